"""`BandAsyncGRPOTrainer`: TRL's experimental `AsyncGRPOTrainer` with each token's ratio clipped to its own interval.

In asynchronous GRPO a vLLM server generates while the trainer trains, so a sample may be several policy versions
old and its ratios drift further from 1 than in synchronous GRPO: that is where a fixed clip throttles rare tokens
hardest. The seam is the synchronous trainer's. TRL's asynchronous loss (`AsyncGRPOTrainer.compute_loss`) packs the
micro-batch into one row per process, takes the trained tokens' old log-probs from the rollout samples (the sampler's
log-probs) and clips their ratios with ``torch.clamp(coef_1, 1 - self.epsilon_low, 1 + self.epsilon_high)``, counting
clipped tokens with the same comparisons; all of it accepts tensors over the trained tokens. So for one loss call
the trainer sets ``epsilon_low = 1 - lower`` and ``epsilon_high = upper - 1`` per token and lets TRL's code do the
rest: packing, tree attention, the token-mean normalisation, gradient accumulation, the MoE auxiliary loss and TRL's
``ratio``, ``kl`` and ``clip_ratio/*`` metrics all stay TRL's. Tests compare the result with TRL's trainer (bit for
bit with ``clip_rule="clip"``) and with the formula on stale samples.
"""

from __future__ import annotations

import collections
import math

import torch

from .async_config import AsyncGRPOTrainer, validate_async_band_options
from .clip_metrics import token_bounds
from .clip_rules import get_clip_rule
from .clip_trainer import ClipRuleTrainerMixin, bandpo_paper, default_bounds
from .config import band_option

__all__ = ["BandAsyncGRPOTrainer", "staleness_distribution"]

# TRL's asynchronous trainer appends each sample's staleness (policy versions behind, when the trainer takes it from
# the rollout queue) under this key of its metric sink.
TRL_STALENESS_KEY = "sample/staleness_mean"


def staleness_distribution(staleness: list[float], max_staleness: int) -> dict[str, float]:
    """``{"band/staleness/<k>": share of samples k versions behind}`` for ``k = 0 .. max_staleness``; empty for no
    samples. Staleness values outside that range (none, since TRL drops older samples) count in no bucket."""
    counts = collections.Counter(int(s) for s in staleness if not math.isnan(s))
    total = sum(counts.values())
    if not total:
        return {}
    return {f"band/staleness/{k}": counts.get(k, 0) / total for k in range(max_staleness + 1)}


class _KeepLogProbs:
    """The model, called as TRL's loss calls it, keeping the per-token log-probs of the forward it runs (detached):
    the clip metrics need the current policy's log-probs, and this avoids a second forward."""

    def __init__(self, model):
        self._model = model
        self.log_probs: torch.Tensor | None = None

    def __call__(self, *args, **kwargs):
        outputs = self._model(*args, **kwargs)
        self.log_probs = outputs.log_probs.detach()
        return outputs

    def __getattr__(self, name):
        return getattr(self._model, name)


class BandAsyncGRPOTrainer(ClipRuleTrainerMixin, AsyncGRPOTrainer):
    """TRL's experimental [`~trl.experimental.async_grpo.AsyncGRPOTrainer`] whose ratio clip is a per-token rule.

    Drop-in: same constructor as `AsyncGRPOTrainer` (a vLLM server started with `trl vllm-serve`, or a custom
    `rollout_worker` / `weight_transfer`). With a [`BandAsyncGRPOConfig`] the clipping rule is configurable exactly as
    in [`BandGRPOTrainer`] (`clip_rule`, `band_divergence`, `band_delta`, ...: the same registry, defaults and
    checks); a plain `AsyncGRPOConfig` gets the paper's defaults (KL, delta = 0.05, cap 10). `clip_rule="clip"`
    leaves TRL's loss exactly as it is.

    Each token's bounds come from its old log-probability, which here is the vLLM sampler's, for a sample that may be
    up to `max_staleness` policy versions old: the staler the sample, the further its ratios are from 1, and the more
    a fixed clip cuts the rare tokens off while the Band interval lets them move.

    Logged next to TRL's metrics (TRL's `clip_ratio/*` count the tokens clipped at the per-token bounds):
    - every `band/*` metric of [`BandGRPOTrainer`] (`band/lower_mean`, `band/upper_mean`, `band/tokens/<bucket>`,
      `band/clip_low/<bucket>`, `band/clip_high/<bucket>`, `band/invalid_bounds`), over each process's trained tokens;
    - `band/staleness/<k>`, k = 0 .. `max_staleness`: the share of the samples taken from the rollout queue since the
      last log that were k policy versions behind (TRL's `sample/staleness_mean` and `sample/staleness_max` are its
      mean and maximum).

    Example:
    ```python
    from bandpo_trl import BandAsyncGRPOConfig, BandAsyncGRPOTrainer

    trainer = BandAsyncGRPOTrainer(
        model="Qwen/Qwen2.5-3B-Instruct",  # served by `trl vllm-serve --model Qwen/Qwen2.5-3B-Instruct`
        reward_funcs=accuracy_reward,
        args=BandAsyncGRPOConfig(output_dir="out", max_staleness=4),
        train_dataset=dataset,
    )
    trainer.train()
    ```
    """

    # The model card names and cites BandPO, and TRL's asynchronous GRPO.
    _tag_names = [*AsyncGRPOTrainer._tag_names, "bandpo"]
    _paper = bandpo_paper(AsyncGRPOTrainer._paper)
    _clipped_tokens = "trained tokens"

    def __init__(self, model, reward_funcs=None, args=None, *more_args, **kwargs):
        if args is not None:  # before the (slow) model load; a plain AsyncGRPOConfig is checked here too
            self._refuse_unapplied_override(validate_async_band_options(args))
        super().__init__(model, reward_funcs, args, *more_args, **kwargs)
        if args is None:  # TRL built its default AsyncGRPOConfig
            self._set_clip_rule(validate_async_band_options(self.args))
        else:
            self._set_clip_rule(get_clip_rule(band_option(self.args, "clip_rule")))

    @default_bounds
    def compute_clip_bounds(
        self, old_log_probs: torch.Tensor, inputs: dict
    ) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """Ratio bounds ``(lower, upper)`` for each trained token, from its old log-probability.

        By default the registered rule named by `clip_rule` (`self.clip_rule`); override this to try another rule in
        a subclass. ``old_log_probs`` is a (1, M) tensor: the sampler's log-probs (at the sampling temperature) of the
        M trained tokens of this process's micro-batch, all its samples laid end to end as TRL packs them
        (``inputs["segment_id"][inputs["token_index"] >= 0]`` says which sample each token belongs to). A rule must
        therefore be elementwise, as the built-in ones are. Return tensors broadcastable to (1, M), or floats, with
        ``lower <= 1 <= upper``; bounds that exclude 1 raise on the first micro-batch and are counted in
        `band/invalid_bounds` afterwards.
        """
        return self.clip_rule(old_log_probs, self._clip_args)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        trained = inputs["token_index"] >= 0  # TRL's own selection: this process's trained tokens, padding dropped
        old_log_probs = inputs["old_log_probs"][trained].unsqueeze(0)
        lower, upper = self.compute_clip_bounds(old_log_probs, inputs)
        if self.applies_token_bounds:
            lower, upper = token_bounds(lower, old_log_probs), token_bounds(upper, old_log_probs)
            if not self._bounds_checked:
                self._check_bounds_once(old_log_probs, lower, upper, torch.ones_like(old_log_probs))
        forward = _KeepLogProbs(model)
        scalar_epsilons = self.epsilon_low, self.epsilon_high
        if self.applies_token_bounds:
            # TRL clamps the flat (M,) ratios to [1 - epsilon_low, 1 + epsilon_high]: per-token tensors make that the
            # per-token bounds.
            self.epsilon_low, self.epsilon_high = 1 - lower[0], upper[0] - 1
        try:
            loss = super().compute_loss(forward, inputs, return_outputs, num_items_in_batch)
        finally:
            self.epsilon_low, self.epsilon_high = scalar_epsilons
        log_probs = forward.log_probs.flatten()[inputs["token_index"][trained]].unsqueeze(0)
        advantages = inputs["advantages"][trained].unsqueeze(0)
        # TRL's asynchronous loss logs its own metrics under "train"; every trained token counts (mask all ones).
        self._log_clip_sums(
            old_log_probs, log_probs, lower, upper, advantages, torch.ones_like(old_log_probs), self._metrics["train"]
        )
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training:
            sink = self._metrics["train"]
            staleness = sink.get(TRL_STALENESS_KEY)  # filled on the main process, where the rollout queue is read
            for name, share in staleness_distribution(staleness or [], self.args.max_staleness).items():
                sink[name].append(share)
        super().log(logs, start_time)
