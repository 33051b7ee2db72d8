"""BandPO for Hugging Face TRL: GRPO with per-token, probability-aware ratio bounds."""

from .band import band_bounds, dcpo_bounds, solve_band
from .config import BandGRPOConfig
from .divergences import Divergence, available_divergences, get_divergence, register_divergence
from .trainer import BandGRPOTrainer

__version__ = "0.1.0"

__all__ = [
    "BandGRPOConfig",
    "BandGRPOTrainer",
    "Divergence",
    "available_divergences",
    "band_bounds",
    "dcpo_bounds",
    "get_divergence",
    "register_divergence",
    "solve_band",
]
