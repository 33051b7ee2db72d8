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

import torch
from trl import GRPOTrainer

from .clip_metrics import PROB_BUCKETS, token_bounds
from .clip_rules import get_clip_rule
from .clip_trainer import ClipRuleTrainerMixin, bandpo_paper, default_bounds
from .config import band_option, is_validated, validate_band_options

__all__ = ["PROB_BUCKETS", "BandGRPOTrainer"]


class BandGRPOTrainer(ClipRuleTrainerMixin, GRPOTrainer):
    """[`~trl.GRPOTrainer`] whose ratio clip is the per-token Band interval of BandPO.

    Drop-in: same constructor as `GRPOTrainer`. With a [`BandGRPOConfig`] the clipping rule is configurable
    (`clip_rule`, `band_divergence`, `band_delta`, ...); a plain `GRPOConfig` gets the paper's defaults
    (KL, delta = 0.05, cap 10).

    To try another rule, register it (`bandpo_trl.register_clip_rule`) and name it in `clip_rule`, or override
    [`~BandGRPOTrainer.compute_clip_bounds`] alone.

    Logged, reduced across processes like TRL's own metrics (TRL's `clip_ratio/*` and `entropy` stay and count
    tokens clipped at the per-token bounds):
    - `band/lower_mean`, `band/upper_mean`: mean ratio bounds over completion tokens;
    - `band/clip_low/<bucket>`, `band/clip_high/<bucket>`: fraction of the completion tokens whose old
      probability lies in the bucket that are clipped at the lower bound (ratio below it, negative advantage) or
      at the upper bound (ratio above it, positive advantage);
    - `band/tokens/<bucket>`: share of completion tokens in the bucket;
    - `band/invalid_bounds`: share of completion tokens whose interval violates `lower <= 1 <= upper` (NaN bounds
      included, tokens with a NaN old log-prob excluded); 0 for the built-in rules. For the bounds this trainer
      applies (every rule but TRL's own `clip`), the first micro-batch with old log-probs is checked once (one host
      synchronisation per trainer) and any violation there raises a `ValueError` naming the rule; later violations
      are counted here, in the same single reduction as the other metrics, and warned about once.
    Buckets: `p<0.01`, `p0.01-0.1`, `p0.1-0.5`, `p>=0.5`. Subclasses add statistics of their own by overriding
    [`~BandGRPOTrainer.clip_metric_sums`] and [`~BandGRPOTrainer.clip_metrics_from_sums`].

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

    # The model card (`create_model_card`, also written with every checkpoint) names and cites BandPO, and GRPO.
    _tag_names = [*GRPOTrainer._tag_names, "bandpo"]
    _paper = bandpo_paper(GRPOTrainer._paper)

    def __init__(self, model, reward_funcs=None, args=None, *more_args, **kwargs):
        if args is not None:
            if not is_validated(args):
                validate_band_options(args)  # before the (slow) model load; a plain GRPOConfig is checked here too
            self._refuse_unapplied_override(get_clip_rule(band_option(args, "clip_rule")))
        super().__init__(model, reward_funcs, args, *more_args, **kwargs)
        if args is None:  # TRL built its default GRPOConfig
            validate_band_options(self.args)
        self._set_clip_rule(get_clip_rule(band_option(self.args, "clip_rule")))
        self._current_logps = None
        self._capture_logps = False

    @default_bounds
    def compute_clip_bounds(
        self, old_per_token_logps: torch.Tensor, inputs: dict
    ) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """Ratio bounds ``(lower, upper)`` for each completion token, from its old log-probability.

        By default the registered rule named by `clip_rule` (`self.clip_rule`). Override this to try another rule
        in a subclass. ``old_per_token_logps`` is (B, T) log pi_old of the sampled tokens at the sampling
        temperature; ``inputs`` is the micro-batch (advantages, masks, ...). Return tensors broadcastable to (B, T),
        or floats, with ``lower <= 1 <= upper``; they carry no gradient. Bounds that exclude 1 on a completion token
        raise on the first micro-batch and are counted in `band/invalid_bounds`.

        Example:
        ```python
        class SqrtBand(BandGRPOTrainer):
            def compute_clip_bounds(self, old_per_token_logps, inputs):
                width = 0.2 * torch.exp(-0.5 * old_per_token_logps)  # 0.2 / sqrt(p)
                return (1 - width).clamp(min=0), 1 + width
        ```
        """
        return self.clip_rule(old_per_token_logps, self._clip_args)

    def _compute_loss(self, model, inputs):
        old_per_token_logps = inputs.get("old_per_token_logps")
        if old_per_token_logps is None:
            # On-policy (ratio == 1): no bound can act and there is nothing to log beyond TRL's metrics.
            return super()._compute_loss(model, inputs)

        lower, upper = self.compute_clip_bounds(old_per_token_logps, inputs)
        if isinstance(lower, torch.Tensor) != isinstance(upper, torch.Tensor):
            # TRL's clamp takes two floats or two tensors, not one of each.
            lower, upper = token_bounds(lower, old_per_token_logps), token_bounds(upper, old_per_token_logps)
        if not self._bounds_checked and self.applies_token_bounds:
            self._check_bounds_once(old_per_token_logps, lower, upper, self._token_mask(inputs))
        scalar_epsilons = self.epsilon_low, self.epsilon_high
        if self.applies_token_bounds:
            # TRL clamps to [1 - epsilon_low, 1 + epsilon_high]; per-token tensors make that the per-token bounds.
            self.epsilon_low, self.epsilon_high = 1 - lower, upper - 1
        self._capture_logps = True
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self.epsilon_low, self.epsilon_high = scalar_epsilons
            self._capture_logps = False
        current_logps, self._current_logps = self._current_logps, None
        self.log_clip_metrics(inputs, old_per_token_logps, current_logps, lower, upper)
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

    @torch.no_grad()
    def log_clip_metrics(self, inputs, old_logps, logps, lower, upper) -> None:
        """Log the clip metrics of one micro-batch (`inputs`: its `completion_mask`, optional `tool_mask` and
        `advantages`; the (B, T) old and current log-probs; the bounds applied, floats or tensors): the sums of
        `clip_metric_sums`, reduced across processes in one reduction, become `clip_metrics_from_sums`'s values in
        `self._metrics`. Called by the loss for every micro-batch with old log-probs."""
        metrics = self._metrics["train" if self.model.training else "eval"]
        self._log_clip_sums(old_logps, logps, lower, upper, inputs["advantages"], self._token_mask(inputs), metrics)
