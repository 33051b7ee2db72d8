"""End-to-end BandGRPO training on the tiny model: single process, LoRA, gradient accumulation with checkpoint and
resume, two processes under torchrun (gloo), and DeepSpeed ZeRO-2 on the CPU. Each run is a subprocess, as users
launch it, so accelerate's process state starts clean."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"


def run(model_dir, output_dir, *extra, nproc=1, timeout=900):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, str(SCRIPT)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), str(SCRIPT)]
    cmd += ["--model", str(model_dir), "--output_dir", str(output_dir), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((Path(output_dir) / "result.json").read_text())


def step_logs(result):
    return [h for h in result["log_history"] if "loss" in h]


def test_band_bites_when_off_policy(tiny_model_dir, tmp_path):
    # A narrow band (delta = 0.002), a large learning rate and 4 optimizer steps per generation batch: the policy
    # leaves the band within the batch, so the bounds act and the band metrics are non-trivial.
    result = run(
        tiny_model_dir, tmp_path, "--max_steps", "8", "--learning_rate", "3e-2", "--band_delta", "0.002"
    )
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
