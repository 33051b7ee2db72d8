"""[`BenchmarkEvalCallback`]: the benchmark evaluation of `bandpo-eval`, run every N optimizer steps during training."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import torch
from transformers import TrainerCallback

from .arguments import EVAL_SPLITS, parse_chat_template_kwargs
from .generation import TransformersGenerator
from .runner import _write_jsonl, evaluate_benchmark
from .scoring import summarize_benchmark

logger = logging.getLogger(__name__)


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
        chat_template_kwargs (`dict` or JSON `str`, *optional*): extra arguments of the chat template for
            conversational prompts. Default: the trainer's `args.chat_template_kwargs` (TRL's `GRPOConfig` field), so
            that the prompts are encoded exactly as training encodes them.

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
        chat_template_kwargs: dict[str, Any] | str | None = None,
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
        self.chat_template_kwargs = (
            None if chat_template_kwargs is None else parse_chat_template_kwargs(chat_template_kwargs)
        )
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
            from ..data import load_named_dataset

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
        chat_template_kwargs: dict[str, Any] | str | None = None,
    ) -> dict[str, float]:
        """Run the evaluation now with `model` and `tokenizer`; return the flat `eval/...` metrics.

        `chat_template_kwargs` defaults to the callback's own (`{}` when it has none)."""
        if show_progress is None:
            show_progress = True if self.show_progress is None else self.show_progress
        if chat_template_kwargs is None:
            chat_template_kwargs = self.chat_template_kwargs
        chat_template_kwargs = parse_chat_template_kwargs(chat_template_kwargs)
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
                    chat_template_kwargs=chat_template_kwargs,
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
        chat_template_kwargs = self.chat_template_kwargs
        if chat_template_kwargs is None:  # the prompts exactly as the trainer encodes them
            chat_template_kwargs = getattr(args, "chat_template_kwargs", None)
        metrics = self.evaluate(
            model,
            processing_class,
            step=step,
            output_dir=out,
            show_progress=show_progress,
            chat_template_kwargs=chat_template_kwargs,
        )
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
