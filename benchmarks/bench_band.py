"""Cost of the Band operator, measured side by side in one run.

For N float32 tokens (default 1M) it times, per divergence, ``band_bounds`` against
  (a) the canonical clipped surrogate computed from log-probs, r = exp(logp - old_logp),
      max(-A r, -A clamp(r, 0.8, 1.2)), the work every PPO/GRPO step already does, and
  (b) a reference-style solver as in the authors' code: 50 float32 bisection iterations per bound, each with a
      host synchronisation (``.item()``) to test for convergence,
and reports the worst relative error of (b) and of ``band_bounds`` against a float64 ``band_bounds``.

    python -m benchmarks.bench_band                 # CPU, 1M tokens (from the repository root)
    python -m benchmarks.bench_band --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bandpo_trl import band_bounds, get_divergence


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_times(fns, device: torch.device, repeats: int) -> list[float]:
    """Median wall time of each function, measured interleaved (f1, f2, f1, f2, ...) so that load from other
    processes hits them alike and their ratio stays meaningful on a shared machine."""
    for _ in range(2):  # warm-up: the first calls also pay for growing the allocator's cache
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, samples in zip(fns, times):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def canonical_surrogate(logps, old_logps, advantages):
    ratio = torch.exp(logps - old_logps)
    return torch.maximum(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.2))


def reference_bisection(old_logps, divergence: str, delta: float, iterations: int = 50):
    """What the authors' solver does: plain bisection on r in float32, a host sync per iteration."""
    f = get_divergence(divergence).f
    p = torch.exp(old_logps.float()).clamp(1e-6, 1 - 1e-6)
    q = 1 - p

    def g(r):
        return p * f(r) + q * f((1 - p * r) / q)

    bounds = []
    # lower root in [0, 1] (g decreasing there), upper root in [1, 1/p] (g increasing there)
    for lo, hi, increasing in ((torch.zeros_like(p), torch.ones_like(p), False), (torch.ones_like(p), 1 / p, True)):
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            move_lo = (g(mid) <= delta) == increasing
            lo = torch.where(move_lo, mid, lo)
            hi = torch.where(move_lo, hi, mid)
            if (hi - lo).max().item() < 1e-12:  # the per-iteration host sync
                break
        bounds.append(0.5 * (lo + hi))
    return bounds[0], bounds[1].clamp(max=10.0)


def bound_errors(bounds, truth) -> float:
    """Worst error in ratio units: absolute for the lower bound (in [0, 1], where relative error near 0 says
    nothing about the clip), relative for the upper bound."""
    (lower, upper), (true_lower, true_upper) = bounds, truth
    err_lower = (lower.double() - true_lower).abs().max().item()
    err_upper = ((upper.double() - true_upper).abs() / true_upper).max().item()
    return max(err_lower, err_upper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--delta", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--divergences", nargs="+", default=["kl", "rkl", "tv", "chi2", "hellinger"])
    args = parser.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    # log-probs of sampled tokens: mostly confident, with a long tail (as in LLM completions)
    old_logps = (-torch.empty(args.tokens).exponential_(1.0, generator=gen) * 1.5).to(device)
    logps = old_logps + 0.05 * torch.randn(args.tokens, generator=gen).to(device)
    advantages = torch.randn(args.tokens, generator=gen).to(device)

    def canonical():
        return canonical_surrogate(logps, old_logps, advantages)

    print(f"device={device} tokens={args.tokens:,} delta={args.delta} threads={torch.get_num_threads()}")
    print("(a) canonical clipped surrogate, (b) reference bisection; each row measured interleaved with (a)")
    header = (
        f"{'divergence':<10} {'band ms':>9} {'(a) ms':>8} {'band/(a)':>9} {'(b) ms':>9} {'(b)/band':>9}"
        f" {'band err':>9} {'(b) err':>9}"
    )
    print(header)
    print("-" * len(header))
    for name in args.divergences:
        t_band, t_canonical = median_times(
            [lambda n=name: band_bounds(old_logps, n, args.delta), canonical], device, args.repeats
        )
        t_ref, t_band_again = median_times(
            [
                lambda n=name: reference_bisection(old_logps, n, args.delta),
                lambda n=name: band_bounds(old_logps, n, args.delta),
            ],
            device,
            max(3, args.repeats // 2),
        )
        truth = band_bounds(old_logps.double(), name, args.delta)
        ours = band_bounds(old_logps, name, args.delta)
        ref = reference_bisection(old_logps, name, args.delta)
        keep = (old_logps > -13.8) & (old_logps < -1e-6)  # outside the fixed-bound extremes
        err_band = bound_errors([b[keep] for b in ours], [t[keep] for t in truth])
        err_ref = bound_errors([b[keep] for b in ref], [t[keep] for t in truth])
        print(
            f"{name:<10} {t_band * 1e3:9.2f} {t_canonical * 1e3:8.2f} {t_band / t_canonical:9.2f}"
            f" {t_ref * 1e3:9.2f} {t_ref / t_band_again:9.1f} {err_band:9.1e} {err_ref:9.1e}"
        )


if __name__ == "__main__":
    main()
