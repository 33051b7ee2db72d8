"""Scoring: the checkers of the accuracy rewards, per-problem scoring, benchmark summaries and the results table."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..arithmetic import arithmetic_is_correct, extract_arithmetic_answer
from ..metrics import mean_at_k, problem_pass_at_k
from ..rewards import extract_answer, is_correct, toy_extract_answer, toy_is_correct

logger = logging.getLogger(__name__)


def get_checker(benchmark: str) -> tuple[Callable[[str, str], bool], Callable[[str], str | None]]:
    """
    The `(checker, extractor)` pair that scores `benchmark`: the one of the accuracy reward its training task uses.

    Math benchmarks use `bandpo_trl.rewards.is_correct` / `extract_answer` (math_verify on the `Answer:` line or the
    last `\\boxed{}`: the math accuracy reward); the toy task uses the exact-integer check of `toy_accuracy_reward`,
    the `arithmetic_<level>` datasets the last-number check of `arithmetic_accuracy_reward`.
    """
    if benchmark == "toy_arithmetic":
        return toy_is_correct, toy_extract_answer
    if benchmark.startswith("arithmetic_"):  # the last number of the reply: the arithmetic accuracy reward's checker
        return arithmetic_is_correct, extract_arithmetic_answer
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
