"""The Band operator: per-token ratio bounds from an f-divergence trust region.

For a sampled token whose old probability is ``p``, the Band interval ``[l, u]`` is the set of ratios
``r = pi(a) / pi_old(a)`` reachable inside ``D_f(pi || pi_old) <= delta`` (docs/method.md §2):

    g(p, r) = p f(r) + (1 - p) f((1 - p r) / (1 - p)) <= delta,    r in [0, 1/p].

Each divergence comes from the registry (:mod:`bandpo_trl.divergences`): its generator ``f`` plus, optionally, its
bounds in closed form or from a dedicated solver (docs/method.md §3). This module holds those solvers, registers the
five built-in divergences, and applies the training rules (cap, extreme ``p``; docs/method.md §4) in
:func:`band_bounds`; any other convex ``f`` goes through :func:`solve_band`, a bracketed bisection. All functions
here are pure tensor code with a fixed amount of work: no ``.item()``, no data-dependent loop, so they run inside
CUDA graphs and ``torch.compile``.

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

import torch
import torch.nn.functional as F

from .divergences import (
    Divergence,
    available_divergences,
    check_generator,
    get_divergence,
    register_divergence,
    resolve_divergence,
)
from .utils import check_positive

__all__ = [
    "Divergence",
    "available_divergences",
    "band_bounds",
    "check_generator",
    "check_max_ratio",
    "dcpo_bounds",
    "get_divergence",
    "register_divergence",
    "resolve_divergence",
    "solve_band",
]

# docs/method.md §4.2: tokens this close to 0 or 1 get fixed bounds instead of solved ones.
EXTREME_P = 1e-6
_LOG_TAIL = math.log(EXTREME_P)
_LOG_HEAD = math.log1p(-EXTREME_P)


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
    # off by that (2e-3 in float32 at p = 3e-5) is then not a left bracket, and the clamp would stop Newton short.
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


def check_max_ratio(max_ratio, name: str = "max_ratio") -> float | None:
    """``max_ratio`` as a float, or ``None``; raise ``ValueError`` naming ``name`` unless it is ``None`` or a finite
    number >= 1 (the cap on the upper bound, docs/method.md §4.2; below 1 it would exclude the ratio 1).

    Example:
        >>> check_max_ratio(10)
        10.0
        >>> check_max_ratio(0.5, "band_max_ratio")
        Traceback (most recent call last):
        ValueError: band_max_ratio must be None (raw bounds) or a finite number >= 1, got 0.5
    """
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


def _raw_bounds(
    divergence: Divergence, p: torch.Tensor, q: torch.Tensor, delta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw interval at ``p`` (``q = 1 - p``): the divergence's closed form or solver, else :func:`solve_band`."""
    if divergence.odds_bounds is not None:
        return divergence.odds_bounds(q / p, delta)
    if divergence.raw_bounds is not None:
        return divergence.raw_bounds(p, q, delta)
    return solve_band(divergence.f, p, q, delta)


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
    lower, upper = _raw_bounds(divergence, p, 1 - p, delta)
    return bool(lower.item() == 0.0 and upper.item() >= 2 * max_ratio)


@functools.lru_cache(maxsize=256)
def _lower_limit_at_one(divergence: Divergence, delta: float) -> float:
    if divergence.lower_limit_at_one is not None:
        return float(divergence.lower_limit_at_one(delta))
    # (Only the mask path asks: an odds closed form gets its limit from t = 0 directly.)
    q = torch.tensor([1e-12], dtype=torch.float64)
    lower, _ = _raw_bounds(divergence, 1 - q, q, delta)
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
        max_ratio: cap on ``upper`` (the paper's 10). With a number, the rules of docs/method.md §4.2 apply:
            ``p < 1e-6`` gives ``(0, max_ratio)``, ``p > 1 - 1e-6`` gives ``(lim_{p->1} l, 1)``, and the bounds are
            clamped to ``[0, 1]`` and ``[1, max_ratio]``. ``None`` returns the raw interval ``[l, u]`` inside
            ``[0, 1/p]`` (with ``p`` floored so that ``1/p`` stays finite in the input's dtype).

    Returns:
        Two tensors shaped, typed and placed like ``old_logps``, without autograd history. NaN in, NaN out;
        ``log p = -inf`` and ``log p >= 0`` (rounding) give valid bounds.
    """
    _check_logps(old_logps)
    spec = get_divergence(divergence)
    delta = check_positive("delta", delta)
    max_ratio = check_max_ratio(max_ratio)
    work = _work_dtype(old_logps.dtype)
    with torch.no_grad():
        logp = old_logps.detach().to(work)
        if spec.odds_bounds is not None:
            lower, upper = spec.odds_bounds(_odds(logp, max_ratio is not None, old_logps.dtype), delta)
        elif max_ratio is None:
            log_min, log_max = _raw_log_range(work, old_logps.dtype)
            lower, upper = _raw_bounds(spec, *_probabilities(logp.clamp(log_min, log_max)), delta)
        else:
            lower, upper = _raw_bounds(spec, *_probabilities(logp.clamp(_LOG_TAIL, _LOG_HEAD)), delta)
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
    """DCPO's dynamic adaptive clipping bounds (docs/method.md §5.4), same conventions as :func:`band_bounds`.

    ``l = 1/2 + 1/2 sqrt(max(1 - 4 eps_l / p, 0))``, ``u = 1/2 + 1/2 sqrt(1 + 4 eps_h / p)``, ``u`` capped at
    ``max_ratio``. Unlike Band it ignores the simplex limit ``u <= 1/p``.
    """
    _check_logps(old_logps)
    epsilon_low = check_positive("epsilon_low", epsilon_low)
    epsilon_high = check_positive("epsilon_high", epsilon_high)
    max_ratio = check_max_ratio(max_ratio)
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
