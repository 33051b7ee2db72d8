"""The divergence registry: f-divergences by name, and the checks a generator passes before it is registered.

A divergence is its generator ``f`` (convex on ``u >= 0``, ``f(1) = 0``) plus, optionally, its Band bounds in closed
form or from a dedicated solver (docs/method.md §3). :func:`register_divergence` checks ``f`` once
(:func:`check_generator`) and stores it; :func:`get_divergence` and :func:`resolve_divergence` look a name (or an
import path) up. The operator that turns a divergence into bounds is :func:`bandpo_trl.band.band_bounds`, which
registers the five built-in divergences.

Example:
    >>> import torch
    >>> from bandpo_trl import available_divergences, register_divergence
    >>> _ = register_divergence("js", lambda u: 0.5 * (torch.xlogy(u, u) - torch.xlogy(u + 1, (u + 1) / 2)))
    >>> available_divergences()
    ['chi2', 'hellinger', 'js', 'kl', 'rkl', 'tv']
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .utils import import_module, import_object, is_import_path

__all__ = [
    "Divergence",
    "OddsBounds",
    "RawBounds",
    "available_divergences",
    "check_generator",
    "get_divergence",
    "register_divergence",
    "resolve_divergence",
]


RawBounds = Callable[[torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
OddsBounds = Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Divergence:
    """An f-divergence usable by :func:`bandpo_trl.band.band_bounds`.

    Args:
        name: registry key.
        f: the generator, a convex torch function on ratios ``u >= 0`` with ``f(1) = 0``.
        raw_bounds: optional ``(p, q, delta) -> (lower, upper)`` giving the raw interval, with ``q = 1 - p``
            passed separately because it is computed accurately from the log-probability. Without it (and without
            ``odds_bounds``) the generic solver :func:`bandpo_trl.band.solve_band` is used.
        lower_limit_at_one: optional ``delta -> lim_{p -> 1} l(p)``, used for tokens with ``p > 1 - 1e-6``.
            Without it the limit is estimated once per ``delta`` from the raw bounds at ``p = 1 - 1e-12``.
        odds_bounds: optional closed form ``(t, delta) -> (lower, upper)`` in the odds ``t = (1 - p) / p`` (so
            ``1/p = 1 + t``), for finite ``t >= 0``; an alternative to ``raw_bounds`` and ``lower_limit_at_one``. It
            must be continuous at ``t = 0``, whose value is then the ``p -> 1`` limit. It is the fast path: one
            transcendental pass for ``t`` and no masks for the rules of docs/method.md §4.2.

    ``raw_bounds`` and ``odds_bounds`` must return new tensors: :func:`band_bounds` clamps them in place.
    """

    name: str
    f: Callable[[torch.Tensor], torch.Tensor]
    raw_bounds: RawBounds | None = None
    lower_limit_at_one: Callable[[float], float] | None = None
    odds_bounds: OddsBounds | None = None


_REGISTRY: dict[str, Divergence] = {}
# Import paths "module:name" whose module registered `name` on import -> that name (see resolve_divergence).
_ALIASES: dict[str, str] = {}


# --------------------------------------------------------------------------------------------------------------
# Checks of a generator at registration: once, on a fixed float64 grid (about 200 points, microseconds).
# --------------------------------------------------------------------------------------------------------------

# u = 0, 1 and 200 points log-spaced over [1e-6, 1e6] (1 is not one of them), sorted. f(0) may be +inf (kl);
# everywhere else f must be finite.
_PROBE = torch.cat([torch.tensor([0.0, 1.0], dtype=torch.float64), torch.logspace(-6, 6, 200, dtype=torch.float64)])
_PROBE = _PROBE.sort().values
# A fixed shuffle of 150 of the 202 points as a (2, 75) batch: an elementwise f gives the same values there (the solver
# calls f on (2, *shape) tensors), one that reduces, normalises or looks at positions does not.
_PROBE_SUBSET = torch.randperm(len(_PROBE), generator=torch.Generator().manual_seed(0))[:150]
# The grid points on either side of u = 1, where a generator that is not 0 there is smallest.
_NEXT_TO_ONE = torch.tensor([int((_PROBE < 1).sum()) - 1, int((_PROBE <= 1).sum())])
# Allowance on f(1) = 0 and f >= 0, in units of f's own magnitude (see _magnitude): any scale of f is judged alike.
_ATOL = 1e-10
# Rounding allowances, relative: wide enough for an f computed in float32, far below any real concavity or
# dependence on other elements.
_RTOL = 1e-6
_TINY = torch.finfo(torch.float64).tiny


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _probe(name: str, f: Callable[[torch.Tensor], torch.Tensor], u: torch.Tensor) -> torch.Tensor:
    try:
        with torch.no_grad():
            y = f(u.clone())
    except Exception as error:  # noqa: BLE001 - any failure of the user's function is reported with its cause
        raise ValueError(
            f"divergence {name!r}: the generator f raised {type(error).__name__}: {error} when called on a float64 "
            f"tensor of ratios of shape {tuple(u.shape)}; f must map a ratio tensor elementwise to f(ratio)"
        ) from error
    if not isinstance(y, torch.Tensor) or not y.is_floating_point():
        kind = y.dtype if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(
            f"divergence {name!r}: the generator f must return a floating-point torch.Tensor shaped like its input "
            f"(f is applied elementwise to a tensor of ratios), got {kind} for an input of shape {tuple(u.shape)}"
        )
    if y.shape != u.shape:
        raise ValueError(
            f"divergence {name!r}: the generator f is not elementwise: it must return a tensor shaped like its input, "
            f"got shape {tuple(y.shape)} for an input of shape {tuple(u.shape)}"
        )
    return y.detach().to(torch.float64)


def _magnitude(y: torch.Tensor) -> float | None:
    """The unit the checks measure f in: the larger |f| at the two grid points next to 1 (a 0 at 1 is judged against
    the values around it); where f vanishes there, the largest finite |f| on the grid; ``None`` when no finite value
    reaches float64's smallest normal number (f is identically 0)."""
    finite = y.abs().nan_to_num(0.0, posinf=0.0)
    for candidates in (finite[_NEXT_TO_ONE], finite):
        magnitude = candidates.max().item()
        if magnitude >= _TINY:
            return magnitude
    return None


def check_generator(name: str, f: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Raise ``ValueError`` unless ``f`` is a usable f-divergence generator (called by :func:`register_divergence`).

    On a float64 grid (u = 0, 1 and 200 points log-spaced over [1e-6, 1e6]) ``f`` must be elementwise (same shape
    out as in; the same values on a shuffled (2, 75) sub-batch), finite on (0, inf) (f(0) may be +inf, as for kl),
    zero at 1, non-negative, convex (up to rounding) and not identically zero. A generator failing any of these
    would register and then give no trust region at all (every bound (0, min(1/p, cap))) or frozen tokens (1, 1).
    The verdict does not depend on the scale of ``f``: rounding allowances are relative to f's own magnitude, so
    ``c f`` (the same trust region at ``c delta``) passes or fails as ``f`` does for any ``c > 0``.
    """
    u = _PROBE
    y = _probe(name, f, u)
    magnitude = _magnitude(y)
    scale = 1.0 if magnitude is None else magnitude
    sub = _PROBE_SUBSET
    y_sub = _probe(name, f, u[sub].reshape(2, -1)).reshape(-1)
    both = torch.isfinite(y[sub]) & torch.isfinite(y_sub)
    # Equal up to rounding (vectorised and scalar kernels may differ in the last bits); inf and NaN exactly.
    exact = (y_sub == y[sub]) | (y_sub.isnan() & y[sub].isnan())
    same = torch.where(both, (y_sub - y[sub]).abs() <= _RTOL * y[sub].abs() + 1e-15 * scale, exact)
    if not same.all():
        i = int(sub[~same][0])
        j = int((~same).nonzero()[0])
        raise ValueError(
            f"divergence {name!r}: the generator f is not elementwise: at u = {_fmt(u[i].item())} it gives "
            f"{_fmt(y[i].item())} on the full grid but {_fmt(y_sub[j].item())} in a shuffled sub-batch; f(u) of each "
            "ratio must depend on that ratio alone"
        )
    positive = u > 0
    bad = positive & ~torch.isfinite(y) | ~positive & (y.isnan() | (y == -math.inf))
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"divergence {name!r}: the generator f must be finite on (0, inf) (only f(0) may be +inf), got "
            f"f({_fmt(u[i].item())}) = {y[i].item()}"
            + (" (for u log u, torch.xlogy(u, u) gives the limit 0 at u = 0)" if u[i] == 0 and y[i].isnan() else "")
        )
    at_one = y[u == 1].item()
    if not abs(at_one) <= _ATOL * scale:
        raise ValueError(f"divergence {name!r}: the generator f must satisfy f(1) = 0, got f(1) = {_fmt(at_one)}")
    negative = y < -_ATOL * scale
    if negative.any():
        i = int(negative.nonzero()[0])
        raise ValueError(
            f"divergence {name!r}: the generator f must be non-negative, got f({_fmt(u[i].item())}) = "
            f"{_fmt(y[i].item())}. (A convex f with f(1) = 0 is non-negative when f'(1) = 0; adding c (u - 1) "
            "does not change the divergence: e.g. u log u - u + 1 instead of u log u.)"
        )
    # Convexity on the finite points: each value at most the chord of its neighbours, up to rounding.
    finite = torch.isfinite(y)
    x, v = u[finite], y[finite]
    weight = (x[2:] - x[1:-1]) / (x[2:] - x[:-2])
    chord = weight * v[:-2] + (1 - weight) * v[2:]
    excess = v[1:-1] - chord
    tolerance = _RTOL * (v[:-2].abs() + v[1:-1].abs() + v[2:].abs()) + _TINY
    concave = excess > tolerance
    if concave.any():
        i = int(concave.nonzero()[0])
        raise ValueError(
            f"divergence {name!r}: the generator f must be convex, but f({_fmt(x[i + 1].item())}) = "
            f"{_fmt(v[i + 1].item())} lies above the chord from f({_fmt(x[i].item())}) = {_fmt(v[i].item())} to "
            f"f({_fmt(x[i + 2].item())}) = {_fmt(v[i + 2].item())}"
        )
    if magnitude is None:
        raise ValueError(
            f"divergence {name!r}: the generator f is identically 0 on [0, 1e6] (no value reaches {_TINY:.3g}): that "
            "divergence is 0 for every policy, so there is no trust region (every token would get the bounds "
            "(0, min(1/p, cap)))"
        )


def register_divergence(
    name: str,
    f: Callable[[torch.Tensor], torch.Tensor],
    raw_bounds: RawBounds | None = None,
    lower_limit_at_one: Callable[[float], float] | None = None,
    *,
    odds_bounds: OddsBounds | None = None,
    overwrite: bool = False,
) -> Divergence:
    """Register an f-divergence under ``name``; only its generator ``f`` is required.

    ``f`` is checked once, here, by :func:`check_generator`: it must be elementwise, finite on (0, inf) (f(0) may be
    +inf), zero at 1, non-negative, convex and not identically zero, or a ``ValueError`` names the property that
    fails (such a generator would otherwise silently disable clipping or freeze tokens).

    Example:
        >>> register_divergence("js", lambda u: 0.5 * (torch.xlogy(u, u) - torch.xlogy(u + 1, (u + 1) / 2)))
        >>> band_bounds(old_logps, "js", delta=0.02)
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"divergence name must be a non-empty string, got {name!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"divergence {name!r} is already registered; pass overwrite=True to replace it")
    if not callable(f):
        raise ValueError(f"f must be a callable mapping a ratio tensor to f(ratio), got {f!r}")
    check_generator(name, f)
    if odds_bounds is not None and (raw_bounds is not None or lower_limit_at_one is not None):
        raise ValueError(
            f"divergence {name!r}: give either raw_bounds (with an optional lower_limit_at_one) or odds_bounds, "
            "not both (odds_bounds at t = 0 already is the p -> 1 limit)"
        )
    divergence = Divergence(name, f, raw_bounds, lower_limit_at_one, odds_bounds)
    _REGISTRY[name] = divergence
    return divergence


def available_divergences() -> list[str]:
    """Names accepted by :func:`band_bounds` (built-in and registered)."""
    return sorted(_REGISTRY)


def get_divergence(name: str | Divergence) -> Divergence:
    """The registered divergence ``name`` (or an import path already resolved by :func:`resolve_divergence`)."""
    if isinstance(name, Divergence):
        return name
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        pass
    try:
        return _REGISTRY[_ALIASES[name]]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown divergence {name!r}; accepted: {', '.join(available_divergences())} "
            "(or register one with bandpo_trl.register_divergence)"
        ) from None


def resolve_divergence(name: str) -> str:
    """A key accepted by :func:`get_divergence` for a registered name or an import path, importing as needed.

    - a registered name (or an already resolved path) is returned as is;
    - ``"my_pkg.divergences:js"`` imports ``my_pkg.divergences``; if that import registered ``js`` (through
      :func:`register_divergence`; or ``js`` is registered with a generator defined in that module), the path
      selects it. Otherwise the module's callable attribute ``js`` is registered as the generator under the name
      ``"my_pkg.divergences:js"``;
    - ``"my_pkg.divergences.js_generator"`` (no colon) imports ``my_pkg.divergences`` and registers its callable
      attribute ``js_generator`` as the generator under the full dotted name.

    A generator registered here is checked like any other (:func:`check_generator`). The current working directory
    is put on ``sys.path`` for the import. Raises ``ValueError`` for an unknown name, a module that is not found,
    a missing or non-callable attribute, or a generator that fails the checks. Idempotent: the path stays usable
    as a name (``band_bounds(logps, "my_pkg.divergences:js")``) once resolved.
    """
    if name in _REGISTRY or (isinstance(name, str) and _ALIASES.get(name) in _REGISTRY):
        return name
    if not is_import_path(name):
        get_divergence(name)  # raises the "unknown divergence" error
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        before = _REGISTRY.get(attribute)
        module = import_module(module_name, name) if module_name else None
        registered = _REGISTRY.get(attribute)
        if (
            module is not None
            and registered is not None
            and (registered is not before or getattr(registered.f, "__module__", None) == module.__name__)
        ):
            _ALIASES[name] = attribute
            return name
        try:
            f = import_object(name, require_callable=True)
        except ValueError as error:
            if module is None or hasattr(module, attribute.split(".")[0]):
                raise
            raise ValueError(
                f"{name!r}: importing module {module_name!r} registered no divergence {attribute!r}, and the module "
                f"has no attribute {attribute!r} to register as its generator"
            ) from error
    else:
        f = import_object(name, require_callable=True)
    register_divergence(name, f)
    return name
