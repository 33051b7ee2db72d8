"""[`BenchmarkEvalCallback`]: the benchmark evaluation of `bandpo-eval`, run every N optimizer steps during training."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import extract_model_from_parallel, gather_object
from transformers import TrainerCallback
from trl.models import unwrap_model_for_generation

from ..data import load_eval_dataset
from ..data_files import parse_dataset_paths
from .generation import (
    Completion,
    TransformersGenerator,
    VLLMClientGenerator,
    VLLMGenerator,
    parse_chat_template_kwargs,
)
from .results import write_json, write_jsonl
from .runner import evaluate_benchmark
from .sampling import SamplingSettings
from .scoring import summarize_benchmark

logger = logging.getLogger(__name__)

# The in-training evaluation is a periodic check of the policy, not the final report of `bandpo-eval` (32 samples of
# up to 4096 tokens on every problem): by default fewer samples, a fixed subset of problems and shorter completions.
# `bandpo-train` (`eval_k`, `eval_num_problems`) uses the same defaults, with its own max_completion_length.
IN_TRAINING_K = 4
IN_TRAINING_NUM_PROBLEMS = 32
IN_TRAINING_MAX_NEW_TOKENS = 512


def merge_shards(pairs: Sequence[tuple[int, Any]]) -> list[Any]:
    """The per-problem records of all processes, gathered as `(problem index, record)` pairs, back in problem order.

    `split_between_processes(..., apply_padding=True)` gives every process the same number of problems by repeating
    the last one; each index is kept once (its first record)."""
    merged: dict[int, Any] = {}
    for index, record in pairs:
        merged.setdefault(int(index), record)
    return [merged[index] for index in sorted(merged)]


class _TrainerVLLM:
    """The vLLM engine of a TRL trainer that generates with vLLM (`args.use_vllm`), as `GRPOTrainer` 1.16 holds it:
    `trainer.vllm_generation` (a `trl.generation.vllm_generation.VLLMGeneration`) with `.llm` in colocate mode and
    `.vllm_client` (main process only) in server mode. A trainer exposing `.llm` / `.vllm_client` itself is accepted
    too. Before sampling, the engine gets the current policy weights (`sync_weights`)."""

    def __init__(self, trainer, source, mode: str):
        self.trainer, self.source, self.mode = trainer, source, mode

    @classmethod
    def find(cls, trainer) -> _TrainerVLLM | None:
        args = getattr(trainer, "args", None)
        if trainer is None or not getattr(args, "use_vllm", False):
            return None
        source = getattr(trainer, "vllm_generation", None)
        source = trainer if source is None else source
        mode = getattr(source, "mode", None) or getattr(trainer, "vllm_mode", None) or getattr(args, "vllm_mode", None)
        if mode == "server":  # the client exists on the main process only: the mode alone decides, on every process
            return cls(trainer, source, "server")
        if getattr(source, "llm", None) is not None:
            return cls(trainer, source, "colocate")
        return None

    def sync_weights(self, step: int | None) -> None:
        """Push the current policy weights to vLLM (a collective: every process calls it), unless the trainer already
        did at this step; the trainer then skips its own push until the weights change again."""
        if step is not None and getattr(self.trainer, "_last_loaded_step", None) == step:
            return
        sync = getattr(self.source, "sync_weights", None) or getattr(self.trainer, "_move_model_to_vllm", None)
        if sync is None:
            logger.warning("BenchmarkEvalCallback: the trainer's vLLM engine has no sync_weights; its weights may lag")
            return
        sync()
        if step is not None and hasattr(self.trainer, "_last_loaded_step"):
            self.trainer._last_loaded_step = step

    @contextlib.contextmanager
    def awake(self) -> Iterator[None]:
        """Colocated vLLM with sleep mode: KV cache mapped while sampling, weights and cache released afterwards (as
        the trainer does around its own generation; it re-pushes the weights before the next one)."""
        sleeping = self.mode == "colocate" and getattr(self.source, "enable_sleep_mode", False)
        if sleeping:
            self.source.llm.wake_up(tags=["kv_cache"])
        try:
            yield
        finally:
            if sleeping:
                self.source.llm.sleep(level=2)
                self.source._llm_weights_sleeping = True


class _TensorParallelGroupGenerator:
    """Colocated vLLM with tensor parallelism: the processes of a TP group run one engine together, so they must
    submit the same prompts. Each process's prompts are gathered over its group, generated at once, and each process
    keeps its own slice (what `VLLMGeneration.generate` does)."""

    def __init__(self, generator, group, size: int):
        self.generator, self.group, self.size = generator, group, size

    def generate(self, prompts, n: int, desc: str | None = None) -> list[list[Completion]]:
        parts: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(parts, [list(ids) for ids in prompts], group=self.group)
        samples = self.generator.generate([ids for part in parts for ids in part], n, desc=desc)
        start = sum(len(part) for part in parts[: torch.distributed.get_rank(group=self.group)])
        return samples[start : start + len(prompts)]


class BenchmarkEvalCallback(TrainerCallback):
    r"""
    Evaluate the policy on benchmarks every `every_n_steps` optimizer steps and log `eval/<benchmark>/mean@<k>` and
    `eval/<benchmark>/pass@<k>` (the paper validates during training).

    The callback samples with the policy being trained (the trainer's `processing_class` as tokenizer), inside a
    forked RNG state so that enabling it does not change the training run's random stream. The metrics join the
    trainer's next log entry (it forces one at the evaluation step), so they reach `state.log_history`, the progress
    bar / printer and every callback that runs after this one. To also reach reporting integrations (TensorBoard,
    W&B, ...), which run before user callbacks, move it to the front of the trainer's callbacks:
    `callback.attach(trainer)`.

    Given the trainer (`attach(trainer)` or `trainer=`), it generates as TRL does: with the trainer's vLLM engine when
    the recipe uses vLLM (`args.use_vllm`; colocate or server mode, the current weights pushed first), otherwise with
    `transformers` on the model unwrapped by `trl.models.unwrap_model_for_generation` (under DeepSpeed ZeRO-3 the
    parameters are gathered once for the whole evaluation, as `args.ds3_gather_for_generation` says). The problems are
    split between the processes with accelerate's `split_between_processes` (in server mode the main process sends
    them all to the server), each process scores its share, and the records are gathered with `gather_object`
    (`LogCompletionsCallback`'s pattern); the metrics are computed from the gathered records, the same on every
    process, and the files are written by the main process. Without the trainer, the model passed to the callback
    generates with `transformers`, every process in lockstep (`synced_gpus`) as the parameters may be sharded.

    Args:
        benchmarks (`Sequence[str]`): dataset names (e.g. `["aime24", "amc23"]`).
        every_n_steps (`int`): evaluate when `global_step % every_n_steps == 0`; `<= 0` disables the callback.
        k (`int`): samples per problem (default 4).
        num_problems (`int`, *optional*): problems per benchmark, a fixed subset drawn with `sampling.seed`, the same
            at every evaluation (default 32; `None`: all).
        sampling ([`SamplingSettings`], *optional*): how to sample. Default: `SamplingSettings(max_new_tokens=512)`,
            the paper's sampling with shorter completions. Its `seed` seeds every evaluation alike, so curves compare
            like with like.
        batch_size (`int`): sequences per `generate` call.
        pass_k (`Sequence[int]`, *optional*): k values of pass@k to log (default: `k`).
        output_dir (`str`, *optional*): where to write per-step results
            (`<output_dir>/step-<N>/<benchmark>.jsonl`). Default: `<trainer output_dir>/benchmark_eval`.
        save_results (`bool`): write those files at all.
        datasets (`dict[str, Dataset]`, *optional*): datasets to use instead of `load_named_dataset(name)`.
        dataset_paths (`dict[str, str]` or `list[str]`, *optional*): local copies of benchmarks, `{name: path}` or
            `["name=path", ...]` (as `bandpo-train`'s `dataset_paths`, which it passes), for machines without Hub
            access. Call [`~BenchmarkEvalCallback.load_datasets`] before training to read and check them up front.
        show_progress (`bool`, *optional*): show a sampling progress bar on the main process. Default: follow the
            trainer's `disable_tqdm` (and show it when `evaluate` is called directly).
        chat_template_kwargs (`dict` or JSON `str`, *optional*): extra arguments of the chat template for
            conversational prompts. Default: the trainer's `args.chat_template_kwargs` (TRL's `GRPOConfig` field), so
            that the prompts are encoded exactly as training encodes them.
        trainer (`Trainer`, *optional*): the trainer, for its accelerator and vLLM engine (see above); also set by
            [`~BenchmarkEvalCallback.attach`].

    Example:
    ```python
    from bandpo_trl.evaluation import BenchmarkEvalCallback, SamplingSettings

    callback = BenchmarkEvalCallback(
        benchmarks=["aime24", "amc23"], every_n_steps=50, k=8, sampling=SamplingSettings(max_new_tokens=2048)
    )
    trainer = BandGRPOTrainer(..., callbacks=[callback])
    callback.attach(trainer)  # first in line for the reporting integrations; generation as TRL's (vLLM, ZeRO-3)
    ```
    """

    def __init__(
        self,
        benchmarks: Sequence[str],
        every_n_steps: int,
        *,
        k: int = IN_TRAINING_K,
        num_problems: int | None = IN_TRAINING_NUM_PROBLEMS,
        sampling: SamplingSettings | None = None,
        batch_size: int = 64,
        pass_k: Sequence[int] | None = None,
        output_dir: str | None = None,
        save_results: bool = True,
        datasets: dict[str, Any] | None = None,
        show_progress: bool | None = None,
        chat_template_kwargs: dict[str, Any] | str | None = None,
        trainer=None,
        dataset_paths: dict[str, str] | list[str] | None = None,
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
        self.num_problems = num_problems
        self.sampling = sampling or SamplingSettings(max_new_tokens=IN_TRAINING_MAX_NEW_TOKENS)
        self.batch_size = batch_size
        self.output_dir = output_dir
        self.save_results = save_results
        self._datasets = dict(datasets or {})
        self.dataset_paths = parse_dataset_paths(dataset_paths)
        self.show_progress = show_progress
        self.chat_template_kwargs = (
            None if chat_template_kwargs is None else parse_chat_template_kwargs(chat_template_kwargs)
        )
        self._pending: dict[str, float] = {}
        self._last_step = -1
        self.history: list[dict[str, Any]] = []  # (step, metrics) of every evaluation, for programmatic use
        self.trainer = trainer

    def attach(self, trainer) -> BenchmarkEvalCallback:
        """Put this callback first in `trainer`'s callbacks, so that reporting integrations see its metrics, and
        generate with the trainer's accelerator and vLLM engine."""
        self.trainer = trainer
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        return self

    def load_datasets(self) -> list[Any]:
        """Load (once) and return every benchmark's problems, from `dataset_paths` or the Hub: call it before training
        so that a missing or bad benchmark fails before the model is trained, not at the first evaluation."""
        return [self._dataset(name) for name in self.benchmarks]

    def _dataset(self, name: str):
        if name not in self._datasets:
            self._datasets[name] = load_eval_dataset(
                name, num_problems=self.num_problems, seed=self.sampling.seed, path=self.dataset_paths.get(name)
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
        trainer=None,
    ) -> dict[str, float]:
        """Run the evaluation now with `model` and `tokenizer`; return the flat `eval/...` metrics.

        `chat_template_kwargs` defaults to the callback's own (`{}` when it has none); `trainer` to the attached one.
        When `model` is the trainer's model, the trainer's way of generating is used (its vLLM engine, or its wrapped
        model unwrapped for generation); any other model (e.g. a reloaded checkpoint) generates itself."""
        if show_progress is None:
            show_progress = True if self.show_progress is None else self.show_progress
        if chat_template_kwargs is None:
            chat_template_kwargs = self.chat_template_kwargs
        chat_template_kwargs = parse_chat_template_kwargs(chat_template_kwargs)
        trainer = trainer if trainer is not None else self.trainer
        if trainer is not None and model is not None:
            if not any(model is getattr(trainer, name, None) for name in ("model", "model_wrapped")):
                trainer = None  # another model than the one being trained
        state = PartialState()
        world, rank = state.num_processes, state.process_index
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        metrics: dict[str, float] = {}
        with (
            torch.random.fork_rng(devices=devices),
            self._generator(model, tokenizer, trainer, step, show_progress and rank == 0) as (generator, everyone),
        ):
            torch.manual_seed(self.sampling.seed + rank)
            for name in self.benchmarks:
                dataset = self._dataset(name)
                indices = list(range(len(dataset)))
                if everyone:
                    # The same number of problems on every process (the last one repeated as filler): processes that
                    # generate in lockstep stay in step; the filler is dropped after gathering.
                    with state.split_between_processes(indices, apply_padding=True) as share:
                        share = list(share)
                else:  # the main process generates for all (a vLLM server)
                    share = indices if state.is_main_process else []
                records = []
                if share:
                    result = evaluate_benchmark(
                        name,
                        dataset.select(share),
                        generator,
                        tokenizer,
                        k=self.k,
                        pass_k=self.pass_k,
                        show_progress=False,
                        chat_template_kwargs=chat_template_kwargs,
                    )
                    records = list(zip(share, result.records))
                if world > 1:
                    records = gather_object(records)
                records = merge_shards(records)
                summary = summarize_benchmark(records, self.k, self.pass_k)
                metrics[f"eval/{name}/mean@{self.k}"] = summary[f"mean@{self.k}"]
                for j in self.pass_k:
                    metrics[f"eval/{name}/pass@{j}"] = summary[f"pass@{j}"]
                if self.save_results and output_dir and state.is_main_process:
                    write_jsonl(os.path.join(output_dir, f"{name}.jsonl"), records)
        if self.save_results and output_dir and state.is_main_process:
            write_json(os.path.join(output_dir, "summary.json"), {"step": step, "metrics": metrics})
        self.history.append({"step": step, **metrics})
        return metrics

    @contextlib.contextmanager
    def _generator(self, model, tokenizer, trainer, step, show_progress) -> Iterator[tuple[Any, bool]]:
        """`(generator, everyone)`: what samples, and whether every process generates its share (else the main
        process generates for all)."""
        vllm = _TrainerVLLM.find(trainer)
        if vllm is not None:
            vllm.sync_weights(step)
            if vllm.mode == "server":
                client = getattr(vllm.source, "vllm_client", None)
                generator = None
                if PartialState().is_main_process:
                    if client is None:
                        raise RuntimeError(
                            "BenchmarkEvalCallback: vllm_mode='server' but the trainer has no vLLM client"
                        )
                    eos = getattr(trainer, "eos_token_ids", None)
                    generator = VLLMClientGenerator(client, tokenizer, self.sampling, eos_token_ids=eos)
                yield generator, False
                return
            generator = VLLMGenerator.from_llm(vllm.source.llm, self.sampling, show_progress=False)
            tp_size = int(getattr(vllm.source, "tensor_parallel_size", 1) or 1)
            if tp_size > 1:
                generator = _TensorParallelGroupGenerator(generator, vllm.source.tp_group, tp_size)
            with vllm.awake():
                yield generator, True
            return
        if getattr(getattr(trainer, "args", None), "use_vllm", False):
            logger.warning(
                "BenchmarkEvalCallback: the trainer uses vLLM but has no engine to reach; using transformers"
            )

        world = PartialState().num_processes
        with contextlib.ExitStack() as stack:
            if trainer is not None and getattr(trainer, "accelerator", None) is not None:
                from trl.distributed import DistributedBackend

                args, accelerator = trainer.args, trainer.accelerator
                gather = getattr(args, "ds3_gather_for_generation", True)
                wrapped = getattr(trainer, "model_wrapped", None)
                wrapped = trainer.model if wrapped is None else wrapped
                unwrapped = stack.enter_context(
                    unwrap_model_for_generation(
                        wrapped,
                        accelerator,
                        gather_deepspeed3_params=gather,
                        gradient_checkpointing_kwargs=getattr(args, "gradient_checkpointing_kwargs", None),
                    )
                )
                backend = DistributedBackend(accelerator)
                stack.enter_context(backend.summon_full_params(wrapped, recurse=False))
                # Full parameters on every process (DDP, ZeRO-1/2, ZeRO-3 gathered): each generates on its own.
                synced_gpus = world > 1 and (backend.is_fsdp or (backend.is_zero3 and not gather))
            else:
                unwrapped, synced_gpus = extract_model_from_parallel(model), world > 1
            yield (
                TransformersGenerator(
                    unwrapped,
                    tokenizer,
                    self.sampling,
                    batch_size=self.batch_size,
                    synced_gpus=synced_gpus,
                    show_progress=show_progress,
                ),
                True,
            )

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
            trainer=self.trainer,
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
