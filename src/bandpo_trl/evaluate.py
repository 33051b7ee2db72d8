"""Benchmark evaluation as the BandPO paper reports it: k samples per problem, mean@k and pass@k.

The paper samples 32 completions per problem at temperature 1.0 (top-p 1.0) on AIME 2024, AIME 2025 and AMC 2023 and
reports mean@32 (average accuracy) and pass@32. This module does the same for any checkpoint:

```bash
bandpo-eval --model outputs/qwen-bandpo --benchmarks aime24 aime25 amc23 --k 32 --max_new_tokens 4096
python -m bandpo_trl.evaluate --model Qwen/Qwen2.5-3B-Instruct --adapter outputs/qwen-lora --benchmarks math500
```

Generation goes through vLLM when it is installed and a GPU is present (`--backend auto`), otherwise through batched
`transformers` sampling; scoring is the same either way: the checker of the math accuracy reward
(`bandpo_trl.rewards.is_correct`). Results go to `<output_dir>/<benchmark>.jsonl` (one line per problem: id, gold,
extracted answers, correctness, completions) and `<output_dir>/summary.json`; a Markdown table is printed at the end.

During training, [`BenchmarkEvalCallback`] runs the same evaluation every N optimizer steps and logs
`eval/<benchmark>/mean@k` and `eval/<benchmark>/pass@k`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, TrainerCallback

from .metrics import mean_at_k, pass_at_k, problem_pass_at_k

logger = logging.getLogger("bandpo_trl.evaluate")  # also when run as `python -m`

__all__ = [
    "BenchmarkEvalCallback",
    "BenchmarkResult",
    "Completion",
    "EvalArguments",
    "TransformersGenerator",
    "VLLMGenerator",
    "encode_prompt",
    "evaluate_benchmark",
    "format_results_table",
    "get_checker",
    "load_model_and_tokenizer",
    "main",
    "mean_at_k",
    "pass_at_k",
    "problem_pass_at_k",
    "resolve_backend",
    "resolve_model_and_adapter",
    "run_evaluation",
    "sampling_generation_config",
    "score_completions",
    "summarize_benchmark",
]

PAPER_BENCHMARKS = ("aime24", "aime25", "amc23")
BACKENDS = ("auto", "vllm", "transformers")
# The split each benchmark is evaluated on, when it is not the dataset's default. The toy task draws from a stream of
# problems independent of the training one.
EVAL_SPLITS = {"toy_arithmetic": "test"}


# --------------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class EvalArguments:
    r"""
    Arguments of `bandpo-eval` / `python -m bandpo_trl.evaluate`. Every field is a command-line flag (`--k 32`), and
    `--config file.yaml` reads them from a YAML file (command-line flags override it).

    Example:
    ```python
    from bandpo_trl.evaluate import EvalArguments, run_evaluation

    summary = run_evaluation(EvalArguments(model="outputs/qwen-bandpo", benchmarks=["aime24"], k=32))
    print(summary["results"]["aime24"]["mean@32"])
    ```
    """

    model: str = field(
        metadata={"help": "Model to evaluate: a local checkpoint directory or a Hugging Face Hub id."},
    )
    adapter: str | None = field(
        default=None,
        metadata={
            "help": "Optional LoRA adapter (directory or Hub id) trained on top of `model`; it is merged into the "
            "model before generation. The tokenizer is read from the adapter directory when it holds one."
        },
    )
    benchmarks: list[str] = field(
        default_factory=lambda: list(PAPER_BENCHMARKS),
        metadata={
            "help": "Benchmarks to evaluate, by dataset name (e.g. aime24 aime25 amc23 math500 toy_arithmetic; "
            "commas also separate names). 'all' means every evaluation set of `bandpo_trl.data.EVAL_DATASETS`. "
            "Defaults to the paper's AIME 2024, AIME 2025 and AMC 2023."
        },
    )
    k: int = field(
        default=32,
        metadata={"help": "Samples per problem: the k of mean@k and pass@k (the paper uses 32)."},
    )
    pass_k: list[int] | None = field(
        default=None,
        metadata={
            "help": "Values of k to report pass@k for, each <= `k` (the unbiased estimator is exact for any k <= n). "
            "Defaults to `k` alone."
        },
    )
    temperature: float = field(
        default=1.0,
        metadata={"help": "Sampling temperature (the paper's 1.0). 0 means greedy decoding."},
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling top-p (the paper's 1.0)."})
    top_k: int = field(
        default=0,
        metadata={
            "help": "Top-k sampling; 0 disables it. The model's own generation_config.json sampling settings "
            "(top_k, top_p, temperature, repetition_penalty, ...) are always overridden by these flags."
        },
    )
    max_new_tokens: int = field(
        default=4096,
        metadata={"help": "Maximum completion length in tokens (the paper's 4096). Longer completions are cut."},
    )
    batch_size: int = field(
        default=64,
        metadata={
            "help": "Sequences generated at once by the transformers backend (prompts x samples; with batch_size "
            ">= k, batch_size // k prompts per call, otherwise several calls per prompt). vLLM schedules itself. "
            "The samples are reproducible for a given seed and batch size."
        },
    )
    seed: int = field(default=0, metadata={"help": "Random seed of the sampling (and of problem subsampling)."})
    num_problems: int | None = field(
        default=None,
        metadata={"help": "Evaluate at most this many problems per benchmark (for quick runs). Default: all."},
    )
    output_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where to write <benchmark>.jsonl and summary.json. Default: '<adapter or model dir>/eval' "
            "for a local checkpoint, 'eval_results/<model id>' for a Hub id."
        },
    )
    backend: str = field(
        default="auto",
        metadata={
            "help": "Generation backend: 'vllm', 'transformers', or 'auto' (vLLM when it is installed and CUDA is "
            "available, transformers otherwise).",
            "choices": list(BACKENDS),
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Weights dtype: 'auto' (the checkpoint's), 'bfloat16', 'float16' or 'float32'.",
            "choices": ["auto", "bfloat16", "float16", "float32"],
        },
    )
    device: str | None = field(
        default=None,
        metadata={"help": "Device of the transformers backend (e.g. 'cuda:0', 'cpu'). Default: CUDA if available."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom model code from the Hub (passed to from_pretrained)."}
    )
    torch_num_threads: int | None = field(
        default=None,
        metadata={
            "help": "CPU threads torch may use (torch.set_num_threads); 1 is fastest for tiny models on a busy "
            "machine. Default: torch's."
        },
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.9, metadata={"help": "vLLM backend: fraction of GPU memory vLLM may use."}
    )
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM backend: tensor-parallel GPUs."})
    vllm_max_model_len: int | None = field(
        default=None,
        metadata={"help": "vLLM backend: maximum sequence length (prompt + completion). Default: the model's."},
    )
    save_completions: bool = field(
        default=True,
        metadata={"help": "Store the completion texts in <benchmark>.jsonl (besides the extracted answers)."},
    )
    show_progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def __post_init__(self):
        if isinstance(self.benchmarks, str):
            self.benchmarks = [self.benchmarks]
        self.benchmarks = [name.strip() for item in self.benchmarks for name in str(item).split(",") if name.strip()]
        if not self.benchmarks:
            raise ValueError("`benchmarks` is empty")
        if self.k < 1:
            raise ValueError(f"`k` must be >= 1, got {self.k}")
        if self.pass_k is None:
            self.pass_k = [self.k]
        self.pass_k = sorted({int(j) for j in self.pass_k})
        for j in self.pass_k:
            if not 1 <= j <= self.k:
                raise ValueError(f"every `pass_k` value must be in [1, k={self.k}] (pass@k needs k <= n), got {j}")
        if self.temperature < 0:
            raise ValueError(f"`temperature` must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"`top_p` must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"`top_k` must be >= 0 (0 disables it), got {self.top_k}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("`max_new_tokens` and `batch_size` must be >= 1")
        if self.num_problems is not None and self.num_problems < 1:
            raise ValueError(f"`num_problems` must be >= 1, got {self.num_problems}")
        if self.backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {BACKENDS}, got {self.backend!r}")
        if self.temperature == 0 and self.k > 1:
            logger.warning("temperature=0 is greedy decoding: the %d samples of a problem are identical.", self.k)


# --------------------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------------------


def toy_is_correct(text: str, gold: str) -> bool:
    """The toy task's checker (that of `toy_accuracy_reward`): the stripped completion is exactly the gold integer."""
    from .rewards import toy_accuracy_reward

    return toy_accuracy_reward([text], answer=[gold])[0] == 1.0


def toy_extract_answer(text: str) -> str | None:
    """The toy task's answer: the stripped completion when it is an integer, else None."""
    text = text.strip()
    return text if re.fullmatch(r"-?\d+", text) else None


def get_checker(benchmark: str) -> tuple[Callable[[str, str], bool], Callable[[str], str | None]]:
    """
    The `(checker, extractor)` pair that scores `benchmark`: the one of the accuracy reward its training task uses.

    Math benchmarks use `bandpo_trl.rewards.is_correct` / `extract_answer` (math_verify on the `Answer:` line or the
    last `\\boxed{}`: the math accuracy reward); the toy task uses the exact-integer check of `toy_accuracy_reward`.
    """
    if benchmark == "toy_arithmetic":
        return toy_is_correct, toy_extract_answer
    from .rewards import extract_answer, is_correct

    return is_correct, extract_answer


def score_completions(
    completions: Sequence[str],
    gold: str,
    checker: Callable[[str, str], bool] | None = None,
    extractor: Callable[[str], str | None] | None = None,
) -> tuple[list[str | None], list[bool]]:
    r"""
    Score the sampled completions of one problem with the math accuracy reward's checker.

    Args:
        completions (`Sequence[str]`): the completion texts.
        gold (`str`): the reference answer.
        checker (`Callable[[str, str], bool]`, *optional*): `checker(completion, gold) -> bool`. Defaults to
            `bandpo_trl.rewards.is_correct` (math_verify), the checker of the accuracy reward used in training.
        extractor (`Callable[[str], str | None]`, *optional*): answer extraction, for the record only. Defaults to
            `bandpo_trl.rewards.extract_answer`.

    Returns:
        `tuple[list[str | None], list[bool]]`: the extracted answer (None if none was found) and the correctness of
        each completion.

    Example:
    ```python
    answers, correct = score_completions(["... Answer: 42", "... Answer: 41"], gold="42")
    # correct == [True, False]
    ```
    """
    if checker is None or extractor is None:
        from .rewards import extract_answer, is_correct

        checker = checker or is_correct
        extractor = extractor or extract_answer
    answers, correct = [], []
    for text in completions:
        try:
            answers.append(extractor(text))
        except Exception:  # the record must not fail because of an odd completion
            answers.append(None)
        try:
            correct.append(bool(checker(text, gold)))
        except Exception as error:
            logger.debug("checker failed on a completion (%s); counted as wrong", error)
            correct.append(False)
    return answers, correct


# --------------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Completion:
    """One sampled completion: its text (special tokens removed), its length in tokens, and whether it ended on its
    own (an end-of-sequence token) rather than at `max_new_tokens`."""

    text: str
    num_tokens: int
    finished: bool


def is_conversational_prompt(prompt: Any) -> bool:
    """Whether `prompt` is a list of `{"role", "content"}` messages (else it is used as plain text)."""
    return (
        isinstance(prompt, (list, tuple)) and len(prompt) > 0 and isinstance(prompt[0], dict) and "role" in prompt[0]
    )


def encode_prompt(tokenizer, prompt: str | Sequence[dict[str, str]]) -> list[int]:
    """
    Token ids of a prompt, exactly as TRL's `GRPOTrainer` builds them for generation.

    A conversational prompt (list of messages) goes through the chat template with `add_generation_prompt=True`; a
    plain string is tokenized as-is (with the tokenizer's usual special tokens).

    Example:
    ```python
    ids = encode_prompt(tokenizer, [{"role": "user", "content": "What is 2+2?"}])
    ids = encode_prompt(tokenizer, "2+2=")
    ```
    """
    if is_conversational_prompt(prompt):
        ids = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True, return_dict=True)
        ids = ids["input_ids"]
    elif isinstance(prompt, str):
        ids = tokenizer(text=prompt)["input_ids"]
    else:
        raise TypeError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):  # a batch of one
        ids = ids[0]
    return [int(i) for i in ids]


def _eos_token_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, getattr(tokenizer, "eos_token_id", None)):
        if value is None:
            continue
        for token_id in value if isinstance(value, (list, tuple)) else [value]:
            if int(token_id) not in ids:
                ids.append(int(token_id))
    return ids


def sampling_generation_config(
    model,
    tokenizer,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 4096,
) -> GenerationConfig:
    """
    The `GenerationConfig` of evaluation sampling: plain temperature / top-p / top-k sampling.

    The model's `generation_config.json` often carries its own sampling defaults (e.g. `top_k=20, top_p=0.8,
    repetition_penalty=1.05`), and `transformers` fills every unset field from it, plus a global `top_k=50`. Every
    sampling knob is therefore set explicitly to the requested or the neutral value, so that `transformers` samples from
    the same distribution as vLLM with the same `SamplingParams`. End-of-sequence ids are the model's and the
    tokenizer's.
    """
    eos = _eos_token_ids(model, tokenizer)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if eos else 0
    greedy = temperature == 0
    return GenerationConfig(
        do_sample=not greedy,
        temperature=1.0 if greedy else float(temperature),
        top_p=1.0 if greedy else float(top_p),
        top_k=0 if greedy else int(top_k),
        min_p=0.0,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        num_beams=1,
        num_return_sequences=1,
        max_new_tokens=int(max_new_tokens),
        eos_token_id=eos or None,
        pad_token_id=int(pad),
        use_cache=True,
    )


class TransformersGenerator:
    r"""
    Batched sampling with `transformers`: left-padded prompts, `num_return_sequences` samples per prompt.

    Args:
        model: a causal LM (a `PreTrainedModel` or a `PeftModel`).
        tokenizer: its tokenizer.
        temperature, top_p, top_k, max_new_tokens: sampling settings (see [`sampling_generation_config`]).
        batch_size (`int`): sequences per `generate` call. With `batch_size >= n`, `batch_size // n` prompts with all
            their `n` samples; otherwise `batch_size` samples of one prompt per call.
        synced_gpus (`bool`): pass `synced_gpus=True` to `generate` (needed when the model is sharded across processes,
            e.g. DeepSpeed ZeRO-3, and the processes finish at different times).
        show_progress (`bool`): show a tqdm bar (in samples).

    Example:
    ```python
    generator = TransformersGenerator(model, tokenizer, temperature=1.0, max_new_tokens=64, batch_size=32)
    samples = generator.generate([encode_prompt(tokenizer, "2+2=")], n=8)  # samples[0]: 8 Completion objects
    ```
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_new_tokens: int = 4096,
        batch_size: int = 64,
        synced_gpus: bool = False,
        show_progress: bool = True,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.synced_gpus = synced_gpus
        self.show_progress = show_progress
        self.generation_config = sampling_generation_config(
            model, tokenizer, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens
        )
        self.eos_token_ids = set(_eos_token_ids(model, tokenizer))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def _generate_batch(self, prompts: list[list[int]], n: int) -> list[Completion]:
        pad = self.generation_config.pad_token_id
        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):  # left padding
            if ids:
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, width - len(ids) :] = 1
        config = self.generation_config
        if n != 1:
            config = GenerationConfig.from_dict(config.to_dict())
            config.num_return_sequences = n
        kwargs = {"synced_gpus": True} if self.synced_gpus else {}
        output = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            generation_config=config,
            **kwargs,
        )
        completions = []
        for row in output[:, width:].tolist():  # rows are prompt-major: prompt 0's n samples, then prompt 1's, ...
            end = next((i for i, token in enumerate(row) if token in self.eos_token_ids), None)
            tokens = row if end is None else row[: end + 1]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            completions.append(Completion(text=text, num_tokens=len(tokens), finished=end is not None))
        return completions

    def generate(self, prompts: Sequence[Sequence[int]], n: int, desc: str | None = None) -> list[list[Completion]]:
        """`n` samples for each prompt (token ids), as a list (per prompt) of lists of [`Completion`]."""
        prompts = [list(ids) for ids in prompts]
        per_call = min(n, self.batch_size)
        prompts_per_call = max(1, self.batch_size // per_call)
        results: list[list[Completion]] = [[] for _ in prompts]
        was_training = getattr(self.model, "training", False)
        self.model.eval()
        try:
            with tqdm(total=len(prompts) * n, desc=desc, unit="sample", disable=not self.show_progress) as bar:
                for start in range(0, len(prompts), prompts_per_call):
                    group = prompts[start : start + prompts_per_call]
                    done = 0
                    while done < n:
                        m = min(per_call, n - done)
                        batch = self._generate_batch(group, m)
                        for j in range(len(group)):
                            results[start + j].extend(batch[j * m : (j + 1) * m])
                        done += m
                        bar.update(len(group) * m)
        finally:
            if was_training:
                self.model.train()
        return results


class VLLMGenerator:
    r"""
    Sampling with vLLM (imported lazily: only needed when this backend is used).

    Prompts are passed as token ids, so the chat template is applied exactly once, as in the transformers backend.
    The sampling parameters are passed explicitly, so the model's `generation_config.json` defaults do not apply.

    Example:
    ```python
    generator = VLLMGenerator("Qwen/Qwen2.5-3B-Instruct", temperature=1.0, max_new_tokens=4096, seed=0)
    samples = generator.generate([encode_prompt(tokenizer, messages)], n=32)
    ```
    """

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_new_tokens: int = 4096,
        seed: int = 0,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.9,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        trust_remote_code: bool = False,
        show_progress: bool = True,
    ):
        from vllm import LLM

        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_k = int(top_k)
        self.max_new_tokens = int(max_new_tokens)
        self.show_progress = show_progress
        kwargs = {"max_model_len": max_model_len} if max_model_len else {}
        self.llm = LLM(
            model=model,
            tokenizer=tokenizer or model,
            seed=seed,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            trust_remote_code=trust_remote_code,
            **kwargs,
        )

    def generate(self, prompts: Sequence[Sequence[int]], n: int, desc: str | None = None) -> list[list[Completion]]:
        """`n` samples for each prompt (token ids), as a list (per prompt) of lists of [`Completion`]."""
        from vllm import SamplingParams

        greedy = self.temperature == 0
        params = SamplingParams(
            n=n,
            temperature=0.0 if greedy else self.temperature,
            top_p=1.0 if greedy else self.top_p,
            max_tokens=self.max_new_tokens,
            **({"top_k": self.top_k} if self.top_k > 0 and not greedy else {}),
        )
        if desc and self.show_progress:
            logger.info("Generating %s with vLLM", desc)
        outputs = self.llm.generate(
            [{"prompt_token_ids": list(ids)} for ids in prompts], params, use_tqdm=self.show_progress
        )
        return [
            [
                Completion(text=o.text, num_tokens=len(o.token_ids), finished=o.finish_reason == "stop")
                for o in output.outputs
            ]
            for output in outputs
        ]


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def resolve_backend(backend: str = "auto") -> str:
    """
    The generation backend to use: `"vllm"` or `"transformers"`.

    `"auto"` picks vLLM when it is importable and CUDA is available, transformers otherwise. Asking for `"vllm"`
    without vLLM installed, or without a GPU, raises an error instead of silently falling back.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    has_vllm = importlib.util.find_spec("vllm") is not None
    if backend == "auto":
        return "vllm" if has_vllm and _cuda_available() else "transformers"
    if backend == "vllm":
        if not has_vllm:
            raise ImportError("backend='vllm' needs vLLM: pip install 'bandpo_trl[vllm]'")
        if not _cuda_available():
            raise RuntimeError("backend='vllm' needs a CUDA GPU; use backend='transformers' on CPU")
    return backend


# --------------------------------------------------------------------------------------------------------------------
# Model loading
# --------------------------------------------------------------------------------------------------------------------


def _looks_like_local_path(name: str) -> bool:
    # A Hub id is "name" or "org/name"; anything that exists here, starts like a path or has more parts is local.
    return os.path.exists(name) or name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def check_local_checkpoint(path: str, flag: str, adapter: bool = False) -> None:
    """Fail early, naming `path` and what is missing, when a local model (or adapter) directory cannot be loaded.

    Hub ids (`org/name`) are left to `from_pretrained`. Without this, a missing directory reads as "Repo id must be
    in the form ..." and one without tokenizer files as a sentencepiece error.
    """
    if not _looks_like_local_path(path):
        return
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{flag} {path}: no such directory (expected a saved model directory or a Hub id)")
    if adapter:
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise FileNotFoundError(f"{flag} {path}: no adapter_config.json, so this is not a saved LoRA adapter")
        return
    files = set(os.listdir(path))
    if "config.json" not in files and "adapter_config.json" not in files:
        raise FileNotFoundError(
            f"{flag} {path}: no config.json (nor adapter_config.json), so this is not a saved model; a training "
            "output directory holds one once training has finished (checkpoints in checkpoint-N/)"
        )
    if "config.json" in files and not files & {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"}:
        raise FileNotFoundError(
            f"{flag} {path}: no tokenizer files (tokenizer.json / tokenizer_config.json); save the tokenizer next "
            "to the model (trainer.save_model does) or copy it there"
        )


def _has_tokenizer(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "tokenizer_config.json"))


def load_tokenizer(model: str, adapter: str | None = None, trust_remote_code: bool = False):
    """The tokenizer of `adapter` when its directory holds one (training may change it), else the model's."""
    from transformers import AutoTokenizer

    source = adapter if _has_tokenizer(adapter) else model
    return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)


def resolve_model_and_adapter(model: str, adapter: str | None = None) -> tuple[str, str | None]:
    """
    A `model` directory that holds only a LoRA adapter (`adapter_config.json`, no `config.json`: what a LoRA training
    run saves) stands for its base model (`base_model_name_or_path`) plus that adapter. Anything else is returned as is.

    Example:
    ```python
    resolve_model_and_adapter("outputs/qwen-lora")  # ("Qwen/Qwen2.5-3B-Instruct", "outputs/qwen-lora")
    ```
    """
    adapter_config = os.path.join(model, "adapter_config.json")
    if adapter is None and os.path.isfile(adapter_config) and not os.path.isfile(os.path.join(model, "config.json")):
        with open(adapter_config, encoding="utf-8") as handle:
            base = json.load(handle).get("base_model_name_or_path")
        if base:
            logger.info("%s is a LoRA adapter: evaluating its base model %s with it merged", model, base)
            return base, model
    return model, adapter


def load_model_and_tokenizer(
    model: str,
    adapter: str | None = None,
    *,
    dtype: str = "auto",
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
):
    """
    Load a causal LM and its tokenizer for evaluation, with an optional LoRA adapter merged into the weights.

    Args:
        model (`str`): local directory or Hub id.
        adapter (`str`, *optional*): LoRA adapter directory or Hub id, loaded with `peft.PeftModel.from_pretrained`
            and merged (`merge_and_unload`) so generation runs at the base model's speed.
        dtype (`str`): `"auto"` (the checkpoint's), `"bfloat16"`, `"float16"` or `"float32"`.
        device: where to put the model. Default: CUDA if available, else CPU.

    Returns:
        `(model, tokenizer)`, the model in eval mode.

    Example:
    ```python
    model, tokenizer = load_model_and_tokenizer("Qwen/Qwen2.5-3B-Instruct", adapter="outputs/qwen-lora")
    ```
    """
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(model, adapter, trust_remote_code)
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if adapter:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, adapter).merge_and_unload()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    lm.to(device).eval()
    return lm, tokenizer


def _merge_adapter_to_dir(args: EvalArguments) -> str:
    """Merge the LoRA adapter into the base model and save it to a temporary directory (for vLLM)."""
    model, tokenizer = load_model_and_tokenizer(
        args.model, args.adapter, dtype=args.dtype, device="cpu", trust_remote_code=args.trust_remote_code
    )
    path = tempfile.mkdtemp(prefix="bandpo-eval-merged-")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    return path


# --------------------------------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class BenchmarkResult:
    """The outcome of one benchmark: one record per problem and the summary metrics."""

    name: str
    records: list[dict[str, Any]]
    metrics: dict[str, Any]


def summarize_benchmark(records: Sequence[dict[str, Any]], k: int, pass_k: Iterable[int] | None = None) -> dict:
    """
    Summary metrics of a benchmark from its per-problem records (each with a `correct` list and optionally
    `completion_tokens`, `finished` and `answers`): `mean@k`, `pass@j` for each `j` in `pass_k` (default: `k`),
    counts, the fraction of samples without an extracted answer, mean completion length and truncation rate.
    """
    correct = [record["correct"] for record in records]
    pass_k = sorted(set(pass_k or [k]))
    num_samples = sum(len(row) for row in correct)
    metrics: dict[str, Any] = {
        "num_problems": len(records),
        "samples_per_problem": k,
        "num_samples": num_samples,
        "num_correct": sum(sum(row) for row in correct),
        f"mean@{k}": mean_at_k(correct),
    }
    for j in pass_k:
        metrics[f"pass@{j}"] = problem_pass_at_k(correct, j)
    if all("answers" in record for record in records):
        metrics["no_answer_rate"] = sum(a is None for r in records for a in r["answers"]) / num_samples
    if all("completion_tokens" in record for record in records):
        metrics["mean_completion_tokens"] = sum(t for r in records for t in r["completion_tokens"]) / num_samples
    if all("finished" in record for record in records):
        metrics["truncated_rate"] = sum(not f for r in records for f in r["finished"]) / num_samples
    return metrics


def _prompt_for_record(prompt: Any) -> Any:
    return [dict(message) for message in prompt] if is_conversational_prompt(prompt) else prompt


def evaluate_benchmark(
    name: str,
    dataset,
    generator,
    tokenizer,
    *,
    k: int,
    pass_k: Iterable[int] | None = None,
    checker: Callable[[str, str], bool] | None = None,
    extractor: Callable[[str], str | None] | None = None,
    save_completions: bool = True,
    show_progress: bool = True,
) -> BenchmarkResult:
    """
    Sample `k` completions for every problem of `dataset` (columns `prompt`, `answer` and, optionally, `problem_id`)
    with `generator` (a [`TransformersGenerator`], a [`VLLMGenerator`] or anything with the same `generate(prompt_ids,
    n, desc)` method), score them and summarize. `checker` / `extractor` default to [`get_checker`]`(name)`.
    """
    if checker is None or extractor is None:
        default_checker, default_extractor = get_checker(name)
        checker = checker or default_checker
        extractor = extractor or default_extractor
    if len(dataset) == 0:
        raise ValueError(f"benchmark {name!r} has no problems")
    missing = {"prompt", "answer"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"benchmark {name!r} lacks the column(s) {sorted(missing)}")
    prompts = dataset["prompt"]
    golds = [str(answer) for answer in dataset["answer"]]
    ids = dataset["problem_id"] if "problem_id" in dataset.column_names else list(range(len(dataset)))
    prompt_ids = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    samples = generator.generate(prompt_ids, k, desc=name)
    if len(samples) != len(prompts) or any(len(row) != k for row in samples):
        raise RuntimeError(f"the generator returned the wrong number of samples for {name!r}")
    records = []
    for problem_id, prompt, gold, row in tqdm(
        list(zip(ids, prompts, golds, samples)), desc=f"{name}: scoring", unit="problem", disable=not show_progress
    ):
        texts = [sample.text for sample in row]
        answers, correct = score_completions(texts, gold, checker=checker, extractor=extractor)
        record = {
            "problem_id": str(problem_id),
            "gold": gold,
            "answers": answers,
            "correct": correct,
            "num_correct": sum(correct),
            "num_samples": len(correct),
            f"pass@{k}": pass_at_k(len(correct), sum(correct), k),
            "completion_tokens": [sample.num_tokens for sample in row],
            "finished": [sample.finished for sample in row],
            "prompt": _prompt_for_record(prompt),
        }
        if save_completions:
            record["completions"] = texts
        records.append(record)
    return BenchmarkResult(name=name, records=records, metrics=summarize_benchmark(records, k, pass_k))


def format_results_table(results: dict[str, dict[str, Any]], k: int, pass_k: Iterable[int] | None = None) -> str:
    """
    Markdown table of benchmark summaries (accuracies in percent).

    Example:
    ```python
    print(format_results_table({"aime24": {"num_problems": 30, "num_samples": 960, "mean@32": 0.3, "pass@32": 0.7}}, 32))
    # | benchmark | problems | samples | mean@32 (%) | pass@32 (%) |
    # | --- | ---: | ---: | ---: | ---: |
    # | aime24 | 30 | 960 | 30.00 | 70.00 |
    ```
    """
    pass_k = sorted(set(pass_k or [k]))
    header = ["benchmark", "problems", "samples", f"mean@{k} (%)"] + [f"pass@{j} (%)" for j in pass_k]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for name, metrics in results.items():
        cells = [name, str(metrics["num_problems"]), str(metrics["num_samples"])]
        cells += [f"{100 * metrics[key]:.2f}" for key in [f"mean@{k}"] + [f"pass@{j}" for j in pass_k]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _expand_benchmarks(names: Sequence[str]) -> list[str]:
    from .data import EVAL_DATASETS, available_datasets

    expanded: list[str] = []
    for name in names:
        for item in EVAL_DATASETS if name == "all" else [name]:
            if item not in expanded:
                expanded.append(item)
    known = set(available_datasets())
    unknown = [name for name in expanded if name not in known]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; available: {sorted(known)}")
    return expanded


def _default_output_dir(args: EvalArguments) -> str:
    for path in (args.adapter, args.model):
        if path and os.path.isdir(path):
            return os.path.join(path, "eval")
    return os.path.join("eval_results", re.sub(r"[^A-Za-z0-9._-]+", "__", args.model))


def _write_jsonl(path: str, records: Iterable[dict[str, Any]]) -> None:
    # The output directory is created with the first file written, so a run that fails early leaves none behind.
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def run_evaluation(args: EvalArguments, generator=None, tokenizer=None) -> dict[str, Any]:
    """
    Evaluate `args.model` (plus `args.adapter`) on `args.benchmarks`; write the results; return the summary.

    Args:
        args ([`EvalArguments`]): what to evaluate and how.
        generator, tokenizer (*optional*): an already built generator and tokenizer to use instead of loading
            `args.model` (e.g. to reuse a model in memory).

    Returns:
        `dict`: the content of `summary.json`: `{"config": ..., "backend": ..., "results": {benchmark: metrics}}`.
    """
    from transformers import set_seed

    from .data import load_named_dataset

    benchmarks = _expand_benchmarks(args.benchmarks)
    output_dir = args.output_dir or _default_output_dir(args)
    if generator is None:
        check_local_checkpoint(args.model, "--model")
        model, adapter = resolve_model_and_adapter(args.model, args.adapter)
        if (model, adapter) != (args.model, args.adapter):
            args = dataclasses.replace(args, model=model, adapter=adapter)
        if args.adapter:
            check_local_checkpoint(args.adapter, "--adapter", adapter=True)

    backend = "custom" if generator is not None else resolve_backend(args.backend)
    merged_dir = None
    start = time.perf_counter()
    try:
        if generator is None:
            if backend == "vllm":
                # vLLM serves the merged weights (the adapter merged on CPU into a temporary checkpoint).
                model_path = merged_dir = _merge_adapter_to_dir(args) if args.adapter else None
                model_path = model_path or args.model
                tokenizer_path = merged_dir or args.model
                tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=args.trust_remote_code)
                generator = VLLMGenerator(
                    model_path,
                    tokenizer_path,
                    temperature=args.temperature,
                    top_p=args.top_p,
                    top_k=args.top_k,
                    max_new_tokens=args.max_new_tokens,
                    seed=args.seed,
                    dtype=args.dtype,
                    gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                    tensor_parallel_size=args.vllm_tensor_parallel_size,
                    max_model_len=args.vllm_max_model_len,
                    trust_remote_code=args.trust_remote_code,
                    show_progress=args.show_progress,
                )
            else:
                model, tokenizer = load_model_and_tokenizer(
                    args.model,
                    args.adapter,
                    dtype=args.dtype,
                    device=args.device,
                    trust_remote_code=args.trust_remote_code,
                )
                generator = TransformersGenerator(
                    model,
                    tokenizer,
                    temperature=args.temperature,
                    top_p=args.top_p,
                    top_k=args.top_k,
                    max_new_tokens=args.max_new_tokens,
                    batch_size=args.batch_size,
                    show_progress=args.show_progress,
                )
        elif tokenizer is None:
            raise ValueError("pass the tokenizer together with a custom generator")

        results: dict[str, dict[str, Any]] = {}
        for name in benchmarks:
            dataset = load_named_dataset(
                name, split=EVAL_SPLITS.get(name), num_samples=args.num_problems, seed=args.seed
            )
            set_seed(args.seed)  # each benchmark's samples do not depend on the ones evaluated before it
            result = evaluate_benchmark(
                name,
                dataset,
                generator,
                tokenizer,
                k=args.k,
                pass_k=args.pass_k,
                save_completions=args.save_completions,
                show_progress=args.show_progress,
            )
            _write_jsonl(os.path.join(output_dir, f"{name}.jsonl"), result.records)
            results[name] = result.metrics
            logger.info("%s: %s", name, json.dumps(result.metrics))
    finally:
        if merged_dir:
            shutil.rmtree(merged_dir, ignore_errors=True)

    summary = {
        "config": dataclasses.asdict(args),
        "backend": backend,
        "elapsed_s": round(time.perf_counter() - start, 3),
        "results": results,
    }
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "summary.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    summary["output_dir"] = output_dir
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: `bandpo-eval --model PATH_OR_ID [--adapter LORA] --benchmarks aime24 amc23 --k 32`.

    Writes `<output_dir>/<benchmark>.jsonl` and `<output_dir>/summary.json` and prints a Markdown table."""
    from trl import TrlParser

    parser = TrlParser(dataclass_types=[EvalArguments], prog="bandpo-eval", description=__doc__.split("\n")[0])
    (args,) = parser.parse_args_and_config(args=argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.torch_num_threads:
        torch.set_num_threads(args.torch_num_threads)
    summary = run_evaluation(args)
    print(
        f"\nResults written to {summary['output_dir']} (k={args.k}, temperature={args.temperature}, "
        f"top_p={args.top_p}, backend={summary['backend']}):\n"
    )
    print(format_results_table(summary["results"], args.k, args.pass_k))


# --------------------------------------------------------------------------------------------------------------------
# Evaluation during training
# --------------------------------------------------------------------------------------------------------------------


def _unwrap(model):
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP and friends
        model = model.module
    return model


class BenchmarkEvalCallback(TrainerCallback):
    r"""
    Evaluate the policy on benchmarks every `every_n_steps` optimizer steps and log `eval/<benchmark>/mean@<k>` and
    `eval/<benchmark>/pass@<k>` (the paper validates during training).

    The callback samples with the model being trained (transformers backend, the trainer's `processing_class` as
    tokenizer), inside a forked RNG state so that enabling it does not change the training run's random stream. The
    metrics join the trainer's next log entry (it forces one at the evaluation step), so they reach `state.log_history`,
    the progress bar / printer and every callback that runs after this one. To also reach reporting integrations (
    TensorBoard, W&B, ...), which run before user callbacks, move it to the front of the trainer's callbacks:
    `callback.attach(trainer)`. Under multi-process training every process evaluates a shard of the problems, in
    lockstep (`synced_gpus`), and the results are gathered.

    Args:
        benchmarks (`Sequence[str]`): dataset names (e.g. `["aime24", "amc23"]`).
        every_n_steps (`int`): evaluate when `global_step % every_n_steps == 0`; `<= 0` disables the callback.
        k (`int`): samples per problem.
        max_new_tokens (`int`): completion length cap.
        num_problems (`int`, *optional*): problems per benchmark (a fixed subset, the same at every evaluation).
        temperature, top_p, top_k: sampling settings.
        batch_size (`int`): sequences per `generate` call.
        seed (`int`): sampling seed (the same at every evaluation, so curves compare like with like).
        pass_k (`Sequence[int]`, *optional*): k values of pass@k to log (default: `k`).
        output_dir (`str`, *optional*): where to write per-step results
            (`<output_dir>/step-<N>/<benchmark>.jsonl`). Default: `<trainer output_dir>/benchmark_eval`.
        save_results (`bool`): write those files at all.
        datasets (`dict[str, Dataset]`, *optional*): datasets to use instead of `load_named_dataset(name)`.
        show_progress (`bool`, *optional*): show a sampling progress bar on the main process. Default: follow the
            trainer's `disable_tqdm` (and show it when `evaluate` is called directly).

    Example:
    ```python
    from bandpo_trl.evaluate import BenchmarkEvalCallback

    callback = BenchmarkEvalCallback(benchmarks=["aime24", "amc23"], every_n_steps=50, k=8, max_new_tokens=2048)
    trainer = BandGRPOTrainer(..., callbacks=[callback])
    ```
    """

    def __init__(
        self,
        benchmarks: Sequence[str],
        every_n_steps: int,
        *,
        k: int = 4,
        max_new_tokens: int = 512,
        num_problems: int | None = 32,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        batch_size: int = 64,
        seed: int = 0,
        pass_k: Sequence[int] | None = None,
        output_dir: str | None = None,
        save_results: bool = True,
        datasets: dict[str, Any] | None = None,
        show_progress: bool | None = None,
    ):
        if isinstance(benchmarks, str):
            benchmarks = [benchmarks]
        self.benchmarks = [name.strip() for item in benchmarks for name in item.split(",") if name.strip()]
        self.every_n_steps = int(every_n_steps)
        self.k = int(k)
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.pass_k = sorted(set(pass_k or [self.k]))
        for j in self.pass_k:
            if not 1 <= j <= self.k:
                raise ValueError(f"every pass_k value must be in [1, k={self.k}], got {j}")
        self.max_new_tokens = max_new_tokens
        self.num_problems = num_problems
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.batch_size = batch_size
        self.seed = seed
        self.output_dir = output_dir
        self.save_results = save_results
        self._datasets = dict(datasets or {})
        self.show_progress = show_progress
        self._pending: dict[str, float] = {}
        self._last_step = -1
        self.history: list[dict[str, Any]] = []  # (step, metrics) of every evaluation, for programmatic use

    def attach(self, trainer) -> BenchmarkEvalCallback:
        """Put this callback first in `trainer`'s callbacks, so that reporting integrations see its metrics."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        return self

    def _dataset(self, name: str):
        if name not in self._datasets:
            from .data import load_named_dataset

            self._datasets[name] = load_named_dataset(
                name, split=EVAL_SPLITS.get(name), num_samples=self.num_problems, seed=self.seed
            )
        dataset = self._datasets[name]
        if self.num_problems is not None and len(dataset) > self.num_problems:
            dataset = dataset.select(range(self.num_problems))
        return dataset

    def evaluate(
        self,
        model,
        tokenizer,
        step: int | None = None,
        output_dir: str | None = None,
        show_progress: bool | None = None,
    ) -> dict[str, float]:
        """Run the evaluation now with `model` and `tokenizer`; return the flat `eval/...` metrics."""
        if show_progress is None:
            show_progress = True if self.show_progress is None else self.show_progress
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        world = torch.distributed.get_world_size() if distributed else 1
        rank = torch.distributed.get_rank() if distributed else 0
        model = _unwrap(model)
        generator = TransformersGenerator(
            model,
            tokenizer,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            synced_gpus=world > 1,
            show_progress=show_progress and rank == 0,
        )
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        metrics: dict[str, float] = {}
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed + rank)
            for name in self.benchmarks:
                dataset = self._dataset(name)
                n = len(dataset)
                # Every process takes the same number of problems (the last one repeated as filler), so that the
                # processes generate in lockstep; the filler results are dropped after gathering.
                per_rank = math.ceil(n / world)
                indices = [min(i, n - 1) for i in range(rank * per_rank, (rank + 1) * per_rank)]
                shard = dataset.select(indices)
                result = evaluate_benchmark(
                    name,
                    shard,
                    generator,
                    tokenizer,
                    k=self.k,
                    pass_k=self.pass_k,
                    show_progress=False,
                )
                records = [(i, r) for i, r in zip(range(rank * per_rank, (rank + 1) * per_rank), result.records)]
                if world > 1:
                    gathered: list[Any] = [None] * world
                    torch.distributed.all_gather_object(gathered, records)
                    records = [pair for part in gathered for pair in part]
                records = [r for i, r in sorted(records, key=lambda pair: pair[0]) if i < n]
                summary = summarize_benchmark(records, self.k, self.pass_k)
                metrics[f"eval/{name}/mean@{self.k}"] = summary[f"mean@{self.k}"]
                for j in self.pass_k:
                    metrics[f"eval/{name}/pass@{j}"] = summary[f"pass@{j}"]
                if self.save_results and output_dir and rank == 0:
                    os.makedirs(output_dir, exist_ok=True)
                    _write_jsonl(os.path.join(output_dir, f"{name}.jsonl"), records)
        if self.save_results and output_dir and rank == 0:
            with open(os.path.join(output_dir, "summary.json"), "w", encoding="utf-8") as handle:
                json.dump({"step": step, "metrics": metrics}, handle, indent=2)
        self.history.append({"step": step, **metrics})
        return metrics

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        step = state.global_step
        if self.every_n_steps <= 0 or step <= 0 or step % self.every_n_steps or step == self._last_step:
            return control
        if model is None or processing_class is None:
            logger.warning("BenchmarkEvalCallback: the trainer passed no model or processing_class; skipping")
            return control
        self._last_step = step
        root = self.output_dir or os.path.join(args.output_dir, "benchmark_eval")
        out = os.path.join(root, f"step-{step}")
        start = time.perf_counter()
        show_progress = not args.disable_tqdm if self.show_progress is None else self.show_progress
        metrics = self.evaluate(model, processing_class, step=step, output_dir=out, show_progress=show_progress)
        metrics["eval/benchmark_runtime_s"] = round(time.perf_counter() - start, 3)
        self._pending.update(metrics)
        control.should_log = True  # the metrics join the log entry of this step
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._pending or logs is None:
            return control
        logs.update(self._pending)
        # The trainer appended a copy of `logs` to the history before calling the callbacks.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending)
        self._pending = {}
        return control


if __name__ == "__main__":
    main()
