"""Benchmark evaluation as the BandPO paper reports it: k samples per problem, mean@k and pass@k.

The paper samples 32 completions per problem at temperature 1.0 (top-p 1.0) on AIME 2024, AIME 2025 and AMC 2023 and
reports mean@32 (average accuracy) and pass@32. This package does the same for any checkpoint:

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

Modules, one job each:

- `arguments`: [`EvalArguments`] (the flags of `bandpo-eval`) and the benchmark constants;
- `scoring`: the checkers, [`score_completions`], [`summarize_benchmark`], [`format_results_table`];
- `generation`: [`encode_prompt`], [`TransformersGenerator`], [`VLLMGenerator`], [`resolve_backend`];
- `loading`: model / tokenizer / adapter loading and the checks of local checkpoint directories;
- `runner`: [`evaluate_benchmark`], [`run_evaluation`] and [`main`] (`bandpo-eval`);
- `callback`: [`BenchmarkEvalCallback`], the same evaluation during training.
"""

from ..metrics import mean_at_k, pass_at_k, problem_pass_at_k
from .arguments import BACKENDS, EVAL_SPLITS, PAPER_BENCHMARKS, EvalArguments, parse_chat_template_kwargs
from .callback import BenchmarkEvalCallback
from .generation import (
    Completion,
    TransformersGenerator,
    VLLMGenerator,
    encode_prompt,
    is_conversational_prompt,
    resolve_backend,
    sampling_generation_config,
    vllm_max_lora_rank,
)
from .loading import (
    adapter_base_model,
    check_local_checkpoint,
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_model_and_adapter,
    tokenizer_source,
)
from .runner import evaluate_benchmark, main, run_evaluation
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
    "TransformersGenerator",
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
]
