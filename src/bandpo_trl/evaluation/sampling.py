"""[`SamplingSettings`]: how evaluation samples completions, one object for every generator."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingSettings:
    r"""
    How completions are sampled: the settings every generator ([`TransformersGenerator`], [`VLLMGenerator`],
    [`VLLMClientGenerator`]) applies the same way, whatever the model's own `generation_config.json` says. The
    defaults are the paper's evaluation: temperature 1.0, top-p 1.0, no top-k, up to 4096 new tokens.

    `bandpo-eval` builds them from its flags ([`EvalArguments.sampling`]); [`BenchmarkEvalCallback`] takes them as
    `sampling=` (`bandpo-train` passes its training sampling: `temperature`, `top_p`, `max_completion_length`, `seed`).

    Temperature 0 means greedy decoding ([`greedy`]): every step takes the most likely token, so the top-p and top-k
    filters change nothing and [`effective`] sets them to their neutral values.

    Args:
        temperature (`float`): sampling temperature, >= 0; 0 is greedy decoding.
        top_p (`float`): nucleus sampling, in (0, 1]; 1.0 disables it.
        top_k (`int`): top-k sampling, >= 0; 0 disables it.
        max_new_tokens (`int`): completion length cap in tokens; longer completions are cut (not `finished`).
        seed (`int`): seed of the sampling. vLLM takes it as the engine's seed (a new engine) or as every request's
            seed (an engine or server shared with training); `transformers` samples from torch's global generator,
            which `run_evaluation` (per benchmark) and the callback (per evaluation) seed with it.

    Example:
    ```python
    from bandpo_trl.evaluation import SamplingSettings, TransformersGenerator

    generator = TransformersGenerator(model, tokenizer, SamplingSettings(max_new_tokens=64), batch_size=32)
    SamplingSettings(temperature=0).greedy  # True
    ```
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 4096
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"`temperature` must be >= 0 (0 is greedy decoding), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"`top_p` must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"`top_k` must be >= 0 (0 disables it), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be >= 1, got {self.max_new_tokens}")
        # One type per field, whatever a YAML file or a caller passed (e.g. an int temperature).
        for name, kind in (("temperature", float), ("top_p", float), ("top_k", int), ("max_new_tokens", int)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        object.__setattr__(self, "seed", int(self.seed))

    @property
    def greedy(self) -> bool:
        """Whether these settings decode greedily: temperature 0."""
        return self.temperature == 0

    def effective(self) -> SamplingSettings:
        """The settings as a generator applies them: for greedy decoding, temperature 0.0 and neutral top-p (1.0) and
        top-k (0), which cannot change the most likely token; otherwise these settings unchanged."""
        if self.greedy:
            return dataclasses.replace(self, temperature=0.0, top_p=1.0, top_k=0)
        return self
