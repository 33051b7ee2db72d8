"""BandPO for Hugging Face TRL: GRPO with per-token, probability-aware ratio bounds."""

from .band import (
    Divergence,
    available_divergences,
    band_bounds,
    dcpo_bounds,
    get_divergence,
    register_divergence,
    solve_band,
)
from .config import BandGRPOConfig
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
