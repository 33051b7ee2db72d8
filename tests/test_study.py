"""The study of where Band helps (`benchmarks/study.py`, `benchmarks/study_tasks.py`): its tasks, statistics and pipeline."""

from __future__ import annotations

import csv
import itertools
import json
import math
import statistics
from collections import Counter

import pytest

from benchmarks import study
from benchmarks import study_tasks as tasks

# ------------------------------------------------------------------------------------------------- statistics


def test_t_quantiles_and_mean_ci_by_hand():
    assert study.t975(1) == 12.706 and study.t975(4) == 2.776 and study.t975(200) == 1.96
    with pytest.raises(ValueError):
        study.t975(0)
    # 1..5: mean 3, sd sqrt(2.5) = 1.5811; half width 2.776 * 1.5811 / sqrt(5) = 1.9630
    mean, lo, hi = study.mean_ci([1, 2, 3, 4, 5])
    assert mean == 3 and lo == pytest.approx(1.0370, abs=1e-4) and hi == pytest.approx(4.9630, abs=1e-4)
    # two values 0 and 2: mean 1, sd sqrt(2); half width 12.706 * sqrt(2) / sqrt(2) = 12.706
    assert study.mean_ci([0.0, 2.0, math.nan]) == pytest.approx((1.0, 1 - 12.706, 1 + 12.706))
    one = study.mean_ci([4.0])
    assert one[0] == 4.0 and math.isnan(one[1]) and math.isnan(one[2])
    assert all(math.isnan(x) for x in study.mean_ci([]))


def test_paired_differences_and_the_call():
    rule = {0: 10.0, 1: 12.0, 2: 9.0, 3: 11.0}
    clip = {0: 15.0, 1: 16.0, 2: 14.0, 4: 99.0}  # seed 3 has no clip run, seed 4 no rule run: both left out
    diffs = study.paired_differences(rule, clip)
    assert diffs == [-5.0, -4.0, -5.0]
    ci = study.mean_ci(diffs)  # mean -4.667, sd 0.5774, half width 4.303 * 0.5774 / sqrt(3) = 1.434
    assert ci[0] == pytest.approx(-14 / 3) and ci[2] == pytest.approx(-14 / 3 + 1.4343, abs=1e-3)
    assert study.call(ci, lower_is_better=True) == "better than clip"
    assert study.call(ci, lower_is_better=False) == "worse than clip"
    assert study.call(study.mean_ci([-1.0, 1.0, 0.5]), lower_is_better=True) == "no detectable difference"
    assert study.call(study.mean_ci([1.0]), lower_is_better=True) == "not enough seeds"


def test_first_step_and_censoring():
    points = [(0, 0.1), (1, 0.5), (2, 0.6)]
    assert study.first_step(points, 0.5, strict=True) == 2
    assert study.first_step(points, 0.5, strict=False) == 1
    assert study.first_step(points, 0.9, strict=False) is None
    run = {
        "probe": [{"step": 0, "p_rewarded": 0.02}, {"step": 4, "p_rewarded": 0.3}, {"step": 8, "p_rewarded": 0.7}],
        "steps": [
            {"step": 1, "reward": 0.0, "entropy": 1.0},
            {"step": 5, "reward": 0.5, "entropy": 0.8},
            {"step": 9, "reward": 0.8, "entropy": 0.4},
        ],
    }
    m = study.e1_run_metrics(run, budget=12, steps_per_generation=4)
    assert m["steps_to_p05"] == 8 and m["batches_to_p05"] == 2 and not m["p05_censored"]
    assert m["steps_to_r09"] == 12 and m["r09_censored"]  # never reached: the budget, flagged
    assert m["entropy_to_p05"] == pytest.approx(statistics.fmean([1.0, 0.8]))  # steps <= 8


def test_bucket_fractions_are_token_weighted():
    steps = [
        {"study/pos_tokens/p<0.01": 4, "study/pos_clip_high/p<0.01": 1},
        {"study/pos_tokens/p<0.01": 0, "study/pos_clip_high/p<0.01": 0},
        {"study/pos_tokens/p<0.01": 6, "study/pos_clip_high/p<0.01": 5},
    ]
    assert study.bucket_fraction(steps, "study/pos_clip_high", "study/pos_tokens", "p<0.01") == 0.6
    assert math.isnan(study.bucket_fraction(steps, "study/pos_clip_high", "study/pos_tokens", "p>=0.5"))
    band = [
        {"band/tokens/p<0.01": 0.5, "band/clip_high/p<0.01": 0.2},
        {"band/tokens/p<0.01": 0.0},  # bucket empty at this step: no clip value logged
        {"band/tokens/p<0.01": 0.25, "band/clip_high/p<0.01": 0.8},
    ]
    assert study.mean_bucket_metric(band, "clip_high", "p<0.01") == pytest.approx((0.1 + 0.2) / 0.75)


# ------------------------------------------------------------------------------------------------- tasks


def test_e1_warmup_frequencies_and_reward():
    rows = tasks.e1_warmup_rows()
    per_prompt = Counter((r["prompt"], r["completion"]) for r in rows)
    for i in range(tasks.E1_NUM_PROMPTS):
        prompt = tasks.e1_prompt(i)
        total = sum(n for (p, _), n in per_prompt.items() if p == prompt)
        assert total == tasks.E1_ROWS_PER_PROMPT
        assert per_prompt[(prompt, "z")] == round(tasks.e1_frequency(i) * total)  # 2, 4, 8 or 16 of 400
        assert {c for (p, c) in per_prompt if p == prompt} == {"z", "a", "b", "c", "d"}
    assert sorted({tasks.e1_frequency(i) for i in range(32)}) == [0.005, 0.01, 0.02, 0.04]
    assert tasks.e1_reward(["z", "a", "zz", ""], answer=["z"] * 4) == [1.0, 0.0, 1.0, 0.0]


def test_e2_walks_counts_and_reward():
    rng = __import__("random").Random(0)
    for s, e in tasks.E2_PAIRS[:10]:
        assert all(tasks.e2_is_correct(s, e, tasks.e2_uniform_walk(s, e, rng)) for _ in range(20))
    # the exact count against brute force on 6-step walks
    for s, e in ((0, 0), (3, 5), (9, 1)):
        brute = sum(tasks.e2_is_correct(s, e, "".join(w), length=6) for w in itertools.product("0123456789", repeat=6))
        assert tasks.e2_num_correct(s, e, length=6) == brute
    assert min(tasks.e2_num_correct(s, e) for s, e in tasks.E2_PAIRS) > 1000  # many correct answers per prompt
    assert not set(tasks.E2_HELD_OUT) & set(tasks.E2_TRAIN) and len(tasks.E2_TRAIN) == 40
    rows = tasks.e2_warmup_rows()
    correct = [tasks.e2_is_correct(int(r["prompt"][0]), int(r["prompt"][2]), r["completion"]) for r in rows]
    assert len(rows) == 40 * tasks.E2_ROWS_PER_PAIR and 0.5 < statistics.fmean(correct) < 0.7  # half + lucky walks
    walk = "4343434343434343"
    assert tasks.e2_reward([walk, walk + "3", walk[:-1] + "5", " " + walk], answer=["3>3:"] * 4) == [1, 0, 0, 1]


# ------------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_e1_warmup_puts_the_rewarded_answer_in_the_tail(tmp_path):
    """The study's E1 warm-up (its real settings): p(rewarded) on every prompt is in [0.005, 0.05]."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    s = study.SETTINGS["e1"]
    path = tasks.warm_up_task("e1", tmp_path, s["warmup_steps"], s["warmup_lr"])
    probs = tasks.e1_rewarded_probs(AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path))
    assert len(probs) == 32 and all(0.005 <= p <= 0.05 for p in probs), probs


@pytest.mark.slow
def test_quick_pipeline_end_to_end(tmp_path, monkeypatch):
    """`study.py --quick` on both experiments (shrunk: short warm-ups, 4 steps, one seed): every run is trained by
    the trainer in a subprocess, then analysed into tables, per-run CSVs and plots."""
    for exp in ("e1", "e2"):
        monkeypatch.setitem(study.SETTINGS[exp], "warmup_steps", 10)
        monkeypatch.setitem(study.QUICK, exp, {"max_steps": 4})
    monkeypatch.setitem(study.QUICK, "e2_probe_every", 2)
    out = tmp_path / "out"
    study.main(["--quick", "--seeds", "0", "--output-dir", str(out), "--warmup-cache", str(tmp_path / "warm")])

    for exp in ("e1", "e2"):
        for method in ("clip", "band_kl"):
            run_dir = out / exp / "runs" / f"{method}-s0"
            probe = json.loads((run_dir / "probe.json").read_text())
            history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
            assert [h["step"] for h in history if "loss" in h] == list(range(1, 5))
            if exp == "e1":
                assert [p["step"] for p in probe] == list(range(0, 5)) and 0 < probe[0]["p_rewarded"] < 1
                assert any(f"study/pos_tokens/{b}" in history[1] for b in study.BUCKETS)
            else:
                assert [p["step"] for p in probe] == [0, 2, 4]
                assert 0 <= probe[-1]["distinct_correct"] <= 32 and 0 <= probe[-1]["pass@32"] <= 1
        with open(out / f"study_{exp}_runs.csv") as f:
            rows = list(csv.DictReader(f))
        assert sorted((r["rule"], r["seed"]) for r in rows) == [("band_kl", "0"), ("clip", "0")]
        table = (out / f"study_{exp}_table.md").read_text()
        assert "Band KL 0.05" in table and "Paired difference from clip" in table
        for kind in ("curves", "buckets"):
            assert (out / f"study_{exp}_{kind}.png").stat().st_size > 1000
