"""The ablation of which side of the band does the work (`benchmarks/ablation*.py`): the one-sided rules against their
formulas, the E1b task, the statistics and contrasts, the per-step logs, and the quick pipeline end to end."""

from __future__ import annotations

import csv
import gzip
import json
import math
import statistics
import sys
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bandpo_trl import clip_rules as clip_rules_module
from benchmarks import ablation, ablation_stats, study
from benchmarks import ablation_tasks as tasks

REFERENCE = Path(__file__).parent / "data" / "band_bounds.csv"


@pytest.fixture(scope="module")
def rules():
    """The ablation's rules module, imported for this module only: the registry and sys.modules are restored after,
    so that other tests may register rules of the same names."""
    saved, aliases = dict(clip_rules_module._RULES), dict(clip_rules_module._ALIASES)
    from benchmarks import ablation_rules

    yield ablation_rules
    clip_rules_module._RULES.clear()
    clip_rules_module._RULES.update(saved)
    clip_rules_module._ALIASES.clear()
    clip_rules_module._ALIASES.update(aliases)
    sys.modules.pop("benchmarks.ablation_rules", None)


def band_args(epsilon=0.2, epsilon_high=0.2, delta=0.05):
    return SimpleNamespace(
        band_divergence="kl", band_delta=delta, band_max_ratio=10.0, epsilon=epsilon, epsilon_high=epsilon_high
    )


def kl_upper(p: float, delta: float) -> float:
    """Band KL's upper bound by bisection on its definition (docs/method.md §2.3): the root u > 1 of the Bernoulli KL
    p ln(1/u) + (1 - p) ln((1 - p) / (1 - p u)) = delta, u < 1/p, capped at 10."""

    def kl(u):
        return p * math.log(1 / u) + (1 - p) * math.log((1 - p) / (1 - p * u))

    lo, hi = 1.0, 1 / p
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kl(mid) < delta else (lo, mid)
    return min(lo, 10.0)


# ------------------------------------------------------------------------------------------------- rules


def reference_rows(delta: str = "0.05"):
    with open(REFERENCE) as f:
        return [r for r in csv.DictReader(f) if r["divergence"] == "kl" and r["delta"] == delta]


@pytest.mark.parametrize(("epsilon", "epsilon_high"), [(0.2, 0.2), (0.2, 0.28)])
def test_one_sided_rules_against_their_formulas(rules, epsilon, epsilon_high):
    """band_upper = [1 - eps, u(p)], band_lower = [l(p), 1 + eps_high], with (l, u) the reference Band KL bounds (capped
    at 10); flat_upper = [1 - eps, u(0.0185)] for every token."""
    rows = reference_rows()
    probs = torch.tensor([float(r["p"]) for r in rows], dtype=torch.float64)
    ref_lower = torch.tensor([float(r["lower"]) for r in rows], dtype=torch.float64)
    ref_upper = torch.tensor([float(r["upper"]) for r in rows], dtype=torch.float64).clamp(max=10.0)
    args = band_args(epsilon, epsilon_high)

    lower, upper = rules.band_upper(probs.log(), args)
    assert lower == pytest.approx(1 - epsilon)
    torch.testing.assert_close(upper, ref_upper, rtol=1e-6, atol=0)

    lower, upper = rules.band_lower(probs.log(), args)
    torch.testing.assert_close(lower, ref_lower, rtol=1e-6, atol=1e-300)
    assert upper == pytest.approx(1 + epsilon_high)

    lower, upper = rules.flat_upper(probs.log(), args)
    assert lower == pytest.approx(1 - epsilon) and isinstance(upper, float)
    assert upper == pytest.approx(kl_upper(0.0185, 0.05), rel=1e-6) and upper == pytest.approx(5.1729, abs=1e-4)


def test_flat_upper_equals_band_upper_at_the_reference_probability_only(rules):
    args = band_args()
    logps = torch.tensor([0.0185, 0.005, 0.24, 0.5], dtype=torch.float64).log()
    _, band = rules.band_upper(logps, args)
    _, flat = rules.flat_upper(logps, args)
    assert band[0].item() == pytest.approx(flat, rel=1e-9)
    assert band[1] > flat > band[2] > band[3]  # rarer tokens get more room under Band, frequent ones less
    for p in (0.005, 0.24, 0.5):
        assert rules.band_upper_at(p, args) == pytest.approx(kl_upper(p, 0.05), rel=1e-6)


def test_rules_resolve_by_import_path_and_validate_without_warnings(rules, tmp_path):
    from bandpo_trl import BandGRPOConfig
    from bandpo_trl.clip_rules import get_clip_rule

    for name in ("band_upper", "band_lower", "flat_upper"):
        options = ablation.METHODS[name]
        assert options["clip_rule"] == f"benchmarks.ablation_rules:{name}"
        assert get_clip_rule(options["clip_rule"]).name == name
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # a rule that ignored a set option would warn
            BandGRPOConfig(output_dir=str(tmp_path), use_cpu=True, steps_per_generation=4, **options)


# ------------------------------------------------------------------------------------------------- E1b task


def test_e1b_warmup_rows_have_exact_log_uniform_counts():
    rows = tasks.e1b_warmup_rows()
    counts = Counter((r["prompt"], r["completion"]) for r in rows)
    assert len(rows) == 32 * 1000
    assert tasks.e1b_frequency(0) == pytest.approx(0.005) and tasks.e1b_frequency(31) == pytest.approx(0.05)
    ratios = [tasks.e1b_frequency(i + 1) / tasks.e1b_frequency(i) for i in range(31)]
    assert ratios == pytest.approx([10 ** (1 / 31)] * 31)  # log-uniform
    for i in range(32):
        prompt = tasks.e1b_prompt(i)
        assert sum(n for (p, _), n in counts.items() if p == prompt) == 1000
        assert counts[(prompt, "z")] == round(1000 * tasks.e1b_frequency(i))
        heads = [counts[(prompt, c)] for c in "abcd"]
        rest = 1000 - counts[(prompt, "z")]
        rotated = [(0.4, 0.3, 0.2, 0.1)[(j + i) % 4] * rest for j in range(4)]
        assert heads == pytest.approx(rotated, abs=1.5)  # 40/30/20/10 rotated per prompt, rounded to whole rows
    assert counts[(tasks.e1b_prompt(0), "z")] == 5 and counts[(tasks.e1b_prompt(31), "z")] == 50


def test_e1b_prompts_differ_in_their_last_token():
    from bandpo_trl.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    ids = [tokenizer(tasks.e1b_prompt(i))["input_ids"] for i in range(32)]
    assert len({len(x) for x in ids}) == 1  # one batch without padding
    assert len({x[-1] for x in ids}) == 32 and len({tuple(x[:-1]) for x in ids}) == 1
    assert tokenizer.unk_token_id not in {x[-1] for x in ids}
    data = tasks.e1b_train_dataset(seed=0)
    assert len(data) == 32 * 64 and len(set(data["prompt"])) == 32 and set(data["answer"]) == {"z"}
    assert tasks.TASKS["e1b"]["reward"](["z", "a"], answer=["z", "z"]) == [1.0, 0.0]


def test_spread_check():
    targets = [tasks.e1b_frequency(i) for i in range(32)]
    thresholds = ablation.SPREAD_THRESHOLDS
    check = tasks.spread_check(targets, **thresholds)
    assert check["passed"] and check["log_correlation"] == pytest.approx(1.0)
    assert check["min"] == pytest.approx(0.005) and check["max_over_min"] == pytest.approx(10)
    pooled = [0.0185 + 1e-5 * (i % 3) for i in range(32)]  # what E1's warm-up did: the pooled frequency
    assert not tasks.spread_check(pooled, **thresholds)["passed"]
    narrow = [0.014 * (0.042 / 0.014) ** (i / 31) for i in range(32)]  # ordered, but too narrow
    assert not tasks.spread_check(narrow, **thresholds)["passed"]
    shuffled = targets[16:] + targets[:16]  # wide but not the prompts' own frequencies
    assert not tasks.spread_check(shuffled, **thresholds)["passed"]


# ------------------------------------------------------------------------------------------------- statistics


def test_t_quantiles_against_closed_forms_and_tables():
    assert ablation_stats.t_cdf(0.0, 5) == pytest.approx(0.5)
    for t in (0.3, 1.0, 4.0, 40.0):
        assert ablation_stats.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-10)  # Cauchy
        assert ablation_stats.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-10)
        assert ablation_stats.t_cdf(-t, 7) == pytest.approx(1 - ablation_stats.t_cdf(t, 7), abs=1e-12)
    for df in range(1, 31):  # the study's table of t(0.975)
        assert ablation_stats.t_quantile(0.975, df) == pytest.approx(study.t975(df), abs=6e-4)
    # published t tables, df 9: t(0.99) = 2.821, t(0.995) = 3.250; df 1: t(0.9) = 3.078
    assert ablation_stats.t_quantile(0.99, 9) == pytest.approx(2.821, abs=6e-4)
    assert ablation_stats.t_quantile(0.995, 9) == pytest.approx(3.250, abs=6e-4)
    assert ablation_stats.t_quantile(0.9, 1) == pytest.approx(3.078, abs=6e-4)
    bonferroni = ablation_stats.t_quantile(1 - 0.05 / 6, 9)
    assert 2.821 < bonferroni < 3.250 and bonferroni == pytest.approx(2.933, abs=1e-3)
    with pytest.raises(ValueError):
        ablation_stats.t_quantile(0.3, 9)


def test_intervals_and_calls():
    values = [float(v) for v in range(1, 11)]
    assert ablation_stats.interval(values) == study.mean_ci(values)
    mean, lo, hi = ablation_stats.interval(values, ablation_stats.CONFIRMATORY_LEVEL)
    half = ablation_stats.t_quantile(1 - 0.05 / 6, 9) * statistics.stdev(values) / math.sqrt(10)
    assert (
        mean == 5.5 and (lo, hi) == pytest.approx((5.5 - half, 5.5 + half)) and half == pytest.approx(2.808, abs=1e-3)
    )
    assert ablation_stats.steps_call((-2.0, -3.0, -1.0), "clip") == "faster than clip"
    assert ablation_stats.steps_call((2.0, 1.0, 3.0), "clip") == "slower than clip"
    assert ablation_stats.steps_call((0.0, -1.0, 1.0), "clip") == "no detectable difference"
    assert ablation_stats.slope_call((1.0, 0.5, 1.5), "clip").startswith("rises with start p")
    assert ablation_stats.slope_call((-1.0, -1.5, -0.5), "clip").startswith("falls with start p")
    assert ablation_stats.slope_call((0.0, -1.0, 1.0), "clip") == "no detectable dependence on start p"


def test_paired_contrast_uses_the_confirmatory_level():
    metrics = {
        "clip": {s: {"steps_to_p05": 17.0 + (s % 2)} for s in range(10)},
        "band_upper": {s: {"steps_to_p05": 14.0 + (s % 3 == 0)} for s in range(10)},
    }
    c = ablation_stats.contrast(metrics, "band_upper", "clip", "steps_to_p05", ablation_stats.CONFIRMATORY_LEVEL)
    diffs = [14.0 + (s % 3 == 0) - 17.0 - (s % 2) for s in range(10)]
    assert c["diffs"] == diffs and c["pairs"] == 10
    assert c["ci"] == pytest.approx(ablation_stats.interval(diffs, ablation_stats.CONFIRMATORY_LEVEL))
    assert c["ci"][2] - c["ci"][1] > study.mean_ci(diffs)[2] - study.mean_ci(diffs)[1]  # wider than 95%
    assert c["call"] == "faster than clip"
    families = {(r, b): f for r, b, f in ablation_stats.E1_CONTRASTS}
    assert [k for k, f in families.items() if f == "confirmatory"] == [
        ("band_upper", "clip"),
        ("band_lower", "clip"),
        ("band_upper", "flat_upper"),
    ]


def test_run_metrics_count_clipping_until_the_crossing():
    probe = [{"step": k, "p_rewarded": p, "p_per_prompt": [p]} for k, p in enumerate([0.02, 0.1, 0.3, 0.6, 0.9])]
    steps = [
        {"step": k, "reward": 0.5, "entropy": 1.0, "study/neg_tokens/p<0.01": 10.0, "study/neg_clip_low/p<0.01": c,
         "study/pos_tokens/p0.01-0.1": 4.0, "study/pos_clip_high/p0.01-0.1": 1.0}
        for k, c in zip(range(1, 5), [5.0, 3.0, 2.0, 9.0])
    ]  # fmt: skip
    m = ablation_stats.run_metrics({"steps": steps, "probe": probe}, budget=4, steps_per_generation=4)
    assert m["steps_to_p05"] == 3
    assert m["pre/neg_clipped/p<0.01"] == 10 and m["pre/neg_tokens/p<0.01"] == 30  # steps 1-3 only
    assert m["pre/neg_clip_down/p<0.01"] == pytest.approx(1 / 3)
    assert m["neg_clip_down/p<0.01"] == pytest.approx(19 / 40)  # the whole run
    assert m["pre/pos_clip_up/p<0.1"] == pytest.approx(0.25)
    assert math.isnan(m["pre/neg_clip_down/p>=0.5"])


def test_e1b_per_prompt_steps_slope_and_thirds():
    probe = [{"step": k, "p_per_prompt": [0.1 * k, 0.2 * k, 0.01]} for k in range(6)]
    assert ablation_stats.e1b_prompt_steps({"probe": probe}, budget=5) == [(5, True), (3, False), (5, True)]

    start = [tasks.e1b_frequency(i) for i in range(32)]
    groups = ablation_stats.thirds(start)
    assert [len(g) for g in groups] == [11, 10, 11] and sorted(sum(groups, [])) == list(range(32))
    assert max(start[i] for i in groups[0]) < min(start[i] for i in groups[1])
    xs = [math.log10(p) for p in start]
    assert ablation_stats.ols(xs, [1 + 2 * x for x in xs]) == pytest.approx((1.0, 2.0))
    # the rule is 1 step faster at 0.005 and equally fast at 0.05 in every seed: d = (log10 p - log10 0.05) * 1
    clip = {s: [(20, False)] * 32 for s in range(4)}
    rule = {s: [(20 + (x - math.log10(0.05)), False) for x in xs] for s in range(4)}
    c = ablation_stats.e1b_contrast({"rule": rule, "clip": clip}, "rule", "clip", start, 0.95)
    assert c["slope"]["ci"][0] == pytest.approx(1.0) and c["intercept"]["ci"][0] == pytest.approx(-math.log10(0.05))
    assert c["mean"]["ci"][0] == pytest.approx(statistics.fmean(x - math.log10(0.05) for x in xs))
    assert c["thirds"][0][0] < c["thirds"][1][0] < c["thirds"][2][0] < 0


def test_logs_round_trip_deterministically(tmp_path):
    runs = {"clip": {1: {"steps": [{"step": 1, "loss": 0.123456789}], "probe": [{"step": 0, "p_rewarded": 1 / 3}]}}}
    a, b = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"
    ablation.write_logs(a, runs)
    ablation.write_logs(b, runs)
    assert a.read_bytes() == b.read_bytes()
    back = ablation.read_logs(a)
    assert back["clip"][1]["steps"][0]["loss"] == 0.123457 and back["clip"][1]["probe"][0]["p_rewarded"] == 0.333333
    assert json.loads(gzip.open(a, "rt").readline())["seed"] == 1


# ------------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_quick_pipeline_end_to_end(tmp_path, monkeypatch):
    """`ablation --quick` shrunk (10-step warm-ups, 4 steps, one seed, the three one-sided rules and clip): every run is
    a subprocess of the trainer with a rule named by import path; the per-step logs, tables and plots are written;
    --plot-only redoes the tables from the logs alone; without --quick a failed E1b start check stops E1b."""
    monkeypatch.setitem(ablation.SETTINGS, "e1", {**ablation.SETTINGS["e1"], "warmup_steps": 10})
    monkeypatch.setitem(ablation.SETTINGS, "e1b", {**ablation.SETTINGS["e1b"], "warmup_steps": 10})
    monkeypatch.setitem(ablation.QUICK, "max_steps", 4)
    out, warm = tmp_path / "out", tmp_path / "warm"
    rules = ["clip", "band_upper", "band_lower", "flat_upper"]
    common = ["--seeds", "0", "--methods", *rules, "--output-dir", str(out), "--warmup-cache", str(warm)]
    ablation.main(["--quick", *common])

    expected_bounds = {"clip": (0.8, 1.2), "band_lower": (None, 1.2), "flat_upper": (0.8, 5.1729)}
    for exp in ("e1", "e1b"):
        runs = ablation.read_logs(out / f"ablation_{exp}_logs.jsonl.gz")
        assert sorted(runs) == sorted(rules) and all(list(r) == [0] for r in runs.values())
        for rule, per_seed in runs.items():
            steps, probe = per_seed[0]["steps"], per_seed[0]["probe"]
            assert [s["step"] for s in steps] == [1, 2, 3, 4] and [p["step"] for p in probe] == [0, 1, 2, 3, 4]
            assert len(probe[0]["p_per_prompt"]) == 32 and "study/neg_tokens/p<0.01" in steps[0]
            lower, upper = expected_bounds.get(rule, (0.8, None))
            for s in steps:  # the rule's bounds were applied by the trainer (mean over the step's tokens)
                if lower is not None:
                    assert s["band/lower_mean"] == pytest.approx(lower, abs=1e-4)
                if upper is not None:
                    assert s["band/upper_mean"] == pytest.approx(upper, abs=1e-4)
        table = (out / f"ablation_{exp}_table.md").read_text()
        assert "Band-upper" in table and "flat-upper" in table
        with open(out / f"ablation_{exp}_runs.csv") as f:
            assert sorted(r["rule"] for r in csv.DictReader(f)) == sorted(rules)
        for kind in ("curves", "buckets"):
            assert (out / f"ablation_{exp}_{kind}.png").stat().st_size > 1000
    e1 = (out / "ablation_e1_table.md").read_text()
    assert "confirmatory, 98.33%" in e1 and "Band-lower [l_KL(p), 1.2] - clip" in e1
    start = json.loads((out / "ablation_e1b_start.json").read_text())
    assert len(start["start_p"]) == 32 and not start["passed"]  # a 10-step warm-up does not spread p: reported
    with open(out / "ablation_e1b_prompts.csv") as f:
        assert len(list(csv.DictReader(f))) == 4 * 32
    assert (out / "ablation_e1b_steps_vs_p.png").stat().st_size > 1000
    timing = json.loads((out / "ablation_timing.json").read_text())
    assert timing["wall_s"] > 0 and timing["load_1min"]["samples"] >= 1

    tables = {p.name: p.read_text() for p in out.glob("ablation_*_table.md")}
    ablation.main(["--quick", "--plot-only", *common])
    assert {p.name: p.read_text() for p in out.glob("ablation_*_table.md")} == tables

    full = tmp_path / "full"
    ablation.main(["--experiments", "e1b", "--seeds", "0", "--methods", "clip", "--output-dir", str(full),
                   "--warmup-cache", str(warm), "--results-dir", str(full)])  # fmt: skip
    assert not (full / "e1b").exists() and not (full / "ablation_e1b_logs.jsonl.gz").exists()
    assert not json.loads((full / "ablation_e1b_start.json").read_text())["passed"]
