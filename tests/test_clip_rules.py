"""The clip-rule registry: each built-in rule against its formula, registration, import paths, checks at start-up,
and the trainer applying a registered rule."""

from __future__ import annotations

import csv
import importlib
import math
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from trl import GRPOConfig, GRPOTrainer

from bandpo_trl import (
    BandGRPOConfig,
    BandGRPOTrainer,
    ClipRule,
    available_clip_rules,
    band_bounds,
    get_clip_rule,
    register_clip_rule,
)
from bandpo_trl import clip_rules as clip_rules_module
from bandpo_trl.config import with_band_defaults

REFERENCE = Path(__file__).parent / "data" / "band_bounds.csv"
PROBS = torch.tensor([1e-7, 1e-4, 0.0185, 0.05, 0.24, 0.5, 0.9, 0.999, 1 - 1e-7], dtype=torch.float64)


@pytest.fixture
def registry():
    """Restores the rule registry (and sys.modules / sys.path / cwd changes) after a test that registers rules."""
    rules, aliases = dict(clip_rules_module._RULES), dict(clip_rules_module._ALIASES)
    modules, path = set(sys.modules), list(sys.path)
    yield
    clip_rules_module._RULES.clear()
    clip_rules_module._RULES.update(rules)
    clip_rules_module._ALIASES.clear()
    clip_rules_module._ALIASES.update(aliases)
    for name in set(sys.modules) - modules:
        del sys.modules[name]
    sys.path[:] = path


def config(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", steps_per_generation=4)
    kwargs.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BandGRPOConfig(**kwargs)


def write_module(directory, name, source):
    (directory / f"{name}.py").write_text(textwrap.dedent(source))
    importlib.invalidate_caches()


# ---------------------------------------------------------------------------------------------------------------
# The built-in rules against their formulas (docs/method.md §5)
# ---------------------------------------------------------------------------------------------------------------


def test_builtin_rules_are_registered():
    assert {"band", "clip", "dcpo"} <= set(available_clip_rules())
    assert get_clip_rule("clip").trl_clip and not get_clip_rule("band").trl_clip
    assert not get_clip_rule("dcpo").trl_clip


@pytest.mark.parametrize(("epsilon", "epsilon_high", "expected"), [(0.2, None, (0.8, 1.2)), (0.2, 0.28, (0.8, 1.28))])
def test_clip_rule_is_trls_fixed_interval(epsilon, epsilon_high, expected, tmp_path):
    args = config(tmp_path, clip_rule="clip", epsilon=epsilon, epsilon_high=epsilon_high)
    lower, upper = get_clip_rule("clip")(PROBS.log(), args)
    assert (lower, upper) == pytest.approx(expected)


def test_band_rule_is_the_reference_table_without_a_cap():
    """Raw bounds (band_max_ratio=None) equal the 60-digit reference values, for every divergence and delta (lower
    bounds at a saturation threshold, exactly 0 there, to float64 rounding of log p)."""
    rule = get_clip_rule("band")
    for row in csv.DictReader(REFERENCE.open()):
        args = SimpleNamespace(
            band_divergence=row["divergence"], band_delta=float(row["delta"]), band_max_ratio=None, band_relax=False
        )
        p = torch.tensor([float(row["p"])], dtype=torch.float64)
        lower, upper = rule(p.log(), args)
        assert lower.item() == pytest.approx(float(row["lower"]), rel=1e-9, abs=1e-14), row
        assert upper.item() == pytest.approx(float(row["upper"]), rel=1e-9), row


def test_band_rule_tv_by_hand_with_cap_and_extreme_p(tmp_path):
    """TV, delta = 0.05, cap 10: l = max(1 - delta/p, 0), u = min(1 + delta/p, 1/p, 10); p < 1e-6 gives (0, 10),
    p > 1 - 1e-6 gives (lim l, 1) = (1 - delta, 1)."""
    args = config(tmp_path, band_divergence="tv", band_delta=0.05)
    lower, upper = get_clip_rule("band")(PROBS.log(), args)
    for p, lo, up in zip(PROBS.tolist(), lower.tolist(), upper.tolist(), strict=True):
        if p < 1e-6:
            expected = (0.0, 10.0)
        elif p > 1 - 1e-6:
            expected = (0.95, 1.0)
        else:
            expected = (max(1 - 0.05 / p, 0.0), min(1 + 0.05 / p, 1 / p, 10.0))
        assert (lo, up) == pytest.approx(expected, rel=1e-12), p


def test_band_rule_relax_is_the_union_with_trls_interval(tmp_path):
    args = config(tmp_path, band_relax=True, epsilon_high=0.28)
    lower, upper = get_clip_rule("band")(PROBS.log(), args)
    raw_lower, raw_upper = band_bounds(PROBS.log(), "kl", 0.05, 10.0)
    torch.testing.assert_close(lower, torch.minimum(raw_lower, torch.tensor(0.8, dtype=torch.float64)))
    torch.testing.assert_close(upper, torch.maximum(raw_upper, torch.tensor(1.28, dtype=torch.float64)))


def test_dcpo_rule_by_hand(tmp_path):
    args = config(tmp_path, clip_rule="dcpo", dcpo_epsilon_low=0.16, dcpo_epsilon_high=0.2)
    lower, upper = get_clip_rule("dcpo")(PROBS.log(), args)
    for p, lo, up in zip(PROBS.tolist(), lower.tolist(), upper.tolist(), strict=True):
        assert lo == pytest.approx(0.5 + 0.5 * math.sqrt(max(1 - 4 * 0.16 / p, 0.0)), rel=1e-12)
        assert up == pytest.approx(min(0.5 + 0.5 * math.sqrt(1 + 4 * 0.2 / p), 10.0), rel=1e-12)


def test_rules_see_band_defaults_through_a_plain_grpo_config(tmp_path):
    args = GRPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to="none")
    view = with_band_defaults(args)
    assert (view.band_divergence, view.band_delta, view.band_max_ratio, view.epsilon) == ("kl", 0.05, 10.0, 0.2)
    lower, upper = get_clip_rule("band")(PROBS.log(), view)
    torch.testing.assert_close((lower, upper), band_bounds(PROBS.log(), "kl", 0.05, 10.0))
    with pytest.raises(AttributeError, match="read-only"):
        view.band_delta = 0.1
    band_args = config(tmp_path)
    assert with_band_defaults(band_args) is band_args


# ---------------------------------------------------------------------------------------------------------------
# Registration and lookup
# ---------------------------------------------------------------------------------------------------------------


def test_register_as_decorator_and_as_call(registry):
    @register_clip_rule("test_half_band", options=("band_delta",))
    def half_band(old_logps, args):
        return 0.5, 1.5

    assert half_band(None, None) == (0.5, 1.5)  # the decorator returns the function itself
    rule = get_clip_rule("test_half_band")
    assert isinstance(rule, ClipRule) and rule.bounds is half_band and rule.options == ("band_delta",)
    registered = register_clip_rule("test_fixed", lambda old_logps, args: (0.9, 1.1))
    assert registered is get_clip_rule("test_fixed") and registered.options == ()
    assert {"test_half_band", "test_fixed"} <= set(available_clip_rules())


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: register_clip_rule("band", lambda o, a: (0.8, 1.2)), "clip rule 'band' is already registered"),
        (lambda: register_clip_rule("", lambda o, a: (0.8, 1.2)), "must be a non-empty string"),
        (lambda: register_clip_rule("test_x", 0.5), "bounds must be a function"),
        (lambda: register_clip_rule("test_x", lambda o, a: (0.8, 1.2), options="band_delta"), "tuple of option"),
        (lambda: get_clip_rule("ppo"), r"unknown clip_rule 'ppo'; accepted: band, clip, dcpo"),
    ],
)
def test_registration_errors(call, message, registry):
    with pytest.raises(ValueError, match=message):
        call()


def test_overwrite_replaces_a_rule(registry):
    register_clip_rule("test_fixed", lambda old_logps, args: (0.9, 1.1))
    register_clip_rule("test_fixed", lambda old_logps, args: (0.7, 1.3), overwrite=True)
    assert get_clip_rule("test_fixed")(None, None) == (0.7, 1.3)


def test_import_paths_name_rules(registry, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_module(
        tmp_path,
        "my_rules",
        """
        from bandpo_trl import register_clip_rule

        @register_clip_rule("test_declared", options=("band_delta",))
        def declared(old_logps, args):
            return 0.8, 1.3

        def bare(old_logps, args):
            return 0.7, 1.4
        """,
    )
    # A module that registers the rule: the path selects that registration, with its declared options.
    assert get_clip_rule("my_rules:test_declared").options == ("band_delta",)
    # Registered under another name: the function's own registration is kept.
    assert get_clip_rule("my_rules:declared").name == "test_declared"
    # A bare function is registered under the path, its options undeclared; the dotted path names the same rule.
    rule = get_clip_rule("my_rules:bare")
    assert rule.name == "my_rules:bare" and rule.options is None and rule(None, None) == (0.7, 1.4)
    assert get_clip_rule("my_rules.bare") is rule
    with pytest.raises(ValueError, match="module 'no_such_rules' not found"):
        get_clip_rule("no_such_rules:x")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        get_clip_rule("my_rules:missing")


# ---------------------------------------------------------------------------------------------------------------
# Checks at start-up: the rule's output, and options the rule does not read
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bounds", "message"),
    [
        (lambda o, a: (1.05, 1.3), r"violate lower <= 1 <= upper: lower = 1.05, upper = 1.3 at old probability 0\b"),
        (lambda o, a: (0.8, torch.where(o > -1e-9, 0.9, 1.2)), r"upper = 0.9 at old probability 1\b"),
        (lambda o, a: (o.exp() * float("nan"), 1.2), "violate lower <= 1 <= upper"),
        (lambda o, a: 0.8, r"must return a pair \(lower, upper\), got float"),
        (lambda o, a: ("0.8", 1.2), "lower must be a float or a tensor, got str"),
        (lambda o, a: (torch.zeros(3), 1.2), r"lower of shape \(3,\) does not broadcast"),
        (lambda o, a: a.no_such_option, "raised AttributeError"),
    ],
)
def test_bad_rules_refused_at_start_up(bounds, message, registry, tmp_path):
    register_clip_rule("test_bad", bounds)
    with pytest.raises(ValueError, match=rf"clip rule 'test_bad' \(.*\).*{message}"):
        config(tmp_path, clip_rule="test_bad")


@pytest.mark.parametrize(
    ("overrides", "unread"),
    [
        (dict(clip_rule="dcpo", band_delta=0.1, band_divergence="tv"), "band_divergence='tv', band_delta=0.1"),
        (dict(clip_rule="clip", band_relax=True), "band_relax=True"),
        (dict(clip_rule="band", dcpo_epsilon_low=0.3), "dcpo_epsilon_low=0.3"),
        (dict(clip_rule="clip", band_max_ratio=5.0), "band_max_ratio=5.0"),
        (dict(clip_rule="band", epsilon_high=0.28), "epsilon_high=0.28"),
        (dict(clip_rule="band", band_delta=0.1, epsilon=0.3), "epsilon=0.3"),
        (dict(clip_rule="dcpo", epsilon=0.3, epsilon_high=0.28), "epsilon=0.3, epsilon_high=0.28"),
    ],
)
def test_options_the_rule_does_not_read_warn(overrides, unread, tmp_path):
    with pytest.warns(UserWarning, match=rf"clip_rule='{overrides['clip_rule']}' does not read {unread}: .*no effect"):
        BandGRPOConfig(output_dir=str(tmp_path), steps_per_generation=4, **overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(clip_rule="band", band_divergence="tv", band_delta=0.1, band_relax=True, band_max_ratio=5.0),
        dict(clip_rule="dcpo", dcpo_epsilon_low=0.1, band_max_ratio=5.0),
        dict(clip_rule="clip", epsilon_high=0.28),
        dict(clip_rule="band", band_relax=True, epsilon=0.3, epsilon_high=0.28),  # the union with TRL's interval
        dict(clip_rule="band", epsilon=0.2, epsilon_high=0.2),  # the canonical clip's values, as if unset
    ],
)
def test_options_the_rule_reads_do_not_warn(overrides, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        BandGRPOConfig(output_dir=str(tmp_path), steps_per_generation=4, **overrides)


def test_trls_epsilons_count_as_read_by_a_rule_that_lists_them(registry, tmp_path):
    @register_clip_rule("test_clip_lower", options=("band_max_ratio", "epsilon"))
    def clip_lower(old_logps, args):
        return 1 - args.epsilon, args.band_max_ratio

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        BandGRPOConfig(output_dir=str(tmp_path), steps_per_generation=4, clip_rule="test_clip_lower", epsilon=0.3)
    with pytest.warns(UserWarning, match=r"clip_rule='test_clip_lower' does not read epsilon_high=0.28: "):
        BandGRPOConfig(
            output_dir=str(tmp_path), steps_per_generation=4, clip_rule="test_clip_lower", epsilon_high=0.28
        )


# ---------------------------------------------------------------------------------------------------------------
# The trainer applies the registered rule
# ---------------------------------------------------------------------------------------------------------------


def build(trainer_cls, args, tiny_model_dir, tiny_train_dataset):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(
            model=str(tiny_model_dir),
            reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
            args=args,
            train_dataset=tiny_train_dataset,
        )
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); the loss reads it
    return trainer


def trainer_args(tmp_path, config_cls=BandGRPOConfig, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        bf16=False,
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        gradient_accumulation_steps=1,
        steps_per_generation=2,
        seed=0,
        loss_type="grpo",
    )
    kwargs.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return config_cls(**kwargs)


def batch_for(vocab_size):
    gen = torch.Generator().manual_seed(0)
    return {
        "prompt_ids": torch.randint(2, vocab_size, (4, 3), generator=gen),
        "prompt_mask": torch.ones(4, 3, dtype=torch.long),
        "completion_ids": torch.randint(2, vocab_size, (4, 6), generator=gen),
        "completion_mask": torch.ones(4, 6, dtype=torch.long),
        "advantages": torch.tensor([1.0, -0.5, 0.8, -1.2]),
        "num_items_in_batch": torch.tensor(24),
        "old_per_token_logps": (-3.0 + 1.5 * torch.randn(4, 6, generator=gen)).clamp(max=-1e-3),
    }


def loss_and_grads(trainer, batch):
    trainer.model.zero_grad()
    trainer.model.train()
    loss = trainer._compute_loss(trainer.model, dict(batch))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_registered_rule_is_applied_per_token(registry, tiny_model_dir, tiny_train_dataset, tmp_path):
    """A registered rule of per-token (0.8, 1.2) tensors trains exactly as TRL's scalar clip does."""

    @register_clip_rule("test_tensor_clip")
    def tensor_clip(old_logps, args):
        return torch.full_like(old_logps, 0.8), torch.full_like(old_logps, 1.2)

    custom = build(
        BandGRPOTrainer, trainer_args(tmp_path, clip_rule="test_tensor_clip"), tiny_model_dir, tiny_train_dataset
    )
    reference = build(GRPOTrainer, trainer_args(tmp_path, GRPOConfig), tiny_model_dir, tiny_train_dataset)
    assert custom.clip_rule.name == "test_tensor_clip" and custom.applies_token_bounds
    batch = batch_for(custom.model.config.vocab_size)
    loss_custom, grads_custom = loss_and_grads(custom, batch)
    loss_ref, grads_ref = loss_and_grads(reference, batch)
    torch.testing.assert_close(loss_custom, loss_ref)
    for name in grads_ref:
        torch.testing.assert_close(grads_custom[name], grads_ref[name])


def test_band_upper_rule_from_the_readme(registry, tiny_model_dir, tiny_train_dataset, tmp_path):
    from bandpo_trl.clip_rules import trl_epsilons

    @register_clip_rule("band_upper", options=("band_divergence", "band_delta", "band_max_ratio", "epsilon"))
    def band_upper(old_logps, args):
        _, upper = band_bounds(old_logps, args.band_divergence, args.band_delta, args.band_max_ratio)
        return 1 - trl_epsilons(args)[0], upper

    trainer = build(
        BandGRPOTrainer, trainer_args(tmp_path, clip_rule="band_upper"), tiny_model_dir, tiny_train_dataset
    )
    batch = batch_for(trainer.model.config.vocab_size)
    lower, upper = trainer.compute_clip_bounds(batch["old_per_token_logps"], batch)
    assert lower == pytest.approx(0.8)
    torch.testing.assert_close(upper, band_bounds(batch["old_per_token_logps"], "kl", 0.05, 10.0)[1])
    for values in trainer._metrics["train"].values():
        values.clear()
    loss_and_grads(trainer, batch)
    metrics = trainer._metrics["train"]
    assert metrics["band/lower_mean"] == [pytest.approx(0.8)]
    expected_upper = band_bounds(batch["old_per_token_logps"], "kl", 0.05, 10.0)[1].mean().item()
    assert metrics["band/upper_mean"] == [pytest.approx(expected_upper, rel=1e-6)]


def test_overridden_bounds_under_trls_clip_are_refused(tiny_model_dir, tiny_train_dataset, tmp_path):
    class NeverApplied(BandGRPOTrainer):
        def compute_clip_bounds(self, old_per_token_logps, inputs):
            return 0.5, 2.0

    with pytest.raises(
        ValueError, match=r"NeverApplied.compute_clip_bounds overrides the clip bounds, but clip_rule="
    ):
        build(NeverApplied, trainer_args(tmp_path, clip_rule="clip"), tiny_model_dir, tiny_train_dataset)
    # The same subclass with a rule whose bounds the trainer applies.
    trainer = build(NeverApplied, trainer_args(tmp_path, clip_rule="band"), tiny_model_dir, tiny_train_dataset)
    assert trainer.applies_token_bounds


def test_trls_clip_logs_the_bounds_trl_applied(tiny_model_dir, tiny_train_dataset, tmp_path):
    trainer = build(
        BandGRPOTrainer,
        trainer_args(tmp_path, clip_rule="clip", epsilon_high=0.28),
        tiny_model_dir,
        tiny_train_dataset,
    )
    assert not trainer.applies_token_bounds
    batch = batch_for(trainer.model.config.vocab_size)
    loss_and_grads(trainer, batch)
    metrics = trainer._metrics["train"]
    assert metrics["band/lower_mean"] == [pytest.approx(0.8)] and metrics["band/upper_mean"] == [pytest.approx(1.28)]
    assert trainer.epsilon_low == 0.2 and trainer.epsilon_high == 0.28  # never swapped for tensors
