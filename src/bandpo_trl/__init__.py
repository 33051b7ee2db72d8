"""BandPO for Hugging Face TRL: GRPO with per-token, probability-aware ratio bounds."""

from .band import band_bounds, dcpo_bounds, solve_band
from .clip_rules import ClipRule, available_clip_rules, get_clip_rule, register_clip_rule
from .config import BandGRPOConfig
from .divergences import Divergence, available_divergences, get_divergence, register_divergence
from .trainer import BandGRPOTrainer

__version__ = "0.1.0"

__all__ = [
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
