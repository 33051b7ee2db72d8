"""Regenerate `band_bounds.csv`, the Band operator's reference bounds, from the definition of g(p, r) alone.

For an f-divergence with generator f, the Band interval of a token with old probability p is the set of ratios r
in [0, 1/p] with

    g(p, r) = p f(r) + (1 - p) f((1 - p r) / (1 - p)) <= delta            (docs/method.md §2.1)

g(p, .) is convex with minimum 0 at r = 1, so the interval is [l, u]: u = 1/p if g(p, 1/p) <= delta (upper
saturation), else the root of g = delta in (1, 1/p); l = 0 if g(p, 0) <= delta (lower saturation), else the root in
(0, 1). Each root is found by bisection in mpmath at 60 significant digits: the upper one on r, the lower one on
log r (KL's lower root at p = 1e-4 is about 1e-218, far below float64's range of resolution near 0). Values are
written with 15 significant digits (`mpmath.nstr`), raw: no cap and none of the training rules for extreme p.

Dev-only (mpmath comes with torch). Usage, from the repository root:

    python tests/data/make_band_bounds.py                       # rewrite tests/data/band_bounds.csv
    python tests/data/make_band_bounds.py --out extra.csv --divergences kl --deltas 0.2 --ps 1e-5 0.5

`tests/test_band.py` checks that rows regenerated with this script match the committed file.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import mpmath

DIGITS = 60
WRITTEN_DIGITS = 15
DIVERGENCES = ("kl", "rkl", "tv", "chi2", "hellinger")
DELTAS = ("0.01", "0.05", "0.1")
PS = ("1e-4", "1e-3", "1e-2", "0.05", "0.1", "0.3", "0.5", "0.7", "0.9", "0.99", "0.999")
COLUMNS = ("divergence", "delta", "p", "lower", "upper", "lower_saturated", "upper_saturated")
DEFAULT_OUT = Path(__file__).resolve().parent / "band_bounds.csv"


def f(name: str, u):
    """The generator f of each built-in divergence (docs/method.md §2.3), with its value at u = 0."""
    u = mpmath.mpf(u)
    if name == "kl":
        return mpmath.inf if u == 0 else u - 1 - mpmath.log(u)
    if name == "rkl":
        return mpmath.mpf(1) if u == 0 else u * mpmath.log(u) - u + 1
    if name == "tv":
        return abs(u - 1) / 2
    if name == "chi2":
        return (u - 1) ** 2
    if name == "hellinger":
        return (mpmath.sqrt(u) - 1) ** 2
    raise KeyError(f"unknown divergence {name!r}; known: {', '.join(DIVERGENCES)}")


def g(name: str, p, r):
    """g(p, r) = p f(r) + (1 - p) f((1 - p r) / (1 - p)): the divergence when the token's ratio is r."""
    p, r = mpmath.mpf(p), mpmath.mpf(r)
    return p * f(name, r) + (1 - p) * f(name, (1 - p * r) / (1 - p))


def _bisect(inside, outside, excess, iterations: int):
    """Bisect between a point where excess(x) <= 0 and one where it is > 0; return the midpoint of the last pair."""
    for _ in range(iterations):
        middle = (inside + outside) / 2
        if excess(middle) <= 0:
            inside = middle
        else:
            outside = middle
    return (inside + outside) / 2


def raw_bounds(name: str, delta: str, p: str) -> tuple[mpmath.mpf, mpmath.mpf, bool, bool]:
    """(l, u, l saturated, u saturated) of the raw Band interval, at `DIGITS` significant digits."""
    with mpmath.workdps(DIGITS + 10):
        delta, p = mpmath.mpf(delta), mpmath.mpf(p)
        iterations = int(DIGITS * 3.33) + 40  # bits for DIGITS digits, with margin

        upper_saturated = g(name, p, 1 / p) <= delta
        if upper_saturated:
            upper = 1 / p
        else:
            # Relative precision on u: bisect on r in (1, 1/p), where g rises from 0 to above delta.
            upper = _bisect(mpmath.mpf(1), 1 / p, lambda r: g(name, p, r) - delta, iterations)

        lower_saturated = g(name, p, 0) <= delta
        if lower_saturated:
            lower = mpmath.mpf(0)
        else:
            # Relative precision on l even when it is astronomically small: bisect on log r in (log_floor, 0).
            log_floor = mpmath.mpf(-1)
            while g(name, p, mpmath.exp(log_floor)) <= delta:
                log_floor *= 2
            lower = mpmath.exp(
                _bisect(mpmath.mpf(0), log_floor, lambda t: g(name, p, mpmath.exp(t)) - delta, iterations + 20)
            )
        return lower, upper, bool(lower_saturated), bool(upper_saturated)


def reference_row(name: str, delta: str, p: str) -> dict[str, str]:
    """One CSV row, formatted as in the committed table (delta and p as given)."""
    lower, upper, lower_saturated, upper_saturated = raw_bounds(name, delta, p)
    return {
        "divergence": name,
        "delta": delta,
        "p": p,
        "lower": mpmath.nstr(lower, WRITTEN_DIGITS),
        "upper": mpmath.nstr(upper, WRITTEN_DIGITS),
        "lower_saturated": str(int(lower_saturated)),
        "upper_saturated": str(int(upper_saturated)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"CSV to write (default: {DEFAULT_OUT})")
    parser.add_argument("--divergences", nargs="+", default=list(DIVERGENCES), choices=DIVERGENCES)
    parser.add_argument("--deltas", nargs="+", default=list(DELTAS), help="delta values, written as given")
    parser.add_argument("--ps", nargs="+", default=list(PS), help="old probabilities in (0, 1), written as given")
    args = parser.parse_args(argv)
    for p in args.ps:
        if not 0 < float(p) < 1:
            parser.error(f"p must lie in (0, 1), got {p}")
    for delta in args.deltas:
        if not float(delta) > 0:
            parser.error(f"delta must be > 0, got {delta}")
    with args.out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for name in args.divergences:
            for delta in args.deltas:
                for p in args.ps:
                    writer.writerow(reference_row(name, delta, p))
    print(f"wrote {len(args.divergences) * len(args.deltas) * len(args.ps)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
