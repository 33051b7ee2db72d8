"""The `band/*` metrics: how a micro-batch's tokens were clipped, by old-probability bucket.

Pure tensor functions, shared by every trainer of the package. A trainer computes the token sums of one micro-batch
with `clip_metric_sums`, reduces all of them across processes in one reduction (one host transfer), and logs
`band_metrics` of the totals:

| metric | meaning |
|---|---|
| `band/lower_mean`, `band/upper_mean` | mean ratio bounds over completion tokens |
| `band/tokens/<bucket>` | share of completion tokens whose old probability is in the bucket |
| `band/clip_low/<bucket>` | fraction of the bucket's tokens clipped at the lower bound (ratio below it, advantage < 0) |
| `band/clip_high/<bucket>` | fraction of the bucket's tokens clipped at the upper bound (ratio above it, advantage > 0) |
| `band/invalid_bounds` | share of completion tokens whose bounds break `lower <= 1 <= upper` |
"""

from __future__ import annotations

import torch

__all__ = ["PROB_BUCKETS", "band_metrics", "clip_metric_sums", "in_bucket", "invalid_bounds", "token_bounds"]

# Old-probability buckets: the paper's claim is about the low-probability tail.
PROB_BUCKETS = ((0.0, 0.01, "p<0.01"), (0.01, 0.1, "p0.01-0.1"), (0.1, 0.5, "p0.1-0.5"), (0.5, 1.0, "p>=0.5"))


def token_bounds(bound: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A bound (a float, as the clip rule returns, or a tensor broadcastable to ``like``) as a tensor shaped, typed and
    placed like ``like``."""
    return torch.as_tensor(bound, dtype=like.dtype, device=like.device).expand_as(like)


def in_bucket(probs: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """1.0 where an old probability lies in ``[lo, hi)``, else 0.0; the last bucket (``hi = 1``) also holds p = 1."""
    return ((probs >= lo) & (probs < hi) if hi < 1.0 else probs >= lo).float()


def invalid_bounds(old_logps: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """Tokens whose interval violates ``lower <= 1 <= upper`` (NaN bounds too, unless the old log-prob is NaN)."""
    return ~((lower <= 1) & (upper >= 1)) & ~old_logps.isnan()


def clip_metric_sums(
    old_logps: torch.Tensor,
    logps: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Token sums of one micro-batch behind the `band/*` metrics, as 0-d float tensors (reduce them with a sum).

    Args:
        old_logps, logps: (B, T) log-probs of the sampled tokens under the sampling policy and the current one.
        lower, upper: (B, T) ratio bounds applied to the tokens (see `token_bounds`).
        advantages: (B,) or (B, T) advantages.
        mask: (B, T) float, 1.0 on the completion tokens that enter the loss.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    low = ((ratio < lower) & (advantages < 0)).float() * mask
    high = ((ratio > upper) & (advantages > 0)).float() * mask
    probs = torch.exp(old_logps)
    sums = {
        "tokens": mask.sum(),
        "lower": (lower * mask).sum(),
        "upper": (upper * mask).sum(),
        "invalid": (invalid_bounds(old_logps, lower, upper).float() * mask).sum(),
    }
    for lo, hi, name in PROB_BUCKETS:
        bucket = in_bucket(probs, lo, hi)
        sums[f"tokens/{name}"] = (bucket * mask).sum()
        sums[f"clip_low/{name}"] = (bucket * low).sum()
        sums[f"clip_high/{name}"] = (bucket * high).sum()
    return sums


def band_metrics(totals: dict[str, float]) -> dict[str, float]:
    """The logged `band/*` values from the (reduced) totals of `clip_metric_sums`. A bucket without tokens has no
    clip fractions (nothing is logged for it rather than 0)."""
    count = max(totals["tokens"], 1.0)
    metrics = {
        "band/lower_mean": totals["lower"] / count,
        "band/upper_mean": totals["upper"] / count,
        "band/invalid_bounds": totals["invalid"] / count,
    }
    for _, _, name in PROB_BUCKETS:
        tokens = totals[f"tokens/{name}"]
        metrics[f"band/tokens/{name}"] = tokens / count
        if tokens > 0:
            metrics[f"band/clip_low/{name}"] = totals[f"clip_low/{name}"] / tokens
            metrics[f"band/clip_high/{name}"] = totals[f"clip_high/{name}"] / tokens
    return metrics
