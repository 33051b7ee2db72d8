"""The Band operator: per-token ratio bounds from an f-divergence trust region.

For a sampled token whose old probability is ``p``, the Band interval ``[l, u]`` is the set of ratios
``r = pi(a) / pi_old(a)`` reachable inside ``D_f(pi || pi_old) <= delta`` (BANDPO.md, section 2):

    g(p, r) = p f(r) + (1 - p) f((1 - p r) / (1 - p)) <= delta,    r in [0, 1/p].

Every divergence is a small registry entry (``f`` plus, optionally, its bounds in closed form or from a dedicated
solver); any other convex ``f`` goes through :func:`solve_band`, a bracketed bisection. All functions here are pure
tensor code with a fixed amount of work: no ``.item()``, no data-dependent loop, so they run inside CUDA graphs and
``torch.compile``.

Example:
    >>> import torch
    >>> from bandpo_trl import band_bounds
    >>> lower, upper = band_bounds(torch.log(torch.tensor([0.01, 0.5, 0.99])), "kl", delta=0.05)
    >>> upper  # rare tokens may grow a lot, likely ones hardly at all
    tensor([7.8098, 1.3085, 1.0101])
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .utils import import_module, import_object, is_import_path

__all__ = [
    "Divergence",
    "available_divergences",
    "band_bounds",
    "check_generator",
    "dcpo_bounds",
    "get_divergence",
    "register_divergence",
    "resolve_divergence",
    "solve_band",
]

# BANDPO.md section 3: tokens this close to 0 or 1 get fixed bounds instead of solved ones.
EXTREME_P = 1e-6
_LOG_TAIL = math.log(EXTREME_P)
_LOG_HEAD = math.log1p(-EXTREME_P)

RawBounds = Callable[[torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
OddsBounds = Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Divergence:
    """An f-divergence usable by :func:`band_bounds`.

    Args:
        name: registry key.
        f: the generator, a convex torch function on ratios ``u >= 0`` with ``f(1) = 0``.
        raw_bounds: optional ``(p, q, delta) -> (lower, upper)`` giving the raw interval, with ``q = 1 - p``
            passed separately because it is computed accurately from the log-probability. Without it (and without
            ``odds_bounds``) the generic solver :func:`solve_band` is used.
        lower_limit_at_one: optional ``delta -> lim_{p -> 1} l(p)``, used for tokens with ``p > 1 - 1e-6``.
            Without it the limit is estimated once per ``delta`` from the raw bounds at ``p = 1 - 1e-12``.
        odds_bounds: optional closed form ``(t, delta) -> (lower, upper)`` in the odds ``t = (1 - p) / p`` (so
            ``1/p = 1 + t``), for finite ``t >= 0``; an alternative to ``raw_bounds`` and ``lower_limit_at_one``. It
            must be continuous at ``t = 0``, whose value is then the ``p -> 1`` limit. It is the fast path: one
            transcendental pass for ``t`` and no masks for the rules of BANDPO.md section 3.

    ``raw_bounds`` and ``odds_bounds`` must return new tensors: :func:`band_bounds` clamps them in place.
    """

    name: str
    f: Callable[[torch.Tensor], torch.Tensor]
    raw_bounds: RawBounds | None = None
    lower_limit_at_one: Callable[[float], float] | None = None
    odds_bounds: OddsBounds | None = None

    def bounds(self, p: torch.Tensor, q: torch.Tensor, delta: float) -> tuple[torch.Tensor, torch.Tensor]:
        if self.odds_bounds is not None:
            return self.odds_bounds(q / p, delta)
        if self.raw_bounds is not None:
            return self.raw_bounds(p, q, delta)
        return solve_band(self.f, p, q, delta)


_REGISTRY: dict[str, Divergence] = {}
# Import paths "module:name" whose module registered `name` on import -> that name (see resolve_divergence).
_ALIASES: dict[str, str] = {}


# --------------------------------------------------------------------------------------------------------------
# Checks of a generator at registration: once, on a fixed float64 grid (about 200 points, microseconds).
# --------------------------------------------------------------------------------------------------------------

# u = 0, 1 and 200 points log-spaced over [1e-6, 1e6] (1 is not one of them), sorted. f(0) may be +inf (kl); everywhere else f must be finite.
_PROBE = torch.cat([torch.tensor([0.0, 1.0], dtype=torch.float64), torch.logspace(-6, 6, 200, dtype=torch.float64)])
_PROBE = _PROBE.sort().values
# A fixed shuffle of 150 of the 202 points as a (2, 75) batch: an elementwise f gives the same values there (the solver
# calls f on (2, *shape) tensors), one that reduces, normalises or looks at positions does not.
_PROBE_SUBSET = torch.randperm(len(_PROBE), generator=torch.Generator().manual_seed(0))[:150]
_ATOL = 1e-10  # on f(1) = 0, f >= 0 and "not identically zero"
# Rounding allowances, relative: wide enough for an f computed in float32, far below any real concavity or
# dependence on other elements.
_RTOL = 1e-6


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


def check_generator(name: str, f: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Raise ``ValueError`` unless ``f`` is a usable f-divergence generator (called by :func:`register_divergence`).

    On a float64 grid (u = 0, 1 and 200 points log-spaced over [1e-6, 1e6]) ``f`` must be elementwise (same shape
    out as in; the same values on a shuffled (2, 75) sub-batch), finite on (0, inf) (f(0) may be +inf, as for kl),
    zero at 1, non-negative, convex (up to rounding) and not identically zero. A generator failing any of these
    would register and then give no trust region at all (every bound (0, min(1/p, cap))) or frozen tokens (1, 1).
    """
    u = _PROBE
    y = _probe(name, f, u)
    sub = _PROBE_SUBSET
    y_sub = _probe(name, f, u[sub].reshape(2, -1)).reshape(-1)
    both = torch.isfinite(y[sub]) & torch.isfinite(y_sub)
    # Equal up to rounding (vectorised and scalar kernels may differ in the last bits); inf and NaN exactly.
    exact = (y_sub == y[sub]) | (y_sub.isnan() & y[sub].isnan())
    same = torch.where(both, (y_sub - y[sub]).abs() <= _RTOL * y[sub].abs() + 1e-15, exact)
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
    if not abs(at_one) <= _ATOL:
        raise ValueError(f"divergence {name!r}: the generator f must satisfy f(1) = 0, got f(1) = {_fmt(at_one)}")
    if (y < -_ATOL).any():
        i = int((y < -_ATOL).nonzero()[0])
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
    tolerance = _RTOL * (v[:-2].abs() + v[1:-1].abs() + v[2:].abs()) + 1e-300
    concave = excess > tolerance
    if concave.any():
        i = int(concave.nonzero()[0])
        raise ValueError(
            f"divergence {name!r}: the generator f must be convex, but f({_fmt(x[i + 1].item())}) = "
            f"{_fmt(v[i + 1].item())} lies above the chord from f({_fmt(x[i].item())}) = {_fmt(v[i].item())} to "
            f"f({_fmt(x[i + 2].item())}) = {_fmt(v[i + 2].item())}"
        )
    if not (v > _ATOL).any():
        raise ValueError(
            f"divergence {name!r}: the generator f is identically 0 on [0, 1e6]: that divergence is 0 for every "
            "policy, so there is no trust region (every token would get the bounds (0, min(1/p, cap)))"
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


# --------------------------------------------------------------------------------------------------------------
# Solvers. Both bounds come from a lower-root solver through the mirror identity
#     p u(p) + (1 - p) l(1 - p) = 1   =>   u(p) = 1 - (q / p) (l(q) - 1),
# so a solver only ever looks for the root of g(p, .) = delta in (0, 1).
# --------------------------------------------------------------------------------------------------------------


def _upper_from_mirror(p: torch.Tensor, q: torch.Tensor, lower_of_q_minus_one: torch.Tensor) -> torch.Tensor:
    return 1 - (q / p) * lower_of_q_minus_one


def _log_floor(dtype: torch.dtype) -> float:
    # Roots below this underflow to 0 anyway; keeping iterates above it keeps the arithmetic finite.
    return 2 * math.log(torch.finfo(dtype).tiny)


def solve_band(
    f: Callable[[torch.Tensor], torch.Tensor],
    p: torch.Tensor,
    q: torch.Tensor,
    delta: float,
    iterations: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw Band bounds for any convex generator ``f``, by bisection on ``log r`` with a fixed iteration count.

    ``g(p, .)`` is decreasing on ``(0, 1]``, so bisection on ``s = log r`` over ``[log(tiny), 0]`` converges to
    the lower root to full precision in ``iterations`` steps (64 in float64, 32 otherwise). The upper root
    comes from the mirror identity. Saturation (``g(p, 0) <= delta``) gives exactly 0 (and ``u = 1/p``).
    """
    if iterations is None:
        iterations = 64 if p.dtype == torch.float64 else 32
    both_p = torch.stack([p, q])  # lower roots at p (for l) and at q (for u, by the mirror identity)
    both_q = torch.stack([q, p])
    ratio = both_p / both_q

    def excess(s: torch.Tensor) -> torch.Tensor:
        # exp(s), not expm1(s) + 1: the lower root can be far below float eps (7e-23 for kl at p = 1e-3).
        return both_p * f(torch.exp(s)) + both_q * f(1 - ratio * torch.expm1(s)) - delta

    # both_p * 0: a NaN p makes every iterate NaN, so NaN in gives NaN out rather than a finite bracket end.
    lo = both_p * 0 + math.log(torch.finfo(p.dtype).tiny)
    hi = torch.zeros_like(both_p)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        above = excess(mid) > 0
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    root_log = 0.5 * (lo + hi)
    saturated = both_p * f(torch.zeros_like(both_p)) + both_q * f(1 / both_q) <= delta
    lower = torch.where(saturated[0], 0.0, torch.exp(root_log[0]))
    return lower, _upper_from_mirror(p, q, torch.where(saturated[1], -1.0, torch.expm1(root_log[1])))


def _kl_raw_bounds(p: torch.Tensor, q: torch.Tensor, delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(pi_old || pi): Newton on s = log r, 4 steps in float64 (3 in float32), converged to working precision.

    g(s) = -p s - q log1p(-p expm1(s) / q) is convex and decreasing for s < 0 and lies above its asymptote
    -p s + q log q, whose root ``s_min`` is therefore a left bracket; Newton iterates are kept in [s_min, 0].
    The start is the better of ``s_min`` and the small-delta estimate ``log(1 - sqrt(2 delta q / p))``.
    In-place arithmetic: on the CPU, fresh allocations of token-sized tensors cost as much as the math.
    """
    both_p = torch.stack([p, q])  # lower roots at p (for l) and at q (for u, by the mirror identity)
    both_q = torch.stack([q, p])
    # log q as log1p(-p) while p < 1/2: log(q) of a q near 1 keeps only its absolute accuracy, and an s_min that is
    # off by that (2e-3 in float32 at p = 3e-5) is no longer a left bracket, so the clamp would stop Newton short.
    log_q = torch.where(both_p < 0.5, torch.log1p(-both_p), torch.log(both_q))
    s_min = log_q.mul_(both_q).sub_(delta).div_(both_p).clamp_(min=_log_floor(p.dtype))
    # log1p(-x), not log(1 - x): for p < eps^2 the estimate x is below eps, 1 - x rounds to 1, s = 0 is a fixed
    # point of the Newton step (expm1(0) = 0 slope) and the upper bound from the mirror would collapse to 1.
    s = torch.div(both_q, both_p).mul_(2 * delta).sqrt_().clamp_(max=1).neg_().log1p_()
    torch.maximum(s, s_min, out=s)
    for _ in range(4 if p.dtype == torch.float64 else 3):
        p_em1 = torch.expm1(s).mul_(both_p)
        one_minus_pr = torch.sub(both_q, p_em1)
        q_log = torch.div(p_em1, both_q).neg_().log1p_().mul_(both_q)
        # Newton step excess / slope, with slope = p expm1(s) / (1 - p e^s)
        step = torch.mul(both_p, s).add_(q_log).neg_().sub_(delta).mul_(one_minus_pr).div_(p_em1)
        s.sub_(step)
        torch.maximum(s, s_min, out=s).clamp_(max=0)
    # exp, not expm1 + 1: the lower root can be far below float eps (1e-23 at p = 1e-3, delta = 0.05).
    return torch.exp(s[0]), _upper_from_mirror(p, q, torch.expm1(s[1]))


def _rkl_raw_bounds(p: torch.Tensor, q: torch.Tensor, delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(pi || pi_old): Newton on r, 7 steps in float64 (6 in float32), kept above Pinsker's r >= 1 - sqrt(delta/2)/p.

    g(r) = KL(r p || p) is convex and decreasing on (0, 1]; the start is the smaller of the small-delta estimate
    and the chord bound 1 - delta / g(0), both right of the root, so the first step lands left of it and later
    ones climb to it monotonically. The last step is applied to r for l, but to r - 1 for u: the mirror
    u = 1 - (q/p)(l(q) - 1) needs l(q) - 1 to relative precision, which r itself, near 1, only holds absolutely.
    """
    both_p = torch.stack([p, q])
    both_q = torch.stack([q, p])
    g0 = torch.log(both_q).neg_()
    r_min = (1 - math.sqrt(delta / 2) / both_p).clamp_(min=torch.finfo(p.dtype).tiny)
    r = torch.minimum(torch.div(both_q, both_p).mul_(2 * delta).sqrt_().neg_().add_(1), 1 - delta / g0)
    torch.maximum(r, r_min, out=r)
    steps = 7 if p.dtype == torch.float64 else 6
    for step_index in range(steps):
        one_minus_r = torch.sub(1, r)  # exact for r >= 1/2 (Sterbenz), so 1 - r + correction keeps u - 1 accurate
        p_gap = torch.mul(one_minus_r, both_p)
        log_rest = torch.div(p_gap, both_q).log1p_()  # log((1 - p r) / q) = log1p(p (1 - r) / q)
        log_r = torch.log(r)  # r >= r_min > 0
        # g(r) - delta = p r log r + (1 - p r) log_rest - delta, with 1 - p r = q + p (1 - r) kept exact near p r = 1
        excess = torch.mul(both_p, r).mul_(log_r).add_(p_gap.add_(both_q).mul_(log_rest)).sub_(delta)
        step = excess.div_(log_r.sub_(log_rest).mul_(both_p))  # slope g'(r) = p (log r - log_rest)
        if step_index < steps - 1:
            r.sub_(step)
            torch.maximum(r, r_min, out=r).clamp_(max=1)
    saturated = g0 <= delta  # even r = 0 is inside the region
    lower = torch.maximum(r[0].sub_(step[0]), r_min[0]).clamp_(max=1).masked_fill_(saturated[0], 0.0)
    lower_of_q_minus_one = torch.maximum(one_minus_r[1].add_(step[1]).neg_(), r_min[1] - 1).clamp_(max=0)
    return lower, _upper_from_mirror(p, q, lower_of_q_minus_one.masked_fill_(saturated[1], -1.0))


# Closed forms in the odds t = (1 - p) / p = 1/p - 1: at t = 0 (p = 1) they give the p -> 1 limits exactly.


def _tv_odds_bounds(t: torch.Tensor, delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    # l = max(1 - delta/p, 0) and u = min(1 + delta/p, 1/p), with delta/p = delta (1 + t)
    step = torch.add(t, 1).mul_(delta)
    return torch.sub(1, step).relu_(), torch.minimum(step, t).add_(1)


def _chi2_odds_bounds(t: torch.Tensor, delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    # l = max(1 - sqrt(delta q/p), 0) and u = min(1 + sqrt(delta q/p), 1/p), with q/p = t
    step = torch.mul(t, delta).sqrt_()
    return torch.sub(1, step).relu_(), torch.minimum(step, t).add_(1)


def _hellinger_odds_bounds(t: torch.Tensor, delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    # With alpha = asin(sqrt(p)), phi = acos(1 - delta/2) and w = sqrt(t) = cot(alpha), dividing by sin^2(alpha) = p:
    #   l = sin^2(max(alpha - phi, 0)) / p = max(cos phi - w sin phi, 0)^2
    #   u = sin^2(min(alpha + phi, pi/2)) / p = (cos phi + w sin phi)^2 + max(sin phi - w cos phi, 0)^2,
    # where the second term, cos^2(alpha + phi) / p while alpha + phi > pi/2, makes u = 1/p there without a mask.
    # The min with 1/p = 1 + t undoes rounding above it (cos^2 + sin^2 may round to 1 + ulp): u = 1 exactly at t = 0.
    cos_phi = max(1 - delta / 2, -1.0)
    sin_phi = math.sqrt(1 - cos_phi * cos_phi)
    w = torch.sqrt(t)
    lower = torch.mul(w, -sin_phi).add_(cos_phi).relu_().square_()
    upper = torch.mul(w, sin_phi).add_(cos_phi).square_()
    upper.add_(w.mul_(-cos_phi).add_(sin_phi).relu_().square_())
    return lower, torch.minimum(upper, torch.add(t, 1), out=upper)


register_divergence("kl", lambda u: u - 1 - torch.log(u), _kl_raw_bounds, lambda delta: math.exp(-delta))
register_divergence("rkl", lambda u: torch.xlogy(u, u) - u + 1, _rkl_raw_bounds, lambda delta: 1.0)
register_divergence("tv", lambda u: 0.5 * (u - 1).abs(), odds_bounds=_tv_odds_bounds)
register_divergence("chi2", lambda u: (u - 1).square(), odds_bounds=_chi2_odds_bounds)
register_divergence("hellinger", lambda u: (torch.sqrt(u) - 1).square(), odds_bounds=_hellinger_odds_bounds)


# --------------------------------------------------------------------------------------------------------------
# Public operators
# --------------------------------------------------------------------------------------------------------------


def _check_logps(old_logps) -> None:
    if not isinstance(old_logps, torch.Tensor) or not old_logps.is_floating_point():
        kind = old_logps.dtype if isinstance(old_logps, torch.Tensor) else type(old_logps).__name__
        raise ValueError(
            f"old_logps must be a floating-point torch.Tensor of log-probabilities, got {kind}; "
            "accepted dtypes: float16, bfloat16, float32, float64"
        )


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_max_ratio(max_ratio, name: str = "max_ratio") -> float | None:
    if max_ratio is None:
        return None
    if (
        isinstance(max_ratio, bool)
        or not isinstance(max_ratio, (int, float))
        or not math.isfinite(max_ratio)
        or max_ratio < 1
    ):
        raise ValueError(f"{name} must be None (raw bounds) or a finite number >= 1, got {max_ratio!r}")
    return float(max_ratio)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half types are solved in float32; float64 stays float64 (the reference accuracy of 1e-9 needs it).
    return torch.float64 if dtype == torch.float64 else torch.float32


def _raw_log_range(work: torch.dtype, out: torch.dtype) -> tuple[float, float]:
    # Raw bounds reach 1/p: keep p large enough that 1/p is finite in the output dtype, and 1 - p > 0 (q is
    # -expm1(log p), so log p <= -tiny is enough; a coarser cap such as -eps^2 would move l(p) for rkl by 1e-4).
    p_floor = max(torch.finfo(work).tiny, 4.0 / torch.finfo(out).max)
    return math.log(p_floor), -torch.finfo(work).tiny


def _probabilities(logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # q = 1 - p from expm1: exact near p = 1, where 1 - exp(logp) would cancel.
    return torch.exp(logp), torch.expm1(logp).neg_()


@functools.lru_cache(maxsize=8)
def _head_threshold(dtype: torch.dtype) -> float:
    """The largest -log p of the head rule's tokens (log p > log(1 - 1e-6), compared in ``dtype``), for
    ``F.threshold``, which replaces values ``<=`` its threshold."""
    head = torch.tensor(-_LOG_HEAD, dtype=dtype)
    return torch.nextafter(head, torch.tensor(-math.inf, dtype=dtype)).item()


def _odds(logp: torch.Tensor, capped: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """t = (1 - p) / p = expm1(-log p). Capped: p < 1e-6 is evaluated at 1e-6 (the tail rule where
    _tail_given_by_clamp holds) and p > 1 - 1e-6 at p = 1 (t = 0, the head rule's limits for an odds closed form):
    a clamp and a threshold instead of masks, which cost a pass each and are slow on CPUs."""
    surprisal = torch.neg(logp)
    if capped:
        F.threshold_(surprisal.clamp_(max=-_LOG_TAIL), _head_threshold(logp.dtype), 0.0)
    else:
        log_min, log_max = _raw_log_range(logp.dtype, out_dtype)
        surprisal.clamp_(-log_max, -log_min)
    return surprisal.expm1_()


@functools.lru_cache(maxsize=256)
def _tail_given_by_clamp(divergence: Divergence, delta: float, max_ratio: float) -> bool:
    """Whether tokens clamped up to p = 1e-6 already get the tail rule's (0, max_ratio) (true for the paper's
    settings): then the tail needs no mask. Decided once per (divergence, delta, cap) from a float64 scalar on the
    CPU, not from the data, so it costs no synchronisation."""
    p = torch.tensor([EXTREME_P], dtype=torch.float64)
    lower, upper = divergence.bounds(p, 1 - p, delta)
    return bool(lower.item() == 0.0 and upper.item() >= 2 * max_ratio)


@functools.lru_cache(maxsize=256)
def _lower_limit_at_one(divergence: Divergence, delta: float) -> float:
    if divergence.lower_limit_at_one is not None:
        return float(divergence.lower_limit_at_one(delta))
    # (Only the mask path asks: an odds closed form gets its limit from t = 0 directly.)
    q = torch.tensor([1e-12], dtype=torch.float64)
    lower, _ = divergence.bounds(1 - q, q, delta)
    return float(lower.clamp(0, 1))


def band_bounds(
    old_logps: torch.Tensor,
    divergence: str | Divergence = "kl",
    delta: float = 0.05,
    max_ratio: float | None = 10.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token Band ratio bounds ``(lower, upper)`` from old log-probabilities.

    Args:
        old_logps: log pi_old of the sampled tokens, any shape, device and floating dtype.
        divergence: a name from :func:`available_divergences` (``"kl"``, ``"rkl"``, ``"tv"``, ``"chi2"``,
            ``"hellinger"``, or one registered with :func:`register_divergence`).
        delta: trust-region radius, > 0.
        max_ratio: cap on ``upper`` (the paper's 10). With a number, the rules of BANDPO.md section 3 apply:
            ``p < 1e-6`` gives ``(0, max_ratio)``, ``p > 1 - 1e-6`` gives ``(lim_{p->1} l, 1)``, and the bounds are
            clamped to ``[0, 1]`` and ``[1, max_ratio]``. ``None`` returns the raw interval ``[l, u]`` inside
            ``[0, 1/p]`` (with ``p`` floored so that ``1/p`` stays finite in the input's dtype).

    Returns:
        Two tensors shaped, typed and placed like ``old_logps``, without autograd history. NaN in, NaN out;
        ``log p = -inf`` and ``log p >= 0`` (rounding) give valid bounds.
    """
    _check_logps(old_logps)
    spec = get_divergence(divergence)
    delta = _check_positive("delta", delta)
    max_ratio = _check_max_ratio(max_ratio)
    work = _work_dtype(old_logps.dtype)
    with torch.no_grad():
        logp = old_logps.detach().to(work)
        if spec.odds_bounds is not None:
            lower, upper = spec.odds_bounds(_odds(logp, max_ratio is not None, old_logps.dtype), delta)
        elif max_ratio is None:
            log_min, log_max = _raw_log_range(work, old_logps.dtype)
            lower, upper = spec.bounds(*_probabilities(logp.clamp(log_min, log_max)), delta)
        else:
            lower, upper = spec.bounds(*_probabilities(logp.clamp(_LOG_TAIL, _LOG_HEAD)), delta)
            head = logp > _LOG_HEAD
            lower.masked_fill_(head, _lower_limit_at_one(spec, delta))
            upper.masked_fill_(head, 1.0)
        if max_ratio is not None:
            lower.clamp_(0, 1)
            upper.clamp_(1, max_ratio)
            # (Under torch.compile the masks are always applied: they fuse into the kernel there.)
            if torch.compiler.is_compiling() or not _tail_given_by_clamp(spec, delta, max_ratio):
                tail = logp < _LOG_TAIL
                lower.masked_fill_(tail, 0.0)
                upper.masked_fill_(tail, max_ratio)
        return lower.to(old_logps.dtype), upper.to(old_logps.dtype)


def dcpo_bounds(
    old_logps: torch.Tensor,
    epsilon_low: float = 0.16,
    epsilon_high: float = 0.2,
    max_ratio: float | None = 10.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DCPO's dynamic adaptive clipping bounds (BANDPO.md section 4), same conventions as :func:`band_bounds`.

    ``l = 1/2 + 1/2 sqrt(max(1 - 4 eps_l / p, 0))``, ``u = 1/2 + 1/2 sqrt(1 + 4 eps_h / p)``, ``u`` capped at
    ``max_ratio``. Unlike Band it ignores the simplex limit ``u <= 1/p``.
    """
    _check_logps(old_logps)
    epsilon_low = _check_positive("epsilon_low", epsilon_low)
    epsilon_high = _check_positive("epsilon_high", epsilon_high)
    max_ratio = _check_max_ratio(max_ratio)
    work = _work_dtype(old_logps.dtype)
    with torch.no_grad():
        logp = old_logps.detach().to(work).clamp(max=0)
        if max_ratio is None:
            logp = logp.clamp(min=_raw_log_range(work, old_logps.dtype)[0] + math.log(4 * epsilon_high + 1))
        inv_p = torch.exp(-logp)
        lower = 0.5 + 0.5 * torch.sqrt((1 - 4 * epsilon_low * inv_p).clamp(min=0))
        upper = 0.5 + 0.5 * torch.sqrt(1 + 4 * epsilon_high * inv_p)
        if max_ratio is not None:
            upper = upper.clamp(max=max_ratio)
        return lower.to(old_logps.dtype), upper.to(old_logps.dtype)
