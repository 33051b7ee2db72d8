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
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from tqdm.auto import tqdm

from ..data import EVAL_DATASETS, available_datasets, load_eval_dataset
from ..metrics import pass_at_k
from ..models import load_tokenizer, tokenizer_source
from ..rewards import open_thought_prefix
from .arguments import EvalArguments
from .generation import TransformersGenerator, VLLMGenerator, encode_prompt, is_conversational_prompt, resolve_backend
from .loading import check_local_checkpoint, load_model_and_tokenizer, resolve_model_and_adapter
from .results import write_json, write_jsonl
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


def _expand_benchmarks(names: Sequence[str]) -> list[str]:
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

    benchmarks = _expand_benchmarks(args.benchmarks)
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
    elif tokenizer is None:
        raise ValueError("pass the tokenizer together with a custom generator")

    results: dict[str, dict[str, Any]] = {}
    for name in benchmarks:
        dataset = load_eval_dataset(name, num_problems=args.num_problems, seed=args.seed)
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
            chat_template_kwargs=args.chat_template_kwargs,
        )
        write_jsonl(os.path.join(output_dir, f"{name}.jsonl"), result.records)
        results[name] = result.metrics
        logger.info("%s: %s", name, json.dumps(result.metrics))

    summary = {
        "config": dataclasses.asdict(args),
        "backend": backend,
        "elapsed_s": round(time.perf_counter() - start, 3),
        "results": results,
    }
    write_json(os.path.join(output_dir, "summary.json"), summary)
    summary["output_dir"] = output_dir
    return summary
