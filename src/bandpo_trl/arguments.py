"""The options of `bandpo-train` besides TRL's: [`ScriptArguments`] (data, rewards, in-training evaluation),
[`TinyModelArguments`] (the embedded default's model) and [`make_parser`], the recipe parser.

Example:
```python
from bandpo_trl.arguments import make_parser

script_args, training_args, model_args, tiny_args = make_parser().parse_args_and_config(
    args=["--config", "recipes/tiny/bandpo/config_kl.yaml", "--max_steps", "8"]
)
```
"""

from __future__ import annotations

import argparse
import functools
import warnings
from dataclasses import dataclass, field

from trl import ModelConfig, TrlParser

from .config import BandGRPOConfig
from .data import available_datasets
from .data_files import check_dataset_paths
from .evaluation.callback import IN_TRAINING_K, IN_TRAINING_NUM_PROBLEMS
from .rewards import available_rewards
from .utils import json_object


@dataclass
class ScriptArguments:
    """What to train on and with which rewards; the training and model options live in `BandGRPOConfig` and
    TRL's `ModelConfig`.

    The in-training evaluation (`eval_*`) samples as training does: the temperature, top-p, completion length
    (`max_completion_length`) and seed of `BandGRPOConfig`.

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
            "help": "Drop training prompts longer than this many tokens (chat template applied) before training; "
            "dropping, not truncating, keeps every problem whole. Unset: no prompt is dropped."
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
    eval_k: int = field(default=IN_TRAINING_K, metadata={"help": "Samples per problem of the in-training evaluation."})
    eval_num_problems: int | None = field(
        default=IN_TRAINING_NUM_PROBLEMS,
        metadata={"help": "Problems per benchmark of the in-training evaluation (None: all)."},
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
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value])
            elif not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
                raise ValueError(f"{name} must be a list of names (e.g. {name}: [a, b] in YAML), got {value!r}")
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
        evaluated = self.eval_benchmarks if self.eval_every_steps > 0 else []
        check_dataset_paths(self.dataset_paths, [*self.dataset_names, *evaluated], self._why_unused)
        if self.eval_benchmarks and self.eval_every_steps == 0:
            warnings.warn(
                f"eval_benchmarks={self.eval_benchmarks} is set but eval_every_steps=0, so no benchmark will be "
                "evaluated during training; set eval_every_steps > 0 (e.g. 50) to evaluate every that many steps.",
                UserWarning,
                stacklevel=3,
            )

    def _why_unused(self, name: str) -> str:
        if name in self.eval_benchmarks:
            return f"{name} is in eval_benchmarks, but eval_every_steps=0 evaluates nothing during training"
        return (
            f"it trains on {', '.join(self.dataset_names)}"
            + (f" and evaluates {', '.join(self.eval_benchmarks)}" if self.eval_benchmarks else "")
            + f". Remove the entry, or add {name} to dataset_names (training) or eval_benchmarks (evaluation)"
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


def make_parser() -> TrlParser:
    """The recipe parser: (`ScriptArguments`, `BandGRPOConfig`, `ModelConfig`, `TinyModelArguments`). A recipe's
    YAML keys (`--config`) set the defaults and command-line flags override them; unknown keys are errors."""
    parser = TrlParser((ScriptArguments, BandGRPOConfig, ModelConfig, TinyModelArguments))
    # TRL's `*_kwargs` options take a dict or a JSON string: a string that is not a JSON object is refused by the
    # parser, naming the option, instead of failing after the model is built (or as a bare JSONDecodeError).
    for action in parser._actions:
        if action.dest in JSON_OBJECT_OPTIONS:
            action.type = functools.partial(_json_object_option, action.dest)
    return parser


# The options of `BandGRPOConfig` that hold keyword arguments: a dict, or a JSON object on the command line.
JSON_OBJECT_OPTIONS = (
    "model_init_kwargs",
    "generation_kwargs",
    "chat_template_kwargs",
    "lr_scheduler_kwargs",
    "gradient_checkpointing_kwargs",
    "activation_checkpointing_kwargs",
)


def _json_object_option(name: str, value):
    try:
        return json_object(name, value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).replace(f"{name} must", "must", 1)) from error
