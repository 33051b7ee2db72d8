"""`bandpo-eval` (also `python -m bandpo_trl.evaluation`): evaluate a checkpoint on benchmarks from the command line.

```bash
bandpo-eval --model outputs/qwen-bandpo --benchmarks aime24 aime25 amc23 --k 32 --max_new_tokens 4096
bandpo-eval --config eval.yaml --model Qwen/Qwen2.5-3B-Instruct --adapter outputs/qwen-lora
```
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import torch

from .arguments import EvalArguments
from .runner import EvaluationFailed, run_evaluation
from .scoring import format_results_table

DESCRIPTION = "Benchmark evaluation as the BandPO paper reports it: k samples per problem, mean@k and pass@k."


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: `bandpo-eval --model PATH_OR_ID [--adapter LORA] --benchmarks aime24 amc23 --k 32`.

    The flags are the fields of [`EvalArguments`] (`--config file.yaml` reads them from YAML). Writes
    `<output_dir>/<benchmark>.jsonl` and `<output_dir>/summary.json` and prints a Markdown table; any failure raises,
    so the exit status is non-zero (when some benchmarks failed, the table of the finished ones is printed first)."""
    from trl import TrlParser

    parser = TrlParser(dataclass_types=[EvalArguments], prog="bandpo-eval", description=DESCRIPTION)
    (args,) = parser.parse_args_and_config(args=argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.torch_num_threads:
        torch.set_num_threads(args.torch_num_threads)
    try:
        summary = run_evaluation(args)
    except EvaluationFailed as error:
        if error.summary["results"]:
            print(format_results_table(error.summary["results"], args.k, args.pass_k))
        raise SystemExit(f"bandpo-eval: {error}") from error
    print(
        f"\nResults written to {summary['output_dir']} (k={args.k}, temperature={args.temperature}, "
        f"top_p={args.top_p}, backend={summary['backend']}):\n"
    )
    print(format_results_table(summary["results"], args.k, args.pass_k))


if __name__ == "__main__":
    main()
