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
import os
import textwrap
import warnings

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer

from .checkpoints import clip_settings, warn_on_earlier_run, write_clip_settings
from .clip_metrics import PROB_BUCKETS, band_metrics, clip_metric_sums, invalid_bounds, token_bounds
from .clip_rules import ClipRule, get_clip_rule
from .config import band_option, is_validated, validate_band_options, with_band_defaults

__all__ = ["PROB_BUCKETS", "BandGRPOTrainer"]


class BandGRPOTrainer(GRPOTrainer):
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
    _tag_names = ["trl", "grpo", "bandpo"]
    _name = "BandPO"
    _paper = {
        "title": "BandPO: Bridging Trust Regions and Ratio Clipping via Probability-Aware Bounds for LLM "
        "Reinforcement Learning",
        "id": "2603.04918",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{li2026bandpo,
                title        = {{BandPO: Bridging Trust Regions and Ratio Clipping via Probability-Aware Bounds for LLM Reinforcement Learning}},
                author       = {Li and others},
                year         = 2026,
                eprint       = {arXiv:2603.04918},
            }
            """)
        + "\n"
        + GRPOTrainer._paper["citation"],
    }

    def __init__(self, model, reward_funcs=None, args=None, *more_args, **kwargs):
        if args is not None and not is_validated(args):
            validate_band_options(args)  # before the (slow) model load; a plain GRPOConfig is checked here too
        custom_bounds = type(self).compute_clip_bounds is not BandGRPOTrainer.compute_clip_bounds
        rule = get_clip_rule(band_option(args, "clip_rule")) if args is not None else None
        if rule is not None and rule.trl_clip and custom_bounds:
            raise self._custom_bounds_with_trl_clip(rule)
        super().__init__(model, reward_funcs, args, *more_args, **kwargs)
        if args is None:
            validate_band_options(self.args)
            rule = get_clip_rule(band_option(self.args, "clip_rule"))
            if rule.trl_clip and custom_bounds:
                raise self._custom_bounds_with_trl_clip(rule)
        self.clip_rule: ClipRule = rule
        # TRL's loss keeps its own scalar clip for TRL's rule; every other rule's bounds are swapped in per token.
        self.applies_token_bounds = custom_bounds or not rule.trl_clip
        self._clip_args = with_band_defaults(self.args)
        self._current_logps = None
        self._capture_logps = False
        self._bounds_checked = False  # the first micro-batch with old log-probs is checked once (see the docstring)
        self._warned_invalid_bounds = False

    def _custom_bounds_with_trl_clip(self, rule: ClipRule) -> ValueError:
        method = type(self).compute_clip_bounds
        return ValueError(
            f"{method.__module__}.{method.__qualname__} overrides the clip bounds, but clip_rule={rule.name!r} is "
            "TRL's own fixed clip, which this trainer leaves to TRL's loss, so the override would never be applied. "
            "Set clip_rule to another rule (e.g. 'band') to apply the overridden bounds."
        )

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None):
        """`Trainer.train`, after two warnings (`Trainer` semantics: nothing is refused here, unlike the
        `bandpo-train` entry point): when a fresh run is about to write over an earlier run's checkpoints or model in
        `output_dir`, and when the checkpoint resumed was trained with other clip settings (naming each)."""
        warn_on_earlier_run(self.args, resume_from_checkpoint, self._overriding_bounds())
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval)

    def _save_checkpoint(self, model, trial):
        # The clip settings go in first: Trainer writes trainer_state.json last, and a checkpoint without it is
        # incomplete (bandpo_trl.checkpoints), so a complete checkpoint always has them.
        if self.args.should_save:
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            write_clip_settings(folder, clip_settings(self.args, self._overriding_bounds()))
        super()._save_checkpoint(model, trial)

    def _overriding_bounds(self) -> str | None:
        method = type(self).compute_clip_bounds
        return None if method is BandGRPOTrainer.compute_clip_bounds else f"{method.__module__}.{method.__qualname__}"

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
            self._check_bounds_once(inputs, old_per_token_logps, lower, upper)
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

    def _bounds_source(self) -> str:
        """What produced the bounds, for messages: the overriding method, or the registered rule."""
        method = type(self).compute_clip_bounds
        if method is not BandGRPOTrainer.compute_clip_bounds:
            return f"{method.__module__}.{method.__qualname__}"
        function = self.clip_rule.bounds
        return f"clip rule {self.clip_rule.name!r} ({function.__module__}.{function.__qualname__})"

    @torch.no_grad()
    def _check_bounds_once(self, inputs, old_logps, lower, upper) -> None:
        """On the first micro-batch with old log-probs: raise if any completion token gets an interval that excludes 1.

        One reduction and one host transfer, once per trainer; later micro-batches are only counted in
        `band/invalid_bounds` by `log_clip_metrics`, which already synchronises once per step.
        """
        self._bounds_checked = True
        mask = self._token_mask(inputs)
        lower, upper = token_bounds(lower, old_logps), token_bounds(upper, old_logps)
        invalid = invalid_bounds(old_logps, lower, upper) & mask.bool()
        counts = torch.stack([invalid.sum().float(), mask.sum()])
        n_invalid, n_tokens = self.accelerator.reduce(counts, reduction="sum").tolist()
        if n_invalid == 0:
            return
        example = ""
        if invalid.any():  # this process's share may be empty when another process found the violation
            index = invalid.flatten().nonzero()[0, 0]
            lo, up, logp = (t.flatten()[index].item() for t in (lower, upper, old_logps))
            example = f"; e.g. lower = {lo:.6g}, upper = {up:.6g} for a token of old probability {math.exp(logp):.6g}"
        raise ValueError(
            f"{self._bounds_source()} returned ratio bounds that violate lower <= 1 <= upper for "
            f"{n_invalid / max(n_tokens, 1.0):.1%} of the completion tokens ({int(n_invalid)} of {int(n_tokens)}) "
            f"of the first micro-batch{example}. An interval that excludes ratio 1 clips tokens the policy has not "
            "moved; return lower <= 1 <= upper (e.g. lower.clamp(max=1), upper.clamp(min=1))"
        )

    def clip_metric_sums(
        self,
        old_logps: torch.Tensor,
        logps: torch.Tensor,
        lower: torch.Tensor,
        upper: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The token sums of one micro-batch behind the logged clip metrics (0-d tensors, summed across processes in
        one reduction). Override to add sums of your own (call `super()` and add keys), then turn them into metrics
        in `clip_metrics_from_sums`. Arguments: (B, T) old and current log-probs of the sampled tokens, the (B, T)
        bounds applied, the advantages ((B,) or (B, T)) and the (B, T) float mask of the completion tokens."""
        return clip_metric_sums(old_logps, logps, lower, upper, advantages, mask)

    def clip_metrics_from_sums(self, totals: dict[str, float]) -> dict[str, float]:
        """The metrics logged for one micro-batch (`band/*`), from the reduced totals of `clip_metric_sums`."""
        return band_metrics(totals)

    @torch.no_grad()
    def log_clip_metrics(self, inputs, old_logps, logps, lower, upper) -> None:
        """Log the clip metrics of one micro-batch (`inputs`: its `completion_mask`, optional `tool_mask` and
        `advantages`; the (B, T) old and current log-probs; the bounds applied, floats or tensors): the sums of
        `clip_metric_sums`, reduced across processes in one reduction, become `clip_metrics_from_sums`'s values in
        `self._metrics`. Called by the loss for every micro-batch with old log-probs."""
        lower, upper = token_bounds(lower, old_logps), token_bounds(upper, old_logps)
        sums = self.clip_metric_sums(old_logps, logps, lower, upper, inputs["advantages"], self._token_mask(inputs))
        # One reduction and one host transfer for all of them.
        values = self.accelerator.reduce(torch.stack(list(sums.values())).float(), reduction="sum").tolist()
        totals = dict(zip(sums, values, strict=True))
        metrics = self._metrics["train" if self.model.training else "eval"]
        for name, value in self.clip_metrics_from_sums(totals).items():
            metrics[name].append(value)
        if (
            totals["invalid"] > 0
            and not self._warned_invalid_bounds
            and self.applies_token_bounds
            and self.accelerator.is_main_process
        ):
            self._warned_invalid_bounds = True
            warnings.warn(
                f"{self._bounds_source()} returned ratio bounds that violate lower <= 1 <= upper for "
                f"{totals['invalid'] / max(totals['tokens'], 1.0):.1%} of the completion tokens of this micro-batch "
                "(logged as band/invalid_bounds; warned once)",
                UserWarning,
                stacklevel=1,  # the trainer's own line: the caller is TRL's training loop
            )
