"""One run of study E3 (docs/smollm2.md): a SmolLM2-135M-Instruct recipe, trained to its step budget or a deadline.

The run is `bandpo-train`'s (same parser, recipe, model resolution, data, reward and `BandGRPOTrainer`) plus what the
study needs and `bandpo-train` has no option for:

- the held-out evaluation of `BenchmarkEvalCallback` (mean@k, pass@k, the completions) at step 0 and every
  `eval_every_steps` steps, appended to `<output_dir>/eval.jsonl` as it happens;
- every logged training step appended to `<output_dir>/log.jsonl` as it happens (a run killed at the deadline keeps
  everything it logged);
- `--deadline` (Unix time): training stops after the first optimizer step that ends past it; `<output_dir>/run.json`
  says whether the step budget (`max_steps`) was completed.

    python -m benchmarks.e3_run --config recipes/SmolLM2-135M-Instruct/bandpo/config_kl.yaml \\
        --output_dir outputs/e3/runs/band_kl-s1 --seed 1 --deadline 1767225600
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import get_peft_config, get_quantization_config

from bandpo_trl import BandGRPOTrainer
from bandpo_trl.arguments import make_parser
from bandpo_trl.data import check_enough_prompts, drop_long_prompts, load_train_dataset
from bandpo_trl.evaluation import BenchmarkEvalCallback, SamplingSettings
from bandpo_trl.models import load_tokenizer, model_init_kwargs, resolve_model_name
from bandpo_trl.rewards import get_reward_funcs


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


class StudyRecorder(TrainerCallback):
    """Held-out evaluation at step 0 and every `every` steps, per-step logs, and the deadline."""

    def __init__(self, evaluator: BenchmarkEvalCallback, every: int, output_dir: str, deadline: float):
        self.evaluator, self.every, self.deadline = evaluator, every, deadline
        self.root = Path(output_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.trainer = None
        self.stopped_at_deadline = False

    def evaluate(self, model, tokenizer, step: int) -> None:
        start = time.time()
        metrics = self.evaluator.evaluate(
            model,
            tokenizer,
            step=step,
            output_dir=str(self.root / "benchmark_eval" / f"step-{step}"),
            show_progress=False,
            trainer=self.trainer,
        )
        append_jsonl(
            self.root / "eval.jsonl", {"step": step, "time": start, "seconds": time.time() - start, **metrics}
        )

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        self.evaluate(model, processing_class, 0)

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.global_step % self.every == 0:
            self.evaluate(model, processing_class, state.global_step)
        if time.time() >= self.deadline and state.global_step < state.max_steps:
            self.stopped_at_deadline = True
            control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        append_jsonl(self.root / "log.jsonl", {"step": state.global_step, "time": time.time(), **(logs or {})})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--deadline", type=float, default=math.inf, help="Unix time after which training stops")
    known, rest = parser.parse_known_args(argv)
    started = time.time()
    script_args, training_args, model_args, tiny_args = make_parser().parse_args_and_config(args=rest)
    torch.set_num_threads(script_args.torch_num_threads or 1)
    if not script_args.eval_benchmarks or script_args.eval_every_steps <= 0:
        raise SystemExit("an E3 run needs eval_benchmarks and eval_every_steps > 0 (its recipe sets them)")

    model_args.model_name_or_path = resolve_model_name(model_args.model_name_or_path, training_args, tiny_args)
    tokenizer = load_tokenizer(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    train_dataset = drop_long_prompts(
        load_train_dataset(script_args, training_args.seed), tokenizer, script_args.max_prompt_length
    )
    check_enough_prompts(train_dataset, training_args)
    evaluator = BenchmarkEvalCallback(
        benchmarks=script_args.eval_benchmarks,
        every_n_steps=0,  # driven by StudyRecorder, which also evaluates step 0
        k=script_args.eval_k,
        pass_k=sorted({1, script_args.eval_k}),
        num_problems=script_args.eval_num_problems,
        # As the policy samples in training; the same sampling seed in every run and at every evaluation.
        sampling=SamplingSettings(
            temperature=training_args.temperature,
            top_p=training_args.top_p,
            max_new_tokens=training_args.max_completion_length,
            seed=0,
        ),
        batch_size=script_args.eval_k * (script_args.eval_num_problems or 64),  # one generate call
        show_progress=False,
    )
    recorder = StudyRecorder(evaluator, script_args.eval_every_steps, training_args.output_dir, known.deadline)
    trainer = BandGRPOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=get_reward_funcs(script_args.reward_funcs),
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
        callbacks=[recorder],
    )
    recorder.trainer = evaluator.trainer = trainer
    trainer.train()
    trainer.save_state()  # trainer_state.json: the full log history
    record = {
        "completed": trainer.state.global_step >= training_args.max_steps,
        "global_step": trainer.state.global_step,
        "max_steps": training_args.max_steps,
        "stopped_at_deadline": recorder.stopped_at_deadline,
        "seed": training_args.seed,
        "clip_rule": training_args.clip_rule,
        "wall_s": round(time.time() - started, 1),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    Path(training_args.output_dir, "run.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(sys.argv[1:]))
