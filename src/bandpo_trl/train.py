"""Training entry point: BandGRPO on named datasets and rewards, configured by a recipe.

Usage:
```bash
# The embedded default (tiny local model, toy task, CPU): what `make train` runs.
accelerate launch --config_file recipes/accelerate_configs/cpu.yaml \\
    -m bandpo_trl.train --config recipes/tiny/bandpo/config_kl.yaml

# A paper recipe on 8 GPUs; any field can be overridden on the command line.
accelerate launch --config_file recipes/accelerate_configs/zero2.yaml \\
    -m bandpo_trl.train --config recipes/Qwen2.5-3B-Instruct/bandpo/config_kl.yaml --band_delta 0.1
```

Arguments are parsed by TRL's `TrlParser` into (`ScriptArguments`, `BandGRPOConfig`, `ModelConfig`,
`TinyModelArguments`; see `bandpo_trl.arguments`): the recipe's YAML keys set the defaults and command-line flags
override them. A named model (`model_name_or_path: tiny`, the embedded default) is built locally
(`bandpo_trl.models`). Any model is then handed to the trainer by its id or path with `model_init_kwargs` built from
`ModelConfig` (dtype, attention, revision), as TRL's own GRPO script does, so TRL loads and places it (and the
reference model) under every accelerate/DeepSpeed set-up; `load_in_4bit`/`load_in_8bit` become its
`quantization_config`, and `use_peft: true` its `peft_config`. The data come from `bandpo_trl.data`, the rewards from
`bandpo_trl.rewards`.
"""

from __future__ import annotations

import os
import sys

import torch
from trl import ModelConfig, get_peft_config, get_quantization_config

from .arguments import ScriptArguments, TinyModelArguments, make_parser
from .checkpoints import check_run_outputs
from .config import BandGRPOConfig
from .data import available_datasets, check_enough_prompts, drop_long_prompts, load_train_dataset
from .devices import check_launch_device
from .evaluation import BenchmarkEvalCallback, SamplingSettings
from .models import load_tokenizer, model_init_kwargs, resolve_model_name
from .rewards import checked_reward, get_reward_funcs, in_open_think, open_thought_prefix, reward_summary
from .trainer import BandGRPOTrainer


def train(
    script_args: ScriptArguments,
    training_args: BandGRPOConfig,
    model_args: ModelConfig,
    tiny_args: TinyModelArguments | None = None,
    trainer_cls: type[BandGRPOTrainer] = BandGRPOTrainer,
):
    """Build the model, data, rewards and trainer from the parsed arguments, train, save; return the trainer.

    `trainer_cls` is the trainer built: `BandGRPOTrainer` or a subclass (e.g. one with your own bound rule)."""
    if script_args.torch_num_threads:
        torch.set_num_threads(script_args.torch_num_threads)
    # Every input is checked, and the data read, before the model is built (the tiny model's warm-up) or loaded.
    check_launch_device(training_args)
    reward_funcs = get_reward_funcs(script_args.reward_funcs)
    for name in [*script_args.dataset_names, *script_args.eval_benchmarks]:
        if name not in available_datasets():
            raise ValueError(f"Unknown dataset {name!r}. Known datasets: {', '.join(available_datasets())}")
    # Never harm an earlier run in output_dir; resume only from a checkpoint that loads, with the same clip settings.
    resume_from = check_run_outputs(training_args, script_args.overwrite_output_dir, script_args.allow_clip_change)
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    train_dataset = load_train_dataset(script_args, training_args.seed)
    callbacks = []
    if script_args.eval_every_steps > 0 and script_args.eval_benchmarks:
        # The policy is evaluated as it samples in training.
        sampling = SamplingSettings(
            temperature=training_args.temperature,
            top_p=training_args.top_p,
            max_new_tokens=training_args.max_completion_length,
            seed=training_args.seed,
        )
        callback = BenchmarkEvalCallback(
            benchmarks=script_args.eval_benchmarks,
            every_n_steps=script_args.eval_every_steps,
            k=script_args.eval_k,
            num_problems=script_args.eval_num_problems,
            sampling=sampling,
            dataset_paths=script_args.dataset_paths,
        )
        callback.load_datasets()
        callbacks.append(callback)

    model_args.model_name_or_path = resolve_model_name(model_args.model_name_or_path, training_args, tiny_args)
    tokenizer = load_tokenizer(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    train_dataset = drop_long_prompts(train_dataset, tokenizer, script_args.max_prompt_length)
    check_enough_prompts(train_dataset, training_args)
    if open_thought_prefix(tokenizer, train_dataset[0]["prompt"]):
        # DeepSeek-R1-Distill: the chat prompt opens the thought, so the rewards must see where the thought ends.
        reward_funcs = [in_open_think(func) for func in reward_funcs]
    # A reward TRL cannot use fails at the first batch, naming the function as the recipe does.
    reward_funcs = [checked_reward(func, name) for func, name in zip(reward_funcs, script_args.reward_funcs)]

    trainer = trainer_cls(
        model=model_args.model_name_or_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
        callbacks=callbacks or None,
    )
    for callback in callbacks:
        callback.attach(trainer)  # generate with the trainer's accelerator / vLLM engine; report through its loggers
    trainer.train(resume_from_checkpoint=resume_from)
    if trainer.state.global_step == 0:
        # Nothing was trained: saving the untouched model as this run's output would report a success.
        raise RuntimeError(
            f"Training ran 0 optimizer steps (max_steps={training_args.max_steps}, num_train_epochs="
            f"{training_args.num_train_epochs}, {len(train_dataset)} prompts); nothing was saved."
        )

    trainer.save_model(training_args.output_dir)  # model (or LoRA adapter) and tokenizer
    trainer.save_state()  # trainer_state.json: the full log history
    if trainer.accelerator.is_main_process:
        summary = reward_summary(trainer.state.log_history)
        if summary:
            trainer.accelerator.print(summary)
        trainer.accelerator.print(
            f"Model, tokenizer and logs (trainer_state.json) saved to {os.path.abspath(training_args.output_dir)}"
        )
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=",".join(script_args.dataset_names))
    trainer.end()
    return trainer


def main(argv: list[str] | None = None) -> int:
    """`bandpo-train` / `python -m bandpo_trl.train`: parse `--config recipe.yaml` plus overrides and train.

    Returns the exit status, 0 (every failure raises); `train` returns the trainer for programmatic use."""
    script_args, training_args, model_args, tiny_args = make_parser().parse_args_and_config(args=argv)
    train(script_args, training_args, model_args, tiny_args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
