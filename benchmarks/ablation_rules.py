"""The one-sided clip rules of the ablation (docs/ablation.md): which side of Band's interval does the work?

Each rule is registered in the clip-rule registry (`bandpo_trl.register_clip_rule`) and named in a run by its import
path, e.g. ``clip_rule="benchmarks.ablation_rules:band_upper"`` (resolved in the run's own process). They combine
Band's bounds (``band_divergence``, ``band_delta``, ``band_max_ratio``; docs/method.md §4) with TRL's fixed clip
``[1 - epsilon, 1 + epsilon_high]``:

| rule | lower | upper |
|---|---|---|
| ``band_upper`` | ``1 - epsilon`` (clip's) | Band's ``u(p)`` |
| ``band_lower`` | Band's ``l(p)`` | ``1 + epsilon_high`` (clip's) |
| ``flat_upper`` | ``1 - epsilon`` (clip's) | the constant ``u(FLAT_UPPER_P)``: Band's upper at E1's start probability |

With ``band_divergence="kl"``, ``band_delta=0.05`` (the study's Band KL) and ``epsilon = epsilon_high = 0.2``:
``band_upper`` gives ``[0.8, 5.17]`` at p = 0.0185 and ``[0.8, 1.31]`` at p = 0.5; ``band_lower`` gives
``[0.026, 1.2]`` and ``[0.69, 1.2]``; ``flat_upper`` gives ``[0.8, 5.17]`` at every p.
"""

from __future__ import annotations

import math

import torch

from bandpo_trl import band_bounds, register_clip_rule
from bandpo_trl.clip_rules import trl_epsilons

BAND_OPTIONS = ("band_divergence", "band_delta", "band_max_ratio")
# The start probability of the rewarded answer in E1 (docs/study.md §7: mean 0.0185 over its 32 prompts, from
# 0.01840 to 0.01860): `flat_upper`'s constant upper bound is Band's upper bound there.
FLAT_UPPER_P = 0.0185


def band_upper_at(p: float, args) -> float:
    """Band's upper ratio bound at old probability `p` under `args`' Band options."""
    _, upper = band_bounds(torch.tensor(math.log(p), dtype=torch.float64), *(getattr(args, o) for o in BAND_OPTIONS))
    return float(upper)


@register_clip_rule("band_upper", options=(*BAND_OPTIONS, "epsilon"))
def band_upper(old_logps: torch.Tensor, args) -> tuple[float, torch.Tensor]:
    """Band's upper bound with clip's lower one: ``[1 - epsilon, u(p)]``."""
    _, upper = band_bounds(old_logps, *(getattr(args, o) for o in BAND_OPTIONS))
    return 1 - trl_epsilons(args)[0], upper


@register_clip_rule("band_lower", options=(*BAND_OPTIONS, "epsilon", "epsilon_high"))
def band_lower(old_logps: torch.Tensor, args) -> tuple[torch.Tensor, float]:
    """Band's lower bound with clip's upper one: ``[l(p), 1 + epsilon_high]``."""
    lower, _ = band_bounds(old_logps, *(getattr(args, o) for o in BAND_OPTIONS))
    return lower, 1 + trl_epsilons(args)[1]


@register_clip_rule("flat_upper", options=(*BAND_OPTIONS, "epsilon"))
def flat_upper(old_logps: torch.Tensor, args) -> tuple[float, float]:
    """Clip's lower bound and a constant upper one, Band's upper bound at `FLAT_UPPER_P`:
    ``[1 - epsilon, u(0.0185)]`` for every token."""
    return 1 - trl_epsilons(args)[0], band_upper_at(FLAT_UPPER_P, args)
