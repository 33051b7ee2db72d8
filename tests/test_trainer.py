"""BandGRPOTrainer on hand-built batches: parity with TRL's GRPOTrainer, the Band loss formula, refusals."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from trl import GRPOConfig, GRPOTrainer

from bandpo_trl import BandGRPOConfig, BandGRPOTrainer, band_bounds

B, P, T = 4, 3, 6  # sequences, prompt length, completion length


def constant_reward(completions, **kwargs):
    return [0.0] * len(completions)


def common_args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        bf16=False,
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=T,
        gradient_accumulation_steps=1,
        steps_per_generation=2,  # off-policy: TRL computes old log-probs
        seed=0,
    )
    kwargs.update(overrides)
    return kwargs


def build(trainer_cls, config_cls, model_dir, tiny_train_dataset, tmp_path, **overrides):
    args = config_cls(**common_args(tmp_path, **overrides))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(
            model=str(model_dir), reward_funcs=constant_reward, args=args, train_dataset=tiny_train_dataset
        )
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); the loss reads it
    return trainer


def make_batch(vocab_size, seed=0, old=True, ref=False, old_offset=None):
    gen = torch.Generator().manual_seed(seed)
    completion_mask = torch.ones(B, T, dtype=torch.long)
    completion_mask[1, 4:] = 0  # a shorter completion, padded
    completion_mask[3, 2:] = 0
    batch = {
        "prompt_ids": torch.randint(2, vocab_size, (B, P), generator=gen),
        "prompt_mask": torch.ones(B, P, dtype=torch.long),
        "completion_ids": torch.randint(2, vocab_size, (B, T), generator=gen),
        "completion_mask": completion_mask,
        "advantages": torch.tensor([1.0, -0.5, 0.8, -1.2]),
        "num_items_in_batch": completion_mask.sum(),
    }
    if old:
        # old log-probs far from and close to the current ones, so some ratios leave every interval
        offset = old_offset if old_offset is not None else torch.randn(B, T, generator=gen) * 1.5
        batch["old_per_token_logps"] = (-3.0 + offset).clamp(max=-1e-3)
    if ref:
        batch["ref_per_token_logps"] = -3.0 + 0.3 * torch.randn(B, T, generator=gen)
    return batch


def loss_grads_metrics(trainer, batch):
    trainer.model.zero_grad()
    trainer.model.train()
    for values in trainer._metrics["train"].values():
        values.clear()
    loss = trainer._compute_loss(trainer.model, dict(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: list(v) for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


def current_logps(model, batch, temperature=1.0):
    """The policy's per-token log-probs of the completion, computed here independently of TRL."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, P - 1 : -1] / temperature
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------------
# Parity: clip_rule="clip" is TRL's GRPOTrainer, loss, gradients and metrics
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize(
    "variant",
    [
        dict(),
        dict(beta=0.04),
        dict(delta=1.5),
        dict(epsilon_high=0.28),
        dict(on_policy=True),
    ],
    ids=["plain", "beta", "dual-clip", "clip-higher", "on-policy"],
)
def test_clip_rule_matches_trl(loss_type, variant, tiny_model_dir, tiny_train_dataset, tmp_path):
    variant = dict(variant)
    on_policy = variant.pop("on_policy", False)
    if on_policy:
        variant["steps_per_generation"] = 1
    kwargs = dict(loss_type=loss_type, **variant)
    trl_trainer = build(GRPOTrainer, GRPOConfig, tiny_model_dir, tiny_train_dataset, tmp_path, **kwargs)
    band_trainer = build(
        BandGRPOTrainer, BandGRPOConfig, tiny_model_dir, tiny_train_dataset, tmp_path, clip_rule="clip", **kwargs
    )
    batch = make_batch(trl_trainer.model.config.vocab_size, old=not on_policy, ref="beta" in variant)

    loss_trl, grads_trl, metrics_trl = loss_grads_metrics(trl_trainer, batch)
    loss_band, grads_band, metrics_band = loss_grads_metrics(band_trainer, batch)

    torch.testing.assert_close(loss_band, loss_trl, rtol=0, atol=0)
    assert grads_band.keys() == grads_trl.keys()
    for name in grads_trl:
        torch.testing.assert_close(grads_band[name], grads_trl[name], rtol=0, atol=0)
    for key, values in metrics_trl.items():
        assert metrics_band[key] == values, key
    extra = set(metrics_band) - set(metrics_trl)
    assert all(k.startswith("band/") for k in extra)
    assert bool(extra) != on_policy  # band metrics need old log-probs


def test_plain_grpo_config_gets_band_defaults(tiny_model_dir, tiny_train_dataset, tmp_path):
    """The one-import swap: a plain GRPOConfig handed to BandGRPOTrainer gets Band KL, delta 0.05, cap 10."""
    plain = build(BandGRPOTrainer, GRPOConfig, tiny_model_dir, tiny_train_dataset, tmp_path, loss_type="grpo")
    explicit = build(
        BandGRPOTrainer,
        BandGRPOConfig,
        tiny_model_dir,
        tiny_train_dataset,
        tmp_path,
        loss_type="grpo",
        clip_rule="band",
        band_divergence="kl",
        band_delta=0.05,
        band_max_ratio=10.0,
    )
    batch = make_batch(plain.model.config.vocab_size)
    torch.testing.assert_close(loss_grads_metrics(plain, batch)[0], loss_grads_metrics(explicit, batch)[0])
    lower, upper = plain.compute_clip_bounds(batch["old_per_token_logps"], batch)
    torch.testing.assert_close(lower, band_bounds(batch["old_per_token_logps"], "kl", 0.05, 10.0)[0])


# ---------------------------------------------------------------------------------------------------------------
# Band: the loss is the formula of docs/method.md §5.1
# ---------------------------------------------------------------------------------------------------------------


def tv_bounds_by_hand(old_logps, delta, cap):
    p = old_logps.double().exp()
    lower = (1 - delta / p).clamp(min=0)
    upper = torch.minimum(1 + delta / p, 1 / p)
    return lower.clamp(0, 1), upper.clamp(1, cap)


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_band_loss_matches_formula(dual_clip, tiny_model_dir, tiny_train_dataset, tmp_path):
    delta, cap = 0.05, 10.0
    trainer = build(
        BandGRPOTrainer,
        BandGRPOConfig,
        tiny_model_dir,
        tiny_train_dataset,
        tmp_path,
        loss_type="grpo",
        band_divergence="tv",
        band_delta=delta,
        band_max_ratio=cap,
        delta=dual_clip,
    )
    vocab = trainer.model.config.vocab_size
    batch = make_batch(vocab, seed=1)
    loss, _, metrics = loss_grads_metrics(trainer, batch)

    with torch.no_grad():
        logps = current_logps(trainer.model, batch).double()
    old = batch["old_per_token_logps"].double()
    lower, upper = tv_bounds_by_hand(old, delta, cap)
    ratio = torch.exp(logps - old)
    adv = batch["advantages"].double().unsqueeze(1)
    unclipped = ratio if dual_clip is None else ratio.clamp(max=dual_clip)
    per_token = torch.maximum(-adv * unclipped, -adv * ratio.clamp(lower, upper))
    mask = batch["completion_mask"].double()
    expected = ((per_token * mask).sum(1) / mask.sum(1)).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)

    # The batch really exercises both sides: tokens inside and outside their band, for both advantage signs.
    valid = mask.bool()
    below, above = (ratio < lower) & valid, (ratio > upper) & valid
    inside = ~below & ~above & valid
    assert inside.any() and (below | above).any()
    assert ((adv < 0) & below).any() or ((adv < 0) & above).any()
    assert ((adv > 0) & above).any() or ((adv > 0) & below).any()

    # Logged clip fractions count the same tokens as the formula (TRL's meaning: clipping that binds).
    n = mask.sum()
    assert metrics["clip_ratio/low_mean"][0] == pytest.approx(((below & (adv < 0)).sum() / n).item())
    assert metrics["clip_ratio/high_mean"][0] == pytest.approx(((above & (adv > 0)).sum() / n).item())
    assert metrics["band/lower_mean"][0] == pytest.approx(((lower * mask).sum() / n).item(), rel=1e-5)
    assert metrics["band/upper_mean"][0] == pytest.approx(((upper * mask).sum() / n).item(), rel=1e-5)


def test_band_gradient_zero_exactly_where_clipped(tiny_model_dir, tiny_train_dataset, tmp_path):
    """Only unclipped tokens carry gradient: the gradient equals that of -A r summed over in-band tokens."""
    trainer = build(BandGRPOTrainer, BandGRPOConfig, tiny_model_dir, tiny_train_dataset, tmp_path, loss_type="bnpo")
    batch = make_batch(trainer.model.config.vocab_size, seed=2)
    _, grads, _ = loss_grads_metrics(trainer, batch)

    old = batch["old_per_token_logps"]
    lower, upper = band_bounds(old, "kl", 0.05, 10.0)
    trainer.model.zero_grad()
    logps = current_logps(trainer.model, batch)
    ratio = torch.exp(logps - old)
    adv = batch["advantages"].unsqueeze(1)
    binding = ((ratio < lower) & (adv < 0)) | ((ratio > upper) & (adv > 0))
    mask = batch["completion_mask"].float()
    live = mask * (~binding).float()
    (-(adv * ratio * live).sum() / mask.sum()).backward()
    for name, param in trainer.model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-7)


def test_bucket_metrics_by_hand(tiny_model_dir, tiny_train_dataset, tmp_path):
    trainer = build(BandGRPOTrainer, BandGRPOConfig, tiny_model_dir, tiny_train_dataset, tmp_path, loss_type="grpo")
    probs = torch.tensor([0.001, 0.05, 0.3, 0.9, 0.005, 0.6]).expand(B, T)
    batch = make_batch(trainer.model.config.vocab_size, old_offset=torch.zeros(B, T))
    batch["old_per_token_logps"] = probs.log()
    _, _, metrics = loss_grads_metrics(trainer, batch)
    mask = batch["completion_mask"].bool()
    n = mask.sum().item()
    expected_share = {
        "p<0.01": (mask & (probs < 0.01)).sum().item() / n,
        "p0.01-0.1": (mask & (probs >= 0.01) & (probs < 0.1)).sum().item() / n,
        "p0.1-0.5": (mask & (probs >= 0.1) & (probs < 0.5)).sum().item() / n,
        "p>=0.5": (mask & (probs >= 0.5)).sum().item() / n,
    }
    for name, share in expected_share.items():
        assert metrics[f"band/tokens/{name}"][0] == pytest.approx(share)
    # The random-init policy gives each token p ~ 1/vocab, so tokens whose old p was 0.9 are clipped low
    # when their advantage is negative, and the rare ones (old p = 0.001) never are.
    assert metrics["band/clip_low/p>=0.5"][0] > 0
    assert metrics["band/clip_low/p<0.01"][0] == 0


def test_subclass_overrides_bounds(tiny_model_dir, tiny_train_dataset, tmp_path):
    class FixedBounds(BandGRPOTrainer):
        def compute_clip_bounds(self, old_per_token_logps, inputs):
            return torch.full_like(old_per_token_logps, 0.8), torch.full_like(old_per_token_logps, 1.2)

    custom = build(FixedBounds, BandGRPOConfig, tiny_model_dir, tiny_train_dataset, tmp_path, loss_type="grpo")
    reference = build(GRPOTrainer, GRPOConfig, tiny_model_dir, tiny_train_dataset, tmp_path, loss_type="grpo")
    batch = make_batch(custom.model.config.vocab_size)
    loss_custom, grads_custom, _ = loss_grads_metrics(custom, batch)
    loss_ref, grads_ref, _ = loss_grads_metrics(reference, batch)
    torch.testing.assert_close(loss_custom, loss_ref)
    for name in grads_ref:
        torch.testing.assert_close(grads_custom[name], grads_ref[name])
    assert custom.epsilon_low == 0.2 and custom.epsilon_high == 0.2  # scalars restored after the loss


def test_relax_is_union_with_clip_higher(tiny_model_dir, tiny_train_dataset, tmp_path):
    trainer = build(
        BandGRPOTrainer,
        BandGRPOConfig,
        tiny_model_dir,
        tiny_train_dataset,
        tmp_path,
        band_relax=True,
        epsilon_high=0.28,
    )
    old = torch.tensor([[-0.01, -0.5, -3.0, -9.0]])
    lower, upper = trainer.compute_clip_bounds(old, {})
    raw_lower, raw_upper = band_bounds(old, "kl", 0.05, 10.0)
    torch.testing.assert_close(lower, torch.minimum(raw_lower, torch.tensor(0.8)))
    torch.testing.assert_close(upper, torch.maximum(raw_upper, torch.tensor(1.28)))


def test_dcpo_rule_uses_dcpo_bounds(tiny_model_dir, tiny_train_dataset, tmp_path):
    trainer = build(BandGRPOTrainer, BandGRPOConfig, tiny_model_dir, tiny_train_dataset, tmp_path, clip_rule="dcpo")
    p = torch.tensor([0.9, 0.3, 0.05, 0.001])
    lower, upper = trainer.compute_clip_bounds(p.log(), {})
    expected_lower = 0.5 + 0.5 * torch.sqrt((1 - 4 * 0.16 / p).clamp(min=0))
    expected_upper = (0.5 + 0.5 * torch.sqrt(1 + 4 * 0.2 / p)).clamp(max=10)
    torch.testing.assert_close(lower, expected_lower)
    torch.testing.assert_close(upper, expected_upper)


# ---------------------------------------------------------------------------------------------------------------
# Refusals and the on-policy warning
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(importance_sampling_level="sequence"), "importance_sampling_level='sequence'"),
        (dict(loss_type="cispo"), "loss_type='cispo' has none"),
        (dict(loss_type="sapo"), "loss_type='sapo'"),
        (dict(loss_type="vespo"), "loss_type='vespo'"),
        (dict(use_liger_kernel=True), "use_liger_kernel"),
        (dict(clip_rule="dcpo", loss_type="cispo"), "clip_rule='dcpo'"),
        (dict(band_divergence="js"), "band_divergence 'js' is unknown; accepted: chi2, hellinger, kl"),
        (dict(band_delta=0.0), "band_delta must be a finite number > 0, got 0.0"),
        (dict(band_delta=-1.0), "band_delta must be a finite number > 0, got -1.0"),
        (dict(band_delta=math.inf), "band_delta must be a finite number > 0"),
        (dict(band_max_ratio=0.5), "band_max_ratio must be None (raw bounds) or a finite number >= 1, got 0.5"),
        (dict(clip_rule="ppo"), "unknown clip_rule 'ppo'; accepted: band, clip, dcpo, or an import path"),
        (dict(dcpo_epsilon_low=0.0, clip_rule="dcpo"), "dcpo_epsilon_low must be a finite number > 0"),
    ],
)
def test_config_refuses(overrides, match, tmp_path):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        BandGRPOConfig(**common_args(tmp_path, **overrides))


def test_clip_rule_keeps_every_trl_option(tmp_path):
    for loss_type in ("cispo", "sapo"):
        BandGRPOConfig(**common_args(tmp_path, clip_rule="clip", loss_type=loss_type))
    BandGRPOConfig(**common_args(tmp_path, clip_rule="clip", importance_sampling_level="sequence"))


@pytest.mark.parametrize("loss_type", ["cispo", "sapo"])
def test_trainer_refuses_plain_grpo_config(loss_type, tiny_model_dir, tiny_train_dataset, tmp_path):
    with pytest.raises(ValueError, match=f"loss_type='{loss_type}'"):
        build(BandGRPOTrainer, GRPOConfig, tiny_model_dir, tiny_train_dataset, tmp_path, loss_type=loss_type)


def test_on_policy_warning(tmp_path):
    with pytest.warns(UserWarning, match="has no effect with this configuration"):
        BandGRPOConfig(**common_args(tmp_path, steps_per_generation=1))
    with pytest.warns(UserWarning, match="has no effect"):
        BandGRPOConfig(**common_args(tmp_path, steps_per_generation=None, gradient_accumulation_steps=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        BandGRPOConfig(**common_args(tmp_path, steps_per_generation=4, gradient_accumulation_steps=2))
        BandGRPOConfig(**common_args(tmp_path, steps_per_generation=1, num_iterations=2))
        BandGRPOConfig(**common_args(tmp_path, steps_per_generation=1, clip_rule="clip"))  # TRL's clip: no warning


# ---------------------------------------------------------------------------------------------------------------
# Bounds that violate lower <= 1 <= upper: refused on the first micro-batch, then counted and warned about
# ---------------------------------------------------------------------------------------------------------------


class ShiftedBounds(BandGRPOTrainer):
    """Band bounds, shifted up by `shift` on the tokens of old probability above `threshold` (lower > 1 there)."""

    shift = 0.0
    threshold = 0.5

    def compute_clip_bounds(self, old_per_token_logps, inputs):
        lower, upper = super().compute_clip_bounds(old_per_token_logps, inputs)
        bad = old_per_token_logps.exp() > self.threshold
        return torch.where(bad, lower + self.shift, lower), torch.where(bad, upper + self.shift, upper)


def probe_batch(vocab, probs_row):
    """make_batch with old probabilities set column by column (the same in every row)."""
    batch = make_batch(vocab, old_offset=torch.zeros(B, T))
    batch["old_per_token_logps"] = torch.tensor(probs_row).log().expand(B, T).clone()
    return batch


def test_invalid_bounds_refused_on_first_micro_batch(tiny_model_dir, tiny_train_dataset, tmp_path):
    trainer = build(ShiftedBounds, BandGRPOConfig, tiny_model_dir, tiny_train_dataset, tmp_path, loss_type="grpo")
    trainer.shift = 0.5
    batch = probe_batch(trainer.model.config.vocab_size, [0.9, 0.01, 0.9, 0.2, 0.9, 0.9])
    # completion tokens: 6 + 4 + 6 + 2 = 18 (rows 1 and 3 padded); with p = 0.9: 4 + 2 + 4 + 1 = 11 of them
    with pytest.raises(ValueError) as info:
        loss_grads_metrics(trainer, batch)
    message = str(info.value)
    assert "ShiftedBounds.compute_clip_bounds returned ratio bounds that violate lower <= 1 <= upper" in message
    assert "61.1% of the completion tokens (11 of 18)" in message
    assert re.search(r"e.g. lower = 1.366\d*, upper = 1.576\d* for a token of old probability 0.9\b", message)
    assert trainer.epsilon_low == 0.2 and trainer.epsilon_high == 0.2  # nothing was swapped in


@pytest.mark.parametrize(
    "bounds, ok",
    [
        ((0.8, 1.2), True),  # floats are allowed, as TRL's clip rule returns
        ((1.0, 1.0), True),  # the degenerate interval {1} is valid (frozen, but lower <= 1 <= upper)
        ((1.05, 1.3), False),
        ((0.5, 0.9), False),
        ((math.nan, 1.2), False),
    ],
)
def test_float_bounds(bounds, ok, tiny_model_dir, tiny_train_dataset, tmp_path):
    class FloatBounds(BandGRPOTrainer):
        def compute_clip_bounds(self, old_per_token_logps, inputs):
            return bounds

    trainer = build(FloatBounds, BandGRPOConfig, tiny_model_dir, tiny_train_dataset, tmp_path, loss_type="grpo")
    batch = make_batch(trainer.model.config.vocab_size)
    if ok:
        _, _, metrics = loss_grads_metrics(trainer, batch)
        assert metrics["band/invalid_bounds"] == [0.0]
    else:
        with pytest.raises(ValueError, match=r"FloatBounds.compute_clip_bounds .* for 100.0% of the completion"):
            loss_grads_metrics(trainer, batch)


def test_invalid_bounds_ignore_padding(tiny_model_dir, tiny_train_dataset, tmp_path):
    """Bounds of padded positions (outside the completion mask) are not checked or counted."""
    trainer = build(ShiftedBounds, BandGRPOConfig, tiny_model_dir, tiny_train_dataset, tmp_path, loss_type="grpo")
    trainer.shift = 0.5
    batch = probe_batch(trainer.model.config.vocab_size, [0.3, 0.2, 0.3, 0.2, 0.3, 0.2])
    batch["old_per_token_logps"][3, 2:] = math.log(0.9)  # padding of the fourth completion
    _, _, metrics = loss_grads_metrics(trainer, batch)
    assert metrics["band/invalid_bounds"] == [0.0]


def test_invalid_bounds_counted_and_warned_once_after_the_first_batch(tiny_model_dir, tiny_train_dataset, tmp_path):
    trainer = build(ShiftedBounds, BandGRPOConfig, tiny_model_dir, tiny_train_dataset, tmp_path, loss_type="grpo")
    vocab = trainer.model.config.vocab_size
    reduces = []
    reduce = trainer.accelerator.reduce
    trainer.accelerator.reduce = lambda *args, **kwargs: reduces.append(1) or reduce(*args, **kwargs)

    trainer.shift = 0.5
    valid = probe_batch(vocab, [0.3, 0.2, 0.3, 0.2, 0.3, 0.2])  # nothing above the threshold: valid
    _, _, metrics = loss_grads_metrics(trainer, valid)
    first_batch_reduces = len(reduces)
    assert metrics["band/invalid_bounds"] == [0.0]

    invalid = probe_batch(vocab, [0.9, 0.01, 0.9, 0.2, 0.9, 0.9])
    reduces.clear()
    with pytest.warns(UserWarning, match=r"ShiftedBounds.compute_clip_bounds returned .* for 61.1% .* warned once"):
        _, _, metrics = loss_grads_metrics(trainer, invalid)
    assert metrics["band/invalid_bounds"] == [pytest.approx(11 / 18)]
    assert len(reduces) == first_batch_reduces - 1  # the one-off check is the only extra reduction
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, _, metrics = loss_grads_metrics(trainer, invalid)
    assert metrics["band/invalid_bounds"] == [pytest.approx(11 / 18)]


@pytest.mark.parametrize("rule", ["band", "dcpo"])
def test_builtin_rules_have_no_invalid_bounds(rule, tiny_model_dir, tiny_train_dataset, tmp_path):
    trainer = build(BandGRPOTrainer, BandGRPOConfig, tiny_model_dir, tiny_train_dataset, tmp_path, clip_rule=rule)
    batch = make_batch(trainer.model.config.vocab_size)
    batch["old_per_token_logps"][0, :3] = torch.tensor([-1e-9, -20.0, -math.inf])  # extreme probabilities
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, _, metrics = loss_grads_metrics(trainer, batch)
    assert metrics["band/invalid_bounds"] == [0.0]
