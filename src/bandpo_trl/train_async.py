"""Asynchronous training entry point: BandAsyncGRPO (TRL's experimental `AsyncGRPOTrainer`), configured by a recipe.

A vLLM server generates on GPUs of its own while the training processes train: start the server, then the training
(a second shell, same node):
```bash
CUDA_VISIBLE_DEVICES=0,1,2,3 trl vllm-serve --model Qwen/Qwen2.5-3B-Instruct --tensor_parallel_size 4 \\
    --max_model_len 5120 --gpu_memory_utilization 0.9
CUDA_VISIBLE_DEVICES=4,5,6,7 accelerate launch --config_file recipes/accelerate_configs/fsdp2.yaml --num_processes 4 \\
    -m bandpo_trl.train_async --config recipes/Qwen2.5-3B-Instruct/bandpo/config_kl_async.yaml
```

Arguments are parsed by TRL's `TrlParser` into (`ScriptArguments`, `BandAsyncGRPOConfig`, `AsyncModelArguments`):
the recipe's YAML keys set the defaults and command-line flags override them. Datasets and rewards are named as in
`bandpo_trl.train`. TRL's asynchronous trainer loads the model itself (its own attention for packed samples; `dtype`,
`trust_remote_code` and `model_init_kwargs` are `AsyncGRPOConfig` fields), scores the rewards in a spawned process and
renders conversational prompts with the chat template.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

import torch
from trl import TrlParser

from .arguments import ScriptArguments
from .async_config import BandAsyncGRPOConfig
from .checkpoints import check_run_outputs
from .data import available_datasets, drop_long_prompts, load_train_dataset
from .models import available_models, load_tokenizer
from .rewards import get_reward_funcs, opens_think_block

logger = logging.getLogger(__name__)


@dataclass
class AsyncModelArguments:
    """The policy to train. (TRL's `ModelConfig` repeats `dtype` and `trust_remote_code`, which `AsyncGRPOConfig`
    has, so the asynchronous parser takes only these.)"""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Model id or path; the vLLM server must serve the same model (`trl vllm-serve --model`)."},
    )
    model_revision: str | None = field(default=None, metadata={"help": "Model revision (branch, tag or commit)."})


def check_async_arguments(script_args: ScriptArguments, model_args: AsyncModelArguments) -> None:
    """Refuse, before anything is loaded, what the asynchronous trainer cannot do (each message says what to use)."""
    if not model_args.model_name_or_path:
        raise ValueError("model_name_or_path is required: the model the vLLM server serves")
    if model_args.model_name_or_path in available_models():
        raise ValueError(
            f"model_name_or_path={model_args.model_name_or_path} names a model built locally for a run, which no vLLM "
            "server serves; the asynchronous trainer needs one. Train it with `python -m bandpo_trl.train` instead."
        )
    if script_args.eval_every_steps > 0:
        raise ValueError(
            f"eval_every_steps={script_args.eval_every_steps}: in-training evaluation is not available with the "
            "asynchronous trainer (its generation runs on the vLLM server). Set eval_every_steps: 0 and evaluate "
            "the saved checkpoints with `bandpo-eval`."
        )
    for name in script_args.dataset_names:
        if name not in available_datasets():
            raise ValueError(f"Unknown dataset {name!r}. Known datasets: {', '.join(available_datasets())}")


def train(script_args: ScriptArguments, training_args: BandAsyncGRPOConfig, model_args: AsyncModelArguments):
    """Build the data, rewards and trainer from the parsed arguments, train, save; return the trainer."""
    from .async_trainer import BandAsyncGRPOTrainer

    check_async_arguments(script_args, model_args)
    if script_args.torch_num_threads:
        torch.set_num_threads(script_args.torch_num_threads)
    reward_funcs = get_reward_funcs(script_args.reward_funcs)
    # Never harm an earlier run in output_dir; resume only from a checkpoint that loads, with the same clip settings.
    resume_from = check_run_outputs(training_args, script_args.overwrite_output_dir, script_args.allow_clip_change)
    tokenizer = load_tokenizer(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    if opens_think_block(tokenizer):
        raise ValueError(
            f"{model_args.model_name_or_path}'s chat template opens a <think> block in the prompt, so its rewards "
            "must be wrapped to see where the thought ends, and TRL's asynchronous trainer scores rewards in a "
            "spawned process, which such a wrapper cannot reach. Train this model with `bandpo_trl.train`."
        )
    if model_args.model_revision is not None:
        training_args.model_init_kwargs = {
            "revision": model_args.model_revision,
            **(training_args.model_init_kwargs or {}),
        }

    train_dataset = drop_long_prompts(
        load_train_dataset(script_args, training_args.seed), tokenizer, script_args.max_prompt_length
    )
    if not len(train_dataset):
        raise ValueError(f"No training prompts in {script_args.dataset_names}: nothing to train on.")
    if isinstance(train_dataset[0]["prompt"], str):
        raise ValueError(
            f"The prompts of {script_args.dataset_names} are plain text, but TRL's asynchronous rollout worker "
            "renders conversations with the chat template. Use conversational datasets (e.g. dapo_math_17k, "
            "math_l3_5, gsm8k)."
        )

    trainer = BandAsyncGRPOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    trainer.train(resume_from_checkpoint=resume_from)
    if trainer.state.global_step == 0:
        # Nothing was trained: saving the untouched model as this run's output would report a success.
        raise RuntimeError(
            f"Training ran 0 optimizer steps (max_steps={training_args.max_steps}, num_train_epochs="
            f"{training_args.num_train_epochs}, {len(train_dataset)} prompts); nothing was saved."
        )
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    if trainer.accelerator.is_main_process:
        trainer.accelerator.print(
            f"Model, tokenizer and logs (trainer_state.json) saved to {os.path.abspath(training_args.output_dir)}"
        )
    return trainer


def make_parser() -> TrlParser:
    """The recipe parser: (`ScriptArguments`, `BandAsyncGRPOConfig`, `AsyncModelArguments`)."""
    return TrlParser((ScriptArguments, BandAsyncGRPOConfig, AsyncModelArguments))


def main(argv: list[str] | None = None) -> int:
    """`python -m bandpo_trl.train_async`: parse `--config recipe.yaml` plus overrides and train. Returns 0 (every
    failure raises)."""
    script_args, training_args, model_args = make_parser().parse_args_and_config(args=argv)
    train(script_args, training_args, model_args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
