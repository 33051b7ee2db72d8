"""BandAsyncGRPOTrainer on TRL's asynchronous GRPO, on the CPU without vLLM: samples come from past policy versions
(bandpo_trl.stale_rollouts), so their ratios are far from 1 as in real asynchronous training.

Truth: TRL's AsyncGRPOTrainer (bit-for-bit parity with clip_rule="clip"), the clipped surrogate computed here by hand
from an independent forward pass of each sample (no packing, no tree attention), band_bounds of the samples' old
log-probs, and the staleness TRL itself reports.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bandpo_trl import BandAsyncGRPOConfig, BandAsyncGRPOTrainer, BandGRPOConfig, band_bounds
from bandpo_trl.async_config import AsyncGRPOConfig, AsyncGRPOTrainer, require_async_grpo
from bandpo_trl.async_trainer import staleness_distribution
from bandpo_trl.config import BAND_DEFAULTS
from bandpo_trl.stale_rollouts import (
    SnapshotWeightTransfer,
    StaleRolloutWorker,
    cpu_async_grpo,
    eager_varlen_attention,
)

TEMPERATURE = 0.1  # sharpens the tiny random model: tokens of every probability bucket, so Band's bounds vary


@pytest.fixture(autouse=True)
def on_cpu():
    with cpu_async_grpo():
        yield


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def config(config_cls, tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        bf16=False,
        use_cpu=True,
        report_to="none",
        token_budget=0,  # a fixed number of samples per micro-batch (no vLLM server to ask for max_model_len)
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        num_generations=4,
        max_completion_length=6,
        temperature=TEMPERATURE,
        max_staleness=3,
        learning_rate=3e-2,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        max_steps=4,
        seed=0,
    )
    kwargs.update(overrides)
    return config_cls(**kwargs)


def build(trainer_cls, args, model_dir, tokenizer, dataset, staleness=2, worker_seed=0):
    transfer = SnapshotWeightTransfer()
    worker = StaleRolloutWorker(
        str(model_dir),
        tokenizer,
        dataset,
        transfer,
        staleness=staleness,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        temperature=args.temperature,
        seed=worker_seed,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(
            str(model_dir),
            args=args,
            processing_class=tokenizer,
            train_dataset=dataset,
            rollout_worker=worker,
            weight_transfer=transfer,
        )
    return trainer, worker


def stale_batch(trainer, worker, n_samples=8, seed=0):
    """Samples of policy version 1 (the trainer's weights now), then the trainer's weights moved away from it."""
    from trl.experimental.async_grpo.async_grpo_trainer import DataCollatorForRollout
    from trl.experimental.async_grpo.packing import TreeRow

    worker.weight_transfer.send_weights(trainer._streaming_iter())
    worker.update_model_version(1)
    samples = [worker.rollout_buffer.get() for _ in range(n_samples)]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the policy the trainer holds a few versions later
        for param in trainer.model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=gen))
    row = TreeRow()
    for s in samples:  # the dicts TRL's rollout queue yields
        row.add(
            dict(
                input_ids=s.input_ids,
                completion_mask=s.completion_mask,
                old_log_probs=s.old_log_probs,
                advantage=s.advantage,
                group_id=s.group_id,
                metrics=s.metrics,
            )
        )
    batch = DataCollatorForRollout(trainer.processing_class.pad_token_id, 1).torch_call([[row]])
    return samples, batch


def loss_grads_metrics(trainer, batch):
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); the loss reads it
    trainer.model.train()
    trainer.model.zero_grad()
    for values in trainer._metrics["train"].values():
        values.clear()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, {k: list(v) for k, v in trainer._metrics["train"].items()}


def plain_model(trainer, model_dir):
    """The trainer's current weights in a model with ordinary attention (no packing, no fused head)."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="eager", dtype=torch.float32)
    model.load_state_dict(trainer.model.state_dict())
    return model


def per_token(model, samples, temperature):
    """Per trained token, from each sample alone: (log pi, old log-prob, advantage), concatenated in sample order."""
    logps, olds, advs = [], [], []
    for s in samples:
        ids = torch.as_tensor(s.input_ids)
        logits = model(ids[None]).logits[0, :-1].float() / temperature
        token_logps = logits.log_softmax(-1).gather(-1, ids[1:, None])[:, 0]
        trained = torch.as_tensor(s.completion_mask[1:]).bool()
        logps.append(token_logps[trained])
        olds.append(torch.as_tensor(s.old_log_probs[1:])[trained])
        advs.append(torch.full((int(trained.sum()),), s.advantage))
    return torch.cat(logps), torch.cat(olds), torch.cat(advs)


# ---------------------------------------------------------------------------------------------------------------
# The CPU stand-ins: eager tree attention, stale samples with their true old log-probs
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_eager_varlen_attention_is_causal_attention_over_each_path(kv_heads):
    """Each segment's queries are the last tokens of its key path: causal attention over the path, last rows."""
    gen = torch.Generator().manual_seed(0)
    heads, dim = 4, 8
    segments = [(3, 3), (2, 5), (4, 4), (1, 6)]  # (queries, keys): a root, then branches reading their prefix
    outputs, q_rows, k_rows, v_rows, cu_q, cu_k = [], [], [], [], [0], [0]
    for n_q, n_k in segments:
        q = torch.randn(n_k, heads, dim, generator=gen)
        k, v = torch.randn(n_k, kv_heads, dim, generator=gen), torch.randn(n_k, kv_heads, dim, generator=gen)
        full = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1),
            k.repeat_interleave(heads // kv_heads, 1).transpose(0, 1),
            v.repeat_interleave(heads // kv_heads, 1).transpose(0, 1),
            is_causal=True,
        ).transpose(0, 1)
        outputs.append(full[-n_q:])
        q_rows.append(q[-n_q:])
        k_rows.append(k)
        v_rows.append(v)
        cu_q.append(cu_q[-1] + n_q)
        cu_k.append(cu_k[-1] + n_k)
    got = eager_varlen_attention(
        torch.cat(q_rows),
        torch.cat(k_rows),
        torch.cat(v_rows),
        torch.tensor(cu_q),
        torch.tensor(cu_k),
        4,
        6,
        softmax_scale=dim**-0.5,
        causal=True,
    )
    torch.testing.assert_close(got, torch.cat(outputs))


def test_stale_worker_samples_from_the_stated_version(tiny_model_dir, tokenizer, tiny_train_dataset, tmp_path):
    """Samples are tagged with the version `staleness` syncs back, and their old log-probs are that version's."""
    trainer, worker = build(
        BandAsyncGRPOTrainer, config(BandAsyncGRPOConfig, tmp_path), tiny_model_dir, tokenizer, tiny_train_dataset
    )
    transfer = worker.weight_transfer
    versions = []
    for _ in range(3):
        transfer.send_weights(trainer._streaming_iter())
        versions.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
        with torch.no_grad():
            for param in trainer.model.parameters():
                param.add_(0.1)
    worker.update_model_version(3)
    samples = [worker.rollout_buffer.get() for _ in range(4)]
    assert {s.model_version for s in samples} == {1}  # 3 - staleness 2
    assert worker.served == [(1, 3)] * 4
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation="eager")
    for version, expected_close in ((1, True), (3, False)):
        model.load_state_dict(versions[version - 1], strict=False)  # lm_head is tied to the embeddings
        with torch.no_grad():
            logps, old, _ = per_token(model, samples, TEMPERATURE)
        assert torch.allclose(logps, old, atol=1e-5) == expected_close
    assert len({tuple(s.input_ids.tolist()) for s in samples}) > 1  # sampled, not greedy


# ---------------------------------------------------------------------------------------------------------------
# Parity: clip_rule="clip" is TRL's AsyncGRPOTrainer, loss, gradients, metrics and whole runs
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("epsilon_high", [None, 0.28])
def test_clip_rule_matches_trl_bit_for_bit(epsilon_high, tiny_model_dir, tokenizer, tiny_train_dataset, tmp_path):
    trl_trainer, trl_worker = build(
        AsyncGRPOTrainer,
        config(AsyncGRPOConfig, tmp_path, epsilon_high=epsilon_high),
        tiny_model_dir,
        tokenizer,
        tiny_train_dataset,
    )
    band_trainer, band_worker = build(
        BandAsyncGRPOTrainer,
        config(BandAsyncGRPOConfig, tmp_path, clip_rule="clip", epsilon_high=epsilon_high),
        tiny_model_dir,
        tokenizer,
        tiny_train_dataset,
    )
    _, trl_batch = stale_batch(trl_trainer, trl_worker)
    _, band_batch = stale_batch(band_trainer, band_worker)
    for key in trl_batch:
        assert torch.equal(trl_batch[key], band_batch[key]), key

    loss_trl, grads_trl, metrics_trl = loss_grads_metrics(trl_trainer, trl_batch)
    loss_band, grads_band, metrics_band = loss_grads_metrics(band_trainer, band_batch)

    assert torch.equal(loss_band, loss_trl)
    assert grads_band.keys() == grads_trl.keys()
    for name in grads_trl:
        assert torch.equal(grads_band[name], grads_trl[name]), name
    timings = {k for k in metrics_trl if k.startswith("perf/")}
    for key in set(metrics_trl) - timings:
        assert metrics_band[key] == metrics_trl[key], key
    assert metrics_trl["clip_ratio/region_mean"][0] > 0  # the samples are stale enough to be clipped
    assert (
        {k for k in metrics_band if k not in metrics_trl}
        == {k for k in metrics_band if k.startswith("band/")}
        != set()
    )


@pytest.mark.slow
def test_clip_rule_trains_like_trl(tiny_model_dir, tokenizer, tiny_train_dataset, tmp_path):
    """Four optimizer steps on samples two versions old: the same weights, bit for bit, as TRL's trainer."""
    runs = []
    for trainer_cls, config_cls, extra in (
        (AsyncGRPOTrainer, AsyncGRPOConfig, {}),
        (BandAsyncGRPOTrainer, BandAsyncGRPOConfig, {"clip_rule": "clip"}),
    ):
        args = config(config_cls, tmp_path / trainer_cls.__name__, **extra)
        trainer, _ = build(trainer_cls, args, tiny_model_dir, tokenizer, tiny_train_dataset, staleness=2)
        trainer.train()
        runs.append((trainer, [h.get("loss") for h in trainer.state.log_history]))
    (trl_trainer, trl_losses), (band_trainer, band_losses) = runs
    assert band_losses == trl_losses
    for (name, p_trl), (_, p_band) in zip(
        trl_trainer.model.named_parameters(), band_trainer.model.named_parameters(), strict=True
    ):
        assert torch.equal(p_trl, p_band), name


# ---------------------------------------------------------------------------------------------------------------
# Band on stale samples: the formula
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", ["kl", "tv"])
def test_band_clips_stale_samples_as_the_formula_says(
    divergence, tiny_model_dir, tokenizer, tiny_train_dataset, tmp_path, monkeypatch
):
    delta, cap = 0.05, 10.0
    args = config(BandAsyncGRPOConfig, tmp_path, band_divergence=divergence, band_delta=delta, band_max_ratio=cap)
    trainer, worker = build(BandAsyncGRPOTrainer, args, tiny_model_dir, tokenizer, tiny_train_dataset)
    samples, batch = stale_batch(trainer, worker)

    clamps = []
    real_clamp = torch.clamp

    def recording_clamp(input, min=None, max=None, **kwargs):
        clamps.append((input.shape, min, max))
        return real_clamp(input, min, max, **kwargs)

    monkeypatch.setattr(torch, "clamp", recording_clamp)
    loss, grads, metrics = loss_grads_metrics(trainer, batch)
    monkeypatch.setattr(torch, "clamp", real_clamp)

    model = plain_model(trainer, tiny_model_dir)
    logps, old, advantages = per_token(model, samples, TEMPERATURE)
    lower, upper = band_bounds(old, divergence, delta, cap)

    # The bounds TRL's clamp received are band_bounds of the samples' old log-probs, token by token.
    (applied,) = [(lo, up) for shape, lo, up in clamps if shape == old.shape]
    torch.testing.assert_close(applied[0], lower)
    torch.testing.assert_close(applied[1], upper)

    # The loss and its gradient are the clipped surrogate with those bounds, token-mean over the trained tokens.
    ratio = torch.exp(logps - old)
    expected = -torch.minimum(ratio * advantages, ratio.clamp(lower, upper) * advantages).sum() / len(old)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    expected.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6)

    # Stale samples leave their band on both sides, for both signs of the advantage, and Band clips other tokens
    # than TRL's fixed [0.8, 1.2] would.
    ratio = ratio.detach()
    low = (ratio < lower) & (advantages < 0)
    high = (ratio > upper) & (advantages > 0)
    assert low.any() and high.any()
    fixed = ((ratio < 0.8) & (advantages < 0)) | ((ratio > 1.2) & (advantages > 0))
    assert not torch.equal(fixed, low | high)
    assert metrics["clip_ratio/low_mean"] == [pytest.approx(low.float().mean().item())]
    assert metrics["clip_ratio/high_mean"] == [pytest.approx(high.float().mean().item())]

    # band/* metrics by hand, bucket by bucket.
    probs = old.exp()
    for lo, hi, name in (
        (0.0, 0.01, "p<0.01"),
        (0.01, 0.1, "p0.01-0.1"),
        (0.1, 0.5, "p0.1-0.5"),
        (0.5, 1.1, "p>=0.5"),
    ):
        in_bucket = (probs >= lo) & (probs < hi)
        assert metrics[f"band/tokens/{name}"] == [pytest.approx(in_bucket.float().mean().item())]
        if in_bucket.any():
            assert metrics[f"band/clip_low/{name}"] == [pytest.approx(low[in_bucket].float().mean().item())]
            assert metrics[f"band/clip_high/{name}"] == [pytest.approx(high[in_bucket].float().mean().item())]
    assert metrics["band/lower_mean"] == [pytest.approx(lower.mean().item(), rel=1e-5)]
    assert metrics["band/upper_mean"] == [pytest.approx(upper.mean().item(), rel=1e-5)]
    assert metrics["band/invalid_bounds"] == [0.0]


def test_plain_async_config_gets_band_defaults(tiny_model_dir, tokenizer, tiny_train_dataset, tmp_path):
    """The one-import swap: a plain AsyncGRPOConfig handed to BandAsyncGRPOTrainer gets Band KL, delta 0.05, cap 10."""
    trainer, worker = build(
        BandAsyncGRPOTrainer, config(AsyncGRPOConfig, tmp_path), tiny_model_dir, tokenizer, tiny_train_dataset
    )
    assert trainer.clip_rule.name == "band" and trainer.applies_token_bounds
    old = torch.tensor([[-0.01, -1.0, -5.0]])
    lower, upper = trainer.compute_clip_bounds(old, {})
    expected = band_bounds(old, "kl", 0.05, 10.0)
    torch.testing.assert_close(lower, expected[0])
    torch.testing.assert_close(upper, expected[1])


def test_subclass_bounds_are_applied(tiny_model_dir, tokenizer, tiny_train_dataset, tmp_path):
    class SqrtBand(BandAsyncGRPOTrainer):
        def compute_clip_bounds(self, old_log_probs, inputs):
            width = 0.2 * torch.exp(-0.5 * old_log_probs)
            return (1 - width).clamp(min=0), 1 + width

    trainer, worker = build(
        SqrtBand, config(BandAsyncGRPOConfig, tmp_path), tiny_model_dir, tokenizer, tiny_train_dataset
    )
    samples, batch = stale_batch(trainer, worker)
    loss, _, _ = loss_grads_metrics(trainer, batch)
    with torch.no_grad():
        logps, old, advantages = per_token(plain_model(trainer, tiny_model_dir), samples, TEMPERATURE)
    width = 0.2 * torch.exp(-0.5 * old)
    ratio = torch.exp(logps - old)
    clipped = ratio.clamp((1 - width).clamp(min=0), 1 + width)
    expected = -torch.minimum(ratio * advantages, clipped * advantages).sum() / len(old)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# End to end: a few steps on stale samples
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_on_stale_samples_logs_band_and_staleness(tiny_model_dir, tokenizer, tiny_train_dataset, tmp_path):
    staleness, steps = 2, 5
    args = config(BandAsyncGRPOConfig, tmp_path, max_steps=steps, max_staleness=3)
    trainer, worker = build(BandAsyncGRPOTrainer, args, tiny_model_dir, tokenizer, tiny_train_dataset, staleness)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == steps
    assert all(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    # The worker served what it was asked to: samples min(staleness, version - 1) versions behind.
    assert {trainer_version - version for version, trainer_version in worker.served} == {0, 1, 2}
    assert all(
        trainer_version - version == min(staleness, trainer_version - 1) for version, trainer_version in worker.served
    )
    for log in logs:
        shares = [log[f"band/staleness/{k}"] for k in range(args.max_staleness + 1)]
        assert sum(shares) == pytest.approx(1.0)
        assert sum(k * s for k, s in enumerate(shares)) == pytest.approx(log["sample/staleness_mean"])
        assert max(k for k, s in enumerate(shares) if s > 0) == log["sample/staleness_max"]
        assert log["band/invalid_bounds"] == 0.0
        assert 0 < log["band/lower_mean"] < 1 < log["band/upper_mean"] <= 10
    assert logs[-1]["band/staleness/2"] == 1.0
    # Band is active: some stale tokens are clipped, and TRL's counts agree with Band's buckets.
    clipped = [log[key] for log in logs for key in log if key.startswith(("band/clip_low/", "band/clip_high/"))]
    assert max(clipped) > 0
    assert max(log["clip_ratio/region_mean"] for log in logs) > 0


def test_model_card_names_bandpo_and_cites_both_papers(tiny_model_dir, tokenizer, tiny_train_dataset, tmp_path):
    args = config(BandAsyncGRPOConfig, tmp_path)
    trainer, worker = build(BandAsyncGRPOTrainer, args, tiny_model_dir, tokenizer, tiny_train_dataset)
    trainer.create_model_card(model_name="tiny-bandpo-async")
    card = (tmp_path / "out" / "README.md").read_text()
    header = card.split("---")[1]
    assert "- bandpo" in header and "- async-grpo" in header and "- trl" in header
    assert "This model was trained with BandPO, a method introduced in [BandPO: Bridging Trust Regions" in card
    assert "eprint       = {arXiv:2603.04918}" in card
    assert "shao2024deepseekmath" in card  # the asynchronous trainer's own citation stays
    assert BandAsyncGRPOTrainer._tag_names == ["trl", "async-grpo", "bandpo"]
    assert AsyncGRPOTrainer._tag_names == ["trl", "async-grpo"]


def test_staleness_distribution():
    assert staleness_distribution([0.0, 2.0, 2.0, 1.0], 3) == {
        "band/staleness/0": 0.25,
        "band/staleness/1": 0.25,
        "band/staleness/2": 0.5,
        "band/staleness/3": 0.0,
    }
    assert staleness_distribution([], 2) == {}
    assert staleness_distribution([math.nan, 1.0], 1) == {"band/staleness/0": 0.0, "band/staleness/1": 1.0}


# ---------------------------------------------------------------------------------------------------------------
# Options, refusals, the TRL version guard
# ---------------------------------------------------------------------------------------------------------------


def test_config_has_the_sync_clipping_options():
    from dataclasses import fields

    sync = {f.name: f for f in fields(BandGRPOConfig)}
    ours = {f.name: f for f in fields(BandAsyncGRPOConfig)}
    for name, default in BAND_DEFAULTS.items():
        assert ours[name].default == default
        assert ours[name].metadata["help"] == sync[name].metadata["help"]


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(clip_rule="nope"), r"unknown clip_rule 'nope'; accepted: band, clip, dcpo"),
        (dict(band_delta=-1.0), r"band_delta"),
        (dict(band_divergence="nope"), r"band_divergence 'nope' is unknown"),
        (dict(band_max_ratio=0.5), r"band_max_ratio"),
    ],
)
def test_config_refuses(overrides, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        config(BandAsyncGRPOConfig, tmp_path, **overrides)


def test_unread_option_warns(tmp_path):
    with pytest.warns(UserWarning, match=r"clip_rule='clip' does not read band_delta=0.1"):
        config(BandAsyncGRPOConfig, tmp_path, clip_rule="clip", band_delta=0.1)


def test_overridden_bounds_refused_with_trl_clip(tiny_model_dir, tokenizer, tiny_train_dataset, tmp_path):
    class Custom(BandAsyncGRPOTrainer):
        def compute_clip_bounds(self, old_log_probs, inputs):
            return 0.5, 2.0

    with pytest.raises(
        ValueError, match=r"Custom.compute_clip_bounds overrides the clip bounds, but clip_rule='clip'"
    ):
        build(
            Custom,
            config(BandAsyncGRPOConfig, tmp_path, clip_rule="clip"),
            tiny_model_dir,
            tokenizer,
            tiny_train_dataset,
        )


def test_invalid_bounds_refused_on_first_micro_batch(tiny_model_dir, tokenizer, tiny_train_dataset, tmp_path):
    class Broken(BandAsyncGRPOTrainer):
        def compute_clip_bounds(self, old_log_probs, inputs):
            return torch.full_like(old_log_probs, 1.1), torch.full_like(old_log_probs, 2.0)

    trainer, worker = build(
        Broken, config(BandAsyncGRPOConfig, tmp_path), tiny_model_dir, tokenizer, tiny_train_dataset
    )
    _, batch = stale_batch(trainer, worker)
    with pytest.raises(ValueError, match=r"Broken.compute_clip_bounds returned ratio bounds that violate lower <= 1"):
        loss_grads_metrics(trainer, batch)


@pytest.mark.parametrize(
    "version, ok", [("1.16.0", True), ("1.16.3", True), ("1.17.0.dev0", False), ("1.15.2", False), ("2.0.0", False)]
)
def test_trl_version_guard(version, ok, monkeypatch):
    import trl

    monkeypatch.setattr(trl, "__version__", version)
    if ok:
        require_async_grpo()
    else:
        with pytest.raises(ImportError, match=rf"found trl {re.escape(version)}.*pip install 'trl>=1\.16,<1\.17'"):
            require_async_grpo()


def test_import_bandpo_trl_does_not_import_the_async_api():
    code = (
        "import sys, bandpo_trl\n"
        "assert not [m for m in sys.modules if m.startswith('trl.experimental.async_grpo')], 'async API imported'\n"
        "import trl; trl.__version__ = '1.17.0'\n"
        "try:\n"
        "    bandpo_trl.BandAsyncGRPOTrainer\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "found trl 1.17.0" in out and "trl>=1.16,<1.17" in out


@pytest.mark.slow
def test_lora_trains_on_stale_samples(tiny_model_dir, tokenizer, tiny_train_dataset, tmp_path):
    """With a LoRA adapter the server receives merged weights (TRL's merged sync) and only the adapter trains."""
    from peft import LoraConfig

    args = config(BandAsyncGRPOConfig, tmp_path, max_steps=3)
    transfer = SnapshotWeightTransfer()
    worker = StaleRolloutWorker(
        str(tiny_model_dir),
        tokenizer,
        tiny_train_dataset,
        transfer,
        staleness=1,
        num_generations=4,
        max_completion_length=args.max_completion_length,
        temperature=args.temperature,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = BandAsyncGRPOTrainer(
            str(tiny_model_dir),
            args=args,
            processing_class=tokenizer,
            train_dataset=tiny_train_dataset,
            rollout_worker=worker,
            weight_transfer=transfer,
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        )
        trainer.train()
    assert trainer.state.global_step == 3
    assert all("lora" not in name for name in transfer.snapshots[1])  # base names, adapter merged
    assert not torch.equal(
        transfer.snapshots[1]["model.layers.0.self_attn.q_proj.weight"],
        transfer.snapshots[4]["model.layers.0.self_attn.q_proj.weight"],
    )
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all("band/upper_mean" in h for h in logs) and logs[-1]["band/staleness/1"] == 1.0
