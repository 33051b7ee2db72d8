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
`TinyModelArguments`): the recipe's YAML keys set the defaults and command-line flags override them.
`model_name_or_path: tiny` builds the embedded default's model locally and warms it up (see `bandpo_trl.tiny`).
Any model is then handed to the trainer by its id or path with `model_init_kwargs` built from `ModelConfig`
(dtype, attention, revision), as TRL's own GRPO script does, so TRL loads and places it (and the reference model)
under every accelerate/DeepSpeed set-up; `load_in_4bit`/`load_in_8bit` become its `quantization_config`, and
`use_peft: true` its `peft_config`.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from dataclasses import dataclass, field

import torch
from datasets import Dataset, concatenate_datasets
from transformers import AutoTokenizer
from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config

from .checkpoints import check_clip_settings, check_output_dir, resolve_resume_checkpoint
from .config import BandGRPOConfig
from .data import available_datasets, load_named_dataset, parse_dataset_paths
from .rewards import available_rewards, get_reward_funcs, in_open_think, opens_think_block

logger = logging.getLogger(__name__)

TINY_MODEL_NAME = "tiny"


@dataclass
class ScriptArguments:
    """What to train on and with which rewards; the training and model options live in `BandGRPOConfig` and
    TRL's `ModelConfig`.

    Example (YAML recipe keys):
    ```yaml
    dataset_names: [dapo_math_17k, math_l3_5]
    reward_funcs: [math_accuracy]
    max_prompt_length: 1024
    ```
    """

    dataset_names: list[str] = field(
        default_factory=lambda: ["toy_arithmetic"],
        metadata={
            "help": f"Training datasets by name, concatenated and shuffled. Known: {', '.join(available_datasets())}."
        },
    )
    dataset_split: str | None = field(
        default=None, metadata={"help": "Split of every training dataset; default: each dataset's training split."}
    )
    dataset_num_samples: int | None = field(
        default=None,
        metadata={
            "help": "Keep at most this many rows of each dataset (a random subset); toy_arithmetic generates this many."
        },
    )
    dataset_paths: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Local copies of named datasets, for clusters without Hub access: NAME=PATH entries (in YAML also "
            "a mapping name: path). PATH is a data file (.parquet, .json, .jsonl, .csv, .arrow) with the source's "
            "columns, a `save_to_disk` directory or a local copy of the Hub repository; rows are mapped as usual."
        },
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["toy_accuracy"],
        metadata={
            "help": f"Reward functions by name, summed with `reward_weights`. Known: {', '.join(available_rewards())}."
        },
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "Drop training prompts longer than this many tokens (chat template applied). TRL 1.16's "
            "GRPOConfig has no prompt length limit any more; dropping, not truncating, keeps every problem whole."
        },
    )
    torch_num_threads: int | None = field(
        default=None,
        metadata={
            "help": "CPU threads torch may use (torch.set_num_threads). The tiny model's matrices are too small to "
            "gain from threads, and on a busy machine extra threads cost a lot: its recipe sets 1."
        },
    )
    eval_benchmarks: list[str] = field(
        default_factory=list,
        metadata={"help": "Benchmarks to evaluate during training (e.g. aime24 amc23); needs eval_every_steps > 0."},
    )
    eval_every_steps: int = field(
        default=0, metadata={"help": "Evaluate eval_benchmarks every this many optimizer steps; 0 disables it."}
    )
    eval_k: int = field(default=4, metadata={"help": "Samples per problem of the in-training evaluation."})
    eval_num_problems: int | None = field(
        default=32, metadata={"help": "Problems per benchmark of the in-training evaluation (None: all)."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start over in an output_dir that holds an earlier run (checkpoint-* directories, a saved model): "
            "delete them first. Without it (or resume_from_checkpoint) such a run is refused before any work."
        },
    )
    allow_clip_change: bool = field(
        default=False,
        metadata={
            "help": "Resume from a checkpoint trained with other clip settings (clip_rule, its options, epsilon) "
            "with a warning naming each, instead of refusing."
        },
    )

    def __post_init__(self):
        # A YAML scalar where a list is expected (`reward_funcs: toy_accuracy`) means a one-element list, not its
        # characters.
        for name in ("dataset_names", "reward_funcs", "eval_benchmarks"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        if self.dataset_num_samples is not None and self.dataset_num_samples <= 0:
            raise ValueError(
                f"dataset_num_samples must be a positive number of rows per dataset, got {self.dataset_num_samples}; "
                "leave it unset to use every row (toy_arithmetic: 4096)"
            )
        if self.max_prompt_length is not None and self.max_prompt_length <= 0:
            raise ValueError(f"max_prompt_length must be a positive number of tokens, got {self.max_prompt_length}")
        if self.eval_every_steps < 0:
            raise ValueError(f"eval_every_steps must be >= 0 (0 disables evaluation), got {self.eval_every_steps}")
        if self.eval_num_problems is not None and self.eval_num_problems < 1:
            raise ValueError(
                "eval_num_problems must be a positive number of problems per benchmark, or None for all of them, "
                f"got {self.eval_num_problems}"
            )
        if self.eval_k < 1:
            raise ValueError(f"eval_k must be a positive number of samples per problem, got {self.eval_k}")
        if self.eval_every_steps > 0 and not self.eval_benchmarks:
            warnings.warn(
                f"eval_every_steps={self.eval_every_steps} is set but eval_benchmarks is empty, so nothing will be "
                "evaluated during training; name the benchmarks (e.g. eval_benchmarks: [aime24, amc23]).",
                UserWarning,
                stacklevel=3,
            )
        if self.eval_benchmarks and self.eval_every_steps == 0:
            warnings.warn(
                f"eval_benchmarks={self.eval_benchmarks} is set but eval_every_steps=0, so no benchmark will be "
                "evaluated during training; set eval_every_steps > 0 (e.g. 50) to evaluate every that many steps.",
                UserWarning,
                stacklevel=3,
            )


@dataclass
class TinyModelArguments:
    """The embedded default's model (`model_name_or_path: tiny`): its size and supervised warm-up. Ignored for any
    other model."""

    tiny_warmup_steps: int = field(
        default=100,
        metadata={"help": "model_name_or_path=tiny only: supervised warm-up steps on the toy task before RL."},
    )
    tiny_warmup_learning_rate: float = field(
        default=3e-3, metadata={"help": "model_name_or_path=tiny only: learning rate of the warm-up."}
    )
    tiny_warmup_num_samples: int = field(
        default=4096, metadata={"help": "model_name_or_path=tiny only: toy problems in the warm-up set."}
    )
    tiny_hidden_size: int = field(default=128, metadata={"help": "model_name_or_path=tiny only: hidden size."})
    tiny_num_layers: int = field(default=2, metadata={"help": "model_name_or_path=tiny only: number of layers."})


def load_train_dataset(script_args: ScriptArguments, seed: int) -> Dataset:
    """The named training datasets, mapped to (prompt, answer, problem_id), concatenated and shuffled."""
    paths = parse_dataset_paths(script_args.dataset_paths)
    parts = [
        load_named_dataset(
            name,
            split=script_args.dataset_split,
            num_samples=script_args.dataset_num_samples,
            seed=seed,
            path=paths.get(name),
        )
        for name in script_args.dataset_names
    ]
    dataset = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    return dataset.shuffle(seed=seed)


def prompt_lengths(dataset: Dataset, tokenizer) -> list[int]:
    """Each row's prompt length in tokens, as the trainer will tokenize it (chat template applied)."""

    def length(prompt) -> int:
        if isinstance(prompt, str):
            return len(tokenizer(prompt)["input_ids"])
        return len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))

    return [length(prompt) for prompt in dataset["prompt"]]


def drop_long_prompts(dataset: Dataset, tokenizer, max_prompt_length: int | None) -> Dataset:
    """Remove rows whose prompt, as the trainer will tokenize it, exceeds `max_prompt_length` tokens.

    Raises:
        ValueError: every prompt is longer than `max_prompt_length` (the message gives the shortest length).
    """
    if max_prompt_length is None:
        return dataset
    lengths = prompt_lengths(dataset, tokenizer)
    kept = dataset.select([i for i, n in enumerate(lengths) if n <= max_prompt_length])
    if len(dataset) and not len(kept):
        raise ValueError(
            f"No training prompts left: all {len(dataset)} loaded prompts are longer than max_prompt_length="
            f"{max_prompt_length} tokens (the shortest has {min(lengths)}). Raise max_prompt_length."
        )
    if len(kept) < len(dataset):
        logger.warning(
            "Dropped %d of %d prompts longer than %d tokens.",
            len(dataset) - len(kept),
            len(dataset),
            max_prompt_length,
        )
    return kept


def check_enough_prompts(dataset: Dataset, training_args: BandGRPOConfig) -> None:
    """Refuse a training set smaller than one generation batch: TRL's sampler would yield no batch at all and the
    run would "train" 0 steps and save the untouched model."""
    needed = training_args.generation_batch_size // training_args.num_generations
    if len(dataset) < needed:
        raise ValueError(
            f"The training set has {len(dataset)} prompts, fewer than one generation batch needs: "
            f"per_device_train_batch_size ({training_args.per_device_train_batch_size}) x processes "
            f"({training_args.world_size}) x steps_per_generation ({training_args.steps_per_generation}) = "
            f"{training_args.generation_batch_size} completions / num_generations ({training_args.num_generations}) "
            f"= {needed} distinct prompts. Use more data (dataset_num_samples, max_prompt_length) or a smaller batch."
        )


def load_tiny(tiny_args: TinyModelArguments, training_args: BandGRPOConfig) -> str:
    """Build and warm up (or reuse) the embedded default's model; return the directory it is saved in."""
    from .tiny import warm_up_cached

    # The warm-up draws from its own stream of toy problems, not the RL prompts.
    sft = load_named_dataset(
        "toy_arithmetic", split="warmup", num_samples=tiny_args.tiny_warmup_num_samples, seed=training_args.seed
    )
    sft = sft.map(lambda row: {"completion": row["answer"]}).select_columns(["prompt", "completion"])
    return warm_up_cached(
        training_args.output_dir,
        sft,
        model_kwargs={
            "hidden_size": tiny_args.tiny_hidden_size,
            "num_hidden_layers": tiny_args.tiny_num_layers,
            "seed": training_args.seed,
        },
        max_steps=tiny_args.tiny_warmup_steps,
        learning_rate=tiny_args.tiny_warmup_learning_rate,
        seed=training_args.seed,
        # The same mixed precision as the RL trainer that follows in this process (accelerate allows only one).
        bf16=training_args.bf16,
        fp16=training_args.fp16,
    )


def model_init_kwargs(model_args: ModelConfig, training_args: BandGRPOConfig) -> dict:
    """How TRL's trainer should load the policy (and the reference model), as TRL's own GRPO script builds it:
    the `ModelConfig` options, updated by any `model_init_kwargs` of the recipe. The trainer then places the model
    (device map, DeepSpeed/FSDP preparation, quantization) the way it does for any model id."""
    kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    kwargs.update(training_args.model_init_kwargs or {})
    return kwargs


def load_tokenizer(model_args: ModelConfig, training_args: BandGRPOConfig):
    """The policy's tokenizer, loaded as TRL's trainer loads it (left padding and truncation), so prompt lengths
    can be measured before the trainer is built."""
    return AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        padding_side="left",
        truncation_side="left",
    )


def train(
    script_args: ScriptArguments,
    training_args: BandGRPOConfig,
    model_args: ModelConfig,
    tiny_args: TinyModelArguments | None = None,
):
    """Build the model, data, rewards and trainer from the parsed arguments, train, save; return the trainer."""
    from . import BandGRPOTrainer

    if script_args.torch_num_threads:
        torch.set_num_threads(script_args.torch_num_threads)
    # Fail on a bad name now, not after a model download or the warm-up.
    reward_funcs = get_reward_funcs(script_args.reward_funcs)
    for name in [*script_args.dataset_names, *script_args.eval_benchmarks]:
        if name not in available_datasets():
            raise ValueError(f"Unknown dataset {name!r}. Known datasets: {', '.join(available_datasets())}")
    # Never harm an earlier run in output_dir; resume only from a checkpoint that loads, with the same clip settings.
    check_output_dir(
        training_args.output_dir,
        training_args.resume_from_checkpoint,
        script_args.overwrite_output_dir,
        should_delete=training_args.should_save,
    )
    resume_from = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    if resume_from is not None:
        check_clip_settings(resume_from, training_args, allow_change=script_args.allow_clip_change)

    if model_args.model_name_or_path == TINY_MODEL_NAME:
        model_args.model_name_or_path = load_tiny(tiny_args or TinyModelArguments(), training_args)
    tokenizer = load_tokenizer(model_args, training_args)
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)

    train_dataset = drop_long_prompts(
        load_train_dataset(script_args, training_args.seed), tokenizer, script_args.max_prompt_length
    )
    check_enough_prompts(train_dataset, training_args)
    if not isinstance(train_dataset[0]["prompt"], str) and opens_think_block(tokenizer):
        # DeepSeek-R1-Distill: the chat prompt ends in "<think>\n", so the rewards must see where the thought ends.
        reward_funcs = [in_open_think(func) for func in reward_funcs]

    callbacks = []
    if script_args.eval_every_steps > 0 and script_args.eval_benchmarks:
        from .evaluation import BenchmarkEvalCallback

        callbacks.append(
            BenchmarkEvalCallback(
                benchmarks=script_args.eval_benchmarks,
                every_n_steps=script_args.eval_every_steps,
                k=script_args.eval_k,
                num_problems=script_args.eval_num_problems,
                max_new_tokens=training_args.max_completion_length,
                temperature=training_args.temperature,
                top_p=training_args.top_p,
                seed=training_args.seed,
            )
        )

    trainer = BandGRPOTrainer(
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
        rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
        if rewards:
            head, tail = rewards[: max(1, len(rewards) // 5)], rewards[-max(1, len(rewards) // 5) :]
            trainer.accelerator.print(
                f"Mean reward: {sum(head) / len(head):.3f} over the first {len(head)} logged steps -> "
                f"{sum(tail) / len(tail):.3f} over the last {len(tail)}."
            )
        trainer.accelerator.print(
            f"Model, tokenizer and logs (trainer_state.json) saved to {os.path.abspath(training_args.output_dir)}"
        )
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=",".join(script_args.dataset_names))
    trainer.end()
    return trainer


def make_parser() -> TrlParser:
    """The recipe parser: (`ScriptArguments`, `BandGRPOConfig`, `ModelConfig`, `TinyModelArguments`)."""
    return TrlParser((ScriptArguments, BandGRPOConfig, ModelConfig, TinyModelArguments))


def main(argv: list[str] | None = None) -> int:
    """`bandpo-train` / `python -m bandpo_trl.train`: parse `--config recipe.yaml` plus overrides and train.

    Returns the exit status, 0 (every failure raises); `train` returns the trainer for programmatic use."""
    script_args, training_args, model_args, tiny_args = make_parser().parse_args_and_config(args=argv)
    train(script_args, training_args, model_args, tiny_args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
