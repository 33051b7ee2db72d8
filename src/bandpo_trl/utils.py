"""Small helpers shared by the library's modules: import paths and the check of a positive number."""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
from types import ModuleType
from typing import Any

__all__ = ["check_positive", "import_module", "import_object", "is_import_path", "json_object"]


def is_import_path(name) -> bool:
    """Whether a name that is not registered is to be read as an import path (it has a '.' or ':')."""
    return isinstance(name, str) and ("." in name or ":" in name)


def import_object(path: str, *, require_callable: bool = False) -> Any:
    """The object named by a dotted path: ``"a.b.c"`` (module ``a.b``, attribute ``c``) or ``"a.b:c"`` (module
    ``a.b``, attribute ``c``; after the colon, ``c.d`` names a nested attribute).

    The current working directory is put on ``sys.path`` first (once), as TRL's GRPO script does for dotted reward
    functions, so a module beside the training command is found.

    Raises:
        ValueError: ``path`` is not of either form, the module is not found (naming it), the attribute is missing
            (naming it and the module), or ``require_callable`` is set and the object is not callable. An error
            raised while importing a module that does exist (a missing dependency of it, a bug) propagates as is.

    Example:
        >>> import_object("math.sqrt")(4.0)
        2.0
        >>> import_object("os.path:join")("a", "b")
        'a/b'
    """
    if not isinstance(path, str) or not path:
        raise ValueError(f"expected an import path 'module.attribute' or 'module:attribute', got {path!r}")
    if ":" in path:
        module_name, _, attribute = path.partition(":")
    else:
        module_name, _, attribute = path.rpartition(".")
    if ":" in attribute or any(not part for part in (*module_name.split("."), *attribute.split("."))):
        raise ValueError(f"expected an import path 'module.attribute' or 'module:attribute', got {path!r}")

    module = import_module(module_name, path)
    obj: Any = module
    parts = attribute.split(".")
    for i, name in enumerate(parts):
        if not hasattr(obj, name):
            owner = f"module {module_name!r}" if i == 0 else f"{module_name}:{'.'.join(parts[:i])}"
            raise ValueError(f"{path!r}: {owner} has no attribute {name!r}")
        obj = getattr(obj, name)
    if require_callable and not callable(obj):
        raise ValueError(
            f"{path!r}: attribute {attribute!r} of module {module_name!r} is not callable, got {type(obj).__name__} "
            f"{obj!r}"
        )
    return obj


def import_module(module_name: str, path: str | None = None) -> ModuleType:
    """``importlib.import_module`` with the current working directory on ``sys.path`` and a clear error.

    Raises ``ValueError`` naming the module (and ``path``, the import path it came from) when the module itself is
    not found; an error raised while importing a module that exists propagates as is.
    """
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        # Only a missing module of the path itself is the path's fault; a missing dependency of it is not.
        if error.name is None or not (module_name == error.name or module_name.startswith(error.name + ".")):
            raise
        prefix = f"{path!r}: " if path is not None else ""
        raise ValueError(
            f"{prefix}module {module_name!r} not found (looked in the current directory {cwd} and on sys.path)"
        ) from error


def check_positive(name: str, value) -> float:
    """``value`` as a float; raise ``ValueError`` naming ``name`` unless it is a finite number > 0 (a bool is not).

    Example:
        >>> check_positive("band_delta", 0.05)
        0.05
        >>> check_positive("band_delta", 0)
        Traceback (most recent call last):
        ValueError: band_delta must be a finite number > 0, got 0
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def json_object(name: str, value) -> dict | None:
    """``value`` as a dict: a dict or None as is, a string read as a JSON object; raise ``ValueError`` naming ``name``
    and the value otherwise (an option such as ``model_init_kwargs`` that TRL would otherwise fail on much later).

    Example:
        >>> json_object("model_init_kwargs", '{"low_cpu_mem_usage": true}')
        {'low_cpu_mem_usage': True}
        >>> json_object("model_init_kwargs", "notjson")
        Traceback (most recent call last):
        ValueError: model_init_kwargs must be a JSON object such as '{"key": "value"}', got 'notjson' (not JSON: Expecting value at column 1)
    """
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as error:
            reason = f"not JSON: {error.msg} at column {error.colno}"
        else:
            if isinstance(parsed, dict):
                return parsed
            reason = f"a JSON {type(parsed).__name__}, not an object"
    else:
        reason = f"a {type(value).__name__}"
    raise ValueError(f'{name} must be a JSON object such as \'{{"key": "value"}}\', got {value!r} ({reason})')
