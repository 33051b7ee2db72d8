"""Benchmark evaluation as the BandPO paper reports it: k samples per problem, mean@k and pass@k.

The paper samples 32 completions per problem at temperature 1.0 (top-p 1.0) on AIME 2024, AIME 2025 and AMC 2023 and
reports mean@32 (average accuracy) and pass@32. This package does the same for any checkpoint:

```bash
bandpo-eval --model outputs/qwen-bandpo --benchmarks aime24 aime25 amc23 --k 32 --max_new_tokens 4096
python -m bandpo_trl.evaluation --model Qwen/Qwen2.5-3B-Instruct --adapter outputs/qwen-lora --benchmarks math500
```

Generation goes through vLLM when it is installed and a GPU is present (`--backend auto`), otherwise through batched
`transformers` sampling; scoring is the same either way: the checker of the math accuracy reward
(`bandpo_trl.rewards.is_correct`). Results go to `<output_dir>/<benchmark>.jsonl` (one line per problem: id, gold,
extracted answers, correctness, completions) and `<output_dir>/summary.json`; a Markdown table is printed at the end.

During training, [`BenchmarkEvalCallback`] runs the same evaluation every N optimizer steps and logs
`eval/<benchmark>/mean@k` and `eval/<benchmark>/pass@k`.

Both sample with one [`SamplingSettings`] (temperature, top-p, top-k, completion length, seed; temperature 0 is greedy
decoding), whose defaults are the paper's evaluation. `bandpo-eval` builds it from its flags; the callback defaults
to 512-token completions, and `bandpo-train` passes its training sampling.

Modules, one job each:

- `sampling`: [`SamplingSettings`];
- `arguments`: [`EvalArguments`] (the flags of `bandpo-eval`);
- `scoring`: the checkers, [`score_completions`], [`summarize_benchmark`], [`format_results_table`];
- `generation`: [`encode_prompt`], [`TransformersGenerator`], [`VLLMGenerator`], [`VLLMClientGenerator`],
  [`resolve_backend`];
- `loading`: model / adapter loading and the checks of local checkpoint directories (the tokenizer:
  `bandpo_trl.models.load_tokenizer`, as in training);
- `results`: the result files ([`write_jsonl`], [`write_json`]);
- `runner`: [`evaluate_benchmark`], [`run_evaluation`];
- `cli`: [`main`], the `bandpo-eval` command;
- `callback`: [`BenchmarkEvalCallback`], the same evaluation during training.
"""

from ..data import EVAL_SPLITS
from ..metrics import mean_at_k, pass_at_k, problem_pass_at_k
from ..models import load_tokenizer, tokenizer_source
from .arguments import PAPER_BENCHMARKS, EvalArguments
from .callback import BenchmarkEvalCallback
from .cli import main
from .generation import (
    BACKENDS,
    Completion,
    TransformersGenerator,
    VLLMClientGenerator,
    VLLMGenerator,
    encode_prompt,
    is_conversational_prompt,
    parse_chat_template_kwargs,
    resolve_backend,
    sampling_generation_config,
    vllm_max_lora_rank,
)
from .loading import (
    adapter_base_model,
    check_local_checkpoint,
    load_model_and_tokenizer,
    resolve_model_and_adapter,
)
from .results import write_json, write_jsonl
from .runner import evaluate_benchmark, run_evaluation
from .sampling import SamplingSettings
from .scoring import (
    BenchmarkResult,
    format_results_table,
    get_checker,
    score_completions,
    summarize_benchmark,
    toy_extract_answer,
    toy_is_correct,
)

__all__ = [
    "BACKENDS",
    "EVAL_SPLITS",
    "PAPER_BENCHMARKS",
    "BenchmarkEvalCallback",
    "BenchmarkResult",
    "Completion",
    "EvalArguments",
    "SamplingSettings",
    "TransformersGenerator",
    "VLLMClientGenerator",
    "VLLMGenerator",
    "adapter_base_model",
    "check_local_checkpoint",
    "encode_prompt",
    "evaluate_benchmark",
    "format_results_table",
    "get_checker",
    "is_conversational_prompt",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "parse_chat_template_kwargs",
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
    "toy_extract_answer",
    "tokenizer_source",
    "toy_is_correct",
    "vllm_max_lora_rank",
    "write_json",
    "write_jsonl",
]
