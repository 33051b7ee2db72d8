"""What every trainer that clips with a registered rule shares: the rule's set-up, the one-time check of the bounds,
the `band/*` clip metrics, the clip settings saved with each checkpoint and the BandPO model card.

`BandGRPOTrainer` (TRL's `GRPOTrainer`) and `BandAsyncGRPOTrainer` (TRL's experimental `AsyncGRPOTrainer`) each put
`ClipRuleTrainerMixin` before their TRL base and keep only their own seam: where TRL's loss takes the old log-probs
and clamps the ratios.
"""

from __future__ import annotations

import math
import os
import textwrap
import warnings

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .checkpoints import clip_settings, warn_on_earlier_run, write_clip_settings
from .clip_metrics import band_metrics, clip_metric_sums, invalid_bounds, token_bounds
from .clip_rules import ClipRule
from .config import with_band_defaults

__all__ = ["ClipRuleTrainerMixin", "bandpo_paper", "default_bounds"]

_BANDPO_CITATION = textwrap.dedent("""\
    @article{li2026bandpo,
        title        = {{BandPO: Bridging Trust Regions and Ratio Clipping via Probability-Aware Bounds for LLM Reinforcement Learning}},
        author       = {Li and others},
        year         = 2026,
        eprint       = {arXiv:2603.04918},
    }
    """)


def bandpo_paper(base_paper: dict) -> dict:
    """The `_paper` of a BandPO trainer, for its model card: the BandPO paper, citing the TRL base's paper too."""
    return {
        "title": "BandPO: Bridging Trust Regions and Ratio Clipping via Probability-Aware Bounds for LLM "
        "Reinforcement Learning",
        "id": "2603.04918",
        "citation": _BANDPO_CITATION + "\n" + base_paper["citation"],
    }


def default_bounds(method):
    """Mark a trainer's own `compute_clip_bounds` (the registered rule's bounds); any other is a subclass's override,
    which the trainer applies, names in its messages and records with its checkpoints."""
    method._applies_registered_rule = True
    return method


class ClipRuleTrainerMixin:
    """The clip rule of a trainer (`self.clip_rule`, from `clip_rule` and the Band options of its config) and all that
    does not depend on where the TRL loss clamps the ratios. Put it before the TRL trainer in the bases; the trainer
    calls `_set_clip_rule` once its config is built, and from its loss `compute_clip_bounds`, `_check_bounds_once`
    (first micro-batch) and `_log_clip_sums`."""

    _name = "BandPO"
    # What the messages call the tokens whose ratio is clipped.
    _clipped_tokens = "completion tokens"

    def _overriding_bounds(self) -> str | None:
        """The subclass method that overrides `compute_clip_bounds` (``module.Class.method``), or None."""
        method = type(self).compute_clip_bounds
        if getattr(method, "_applies_registered_rule", False):
            return None
        return f"{method.__module__}.{method.__qualname__}"

    def _refuse_unapplied_override(self, rule: ClipRule) -> None:
        override = self._overriding_bounds()
        if rule.trl_clip and override is not None:
            raise ValueError(
                f"{override} overrides the clip bounds, but clip_rule={rule.name!r} is TRL's own fixed clip, which "
                "this trainer leaves to TRL's loss, so the override would never be applied. Set clip_rule to another "
                "rule (e.g. 'band') to apply the overridden bounds."
            )

    def _set_clip_rule(self, rule: ClipRule) -> None:
        """Adopt the (validated) rule of `self.args`."""
        self._refuse_unapplied_override(rule)
        self.clip_rule: ClipRule = rule
        # TRL's loss keeps its own scalar clip for TRL's rule; every other rule's bounds are swapped in per token.
        self.applies_token_bounds = self._overriding_bounds() is not None or not rule.trl_clip
        self._clip_args = with_band_defaults(self.args)
        self._bounds_checked = False  # the first micro-batch with old log-probs is checked once
        self._warned_invalid_bounds = False

    def _bounds_source(self) -> str:
        """What produced the bounds, for messages: the overriding method, or the registered rule."""
        override = self._overriding_bounds()
        if override is not None:
            return override
        function = self.clip_rule.bounds
        return f"clip rule {self.clip_rule.name!r} ({function.__module__}.{function.__qualname__})"

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

    @torch.no_grad()
    def _check_bounds_once(self, old_logps, lower, upper, mask) -> None:
        """On the first micro-batch with old log-probs: raise if any clipped token (`mask`) gets an interval that
        excludes 1. One reduction and one host transfer, once per trainer; later micro-batches are only counted in
        `band/invalid_bounds`, with the other clip metrics."""
        self._bounds_checked = True
        lower, upper = token_bounds(lower, old_logps), token_bounds(upper, old_logps)
        invalid = invalid_bounds(old_logps, lower, upper) & mask.bool()
        counts = torch.stack([invalid.sum().float(), mask.sum().float()])
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
            f"{n_invalid / max(n_tokens, 1.0):.1%} of the {self._clipped_tokens} ({int(n_invalid)} of {int(n_tokens)}) "
            f"of the first micro-batch{example}. An interval that excludes ratio 1 clips tokens the policy has not "
            "moved; return lower <= 1 <= upper (e.g. lower.clamp(max=1), upper.clamp(min=1))"
        )

    def clip_metric_sums(self, old_logps, logps, lower, upper, advantages, mask) -> dict[str, torch.Tensor]:
        """The token sums of one micro-batch behind the logged clip metrics (0-d tensors, summed across processes in
        one reduction). Override to add sums of your own (call `super()` and add keys), then turn them into metrics
        in `clip_metrics_from_sums`. Arguments: the old and current log-probs of the sampled tokens, the bounds
        applied, the advantages (per sequence or per token) and the float mask of the clipped tokens."""
        return clip_metric_sums(old_logps, logps, lower, upper, advantages, mask)

    def clip_metrics_from_sums(self, totals: dict[str, float]) -> dict[str, float]:
        """The metrics logged for one micro-batch (`band/*`), from the reduced totals of `clip_metric_sums`."""
        return band_metrics(totals)

    @torch.no_grad()
    def _log_clip_sums(self, old_logps, logps, lower, upper, advantages, mask, metrics) -> None:
        """Append one micro-batch's clip metrics to `metrics` (a TRL metric sink), the sums reduced across processes
        in one reduction; warn once when bounds excluded 1."""
        lower, upper = token_bounds(lower, old_logps), token_bounds(upper, old_logps)
        sums = self.clip_metric_sums(old_logps, logps, lower, upper, advantages, mask)
        # One reduction and one host transfer for all of them.
        values = self.accelerator.reduce(torch.stack(list(sums.values())).float(), reduction="sum").tolist()
        totals = dict(zip(sums, values, strict=True))
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
                f"{totals['invalid'] / max(totals['tokens'], 1.0):.1%} of the {self._clipped_tokens} of this "
                "micro-batch (logged as band/invalid_bounds; warned once)",
                UserWarning,
                stacklevel=1,  # the trainer's own line: the caller is TRL's training loop
            )
