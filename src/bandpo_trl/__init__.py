"""BandPO for Hugging Face TRL: GRPO with per-token, probability-aware ratio bounds."""

from .band import band_bounds, dcpo_bounds, solve_band
from .clip_rules import ClipRule, available_clip_rules, get_clip_rule, register_clip_rule
from .config import BandGRPOConfig
from .divergences import Divergence, available_divergences, get_divergence, register_divergence
from .trainer import BandGRPOTrainer

__version__ = "0.1.0"

# TRL's asynchronous GRPO is experimental: its trainer is imported (and TRL's version checked) on first use only, so
# `import bandpo_trl` works whatever TRL's experimental API looks like.
_ASYNC_EXPORTS = {"BandAsyncGRPOConfig": "async_config", "BandAsyncGRPOTrainer": "async_trainer"}


def __getattr__(name):
    if name in _ASYNC_EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_ASYNC_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BandAsyncGRPOConfig",
    "BandAsyncGRPOTrainer",
    "BandGRPOConfig",
    "BandGRPOTrainer",
    "ClipRule",
    "Divergence",
    "available_clip_rules",
    "available_divergences",
    "band_bounds",
    "dcpo_bounds",
    "get_clip_rule",
    "get_divergence",
    "register_clip_rule",
    "register_divergence",
    "solve_band",
]
