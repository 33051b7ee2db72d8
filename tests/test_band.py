"""Tests for the Band operator (``bandpo_trl.band``) against docs/method.md §2-§4 and §5.4.

The truth used here is independent of the implementation: the reference CSV (60-digit bisection) and
``g(p, r)`` written out below in mpmath at 50 digits (mpmath comes with torch, through sympy).
"""

from __future__ import annotations

import csv
import importlib.util
import math
import re
from pathlib import Path

import mpmath
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bandpo_trl import available_divergences, band_bounds, dcpo_bounds, register_divergence
from bandpo_trl.divergences import check_generator, get_divergence

BUILTIN = ("kl", "rkl", "tv", "chi2", "hellinger")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")),
]

# ----------------------------------------------------------------------------------------------------------------
# Independent truth: f, f''(1), lim_{p -> 1} l(p), and g(p, r) at 50 digits (docs/method.md §2).
# ----------------------------------------------------------------------------------------------------------------

mpmath.mp.dps = 50
# g(p, r) = p f(r) + (1 - p) f((1 - p r) / (1 - p)) in mpmath, from the script that regenerates the reference table.
_reference_spec = importlib.util.spec_from_file_location(
    "make_band_bounds", Path(__file__).resolve().parent / "data" / "make_band_bounds.py"
)
reference_script = importlib.util.module_from_spec(_reference_spec)
_reference_spec.loader.exec_module(reference_script)
g_mp = reference_script.g


F_SECOND_AT_ONE = {"kl": 1.0, "rkl": 1.0, "chi2": 2.0, "hellinger": 0.5}  # tv is not smooth at 1


def lower_limit_at_one(name: str, delta: float) -> float:
    """lim_{p -> 1} l(p): the root of f(r) + (1 - r) f'(inf) = delta (q f((1 - r) / q) -> (1 - r) f'(inf))."""
    return {
        "kl": math.exp(-delta),
        "rkl": 1.0,
        "tv": max(1.0 - delta, 0.0),
        "chi2": 1.0,
        "hellinger": max(1.0 - delta / 2, 0.0) ** 2,
    }[name]


def rel_err(x: float, ref: float) -> float:
    """Relative error; references below 1e-30 (tiny KL lower bounds, saturated zeros) are compared absolutely."""
    return abs(x - ref) / (abs(ref) if abs(ref) >= 1e-30 else 1.0)


def bounds64(p, divergence: str, delta: float, max_ratio=None):
    """band_bounds on float64 probabilities (given as p, not log p), returned as float64 tensors."""
    p = torch.as_tensor(p, dtype=torch.float64)
    return band_bounds(torch.log(p), divergence, delta, max_ratio=max_ratio)


# ----------------------------------------------------------------------------------------------------------------
# Reference CSV: tests/data/band_bounds.csv, regenerated from g(p, r) alone by tests/data/make_band_bounds.py
# (a test below checks that the committed file is what the script writes).
# ----------------------------------------------------------------------------------------------------------------

REFERENCE_CSV = Path(__file__).resolve().parent / "data" / "band_bounds.csv"
with REFERENCE_CSV.open(newline="") as handle:
    REFERENCE = [
        {
            "divergence": row["divergence"],
            "delta": float(row["delta"]),
            "p": float(row["p"]),
            "lower": float(row["lower"]),
            "upper": float(row["upper"]),
            "lower_saturated": row["lower_saturated"] == "1",
            "upper_saturated": row["upper_saturated"] == "1",
        }
        for row in csv.DictReader(handle)
    ]
REFERENCE_IDS = [f"{r['divergence']}-d{r['delta']:g}-p{r['p']:g}" for r in REFERENCE]


def test_reference_table_regenerates_from_its_definition(tmp_path):
    """The committed table is exactly what the 60-digit bisection of g(p, r) = delta writes, byte for byte."""
    out = tmp_path / "band_bounds.csv"
    assert reference_script.main(["--out", str(out)]) == 0
    assert out.read_text() == REFERENCE_CSV.read_text()


@pytest.mark.parametrize(("name", "delta", "p"), [("kl", "0.05", "1e-4"), ("hellinger", "0.2", "0.3")])
def test_reference_script_roots_solve_g(name, delta, p):
    """Rows outside the table: each unsaturated bound is a root of g(p, r) = delta, and band_bounds agrees."""
    lower, upper, lower_saturated, upper_saturated = reference_script.raw_bounds(name, delta, p)
    with mpmath.workdps(60):
        for bound, saturated in ((lower, lower_saturated), (upper, upper_saturated)):
            if not saturated:
                assert abs(g_mp(name, p, bound) - mpmath.mpf(delta)) < mpmath.mpf(10) ** -40
    ours_lower, ours_upper = bounds64(float(p), name, float(delta))
    assert rel_err(ours_upper.item(), float(upper)) <= 1e-9
    assert rel_err(ours_lower.item(), float(lower)) <= 1e-9


def test_reference_covers_every_builtin_divergence():
    assert {r["divergence"] for r in REFERENCE} == set(BUILTIN)
    assert len(REFERENCE) >= 5 * 3 * 11


# ----------------------------------------------------------------------------------------------------------------
# Accuracy against the reference
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("row", REFERENCE, ids=REFERENCE_IDS)
def test_reference_float64(row):
    lower, upper = band_bounds(
        torch.tensor(math.log(row["p"]), dtype=torch.float64), row["divergence"], row["delta"], None
    )
    assert lower.dtype == upper.dtype == torch.float64
    assert rel_err(lower.item(), row["lower"]) <= 1e-9
    assert rel_err(upper.item(), row["upper"]) <= 1e-9
    # Saturation flags (no converse for u: unsaturated kl at p = 0.999 is within 1e-23 of 1/p; and l = 0 may be an
    # underflow, e.g. kl at p = 1e-4, delta = 0.1)
    if row["lower_saturated"]:
        assert lower.item() <= 1e-15
    elif row["lower"] > 1e-300:
        assert lower.item() > 0
    if row["upper_saturated"]:
        assert upper.item() == pytest.approx(1 / row["p"], rel=1e-15)


@pytest.mark.parametrize("row", REFERENCE, ids=REFERENCE_IDS)
def test_reference_float32(row):
    # A few rows sit next to a saturation threshold and are ill-conditioned (rkl d=0.01 p=0.01, hellinger
    # d=0.01/0.05 p=0.01/0.05, ...): merely rounding log p to float32 moves the *exact* answer by 1e-5..5e-5, which
    # no float32 implementation can undo. So the tolerance of 1e-5 is widened per row by 3x the input's own
    # representation error, measured as the deviation from the CSV of the float64 result evaluated at the
    # float32-rounded input (that float64 result is itself checked to 1e-9 above and against g below). Separately,
    # the float32 output must match that float64 computation at the same float32 input within 1e-4 on every row,
    # which bounds the error the float32 arithmetic adds on its own.
    logp32 = torch.tensor(math.log(row["p"]), dtype=torch.float64).to(torch.float32)
    lower, upper = band_bounds(logp32, row["divergence"], row["delta"], None)
    assert lower.dtype == upper.dtype == torch.float32
    lower64, upper64 = band_bounds(logp32.double(), row["divergence"], row["delta"], None)
    for got, same_input64, ref in ((lower, lower64, row["lower"]), (upper, upper64, row["upper"])):
        input_error = rel_err(same_input64.item(), ref)
        assert rel_err(got.item(), ref) <= 1e-5 + 3 * input_error
        assert rel_err(got.item(), same_input64.item()) <= 1e-4


_TAIL32 = torch.logspace(-6, math.log10(0.5), 400, dtype=torch.float64)
P32_GRID = torch.cat([_TAIL32, (1 - torch.logspace(-12, math.log10(0.5), 400, dtype=torch.float64)).flip(0)]).unique()


@pytest.mark.parametrize("delta", (1e-3, 0.01, 0.05, 0.5))
@pytest.mark.parametrize("divergence", BUILTIN)
def test_float32_matches_float64_on_grid(divergence, delta):
    """Dense p in [1e-6, 1 - 1e-12]: float32 output against float64 at the same float32 input. Float32 must round
    p = exp(log p) and q = -expm1(log p), each to a relative 6e-8; what that alone moves the float64 answer by (log p
    shifted by 6e-8 min(1, q/p)) is allowed on top of 1e-6 (the worst seen is 2.2e-7). Catches float32-only losses
    away from saturation, such as u - 1 kept only to absolute precision by a solver working on r near 1."""
    x32 = torch.log(P32_GRID).float()
    x64 = x32.double()
    q = -torch.expm1(x64)
    shift = 2**-24 * torch.minimum(torch.ones_like(q), q / torch.exp(x64))
    got = band_bounds(x32, divergence, delta, None)
    same_input = band_bounds(x64, divergence, delta, None)
    moved = [band_bounds(x64 + sign * shift, divergence, delta, None) for sign in (1, -1)]
    for i in range(2):
        scale = torch.where(same_input[i] >= 1e-30, same_input[i], 1.0)
        error = (got[i].double() - same_input[i]).abs() / scale
        conditioning = torch.maximum(*((m[i] - same_input[i]).abs() / scale for m in moved))
        worst = (error - 4 * conditioning).argmax()
        assert error[worst] <= 1e-6 + 4 * conditioning[worst], (
            f"{'lower' if i == 0 else 'upper'} at p = {P32_GRID[worst].item():.6g}: error {error[worst].item():.3g}, "
            f"conditioning {conditioning[worst].item():.3g}"
        )


@pytest.mark.parametrize("row", REFERENCE, ids=REFERENCE_IDS)
def test_roots_solve_g_equals_delta(row):
    """At each root g(p, bound) = delta, checked as a sign change of g - delta across bound * (1 -+ 1e-9) -+ 1e-15
    (kept inside [0, 1/p]); a saturated bound is inside the region: g(p, 0) <= delta, g(p, 1/p) <= delta."""
    name, delta = row["divergence"], row["delta"]
    logp = math.log(row["p"])
    p = mpmath.exp(mpmath.mpf(logp))  # the exact probability the float64 input stands for
    lower, upper = (b.item() for b in band_bounds(torch.tensor(logp, dtype=torch.float64), name, delta, None))
    assert 0 <= lower <= 1 <= upper <= 1 / row["p"] * (1 + 1e-15)
    inside = delta * (1 + 1e-12)  # rows exactly at a threshold (tv p = delta): p's rounding may land either side

    def bracket(bound):
        return max(bound * (1 - 1e-9) - 1e-15, 0), min(bound * (1 + 1e-9) + 1e-15, 1 / p)

    if row["lower_saturated"]:
        assert g_mp(name, p, 0) <= inside
    else:
        left, right = bracket(lower)
        assert g_mp(name, p, left) > delta > g_mp(name, p, right)
    if row["upper_saturated"]:
        assert g_mp(name, p, 1 / p) <= inside
    else:
        left, right = bracket(upper)
        assert g_mp(name, p, left) < delta < g_mp(name, p, right)


# ----------------------------------------------------------------------------------------------------------------
# Properties of docs/method.md §2.4, on a dense float64 grid of p
# ----------------------------------------------------------------------------------------------------------------

_TAIL = torch.logspace(-12, math.log10(0.5), 300, dtype=torch.float64)
P_GRID = torch.cat([_TAIL, (1 - _TAIL).flip(0)]).unique()  # 1e-12 .. 1 - 1e-12, sorted
DELTAS = (1e-3, 0.01, 0.05, 0.1, 0.5)


@pytest.mark.parametrize("divergence", BUILTIN)
@pytest.mark.parametrize("delta", DELTAS)
def test_order_and_range(divergence, delta):
    lower, upper = bounds64(P_GRID, divergence, delta)
    assert torch.isfinite(lower).all() and torch.isfinite(upper).all()
    assert (lower >= 0).all() and (lower <= 1).all()
    assert (upper >= 1).all() and (upper <= 1 / P_GRID * (1 + 1e-15)).all()


@pytest.mark.parametrize("divergence", BUILTIN)
@pytest.mark.parametrize("delta", DELTAS)
def test_mirror_identity(divergence, delta):
    lower, upper = bounds64(P_GRID, divergence, delta)
    lower_m, upper_m = band_bounds(torch.log1p(-P_GRID), divergence, delta, None)  # at 1 - p
    q = 1 - P_GRID
    torch.testing.assert_close(P_GRID * upper + q * lower_m, torch.ones_like(P_GRID), rtol=0, atol=1e-12)
    torch.testing.assert_close(P_GRID * lower + q * upper_m, torch.ones_like(P_GRID), rtol=0, atol=1e-12)


@pytest.mark.parametrize("divergence", BUILTIN)
@pytest.mark.parametrize("delta", DELTAS)
def test_symmetric_at_one_half(divergence, delta):
    lower, upper = bounds64(0.5, divergence, delta)
    assert (lower + upper).item() == pytest.approx(2, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("divergence", BUILTIN)
@pytest.mark.parametrize("delta", DELTAS)
def test_monotone_in_p(divergence, delta, dtype):
    slack = 1e-12 if dtype == torch.float64 else 1e-5
    lower, upper = band_bounds(torch.log(P_GRID).to(dtype), divergence, delta, None)
    lower, upper = lower.double(), upper.double()
    assert (upper[1:] <= upper[:-1] * (1 + slack)).all(), "u must be non-increasing in p"
    assert (lower[1:] >= lower[:-1] * (1 - slack) - slack * 1e-30).all(), "l must be non-decreasing in p"


@pytest.mark.parametrize("divergence", BUILTIN)
def test_monotone_in_delta(divergence):
    bounds = [bounds64(P_GRID, divergence, delta) for delta in (1e-4, *DELTAS, 1.0)]
    for (lower_a, upper_a), (lower_b, upper_b) in zip(bounds, bounds[1:]):
        assert (upper_b >= upper_a * (1 - 1e-14)).all(), "u must grow with delta"
        assert (lower_b <= lower_a * (1 + 1e-14)).all(), "l must shrink as delta grows"


# (divergence, threshold p for u = 1/p (u saturated for p >= it), threshold p for l = 0 (l saturated for p <= it))
SATURATION = {
    "tv": (lambda d: 1 - d, lambda d: d),
    "chi2": (lambda d: 1 / (1 + d), lambda d: d / (1 + d)),
    "rkl": (lambda d: math.exp(-d), lambda d: -math.expm1(-d)),
}


@pytest.mark.parametrize("divergence", sorted(SATURATION))
@pytest.mark.parametrize("delta", (0.01, 0.05, 0.1, 0.5))
def test_saturation_thresholds(divergence, delta):
    upper_threshold, lower_threshold = (t(delta) for t in SATURATION[divergence])
    eta = 1e-6
    # upper: saturated just above its threshold, not just below
    p_in, p_out = upper_threshold * (1 + eta), upper_threshold * (1 - eta)
    _, upper = bounds64([p_in, p_out], divergence, delta)
    assert upper[0].item() == pytest.approx(1 / p_in, rel=1e-14)
    assert upper[1].item() * p_out < 1 - 1e-9
    # lower: saturated just below its threshold, not just above
    p_in, p_out = lower_threshold * (1 - eta), lower_threshold * (1 + eta)
    lower, _ = bounds64([p_in, p_out], divergence, delta)
    assert lower[0].item() == 0
    assert lower[1].item() > 0


@pytest.mark.parametrize("divergence", ("kl", "hellinger"))
def test_kl_and_hellinger_never_saturate_upper(divergence):
    # g(p, 1/p) > delta for every p < 1 at these deltas: kl has f(0) = inf; hellinger saturates only for p >= cos^2(phi)
    p = P_GRID[P_GRID < 0.9]
    _, upper = bounds64(p, divergence, 0.05)
    assert (upper * p < 1 - 1e-6).all()


@pytest.mark.parametrize("delta", (0.01, 0.05, 0.1))
def test_kl_limit_p_to_one(delta):
    errors = []
    for q in (1e-4, 1e-6, 1e-8, 1e-10):
        lower, upper = bounds64(1 - q, "kl", delta)
        assert 1 <= upper.item() <= 1 / (1 - q)
        errors.append(abs(lower.item() - math.exp(-delta)))
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("delta", (0.01, 0.05, 0.1))
def test_kl_limit_p_to_zero(delta, dtype):
    # float32 reaches p = 1e-30 (tiny is 1e-38); float64 goes down to 1e-300.
    ps = (1e-8, 1e-12, 1e-20, 1e-30) + ((1e-100, 1e-300) if dtype == torch.float64 else ())
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    target = -math.expm1(-delta)
    lowers = []
    for p in ps:
        logp = torch.tensor(math.log(p), dtype=torch.float64).to(dtype)
        lower, upper = band_bounds(logp, "kl", delta, None)
        p_in = math.exp(logp.item())
        # -log(1 - p u) = delta + p log(p u / p) + O(p): the first correction is p log(1/p) in absolute terms
        assert upper.item() * p_in == pytest.approx(target, rel=max(tol, 2 * p * math.log(1 / p) / target))
        lowers.append(lower.item())
    assert lowers[-1] == 0 and lowers == sorted(lowers, reverse=True)
    assert bounds64(1e-4, "kl", delta)[0].item() < 1e-30  # exp(-delta/p - 1)-like decay


@pytest.mark.parametrize("divergence", sorted(F_SECOND_AT_ONE))
@pytest.mark.parametrize("p", (0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99))
def test_small_delta_expansion(divergence, p):
    """u - 1 ~ sqrt(2 delta (1 - p) / (f''(1) p)) (and 1 - l the same), with an error that vanishes as delta -> 0."""
    errors = []
    for delta in (1e-6, 1e-8):
        lower, upper = bounds64(p, divergence, delta)
        estimate = math.sqrt(2 * delta * (1 - p) / (F_SECOND_AT_ONE[divergence] * p))
        errors.append(max(rel_err(upper.item() - 1, estimate), rel_err(1 - lower.item(), estimate)))
    assert errors[0] < 0.05
    assert errors[1] < max(errors[0] / 5, 1e-6)  # O(sqrt(delta)) relative error (exact for chi2)


@pytest.mark.parametrize("p", (0.01, 0.1, 0.5, 0.9, 0.99))
def test_kl_at_delta_matches_chi2_at_two_delta(p):
    for delta, tol in ((1e-4, 0.05), (1e-8, 5e-4)):
        lower_kl, upper_kl = bounds64(p, "kl", delta)
        lower_chi2, upper_chi2 = bounds64(p, "chi2", 2 * delta)
        assert rel_err(upper_kl.item() - 1, upper_chi2.item() - 1) < tol
        assert rel_err(1 - lower_kl.item(), 1 - lower_chi2.item()) < tol


# ----------------------------------------------------------------------------------------------------------------
# Randomised properties in every dtype
# ----------------------------------------------------------------------------------------------------------------

_EPS = {dtype: torch.finfo(dtype).eps for dtype in DTYPES}
# Mirror residual allowed on top of the input's own rounding (which the float64 computation at the same rounded
# inputs measures): output rounding for the half types, solver noise near saturation for float32.
_MIRROR_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@settings(max_examples=200, deadline=None)
@given(
    logp=st.floats(min_value=-700.0, max_value=0.0),
    delta=st.floats(min_value=1e-4, max_value=1.0),
    divergence=st.sampled_from(BUILTIN),
    dtype=st.sampled_from(DTYPES),
    max_ratio=st.one_of(st.none(), st.floats(min_value=1.0, max_value=100.0)),
)
def test_random_inputs_valid_and_mirrored(logp, delta, divergence, dtype, max_ratio):
    x = torch.tensor(logp, dtype=torch.float64).to(dtype)
    lower, upper = band_bounds(x, divergence, delta, max_ratio)
    assert lower.dtype == upper.dtype == dtype
    lower, upper = lower.double().item(), upper.double().item()
    assert math.isfinite(lower) and math.isfinite(upper)
    assert 0 <= lower <= 1 <= upper
    p = math.exp(x.double().item())
    if max_ratio is not None:
        assert upper <= torch.tensor(max_ratio, dtype=torch.float64).to(dtype).item()  # the cap as the dtype holds it
        return
    assert upper <= 1 / p * (1 + _EPS[dtype])
    # The raw form floors p so that 1/p is finite in the dtype (float16: p >= 4 / 65504); the mirror holds above that.
    p_floor = max(
        torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).tiny, 4 / torch.finfo(dtype).max
    )
    if p < 2 * p_floor:
        return
    # mirror identity p u(p) + (1 - p) l(1 - p) = 1, with 1 - p rounded to the same dtype
    y = torch.log1p(torch.tensor(-p, dtype=torch.float64)).to(dtype)
    p_mirror = math.exp(y.double().item())
    lower_m = band_bounds(y, divergence, delta, None)[0].double().item()
    residual = p * upper + p_mirror * lower_m - 1
    lower_m64 = band_bounds(y.double(), divergence, delta, None)[0].item()
    upper64 = band_bounds(x.double(), divergence, delta, None)[1].item()
    residual64 = p * upper64 + p_mirror * lower_m64 - 1
    if dtype == torch.float64:
        assert abs(residual) <= _MIRROR_TOL[dtype]
    else:
        assert abs(residual) <= abs(residual64) + _MIRROR_TOL[dtype]


# ----------------------------------------------------------------------------------------------------------------
# The capped form (docs/method.md §4.2)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", BUILTIN)
@pytest.mark.parametrize("max_ratio", (1.0, 3.0, 10.0))
def test_capped_is_clamped_raw_with_extreme_p_rules(divergence, max_ratio):
    delta = 0.05
    p = torch.cat(
        [
            torch.tensor([1e-9, 9.9e-7, 1.01e-6]),
            P_GRID[(P_GRID > 2e-6) & (P_GRID < 1 - 2e-6)],
            torch.tensor([1 - 1.01e-6, 1 - 0.99e-6, 1 - 1e-9]),
        ]
    ).double()
    lower, upper = bounds64(p, divergence, delta, max_ratio=max_ratio)
    raw_lower, raw_upper = bounds64(p, divergence, delta)
    tail, head = p < 1e-6, p > 1 - 1e-6
    middle = ~(tail | head)
    torch.testing.assert_close(lower[middle], raw_lower[middle].clamp(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(upper[middle], raw_upper[middle].clamp(1, max_ratio), rtol=0, atol=0)
    assert (lower[tail] == 0).all() and (upper[tail] == max_ratio).all()
    assert (upper[head] == 1).all()
    torch.testing.assert_close(
        lower[head], torch.full_like(lower[head], lower_limit_at_one(divergence, delta)), rtol=1e-15, atol=0
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("divergence", BUILTIN)
def test_extreme_p_rules_switch_exactly_at_the_thresholds(divergence, dtype):
    """The head rule applies exactly to log p > log(1 - 1e-6) as compared in the input's dtype, whichever way a
    divergence implements it (a mask, or a threshold on the odds); around log(1e-6) the tail rule and the bounds at
    p = 1e-6 agree. (Half types are left out: 1/p = 1 + 1e-6 rounds to 1 there.)"""
    values = []
    for threshold in (math.log1p(-1e-6), math.log(1e-6)):
        at = torch.tensor(threshold, dtype=dtype)
        below, above = (torch.nextafter(at, torch.tensor(end, dtype=dtype)) for end in (-1.0, 0.0))
        values += [below, at, above]
    logp = torch.stack(values)
    lower, upper = band_bounds(logp, divergence, 0.05, 10.0)
    assert (logp > math.log1p(-1e-6)).tolist() == [False, False, True, False, False, False]
    assert (upper == 1).tolist() == [False, False, True, False, False, False]  # else u = 1/p > 1 at delta = 0.05
    assert ((lower == 0) & (upper == 10)).tolist()[3:] == [True, True, True]


@pytest.mark.usefixtures("divergence_registry")
def test_closed_form_in_p_and_q_agrees_with_the_odds_form():
    """The two ways to give a closed form (``raw_bounds(p, q, delta)`` with masks for the extreme-p rules, and
    ``odds_bounds(t, delta)``) give the same capped and raw bounds: chi2 written in p and q by hand."""

    def chi2_in_p_and_q(p, q, delta):
        step = torch.sqrt(delta * q / p)
        return (1 - step).clamp(min=0), torch.minimum(1 + step, 1 / p)

    register_divergence(
        "test_band_chi2_pq", lambda u: (u - 1).square(), chi2_in_p_and_q, lambda delta: 1.0, overwrite=True
    )
    x = torch.log(torch.cat([torch.tensor([0.0, 1e-12, 1e-7, 5e-7, 1 - 1e-7, 1 - 1e-9, 1.0]), P_GRID])).double()
    for delta in DELTAS:
        for max_ratio in (None, 1.0, 10.0):
            got = band_bounds(x, "test_band_chi2_pq", delta, max_ratio)
            want = band_bounds(x, "chi2", delta, max_ratio)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------------------------------------------
# A divergence given only by its generator f goes through the generic solver
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def from_f(divergence_registry):
    """chi2 and kl registered from f alone (no closed form, no limit): names of the registered copies."""
    names = {"chi2": "test_band_chi2_from_f", "kl": "test_band_kl_from_f"}
    register_divergence(names["chi2"], lambda u: (u - 1).square(), overwrite=True)
    register_divergence(names["kl"], lambda u: u - 1 - torch.log(u), overwrite=True)
    return names


def test_registered_names_are_listed(from_f):
    assert set(BUILTIN) | set(from_f.values()) <= set(available_divergences())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("divergence", ("chi2", "kl"))
def test_generator_only_matches_reference(from_f, divergence, dtype):
    """Every CSV row for chi2 and kl, solved from f alone; float32 under the same widened rule as above."""
    for row in (r for r in REFERENCE if r["divergence"] == divergence):
        logp = torch.tensor(math.log(row["p"]), dtype=torch.float64).to(dtype)
        lower, upper = band_bounds(logp, from_f[divergence], row["delta"], None)
        lower64, upper64 = band_bounds(logp.double(), divergence, row["delta"], None)  # built-in, same input
        for got, same_input64, ref in ((lower, lower64, row["lower"]), (upper, upper64, row["upper"])):
            if dtype == torch.float64:
                assert rel_err(got.item(), ref) <= 1e-9, row
            else:
                assert rel_err(got.item(), ref) <= 1e-5 + 3 * rel_err(same_input64.item(), ref), row
                assert rel_err(got.item(), same_input64.item()) <= 1e-4, row


@pytest.mark.parametrize("divergence", ("chi2", "kl"))
@pytest.mark.parametrize("delta", DELTAS)
def test_generator_only_matches_builtin_on_grid(from_f, divergence, delta):
    logp = torch.log(P_GRID)
    lower, upper = band_bounds(logp, from_f[divergence], delta, None)
    lower_b, upper_b = band_bounds(logp, divergence, delta, None)
    # Away from chi2's saturation thresholds both are accurate to ~1e-14; next to them the closed form itself
    # cancels catastrophically (1 - sqrt(...) ~ 0), so compare l with an absolute floor of 1e-12.
    torch.testing.assert_close(upper, upper_b, rtol=1e-9, atol=0)
    torch.testing.assert_close(lower, lower_b, rtol=1e-9, atol=1e-12 if divergence == "chi2" else 1e-300)
    # The capped form: identical except at p > 1 - 1e-6, where the generic path estimates lim_{p->1} l from
    # p = 1 - 1e-12 (documented in band.Divergence), close to but not exactly the closed-form limit.
    capped_lower, capped_upper = band_bounds(logp, from_f[divergence], delta, 10.0)
    capped_lower_b, capped_upper_b = band_bounds(logp, divergence, delta, 10.0)
    torch.testing.assert_close(capped_upper, capped_upper_b, rtol=1e-9, atol=0)
    torch.testing.assert_close(capped_lower, capped_lower_b, rtol=1e-6, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# DCPO (docs/method.md §5.4)
# ----------------------------------------------------------------------------------------------------------------


def _dcpo_formula(p: float, eps_low: float, eps_high: float, max_ratio):
    lower = 0.5 + 0.5 * math.sqrt(max(1 - 4 * eps_low / p, 0.0))
    upper = 0.5 + 0.5 * math.sqrt(1 + 4 * eps_high / p)
    return lower, upper if max_ratio is None else min(upper, max_ratio)


@pytest.mark.parametrize(
    "kwargs", ({}, {"epsilon_low": 0.1, "epsilon_high": 0.3, "max_ratio": 5.0}, {"max_ratio": None})
)
def test_dcpo_matches_formula(kwargs):
    eps_low, eps_high = kwargs.get("epsilon_low", 0.16), kwargs.get("epsilon_high", 0.2)
    max_ratio = kwargs.get("max_ratio", 10.0)
    p = P_GRID[P_GRID > 1e-9]
    lower, upper = dcpo_bounds(torch.log(p), **kwargs)
    expected = [_dcpo_formula(x, eps_low, eps_high, max_ratio) for x in p.tolist()]
    torch.testing.assert_close(lower, torch.tensor([e[0] for e in expected], dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(upper, torch.tensor([e[1] for e in expected], dtype=torch.float64), rtol=1e-12, atol=0)
    # ignores the simplex limit: at p = 0.9 the upper bound is above 1/p
    assert dcpo_bounds(torch.log(torch.tensor(0.9, dtype=torch.float64)), **kwargs)[1].item() > 1 / 0.9


@pytest.mark.parametrize("dtype", DTYPES)
def test_dcpo_edges(dtype):
    x = torch.tensor([-math.inf, -1e4, math.log(0.3), 0.0, 1e-3, math.nan], dtype=dtype)
    for max_ratio in (10.0, None):
        lower, upper = dcpo_bounds(x, max_ratio=max_ratio)
        assert lower.dtype == upper.dtype == dtype
        assert torch.isfinite(lower[:-1]).all() and torch.isfinite(upper[:-1]).all()
        assert (lower[:-1] >= 0.5).all() and (lower[:-1] <= 1).all() and (upper[:-1] >= 1).all()
        assert lower[-1].isnan() and upper[-1].isnan()
    lower, upper = dcpo_bounds(x)
    assert lower[0].item() == 0.5 and upper[0].item() == 10.0


# ----------------------------------------------------------------------------------------------------------------
# Shapes, dtypes, devices, autograd
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (7,), (2, 3, 5), (0,), (2, 0, 3)], ids=["0d", "1d", "3d", "empty", "empty3d"])
def test_shape_dtype_device(shape, dtype, device):
    generator = torch.Generator().manual_seed(0)
    logps = torch.log(torch.rand(shape, dtype=torch.float64, generator=generator).clamp(min=1e-8))
    logps = logps.to(device=device, dtype=dtype)
    # the values themselves are tested elsewhere; here: the same numbers as float64 at the same (rounded) input
    rtol = 1e-12 if dtype == torch.float64 else _EPS[dtype] + 1e-4
    for divergence in BUILTIN:
        for max_ratio in (10.0, None):
            lower, upper = band_bounds(logps, divergence, 0.05, max_ratio)
            for out in (lower, upper):
                assert out.shape == logps.shape and out.dtype == dtype and out.device == logps.device
            if logps.numel():
                ref_lower, ref_upper = band_bounds(logps.cpu().double(), divergence, 0.05, max_ratio)
                torch.testing.assert_close(lower.cpu().double(), ref_lower, rtol=rtol, atol=1e-30)
                torch.testing.assert_close(upper.cpu().double(), ref_upper, rtol=rtol, atol=0)
    for out in dcpo_bounds(logps):
        assert out.shape == logps.shape and out.dtype == dtype and out.device == logps.device


@pytest.mark.parametrize("divergence", BUILTIN)
def test_no_autograd_history(divergence):
    leaf = torch.log(torch.tensor([0.01, 0.3, 0.9])).requires_grad_()
    for logps in (leaf, leaf * 1.0):  # a leaf requiring grad, and a tensor with a grad_fn
        for lower, upper in (
            band_bounds(logps, divergence),
            band_bounds(logps, divergence, max_ratio=None),
            dcpo_bounds(logps),
        ):
            for out in (lower, upper):
                assert not out.requires_grad and out.grad_fn is None
    assert leaf.grad is None


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_compiles_fullgraph_without_graph_breaks():
    """No .item(), no data-dependent control flow: the whole operator is one graph. fullgraph=True is what proves
    the absence of graph breaks; the "eager" backend keeps this fast (inductor's CPU code generation alone takes
    ~40 s for kl on a 2-core machine, aot_eager ~15 s for these cases)."""
    torch.compiler.reset()
    try:
        logps = torch.log(torch.rand(64, generator=torch.Generator().manual_seed(0)).clamp(min=1e-8))
        logps[:3] = torch.tensor([-math.inf, 0.0, 1e-7])
        cases = [(d, 10.0) for d in BUILTIN] + [("kl", None), ("rkl", None), ("hellinger", None)]
        for divergence, max_ratio in cases:
            compiled = torch.compile(
                lambda x, d=divergence, m=max_ratio: band_bounds(x, d, 0.05, m), fullgraph=True, backend="eager"
            )
            for got, expected in zip(compiled(logps), band_bounds(logps, divergence, 0.05, max_ratio)):
                torch.testing.assert_close(got, expected, rtol=0, atol=0)
        compiled = torch.compile(dcpo_bounds, fullgraph=True, backend="eager")
        for got, expected in zip(compiled(logps), dcpo_bounds(logps)):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    finally:
        torch.compiler.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_no_host_sync(from_f):
    logps = torch.log(torch.rand(4096, device="cuda").clamp(min=1e-8))
    logps[:3] = torch.tensor([-math.inf, 0.0, 1e-7], device="cuda")
    names = (*BUILTIN, *from_f.values())
    for name in names:  # warm up: the generic path estimates lim_{p->1} l once per delta, on the host
        band_bounds(logps, name, 0.05)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for name in names:
            for max_ratio in (10.0, None):
                band_bounds(logps, name, 0.05, max_ratio)
        dcpo_bounds(logps)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------------------------------------------
# Edge inputs and bad arguments
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("divergence", BUILTIN)
def test_edge_log_probabilities(divergence, dtype):
    delta, cap = 0.05, 10.0
    tiny_positive = [torch.finfo(dtype).eps, torch.finfo(dtype).tiny, 1e-3]  # log p > 0 from rounding
    x = torch.tensor([-math.inf, -1e30, -1e4, 0.0, -0.0, *tiny_positive], dtype=dtype)
    lower, upper = band_bounds(x, divergence, delta, cap)
    assert lower.dtype == upper.dtype == dtype
    limit = torch.tensor(lower_limit_at_one(divergence, delta), dtype=torch.float64).to(dtype).double()
    assert (lower[:3] == 0).all() and (upper[:3] == cap).all()
    torch.testing.assert_close(lower[3:].double(), limit.expand(len(x) - 3), rtol=_EPS[dtype], atol=0)
    assert (upper[3:] == 1).all()
    lower, upper = band_bounds(x, divergence, delta, None)
    assert torch.isfinite(lower).all() and torch.isfinite(upper).all()
    assert (lower >= 0).all() and (lower <= 1).all() and (upper >= 1).all()
    assert (lower[:3] == 0).all() and (upper[:3] > 1).all()
    assert (upper[3:] == 1).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_in_nan_out(from_f, dtype):
    x = torch.tensor([math.nan, math.log(0.3), math.nan], dtype=dtype)
    for divergence in (*BUILTIN, *from_f.values()):
        for max_ratio in (10.0, None):
            lower, upper = band_bounds(x, divergence, 0.05, max_ratio)
            assert lower[0].isnan() and upper[0].isnan() and lower[2].isnan() and upper[2].isnan(), divergence
            assert torch.isfinite(lower[1]) and torch.isfinite(upper[1]), divergence


def test_register_refuses_two_closed_forms():
    def chi2_odds(t, delta):
        step = torch.sqrt(delta * t)
        return (1 - step).clamp(min=0), torch.minimum(step, t) + 1

    with pytest.raises(ValueError, match=r"'both': give either raw_bounds .* or odds_bounds, not both"):
        register_divergence(
            "both", lambda u: (u - 1).square(), lower_limit_at_one=lambda d: 1.0, odds_bounds=chi2_odds
        )
    assert "both" not in available_divergences()


def test_unknown_divergence():
    with pytest.raises(ValueError, match=r"unknown divergence 'nope'; accepted: .*\bchi2\b.*\bkl\b"):
        band_bounds(torch.zeros(3), "nope")
    with pytest.raises(ValueError, match=r"unknown divergence None"):
        band_bounds(torch.zeros(3), None)


@pytest.mark.parametrize("delta", [0, 0.0, -0.1, math.inf, -math.inf, math.nan, "0.05", True])
def test_bad_delta(delta):
    with pytest.raises(ValueError, match=r"delta must be a finite number > 0, got " + re.escape(repr(delta))):
        band_bounds(torch.zeros(3), "kl", delta)


@pytest.mark.parametrize("max_ratio", [0.5, 0, -1.0, 0.999, math.inf, math.nan, "10"])
def test_bad_max_ratio(max_ratio):
    message = r"max_ratio must be None \(raw bounds\) or a finite number >= 1, got " + re.escape(repr(max_ratio))
    with pytest.raises(ValueError, match=message):
        band_bounds(torch.zeros(3), "kl", 0.05, max_ratio)
    with pytest.raises(ValueError, match=message):
        dcpo_bounds(torch.zeros(3), max_ratio=max_ratio)


@pytest.mark.parametrize(
    "logps, kind",
    [(torch.tensor([-1, -2]), "torch.int64"), (torch.tensor([True]), "torch.bool"), ([-0.1, -0.2], "list")],
)
def test_bad_logps(logps, kind):
    message = rf"old_logps must be a floating-point torch.Tensor .*got {re.escape(kind)}; accepted dtypes: float16, bfloat16, float32, float64"
    with pytest.raises(ValueError, match=message):
        band_bounds(logps)
    with pytest.raises(ValueError, match=message):
        dcpo_bounds(logps)


@pytest.mark.parametrize("name", ["epsilon_low", "epsilon_high"])
@pytest.mark.parametrize("value", [0.0, -0.2, math.inf])
def test_bad_dcpo_epsilon(name, value):
    with pytest.raises(ValueError, match=rf"{name} must be a finite number > 0, got {re.escape(repr(value))}"):
        dcpo_bounds(torch.zeros(3), **{name: value})


# ----------------------------------------------------------------------------------------------------------------
# Generator checks at registration: a generator that would disable or freeze clipping is refused
# ----------------------------------------------------------------------------------------------------------------


def js_generator(u):
    return 0.5 * (torch.xlogy(u, u) - torch.xlogy(u + 1, (u + 1) / 2))


@pytest.mark.parametrize(
    "f, message",
    [
        (lambda u: -(u - 1).square(), r"must be non-negative, got f\(0\) = -1"),
        (lambda u: torch.minimum((u - 1).abs(), torch.ones_like(u)), r"must be convex, but f\(\S+\) = \S+ lies above"),
        (
            lambda u: torch.log(u) - u + 1,
            r"must be finite on \(0, inf\) \(only f\(0\) may be \+inf\), got f\(0\) = -inf",
        ),
        (lambda u: u * math.nan, r"must be finite on \(0, inf\).*got f\(0\) = nan"),
        (lambda u: u * torch.log(u) - u + 1, r"got f\(0\) = nan \(for u log u, torch.xlogy\(u, u\) gives the limit 0"),
        (lambda u: torch.ones_like(u), r"must satisfy f\(1\) = 0, got f\(1\) = 1"),
        (lambda u: (u - 1).square() + 0.1, r"must satisfy f\(1\) = 0, got f\(1\) = 0.1"),
        (lambda u: torch.zeros_like(u), r"identically 0 on \[0, 1e6\].*no trust region"),
        (lambda u: torch.where(u == 0, math.inf, 0.0), r"identically 0 on \[0, 1e6\]"),  # +inf at 0 only
        (lambda u: 1e-320 * (u - 1).square(), r"identically 0 on \[0, 1e6\] \(no value reaches 2.23e-308\)"),
        (lambda u: torch.xlogy(u, u), r"must be non-negative, got f\(1e-06\) = -1.38155e-05.*u log u - u \+ 1"),
        (
            lambda u: (u - 1).square().sum(),
            r"not elementwise: it must return a tensor shaped like its input, got shape \(\)",
        ),
        (lambda u: (u - u.mean()).square(), r"not elementwise: at u = \S+ it gives \S+ on the full grid but \S+ in a"),
        (
            lambda u: (u - 1).square().flatten(),
            r"not elementwise: .*got shape \(150,\) for an input of shape \(2, 75\)",
        ),
        (lambda u: (u - 1).square() * torch.arange(u.numel()).reshape(u.shape), r"not elementwise"),
        (lambda u: 0.0, r"must return a floating-point torch.Tensor .* got float"),
        (lambda u: (u > 1).long(), r"must return a floating-point torch.Tensor .* got torch.int64"),
        (lambda u: u.numpy(), r"got ndarray"),
        (lambda u: u.undefined_method(), r"raised AttributeError: .*undefined_method"),
    ],
)
@pytest.mark.usefixtures("divergence_registry")
def test_register_refuses_bad_generators(f, message):
    name = "test_band_bad_generator"
    with pytest.raises(ValueError, match=rf"divergence '{name}': (the generator f )?.*{message}"):
        register_divergence(name, f)
    assert name not in available_divergences()
    # Replacing an existing divergence with a bad generator leaves the registered one in place.
    with pytest.raises(ValueError, match=message):
        register_divergence("chi2", f, overwrite=True)
    assert get_divergence("chi2").odds_bounds is not None


@pytest.mark.parametrize(
    "f",
    [
        js_generator,  # README and notebook 02
        lambda u: 0.5 * (u - 1).abs(),  # piecewise linear: convex with equality on each side of the kink
        lambda u: (u - 1).square().float(),  # float32 arithmetic is fine (the check runs on float64 inputs)
        lambda u: (torch.sqrt(u) - 1).square() + 0 * u.sum(),  # a reduction that does not change values
        lambda u: u - 1 - torch.log(u),  # f(0) = +inf
        lambda u: torch.xlogy(u, u) - u + 1,
        lambda u: torch.relu(u - 2),  # zero on [0, 2]: a valid (if odd) divergence
        lambda u: 1e-6 * (u - 1).square(),  # small but not zero
        lambda u: 1e-30 * (u - 1).square(),  # the checks are relative to f's own magnitude
    ],
)
@pytest.mark.usefixtures("divergence_registry")
def test_register_accepts_valid_generators(f):
    register_divergence("test_band_good_generator", f)
    lower, upper = band_bounds(torch.log(torch.tensor([0.01, 0.5, 0.99])), "test_band_good_generator", 0.05)
    assert (lower <= 1).all() and (upper >= 1).all()


@pytest.mark.usefixtures("divergence_registry")
@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_generator_check_does_not_depend_on_scale(scale):
    """c f is the divergence of f times c: it is accepted or refused as f is, and its bounds at c delta are those
    of f at delta (chi2 from its generator alone against the closed form)."""
    register_divergence("test_band_scaled_chi2", lambda u: scale * (u - 1).square())
    logp = torch.log(P_GRID)
    for delta in (0.01, 0.05):
        lower, upper = band_bounds(logp, "test_band_scaled_chi2", delta * scale, None)
        lower_b, upper_b = band_bounds(logp, "chi2", delta, None)
        torch.testing.assert_close(upper, upper_b, rtol=1e-9, atol=0)
        torch.testing.assert_close(lower, lower_b, rtol=1e-9, atol=1e-12)  # as for chi2 from f at scale 1
    refused = [
        (lambda u: torch.xlogy(u, u), r"must be non-negative, got f\(1e-06\) = -1.38155e[-+]\d+"),
        (lambda u: (u - 1).square() + 0.1, r"must satisfy f\(1\) = 0"),
        (lambda u: torch.minimum((u - 1).abs(), torch.ones_like(u)), r"must be convex"),
        (lambda u: (u - u.mean()).square(), r"not elementwise"),
        (lambda u: 0 * u, r"identically 0 on \[0, 1e6\]"),
    ]
    for f, message in refused:
        with pytest.raises(ValueError, match=message):
            register_divergence("test_band_scaled_bad", lambda u, f=f: scale * f(u))
    assert "test_band_scaled_bad" not in available_divergences()


def test_builtin_generators_pass_the_check():
    for name in BUILTIN:
        check_generator(name, get_divergence(name).f)


@pytest.mark.usefixtures("divergence_registry")
def test_generator_check_calls_f_twice_on_small_tensors():
    calls = []

    def f(u):
        calls.append(tuple(u.shape))
        return (u - 1).square()

    register_divergence("test_band_counted", f)
    assert calls == [(202,), (2, 75)]
