"""Study E3's scripts: the pre-registered analysis on hand-made runs, the GGUF transfer's checks, and the CPU dry run of
the whole GPU script (split, stage, join + sha256, the four recipes for two steps, packing, analysis)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from benchmarks import e3

REPO = Path(__file__).resolve().parents[1]
BUDGET = 64


def write_run(root: Path, rule: str, seed: int, means: dict[int, float], completed: bool = True) -> None:
    run = root / "runs" / f"{rule}-s{seed}"
    run.mkdir(parents=True)
    with open(run / "eval.jsonl", "w") as handle:
        for step, mean in means.items():
            record = {
                "step": step,
                f"eval/{e3.BENCHMARK}/mean@8": mean,
                f"eval/{e3.BENCHMARK}/pass@8": min(1, 3 * mean),
            }
            handle.write(json.dumps({**record, f"eval/{e3.BENCHMARK}/pass@1": mean}) + "\n")
    with open(run / "log.jsonl", "w") as handle:
        for step in range(1, max(means) + 1):
            handle.write(json.dumps({"step": step, "loss": 0.0, "entropy": 0.5, "band/tokens/p>=0.5": 0.5}) + "\n")
    if completed or max(means) < BUDGET:
        record = {"completed": completed, "global_step": max(means), "max_steps": BUDGET}
        (run / "run.json").write_text(json.dumps(record))


def curve(final: float, last: int = BUDGET) -> dict[int, float]:
    return {step: 0.25 + (final - 0.25) * step / BUDGET for step in range(0, last + 1, 16)}


def test_analysis_pairs_by_seed_and_calls(tmp_path):
    clip = {1: 0.30, 2: 0.40, 3: 0.35}
    band = {1: 0.36, 2: 0.45, 3: 0.42}  # + 0.06, 0.05, 0.07
    for seed in clip:
        write_run(tmp_path, "clip", seed, curve(clip[seed]))
        write_run(tmp_path, "band_kl", seed, curve(band[seed]))
    summary = e3.analyze(tmp_path, tmp_path / "out", rules=("clip", "band_kl"))
    assert summary["analysis_step"] == BUDGET
    primary = summary["rules"]["band_kl"]["mean@8"]
    assert primary["diff_vs_clip"] == pytest.approx([0.06, 0.05, 0.07])
    mean, lo, hi = primary["diff_ci"]
    # mean 0.06, sd 0.01, t(0.975, 2) = 4.303: half-width 4.303 * 0.01 / sqrt(3)
    assert mean == pytest.approx(0.06) and hi - mean == pytest.approx(4.303 * 0.01 / 3**0.5)
    assert summary["primary"]["call"] == "better than clip" and summary["primary"]["pairs"] == 3
    assert "better than clip" in (tmp_path / "out" / "e3_table.md").read_text()
    assert (tmp_path / "out" / "e3_runs.csv").read_text().count("\n") == 7


def test_incomplete_runs_move_the_analysis_step_and_crashes_drop_their_pair(tmp_path):
    for seed in (1, 2, 3, 4):
        write_run(tmp_path, "clip", seed, curve(0.3))
        last = 48 if seed == 2 else BUDGET  # seed 2's Band KL run stopped at the deadline after step 48
        write_run(tmp_path, "band_kl", seed, curve(0.3, last), completed=seed != 2)
    summary = e3.analyze(tmp_path, tmp_path / "out", rules=("clip", "band_kl"))
    assert summary["analysis_step"] == 48
    assert summary["primary"]["call"] == "no detectable difference (at step 48 of the 64-step budget)"

    # A crashed run (exit status != 0 before the deadline) is left out with its partner instead.
    manifest = {"runs": [{"rule": "band_kl", "seed": 2, "status": "failed", "returncode": 1}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    summary = e3.analyze(tmp_path, tmp_path / "out", rules=("clip", "band_kl"))
    assert summary["analysis_step"] == BUDGET and summary["primary"]["pairs"] == 3
    assert summary["crashed"] == [["band_kl", 2]] or summary["crashed"] == [("band_kl", 2)]

    # Fewer than three pairs: no verdict.
    for seed in (1, 3):
        manifest["runs"].append({"rule": "clip", "seed": seed, "status": "failed", "returncode": 1})
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert e3.analyze(tmp_path, tmp_path / "out", rules=("clip", "band_kl"))["primary"]["call"].startswith(
        "inconclusive"
    )


def test_format_metrics():
    records = [
        {
            "completions": ["3 + 5 = 8.", "8", "The sum is eight", "3 + 5 = 8, I think"],
            "completion_tokens": [8, 1, 5, 64],
            "finished": [True, True, True, False],
            "answers": ["8", "8", None, "8"],
        }
    ]
    assert e3.format_metrics(records) == {
        "mean_tokens": 19.5,
        "truncated": 0.25,
        "no_number": 0.25,
        "equation_format": 0.5,
        "bare_number": 0.25,
    }


def gpu_script(args: list[str], env_extra: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_extra)
    return subprocess.run(
        ["bash", str(REPO / "benchmarks/e3_gpu.sh"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=1200,
    )


def test_joining_the_gguf_checks_its_parts_and_sha256(tmp_path):
    stage, parts = tmp_path / "stage", tmp_path / "parts"
    (parts / "b").mkdir(parents=True)
    (parts / "b" / "part.01").write_bytes(b"second half")
    env = {"E3_STAGE_DIR": str(stage), "E3_PARTS_DIR": str(parts), "E3_GGUF_SHA256": "0" * 64, "OUT": str(tmp_path)}
    missing = gpu_script(["run"], env, tmp_path)
    assert missing.returncode == 2 and "run 'stage' again" in missing.stderr
    (stage / "gguf").mkdir(parents=True)
    (stage / "gguf" / "part.00").write_bytes(b"first half, ")
    corrupt = gpu_script(["run"], env, tmp_path)
    assert corrupt.returncode == 3 and "sha256 mismatch" in corrupt.stderr
    assert (stage / "SmolLM2-135M-Instruct.Q4_1.gguf").read_bytes() == b"first half, second half"


@pytest.mark.slow
def test_cpu_dry_run_of_the_gpu_script(smollm2_cache, tmp_path):
    env = {
        "E3_DRY_RUN": "1",
        "PY": sys.executable,
        "OUT": str(tmp_path / "out"),
        "E3_OUTPUT_DIR": str(tmp_path / "e3"),
        "BANDPO_TRL_CACHE": str(smollm2_cache),
    }
    proc = gpu_script(["dry-run"], env, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sha256 ok" in proc.stdout
    with tarfile.open(tmp_path / "out" / "e3_runs.tar.gz") as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    root = tmp_path / "unpacked" / "e3"
    for rule in e3.RULES:
        run = root / "runs" / f"{rule}-s1"
        record = json.loads((run / "run.json").read_text())
        assert record["completed"] and record["global_step"] == 2 and record["max_steps"] == 2
        assert [json.loads(line)["step"] for line in (run / "eval.jsonl").read_text().splitlines()] == [0, 1, 2]
        steps = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        assert any("band/tokens/p>=0.5" in s for s in steps)
        if rule in ("clip", "clip_higher"):
            upper = {"clip": 1.2, "clip_higher": 1.28}[rule]
            assert [s["band/upper_mean"] for s in steps if "loss" in s] == pytest.approx([upper, upper])
    summary = json.loads((root / "analysis" / "e3_summary.json").read_text())
    assert summary["analysis_step"] == 2 and summary["primary"]["call"].startswith("inconclusive")
    manifest = json.loads((root / "manifest.json").read_text())
    assert sorted(r["status"] for r in manifest["runs"]) == ["finished"] * 4
