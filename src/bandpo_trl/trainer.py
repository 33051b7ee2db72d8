"""`BandGRPOTrainer`: TRL's `GRPOTrainer` with each token's ratio clipped to its own interval.

The override is deliberately thin. TRL's surrogate clips with
``torch.clamp(coef_1, 1 - self.epsilon_low, 1 + self.epsilon_high)`` and counts clipped tokens with
``coef_1 < 1 - self.epsilon_low`` / ``coef_1 > 1 + self.epsilon_high``; both accept per-token tensors. So for the
duration of one loss call the trainer sets ``epsilon_low = 1 - lower`` and ``epsilon_high = upper - 1`` as (B, T)
tensors and lets TRL's own ``_compute_loss`` do the rest: dual clip ``delta``, KL ``beta``, every loss type's
aggregation, ``top_entropy_quantile``, vLLM importance-sampling correction, gradient accumulation and TRL's
``clip_ratio/*`` metrics all stay TRL's code. Tests compare the result with TRL's trainer and with the formula.
"""

from __future__ import annotations

import math
import warnings

import torch
from trl import GRPOTrainer

from .band import band_bounds, dcpo_bounds
from .config import band_option, validate_band_options

# Old-probability buckets for the clip-fraction metrics: the paper's claim is about the low-probability tail.
PROB_BUCKETS = ((0.0, 0.01, "p<0.01"), (0.01, 0.1, "p0.01-0.1"), (0.1, 0.5, "p0.1-0.5"), (0.5, 1.0, "p>=0.5"))


class BandGRPOTrainer(GRPOTrainer):
    """[`~trl.GRPOTrainer`] whose ratio clip is the per-token Band interval of BandPO.

    Drop-in: same constructor as `GRPOTrainer`. With a [`BandGRPOConfig`] the clipping rule is configurable
    (`clip_rule`, `band_divergence`, `band_delta`, ...); a plain `GRPOConfig` gets the paper's defaults
    (KL, delta = 0.05, cap 10).

    To try another rule, override [`~BandGRPOTrainer.compute_clip_bounds`] alone.

    Logged, reduced across processes like TRL's own metrics (TRL's `clip_ratio/*` and `entropy` stay and count
    tokens clipped at the per-token bounds):
    - `band/lower_mean`, `band/upper_mean`: mean ratio bounds over completion tokens;
    - `band/clip_low/<bucket>`, `band/clip_high/<bucket>`: fraction of the completion tokens whose old
      probability lies in the bucket that are clipped at the lower bound (ratio below it, negative advantage) or
      at the upper bound (ratio above it, positive advantage);
    - `band/tokens/<bucket>`: share of completion tokens in the bucket;
    - `band/invalid_bounds`: share of completion tokens whose interval violates `lower <= 1 <= upper` (NaN bounds
      included, tokens with a NaN old log-prob excluded); 0 for the built-in rules. For the bounds this trainer
      applies (`clip_rule` other than `"clip"`, whose interval is TRL's own), the first micro-batch with old
      log-probs is checked once (one host synchronisation per trainer) and any violation there raises a
      `ValueError` naming the `compute_clip_bounds` method; later violations are counted here, in the same
      single reduction as the other metrics, and warned about once.
    Buckets: `p<0.01`, `p0.01-0.1`, `p0.1-0.5`, `p>=0.5`.

    Example:
    ```python
    from bandpo_trl import BandGRPOConfig, BandGRPOTrainer

    trainer = BandGRPOTrainer(
        model="Qwen/Qwen2.5-3B-Instruct",
        reward_funcs=accuracy_reward,
        args=BandGRPOConfig(output_dir="out", steps_per_generation=16, gradient_accumulation_steps=4),
        train_dataset=dataset,
    )
    trainer.train()
    ```
    """

    def __init__(self, model, reward_funcs=None, args=None, *more_args, **kwargs):
        if args is not None:
            validate_band_options(args)  # before the (slow) model load; a plain GRPOConfig is checked here too
        super().__init__(model, reward_funcs, args, *more_args, **kwargs)
        if args is None:
            validate_band_options(self.args)
        self.clip_rule = band_option(self.args, "clip_rule")
        self._current_logps = None
        self._capture_logps = False
        self._bounds_checked = False  # the first micro-batch with old log-probs is checked once (see the docstring)
        self._warned_invalid_bounds = False

    def compute_clip_bounds(
        self, old_per_token_logps: torch.Tensor, inputs: dict
    ) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """Ratio bounds ``(lower, upper)`` for each completion token, from its old log-probability.

        Override this to try another rule. ``old_per_token_logps`` is (B, T) log pi_old of the sampled tokens
        at the sampling temperature; ``inputs`` is the micro-batch (advantages, masks, ...). Return tensors
        broadcastable to (B, T), or floats, with ``lower <= 1 <= upper``; they carry no gradient. Bounds that
        exclude 1 on a completion token raise on the first micro-batch and are counted in `band/invalid_bounds`.

        Example:
        ```python
        class SqrtBand(BandGRPOTrainer):
            def compute_clip_bounds(self, old_per_token_logps, inputs):
                width = 0.2 * torch.exp(-0.5 * old_per_token_logps)  # 0.2 / sqrt(p)
                return (1 - width).clamp(min=0), 1 + width
        ```
        """
        args = self.args
        if self.clip_rule == "clip":
            return 1 - self.epsilon_low, 1 + self.epsilon_high
        max_ratio = band_option(args, "band_max_ratio")
        if self.clip_rule == "dcpo":
            return dcpo_bounds(
                old_per_token_logps,
                band_option(args, "dcpo_epsilon_low"),
                band_option(args, "dcpo_epsilon_high"),
                max_ratio,
            )
        lower, upper = band_bounds(
            old_per_token_logps, band_option(args, "band_divergence"), band_option(args, "band_delta"), max_ratio
        )
        if band_option(args, "band_relax"):
            lower = lower.clamp(max=1 - self.epsilon_low)
            upper = upper.clamp(min=1 + self.epsilon_high)
        return lower, upper

    def _compute_loss(self, model, inputs):
        old_per_token_logps = inputs.get("old_per_token_logps")
        if old_per_token_logps is None:
            # On-policy (ratio == 1): no bound can act and there is nothing to log beyond TRL's metrics.
            return super()._compute_loss(model, inputs)

        lower, upper = self.compute_clip_bounds(old_per_token_logps, inputs)
        if not self._bounds_checked and self.clip_rule != "clip":
            self._check_bounds_once(inputs, old_per_token_logps, lower, upper)
        scalar_epsilons = self.epsilon_low, self.epsilon_high
        if self.clip_rule != "clip":
            # TRL clamps to [1 - epsilon_low, 1 + epsilon_high]; per-token tensors make that the per-token bounds.
            self.epsilon_low, self.epsilon_high = 1 - lower, upper - 1
        self._capture_logps = True
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self.epsilon_low, self.epsilon_high = scalar_epsilons
            self._capture_logps = False
        current_logps, self._current_logps = self._current_logps, None
        self._log_band_metrics(inputs, old_per_token_logps, current_logps, lower, upper)
        return loss

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        # Keep the policy's log-probs from the loss's own forward pass for the clip metrics (no second forward).
        outputs = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if self._capture_logps:
            self._current_logps = outputs[0].detach()
        return outputs

    @staticmethod
    def _token_mask(inputs) -> torch.Tensor:
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        return mask.float()

    @staticmethod
    def _as_token_bounds(bound, old_logps: torch.Tensor) -> torch.Tensor:
        # Bounds may be floats (the clip rule) or tensors broadcastable to (B, T).
        return torch.as_tensor(bound, dtype=old_logps.dtype, device=old_logps.device).expand_as(old_logps)

    @staticmethod
    def _in_bucket(probs: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        # 1.0 where an old probability lies in [lo, hi); the last bucket also holds p = 1.
        return ((probs >= lo) & (probs < hi) if hi < 1.0 else probs >= lo).float()

    @staticmethod
    def _invalid_bounds(old_logps, lower, upper) -> torch.Tensor:
        """Tokens whose interval violates ``lower <= 1 <= upper`` (NaN bounds too, unless the old log-prob is NaN)."""
        return ~((lower <= 1) & (upper >= 1)) & ~old_logps.isnan()

    @torch.no_grad()
    def _check_bounds_once(self, inputs, old_logps, lower, upper) -> None:
        """On the first micro-batch with old log-probs: raise if any completion token gets an interval that excludes 1.

        One reduction and one host transfer, once per trainer; later micro-batches are only counted in
        `band/invalid_bounds` by `_log_band_metrics`, which already synchronises once per step.
        """
        self._bounds_checked = True
        mask = self._token_mask(inputs)
        lower, upper = self._as_token_bounds(lower, old_logps), self._as_token_bounds(upper, old_logps)
        invalid = self._invalid_bounds(old_logps, lower, upper) & mask.bool()
        counts = torch.stack([invalid.sum().float(), mask.sum()])
        n_invalid, n_tokens = self.accelerator.reduce(counts, reduction="sum").tolist()
        if n_invalid == 0:
            return
        example = ""
        if invalid.any():  # this process's share may be empty when another process found the violation
            index = invalid.flatten().nonzero()[0, 0]
            lo, up, logp = (t.flatten()[index].item() for t in (lower, upper, old_logps))
            example = f"; e.g. lower = {lo:.6g}, upper = {up:.6g} for a token of old probability {math.exp(logp):.6g}"
        method = type(self).compute_clip_bounds
        raise ValueError(
            f"{method.__module__}.{method.__qualname__} returned ratio bounds that violate lower <= 1 <= upper for "
            f"{n_invalid / max(n_tokens, 1.0):.1%} of the completion tokens ({int(n_invalid)} of {int(n_tokens)}) "
            f"of the first micro-batch{example}. An interval that excludes ratio 1 clips tokens the policy has not "
            "moved; return lower <= 1 <= upper (e.g. lower.clamp(max=1), upper.clamp(min=1))"
        )

    @torch.no_grad()
    def _log_band_metrics(self, inputs, old_logps, logps, lower, upper) -> None:
        mask = self._token_mask(inputs)
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        lower, upper = self._as_token_bounds(lower, old_logps), self._as_token_bounds(upper, old_logps)
        ratio = torch.exp(logps - old_logps)
        low = ((ratio < lower) & (advantages < 0)).float() * mask
        high = ((ratio > upper) & (advantages > 0)).float() * mask
        invalid = self._invalid_bounds(old_logps, lower, upper).float() * mask
        probs = torch.exp(old_logps)
        sums = [mask.sum(), (lower * mask).sum(), (upper * mask).sum(), invalid.sum()]
        for lo, hi, _ in PROB_BUCKETS:
            in_bucket = self._in_bucket(probs, lo, hi)
            sums += [(in_bucket * mask).sum(), (in_bucket * low).sum(), (in_bucket * high).sum()]
        # One reduction and one host transfer for all of them.
        totals = self.accelerator.reduce(torch.stack(sums).float(), reduction="sum").tolist()
        count = max(totals[0], 1.0)
        metrics = self._metrics["train" if self.model.training else "eval"]
        metrics["band/lower_mean"].append(totals[1] / count)
        metrics["band/upper_mean"].append(totals[2] / count)
        metrics["band/invalid_bounds"].append(totals[3] / count)
        for i, (_, _, name) in enumerate(PROB_BUCKETS):
            in_bucket, clipped_low, clipped_high = totals[4 + 3 * i : 7 + 3 * i]
            metrics[f"band/tokens/{name}"].append(in_bucket / count)
            if in_bucket > 0:
                metrics[f"band/clip_low/{name}"].append(clipped_low / in_bucket)
                metrics[f"band/clip_high/{name}"].append(clipped_high / in_bucket)
        if (
            totals[3] > 0
            and not self._warned_invalid_bounds
            and self.clip_rule != "clip"
            and self.accelerator.is_main_process
        ):
            self._warned_invalid_bounds = True
            method = type(self).compute_clip_bounds
            warnings.warn(
                f"{method.__module__}.{method.__qualname__} returned ratio bounds that violate lower <= 1 <= upper "
                f"for {totals[3] / count:.1%} of the completion tokens of this micro-batch (logged as "
                "band/invalid_bounds; warned once)",
                UserWarning,
                stacklevel=1,  # the trainer's own line: the caller is TRL's training loop
            )
