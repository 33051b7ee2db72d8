"""Clip rules: each turns the old log-probabilities of a batch's tokens into per-token ratio bounds.

A rule is one small pure function ``bounds(old_logps, args) -> (lower, upper)`` registered under a name, like verl's
policy-loss registry: ``old_logps`` is the (B, T) tensor of log pi_old of the sampled tokens, ``args`` the trainer's
config (a plain ``GRPOConfig`` is seen with every ``BandGRPOConfig`` option at its default), and the bounds are tensors
broadcastable to (B, T), or floats, with ``lower <= 1 <= upper``. The trainer clips each token's ratio to its
``[lower, upper]`` inside TRL's own loss. The built-in rules (docs/method.md §5):

- ``clip``: TRL's fixed ``[1 - epsilon, 1 + epsilon_high]``, left to TRL's loss unchanged (bit for bit);
- ``band``: the Band interval of the ``band_divergence`` trust region of radius ``band_delta`` (capped at
  ``band_max_ratio``; with ``band_relax``, its union with TRL's interval);
- ``dcpo``: DCPO's dynamic adaptive bounds.

A rule also declares the ``BandGRPOConfig`` options it reads (``options``): setting another one to a non-default
value is warned about, since it would change nothing. ``BandGRPOConfig(clip_rule=...)`` takes a registered name or an
import path (``"my_pkg.rules:band_upper"``), so a recipe can name a rule of its own as it names a reward.

Example:
```python
from bandpo_trl import BandGRPOConfig, band_bounds, register_clip_rule
from bandpo_trl.clip_rules import trl_epsilons


@register_clip_rule("band_upper", options=("band_divergence", "band_delta", "band_max_ratio"))
def band_upper(old_logps, args):
    # Band's upper bound, TRL's lower one: rare tokens may grow, but fall no further than the fixed clip allows.
    _, upper = band_bounds(old_logps, args.band_divergence, args.band_delta, args.band_max_ratio)
    return 1 - trl_epsilons(args)[0], upper


args = BandGRPOConfig(output_dir="out", clip_rule="band_upper", steps_per_generation=16, gradient_accumulation_steps=4)
```
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .band import band_bounds, dcpo_bounds
from .utils import import_module, import_object, is_import_path

__all__ = [
    "ClipRule",
    "available_clip_rules",
    "get_clip_rule",
    "register_clip_rule",
    "trl_epsilons",
]

Bound = torch.Tensor | float
BoundsFn = Callable[[torch.Tensor, Any], tuple[Bound, Bound]]


@dataclass(frozen=True)
class ClipRule:
    """A registered clip rule.

    Args:
        name: registry key, the value of `clip_rule`.
        bounds: ``(old_logps, args) -> (lower, upper)``: per-token ratio bounds (tensors broadcastable to
            ``old_logps``, or floats) with ``lower <= 1 <= upper``, computed without autograd history.
        options: the `BandGRPOConfig` options the rule reads (e.g. ``("band_delta",)``); any other option of
            `BandGRPOConfig` set to a non-default value is warned about. ``None``: not declared (no warning).
        trl_clip: the rule is TRL's own fixed clip. The trainer then leaves TRL's loss exactly as it is (bit-for-bit
            parity with `GRPOTrainer`), and TRL's options without a per-token ratio clip (sequence-level importance
            sampling, the cispo/sapo/... losses, Liger) stay available.
    """

    name: str
    bounds: BoundsFn
    options: tuple[str, ...] | None = ()
    trl_clip: bool = False

    def __call__(self, old_logps: torch.Tensor, args) -> tuple[Bound, Bound]:
        return self.bounds(old_logps, args)


_RULES: dict[str, ClipRule] = {}
# Import paths "module:name" whose module registered `name` on import -> that name.
_ALIASES: dict[str, str] = {}


def register_clip_rule(
    name: str,
    bounds: BoundsFn | None = None,
    *,
    options: tuple[str, ...] | list[str] | None = (),
    trl_clip: bool = False,
    overwrite: bool = False,
):
    """Register ``bounds(old_logps, args) -> (lower, upper)`` as the clip rule ``name``; usable as a decorator.

    Returns the function itself (as a decorator) or, called with ``bounds``, the registered `ClipRule`.

    Raises:
        ValueError: an empty or taken name (unless ``overwrite``), a ``bounds`` that is not callable, or ``options``
            that are not option names.

    Example:
    ```python
    @register_clip_rule("sqrt_band", options=())
    def sqrt_band(old_logps, args):
        width = 0.2 * torch.exp(-0.5 * old_logps)  # 0.2 / sqrt(p)
        return (1 - width).clamp(min=0), 1 + width
    ```
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a clip rule name must be a non-empty string, got {name!r}")
    if name in _RULES and not overwrite:
        raise ValueError(f"clip rule {name!r} is already registered; pass overwrite=True to replace it")
    if options is not None:
        if isinstance(options, str) or not all(isinstance(option, str) and option for option in options):
            raise ValueError(
                f"clip rule {name!r}: options must be a tuple of option names (e.g. ('band_delta',)) or None, "
                f"got {options!r}"
            )
        options = tuple(options)

    def register(function: BoundsFn) -> BoundsFn:
        if not callable(function):
            raise ValueError(
                f"clip rule {name!r}: bounds must be a function (old_logps, args) -> (lower, upper), got {function!r}"
            )
        _RULES[name] = ClipRule(name, function, options, trl_clip)
        return function

    if bounds is None:
        return register
    register(bounds)
    return _RULES[name]


def available_clip_rules() -> list[str]:
    """Names accepted by `clip_rule` (built-in and registered), sorted."""
    return sorted(_RULES)


def get_clip_rule(name: str | ClipRule) -> ClipRule:
    """The clip rule registered as ``name``, or the one an import path names (imported and registered on first use).

    - ``"my_pkg.rules:band_upper"`` imports ``my_pkg.rules``; if that import registered ``band_upper``, it is that
      rule; otherwise the module's function ``band_upper`` is registered under the full path (options undeclared);
    - ``"my_pkg.rules.band_upper"`` (no colon) registers that function under the full dotted name.

    The current working directory is searched first, as for rewards and divergences.

    Raises:
        ValueError: an unknown name (listing the known ones), a module that is not found, or an attribute that is
            missing or not callable.
    """
    if isinstance(name, ClipRule):
        return name
    if isinstance(name, str):
        if name in _RULES:
            return _RULES[name]
        if _ALIASES.get(name) in _RULES:
            return _RULES[_ALIASES[name]]
    if not is_import_path(name):
        raise ValueError(
            f"unknown clip_rule {name!r}; accepted: {', '.join(available_clip_rules())}, or an import path such as "
            "'my_pkg.rules:my_rule' (or register one with bandpo_trl.register_clip_rule)"
        )
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        module = import_module(module_name, name)
        registered = _RULES.get(attribute)
        if registered is not None and getattr(registered.bounds, "__module__", None) == module.__name__:
            _ALIASES[name] = attribute
            return registered
    function = import_object(name, require_callable=True)
    if isinstance(function, ClipRule):
        function = function.bounds
    for rule in _RULES.values():  # a function its module registered under another name keeps that declaration
        if rule.bounds is function:
            _ALIASES[name] = rule.name
            return rule
    return register_clip_rule(name, function, options=None)


def trl_epsilons(args) -> tuple[float, float]:
    """``(epsilon_low, epsilon_high)`` as TRL's `GRPOTrainer` reads them: ``epsilon_high`` defaults to ``epsilon``."""
    return args.epsilon, args.epsilon if args.epsilon_high is None else args.epsilon_high


# ----------------------------------------------------------------------------------------------------------------------
# The built-in rules (docs/method.md §5)
# ----------------------------------------------------------------------------------------------------------------------


@register_clip_rule("clip", trl_clip=True)
def clip_rule(old_logps: torch.Tensor, args) -> tuple[float, float]:
    """TRL's fixed interval ``[1 - epsilon, 1 + epsilon_high]`` for every token (canonical 0.2 / 0.2; Clip-Higher
    0.2 / 0.28)."""
    epsilon_low, epsilon_high = trl_epsilons(args)
    return 1 - epsilon_low, 1 + epsilon_high


@register_clip_rule("band", options=("band_divergence", "band_delta", "band_max_ratio", "band_relax"))
def band_rule(old_logps: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """The Band interval of each token's old probability: the ratios inside ``D_f(pi || pi_old) <= band_delta``,
    capped at ``band_max_ratio``. With ``band_relax``, its union with TRL's ``[1 - epsilon, 1 + epsilon_high]``."""
    lower, upper = band_bounds(old_logps, args.band_divergence, args.band_delta, args.band_max_ratio)
    if args.band_relax:
        epsilon_low, epsilon_high = trl_epsilons(args)
        lower, upper = lower.clamp(max=1 - epsilon_low), upper.clamp(min=1 + epsilon_high)
    return lower, upper


@register_clip_rule("dcpo", options=("dcpo_epsilon_low", "dcpo_epsilon_high", "band_max_ratio"))
def dcpo_rule(old_logps: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """DCPO's dynamic adaptive bounds ``1/2 + 1/2 sqrt(max(1 - 4 eps_l / p, 0))`` and ``1/2 + 1/2 sqrt(1 + 4 eps_h / p)``,
    the upper one capped at ``band_max_ratio``."""
    return dcpo_bounds(old_logps, args.dcpo_epsilon_low, args.dcpo_epsilon_high, args.band_max_ratio)
