"""Model and LoRA adapter loading for evaluation, with early checks of local checkpoint directories. The tokenizer
is loaded by `bandpo_trl.models.load_tokenizer`, as in training."""

from __future__ import annotations

import logging
import os

import torch

from ..models import load_tokenizer

logger = logging.getLogger(__name__)


def _looks_like_local_path(name: str) -> bool:
    # A Hub id is "name" or "org/name"; anything that exists here, starts like a path or has more parts is local.
    return os.path.exists(name) or name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def check_local_checkpoint(path: str, flag: str, adapter: bool = False) -> None:
    """Fail early, naming `path` and what is missing, when a local model (or adapter) directory cannot be loaded.

    Hub ids (`org/name`) are left to `from_pretrained`. Without this, a missing directory reads as "Repo id must be
    in the form ..." and one without tokenizer files as a sentencepiece error.
    """
    if not _looks_like_local_path(path):
        return
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{flag} {path}: no such directory (expected a saved model directory or a Hub id)")
    if adapter:
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise FileNotFoundError(f"{flag} {path}: no adapter_config.json, so this is not a saved LoRA adapter")
        return
    files = set(os.listdir(path))
    if "config.json" not in files and "adapter_config.json" not in files:
        raise FileNotFoundError(
            f"{flag} {path}: no config.json (nor adapter_config.json), so this is not a saved model; a training "
            "output directory holds one once training has finished (checkpoints in checkpoint-N/)"
        )
    if "config.json" in files and not files & {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"}:
        raise FileNotFoundError(
            f"{flag} {path}: no tokenizer files (tokenizer.json / tokenizer_config.json); save the tokenizer next "
            "to the model (trainer.save_model does) or copy it there"
        )


def adapter_base_model(adapter: str) -> str | None:
    """The base model a LoRA adapter was trained on (`base_model_name_or_path` of its adapter_config.json)."""
    from peft import PeftConfig

    return PeftConfig.from_pretrained(adapter).base_model_name_or_path


def resolve_model_and_adapter(model: str, adapter: str | None = None) -> tuple[str, str | None]:
    """
    A `model` directory that holds only a LoRA adapter (`adapter_config.json`, no `config.json`: what a LoRA training
    run saves) stands for its base model (`base_model_name_or_path`) plus that adapter. Anything else is returned as is.

    Example:
    ```python
    resolve_model_and_adapter("outputs/qwen-lora")  # ("Qwen/Qwen2.5-3B-Instruct", "outputs/qwen-lora")
    ```
    """
    adapter_config = os.path.join(model, "adapter_config.json")
    if adapter is None and os.path.isfile(adapter_config) and not os.path.isfile(os.path.join(model, "config.json")):
        base = adapter_base_model(model)
        if base and _looks_like_local_path(base) and not os.path.isdir(base):
            raise FileNotFoundError(
                f"--model {model} is a LoRA adapter whose base model {base} (base_model_name_or_path in its "
                f"adapter_config.json) is no longer there; give the base model's location: --model BASE_MODEL "
                f"--adapter {model}"
            )
        if base:
            logger.info("%s is a LoRA adapter: evaluating its base model %s with the adapter applied", model, base)
            return base, model
    return model, adapter


def load_model_and_tokenizer(
    model: str,
    adapter: str | None = None,
    *,
    dtype: str = "auto",
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
):
    """
    Load a causal LM and its tokenizer for evaluation, with an optional LoRA adapter merged into the weights.

    Args:
        model (`str`): local directory or Hub id.
        adapter (`str`, *optional*): LoRA adapter directory or Hub id, merged into the weights (`merge_and_unload`)
            so generation runs at the base model's speed. When `model` is the adapter's own base model (what
            [`resolve_model_and_adapter`] gives for an adapter directory), it is loaded with
            `peft.AutoPeftModelForCausalLM.from_pretrained(adapter)`, which also resizes the embeddings to a tokenizer
            saved with the adapter; with another `model`, with `peft.PeftModel.from_pretrained` on top of it.
        dtype (`str`): `"auto"` (the checkpoint's), `"bfloat16"`, `"float16"` or `"float32"`.
        device: where to put the model. Default: CUDA if available, else CPU.

    Returns:
        `(model, tokenizer)`, the model in eval mode.

    Example:
    ```python
    model, tokenizer = load_model_and_tokenizer("Qwen/Qwen2.5-3B-Instruct", adapter="outputs/qwen-lora")
    ```
    """
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(model, adapter, trust_remote_code=trust_remote_code)
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    if adapter and adapter_base_model(adapter) == model:
        from peft import AutoPeftModelForCausalLM

        lm = AutoPeftModelForCausalLM.from_pretrained(adapter, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        lm = lm.merge_and_unload()
    else:
        lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        if adapter:
            from peft import PeftModel

            lm = PeftModel.from_pretrained(lm, adapter).merge_and_unload()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    lm.to(device).eval()
    return lm, tokenizer
