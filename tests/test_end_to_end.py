"""End-to-end BandGRPO training on the tiny model: single process, LoRA, gradient accumulation with checkpoint and
resume, two processes under torchrun (gloo), DeepSpeed ZeRO-2, and the sharded set-ups of the 7B/8B recipes (DeepSpeed
ZeRO-3 and FSDP2, from their accelerate configs) with checkpoint and resume, on the CPU. Each run is a subprocess, as
users launch it, so accelerate's process state starts clean."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"
REDUCE_SCRIPT = Path(__file__).parent / "scripts" / "band_metrics_reduce.py"
ACCELERATE_CONFIGS = Path(__file__).parent.parent / "recipes" / "accelerate_configs"


def launch(script, model_dir, output_dir, *extra, nproc=1, timeout=900):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, str(script)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), str(script)]
    cmd += ["--model", str(model_dir), "--output_dir", str(output_dir), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def run(model_dir, output_dir, *extra, nproc=1, timeout=900):
    launch(SCRIPT, model_dir, output_dir, *extra, nproc=nproc, timeout=timeout)
    return json.loads((Path(output_dir) / "result.json").read_text())


def step_logs(result):
    return [h for h in result["log_history"] if "loss" in h]


def test_band_bites_when_off_policy(tiny_model_dir, tmp_path):
    # A narrow band (delta = 0.002), a large learning rate and 4 optimizer steps per generation batch: the policy
    # leaves the band within the batch, so the bounds act and the band metrics are non-trivial.
    result = run(tiny_model_dir, tmp_path, "--max_steps", "8", "--learning_rate", "3e-2", "--band_delta", "0.002")
    logs = step_logs(result)
    assert result["global_step"] == 8 and len(logs) == 8
    for log in logs:
        assert 0 <= log["band/lower_mean"] < 1 < log["band/upper_mean"] <= 10
        shares = [v for k, v in log.items() if k.startswith("band/tokens/")]
        assert sum(shares) == pytest.approx(1.0)
    assert max(log["clip_ratio/region_mean"] for log in logs) > 0
    bucket_clips = [v for log in logs for k, v in log.items() if k.startswith(("band/clip_low/", "band/clip_high/"))]
    assert max(bucket_clips) > 0


def test_lora(tiny_model_dir, tmp_path):
    result = run(tiny_model_dir, tmp_path, "--lora", "--max_steps", "4")
    assert result["is_peft"] and result["global_step"] == 4
    assert "band/upper_mean" in step_logs(result)[-1]


def test_gradient_accumulation_checkpoint_and_resume(tiny_model_dir, tmp_path):
    common = ["--gradient_accumulation_steps", "2", "--steps_per_generation", "4", "--save_steps", "2"]
    first = run(tiny_model_dir, tmp_path, *common, "--max_steps", "2")
    assert first["global_step"] == 2
    assert (tmp_path / "checkpoint-2" / "trainer_state.json").exists()
    resumed = run(tiny_model_dir, tmp_path, *common, "--max_steps", "4", "--resume")
    assert resumed["global_step"] == 4
    # The resumed run starts from the checkpoint's step: it logs steps 3 and 4 only, after the 2 restored ones.
    steps = [h["step"] for h in step_logs(resumed)]
    assert steps == [1, 2, 3, 4]
    assert [h["step"] for h in step_logs(first)] == [1, 2]
    assert step_logs(resumed)[:2] == step_logs(first)


def test_two_processes_torchrun(tiny_model_dir, tmp_path):
    result = run(tiny_model_dir, tmp_path, "--max_steps", "3", nproc=2)
    assert result["world_size"] == 2 and result["global_step"] == 3
    assert "band/lower_mean" in step_logs(result)[-1]


def test_deepspeed_zero2_cpu(tiny_model_dir, tmp_path):
    pytest.importorskip("deepspeed")
    result = run(tiny_model_dir, tmp_path, "--max_steps", "3", "--deepspeed_zero2", nproc=2)
    assert result["deepspeed"] and result["world_size"] == 2 and result["global_step"] == 3
    assert "band/upper_mean" in step_logs(result)[-1]


def local_band_sums(output_dir, nproc):
    return [json.loads((Path(output_dir) / f"band_local_rank{r}.json").read_text()) for r in range(nproc)]


def check_reduced_across_ranks(logs, per_rank):
    """The logged band means are the two ranks' token-weighted sums divided by their summed token counts, averaged
    over the step's micro-batches (TRL averages a step's metric list): what one process holding both ranks' rows
    would log, and not the average of each rank's own mean (the ranks' token counts differ)."""
    assert len(per_rank) == 2
    steps_seen = 0
    for log in logs:
        calls = [[c for c in rank if c["step"] == log["step"]] for rank in per_rank]
        if not calls[0]:
            continue  # a step before a resume: logged by the first run
        assert len(calls[0]) == len(calls[1]) > 0
        for key in ("lower", "upper"):
            reduced = [
                (a[key] + b[key]) / (a["tokens"] + b["tokens"]) for a, b in zip(calls[0], calls[1], strict=True)
            ]
            assert log[f"band/{key}_mean"] == pytest.approx(sum(reduced) / len(reduced), rel=1e-5), (key, log["step"])
        steps_seen += 1
    assert steps_seen > 0
    assert any(a["tokens"] != b["tokens"] for a, b in zip(*per_rank)), "ranks saw equal token counts: not a test"


@pytest.mark.parametrize(
    "accelerate_config, sharding",
    [("zero3.yaml", "zero3"), ("fsdp2.yaml", "fsdp2")],
    ids=["deepspeed_zero3", "fsdp2"],
)
def test_sharded_training_checkpoint_and_resume(tiny_model_dir, tmp_path, accelerate_config, sharding):
    # The 7B/8B recipes' sharding on 2 CPU processes (gloo): parameters sharded, a reference model (beta > 0, sharded
    # the same way by TRL), 2 optimizer steps per generation batch (the second off-policy), a checkpoint at step 2,
    # then a resumed run to step 4. A narrow band and a large learning rate make the bounds act.
    if sharding == "zero3":
        pytest.importorskip("deepspeed")
    common = [
        "--accelerate_config", str(ACCELERATE_CONFIGS / accelerate_config), "--beta", "0.001",
        "--gradient_accumulation_steps", "2", "--steps_per_generation", "4", "--save_steps", "2",
        "--learning_rate", "3e-2", "--band_delta", "0.002",
    ]  # fmt: skip
    first = run(tiny_model_dir, tmp_path, *common, "--max_steps", "2", nproc=2)
    assert (first["world_size"], first["global_step"], first["sharding"]) == (2, 2, sharding)
    assert first["reference_model"]
    if sharding == "zero3":
        assert first["deepspeed"] and first["zero_stage"] == 3
        assert (tmp_path / "checkpoint-2" / "global_step2").is_dir()  # DeepSpeed's sharded optimizer states
    else:
        assert first["fsdp_version"] == 2 and not first["deepspeed"]
        assert (tmp_path / "checkpoint-2" / "optimizer.bin").exists()
    assert (tmp_path / "checkpoint-2" / "model.safetensors").exists()  # a full Hugging Face model, gathered
    check_reduced_across_ranks(step_logs(first), local_band_sums(tmp_path, 2))

    resumed = run(tiny_model_dir, tmp_path, *common, "--max_steps", "4", "--resume", nproc=2)
    assert (resumed["global_step"], resumed["sharding"]) == (4, sharding)
    logs = step_logs(resumed)
    assert [h["step"] for h in logs] == [1, 2, 3, 4]  # steps 3 and 4 follow the restored 1 and 2
    assert logs[:2] == step_logs(first)
    check_reduced_across_ranks(logs[2:], local_band_sums(tmp_path, 2))
    for log in logs:
        assert 0 <= log["band/lower_mean"] < 1 < log["band/upper_mean"] <= 10
        assert sum(v for k, v in log.items() if k.startswith("band/tokens/")) == pytest.approx(1.0)
    clipped = [v for log in logs for k, v in log.items() if k.startswith(("band/clip_low/", "band/clip_high/"))]
    assert max(clipped) > 0  # off-policy steps: the band acted


def test_band_metrics_reduced_across_ranks_equal_one_process(tiny_model_dir, tmp_path):
    # The same fixed batch (tokens in every probability bucket, completion lengths that differ between the halves),
    # once on one process and once split over two torchrun processes that reduce their sums.
    launch(REDUCE_SCRIPT, tiny_model_dir, tmp_path / "one", nproc=1)
    launch(REDUCE_SCRIPT, tiny_model_dir, tmp_path / "two", nproc=2)
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert set(one) == set(two) == {"band_kl", "band_tv", "dcpo", "clip"}
    for rule in one:
        assert (one[rule]["world_size"], two[rule]["world_size"]) == (1, 2)
        single, reduced = one[rule]["reduced"], two[rule]["reduced"]
        assert set(single) == set(reduced) and "band/clip_high/p<0.01" in single
        for key in single:
            assert reduced[key] == pytest.approx(single[key], rel=1e-5, abs=1e-7), (rule, key)
        # Averaging each rank's own ratios would give other numbers: the test data can tell the two apart.
        shards = one[rule]["shards"]
        naive = [sum(s["band/tokens/p<0.01"][i] for s in shards) / len(shards) for i in range(2)]
        assert naive != pytest.approx(single["band/tokens/p<0.01"], rel=1e-3)
    assert max(x for key, values in one["band_kl"]["reduced"].items() if "/clip_" in key for x in values) > 0
