"""Benchmark evaluation as the BandPO paper reports it: k samples per problem, mean@k and pass@k.

[`evaluate_benchmark`] samples and scores one benchmark with any generator; [`run_evaluation`] loads a checkpoint,
evaluates it on several benchmarks and writes the results (the `bandpo-eval` command, `cli.main`, runs it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from tqdm.auto import tqdm

from ..data import load_eval_dataset
from ..data_files import parse_dataset_paths
from ..metrics import pass_at_k
from ..models import load_tokenizer, tokenizer_source
from ..rewards import open_thought_prefix
from .arguments import EvalArguments, expand_benchmarks
from .generation import TransformersGenerator, VLLMGenerator, encode_prompt, is_conversational_prompt, resolve_backend
from .loading import check_local_checkpoint, load_model_and_tokenizer, resolve_model_and_adapter
from .results import check_writable_dir, write_json, write_jsonl
from .scoring import BenchmarkResult, get_checker, score_completions, summarize_benchmark

logger = logging.getLogger(__name__)


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
    chat_template_kwargs: dict[str, Any] | None = None,
) -> BenchmarkResult:
    """
    Sample `k` completions for every problem of `dataset` (columns `prompt`, `answer` and, optionally, `problem_id`)
    with `generator` (a [`TransformersGenerator`], a [`VLLMGenerator`] or anything with the same `generate(prompt_ids,
    n, desc)` method), score them and summarize. `checker` / `extractor` default to [`get_checker`]`(name)`; conversational
    prompts are encoded with `chat_template_kwargs` (see [`encode_prompt`]).
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
    prompt_ids = [encode_prompt(tokenizer, prompt, chat_template_kwargs) for prompt in prompts]
    samples = generator.generate(prompt_ids, k, desc=name)
    if len(samples) != len(prompts) or any(len(row) != k for row in samples):
        raise RuntimeError(f"the generator returned the wrong number of samples for {name!r}")
    records = []
    for problem_id, prompt, gold, row in tqdm(
        list(zip(ids, prompts, golds, samples)), desc=f"{name}: scoring", unit="problem", disable=not show_progress
    ):
        texts = [sample.text for sample in row]
        # A template that opens <think> in the generation prompt (DeepSeek-R1-Distill) makes every completion start
        # inside the thought: score it as training's reward does, so a thought cut off at max_new_tokens has no
        # final answer even if it wrote one along the way.
        opener = open_thought_prefix(tokenizer, prompt)
        answers, correct = score_completions([opener + t for t in texts], gold, checker=checker, extractor=extractor)
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


def _default_output_dir(args: EvalArguments) -> str:
    for path in (args.adapter, args.model):
        if path and os.path.isdir(path):
            return os.path.join(path, "eval")
    return os.path.join("eval_results", re.sub(r"[^A-Za-z0-9._-]+", "__", args.model))


class EvaluationFailed(RuntimeError):
    """Some benchmarks of [`run_evaluation`] failed; `summary` is what was written to `summary.json`: the finished
    benchmarks' results and, under `"failed"`, each failed benchmark's error."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


def run_evaluation(args: EvalArguments, generator=None, tokenizer=None) -> dict[str, Any]:
    """
    Evaluate `args.model` (plus `args.adapter`) on `args.benchmarks`; write the results; return the summary.

    Every input is checked before any model is loaded or anything generated: the output directory must be writable,
    the model (and adapter) directories loadable, and every benchmark's problems are loaded (from the Hub, or from
    `args.dataset_paths`). Each benchmark's `<benchmark>.jsonl` and the `summary.json` of the benchmarks finished so
    far are written atomically as soon as it is done; a benchmark that fails is recorded in `summary.json` under
    `"failed"` and the others still run.

    Args:
        args ([`EvalArguments`]): what to evaluate and how.
        generator, tokenizer (*optional*): an already built generator and tokenizer to use instead of loading
            `args.model` (e.g. to reuse a model in memory).

    Returns:
        `dict`: the content of `summary.json`: `{"config": ..., "backend": ..., "results": {benchmark: metrics}}`.

    Raises:
        EvaluationFailed: some benchmark failed; the message names each with its error, and where the results of
            the finished ones are.
    """
    from transformers import set_seed

    benchmarks = expand_benchmarks(args.benchmarks)
    output_dir = args.output_dir or _default_output_dir(args)
    if generator is None:
        from ..smollm2 import resolve_smollm2_name

        args = dataclasses.replace(args, model=resolve_smollm2_name(args.model))  # smollm2-135m-instruct
        check_local_checkpoint(args.model, "--model")
        model, adapter = resolve_model_and_adapter(args.model, args.adapter)
        if (model, adapter) != (args.model, args.adapter):
            args = dataclasses.replace(args, model=model, adapter=adapter)
        if args.adapter:
            check_local_checkpoint(args.adapter, "--adapter", adapter=True)
    elif tokenizer is None:
        raise ValueError("pass the tokenizer together with a custom generator")
    check_writable_dir(output_dir)
    paths = parse_dataset_paths(args.dataset_paths)
    datasets = {
        name: load_eval_dataset(name, num_problems=args.num_problems, seed=args.seed, path=paths.get(name))
        for name in benchmarks
    }

    backend = "custom" if generator is not None else resolve_backend(args.backend)
    start = time.perf_counter()
    if generator is None:
        if backend == "vllm":
            # vLLM loads the base weights and applies the adapter itself (native LoRA): no merged copy is written.
            tokenizer_path = tokenizer_source(args.model, args.adapter)
            tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=args.trust_remote_code)
            generator = VLLMGenerator(
                args.model,
                tokenizer_path,
                args.sampling,
                dtype=args.dtype,
                gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                tensor_parallel_size=args.vllm_tensor_parallel_size,
                max_model_len=args.vllm_max_model_len,
                trust_remote_code=args.trust_remote_code,
                show_progress=args.show_progress,
                adapter=args.adapter,
                max_lora_rank=args.vllm_max_lora_rank,
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
                model, tokenizer, args.sampling, batch_size=args.batch_size, show_progress=args.show_progress
            )

    summary_path = os.path.join(output_dir, "summary.json")
    summary: dict[str, Any] = {"config": dataclasses.asdict(args), "backend": backend, "results": {}}
    failed: dict[str, str] = {}
    for name in benchmarks:
        set_seed(args.seed)  # each benchmark's samples do not depend on the ones evaluated before it
        try:
            result = evaluate_benchmark(
                name,
                datasets[name],
                generator,
                tokenizer,
                k=args.k,
                pass_k=args.pass_k,
                save_completions=args.save_completions,
                show_progress=args.show_progress,
                chat_template_kwargs=args.chat_template_kwargs,
            )
            write_jsonl(os.path.join(output_dir, f"{name}.jsonl"), result.records)
        except Exception as error:  # the other benchmarks still run; the failure is reported at the end
            logger.exception("%s failed", name)
            failed[name] = f"{type(error).__name__}: {error}"
            summary["failed"] = failed
        else:
            summary["results"][name] = result.metrics
            logger.info("%s: %s", name, json.dumps(result.metrics))
        summary["elapsed_s"] = round(time.perf_counter() - start, 3)
        write_json(summary_path, summary)  # after every benchmark: a killed run keeps what finished

    summary["output_dir"] = output_dir
    if failed:
        finished = ", ".join(summary["results"]) or "none"
        raise EvaluationFailed(
            f"{len(failed)} of {len(benchmarks)} benchmarks failed: "
            + "; ".join(f"{name}: {error}" for name, error in failed.items())
            + f". Finished: {finished}; their results are in {summary_path}.",
            summary,
        )
    return summary
