"""Where does Band help? The pre-registered study (design and results: docs/study.md).

E1 tail learning and E2 exploration over long completions (tasks: `benchmarks/study_tasks.py`), six clipping rules
(those of `toy_reproduction.py`: clip [0.8, 1.2], Clip-Higher [0.8, 1.28], DCPO, Band KL/TV/chi2 at delta 0.05),
5 seeds, paired by seed. Each task's tiny model is warmed up once and shared by every run of that task; each run is
a subprocess (`python -m benchmarks.study_tasks`, i.e. `BandGRPOTrainer` with `bandpo_trl.train`'s options), two at
a time, one torch thread each. From the repository root:

    python -m benchmarks.study              # the full study (both experiments, 6 rules x 5 seeds)
    python -m benchmarks.study --quick      # clip and Band KL x 2 seeds, short runs: a few minutes
    python -m benchmarks.study --plot-only  # redo tables and plots from the saved runs

    python -m benchmarks.study --experiments e2s --methods clip band_kl   # E2's sensitivity arm (lr 1e-3)

Outputs: `<output-dir>/<experiment>/runs/<rule>-s<seed>/{trainer_state.json,probe.json,train.log}` (raw, git-ignored);
`<results-dir>/study_<experiment>_{runs.csv,table.md,summary.json}` (one line per run; the tables; mean, 95% CI and
paired differences); plots `<plot-dir>/study_<experiment>_{curves,buckets}.png`. Both directories default to
`docs/study/`, the study's one folder of results (`--quick`: the output directory).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.toy_reproduction import BUCKETS, COLORS, LABELS, METHODS, flag_args, save_small, series, smooth

ROOT = Path(__file__).resolve().parent.parent
STUDY_DIR = ROOT / "docs" / "study"  # the committed results: tables, run lists, summaries and plots
TASKS_MODULE = "benchmarks.study_tasks"  # run with the repository root as working directory

# Shared by every run of both experiments.
COMMON = {
    "temperature": 1.0,
    "top_p": 1.0,
    "loss_type": "grpo",
    "beta": 0.0,
    "scale_rewards": "group",
    "gradient_accumulation_steps": 1,
    "lr_scheduler_type": "constant",
    "warmup_steps": 0,
    "weight_decay": 0.01,
    "max_grad_norm": 1.0,
    "dtype": "float32",
    "bf16": "false",
    "use_cpu": "true",
    "gradient_checkpointing": "false",
    "dataloader_num_workers": 0,
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
    "disable_tqdm": "true",
    "log_completions": "false",
    "torch_num_threads": 1,
}
# Per experiment: the task's training setting (pre-registered in docs/study.md) and its warm-up.
SETTINGS = {
    "e1": {
        "train": {
            "num_generations": 16,
            "per_device_train_batch_size": 64,
            "steps_per_generation": 4,
            "max_completion_length": 1,
            "learning_rate": 1e-3,
            "max_steps": 100,
        },
        "task": "e1",
        "probe_every": 1,
        "warmup_steps": 400,
        "warmup_lr": 3e-3,
    },
    "e2": {
        "train": {
            "num_generations": 8,
            "per_device_train_batch_size": 64,
            "steps_per_generation": 4,
            "max_completion_length": 17,
            "learning_rate": 5e-4,
            "max_steps": 200,
        },
        "task": "e2",
        "probe_every": 40,
        "warmup_steps": 300,
        "warmup_lr": 3e-3,
    },
}
# E2's sensitivity arm (pre-registered, run after the main study): the same task at the pilot's higher learning rate,
# clip and Band KL only (`--experiments e2s --methods clip band_kl`).
SETTINGS["e2s"] = {**SETTINGS["e2"], "train": {**SETTINGS["e2"]["train"], "learning_rate": 1e-3}}
QUICK = {"e1": {"max_steps": 40}, "e2": {"max_steps": 40}, "e2s": {"max_steps": 40}, "e2_probe_every": 20}


def run_command(
    method: str,
    seed: int,
    model_dir: str,
    run_dir: Path,
    settings: dict,
    methods: dict = METHODS,
    module: str = TASKS_MODULE,
) -> list[str]:
    """The command of one run: `module`'s entry point (`study_tasks.main`) with the task, the shared settings, the
    task's training setting and the rule's options `methods[method]`."""
    return [
        sys.executable, "-m", module,
        "--task", settings["task"],
        "--probe_every", str(settings["probe_every"]),
        "--model_name_or_path", model_dir,
        "--output_dir", str(run_dir),
        "--seed", str(seed),
        *flag_args(COMMON),
        *flag_args(settings["train"]),
        *flag_args(methods[method]),
    ]  # fmt: skip


def run_queue(jobs: list[tuple[str, list[str], Path]], parallel: int) -> list[tuple[str, float]]:
    """Run (name, command, run_dir) jobs `parallel` at a time; a job whose run_dir has trainer_state.json is kept.
    Returns (name, seconds) of the jobs run; exits with the log's tail if one fails."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    pending, active, done = list(jobs), [], []
    while pending or active:
        while pending and len(active) < parallel:
            name, cmd, run_dir = pending.pop(0)
            if (run_dir / "trainer_state.json").exists():
                print(f"  {name}: already done, kept", flush=True)
                continue
            run_dir.mkdir(parents=True, exist_ok=True)
            log = open(run_dir / "train.log", "w")
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            active.append((name, proc, log, run_dir, time.time()))
        time.sleep(0.5)
        for item in list(active):
            name, proc, log, run_dir, started = item
            if proc.poll() is None:
                continue
            log.close()
            active.remove(item)
            if proc.returncode != 0:
                sys.exit(f"{name} failed:\n{(run_dir / 'train.log').read_text()[-3000:]}")
            done.append((name, time.time() - started))
            print(f"  {name}: {done[-1][1]:.0f} s", flush=True)
    return done


# ----------------------------------------------------------------------------------------------------- statistics

# Two-sided 95% quantiles of Student's t (df 1..30); above 30 the normal 1.96 is within 4%.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def t975(df: int) -> float:
    if df < 1:
        raise ValueError(f"a t-interval needs at least 2 values (df >= 1), got df={df}")
    return T975[df - 1] if df <= len(T975) else 1.96


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and two-sided 95% t-interval (mean - h, mean + h), h = t(0.975, n - 1) * sd / sqrt(n); NaNs dropped.
    With one value the interval is (nan, nan); with none everything is nan."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan, math.nan
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def paired_differences(values: dict[int, float], baseline: dict[int, float]) -> list[float]:
    """values[seed] - baseline[seed] over the seeds both have, in seed order."""
    return [values[s] - baseline[s] for s in sorted(values) if s in baseline]


def call(ci: tuple[float, float, float], lower_is_better: bool) -> str:
    """The pre-registered rule: better/worse than clip when the 95% CI of the paired difference excludes 0."""
    _, lo, hi = ci
    if math.isnan(lo):
        return "not enough seeds"
    if hi < 0:
        return "better than clip" if lower_is_better else "worse than clip"
    if lo > 0:
        return "worse than clip" if lower_is_better else "better than clip"
    return "no detectable difference"


def fmt_ci(ci: tuple[float, float, float], digits: int = 2, sign: bool = False) -> str:
    mean, lo, hi = ci
    if math.isnan(mean):
        return "n/a"
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    if math.isnan(lo):
        return f.format(mean)
    return f"{f.format(mean)} [{f.format(lo)}, {f.format(hi)}]"


def first_step(points: list[tuple[int, float]], threshold: float, strict: bool) -> int | None:
    """First step whose value exceeds (strict) or reaches the threshold; None if none does."""
    for step, value in points:
        if value > threshold or (not strict and value == threshold):
            return step
    return None


# ----------------------------------------------------------------------------------------------------- analysis


def load_run(run_dir: Path) -> dict | None:
    """{'steps': per-optimizer-step log records, 'probe': probe records} of a finished run, or None."""
    state, probe = run_dir / "trainer_state.json", run_dir / "probe.json"
    if not state.exists() or not probe.exists():
        return None
    history = json.loads(state.read_text())["log_history"]
    return {"steps": [h for h in history if "loss" in h], "probe": json.loads(probe.read_text())}


def bucket_fraction(steps: list[dict], numerator: str, denominator: str, bucket: str) -> float:
    """Token-weighted fraction over all steps: sum of numerator counts / sum of denominator counts of a bucket."""
    num = sum(s.get(f"{numerator}/{bucket}", 0.0) for s in steps)
    den = sum(s.get(f"{denominator}/{bucket}", 0.0) for s in steps)
    return num / den if den else math.nan


def mean_bucket_metric(steps: list[dict], key: str, bucket: str) -> float:
    """Share of the bucket's tokens clipped (band/clip_high|clip_low), weighted by the bucket's token share."""
    num = sum(s.get(f"band/{key}/{bucket}", 0.0) * s.get(f"band/tokens/{bucket}", 0.0) for s in steps)
    den = sum(s.get(f"band/tokens/{bucket}", 0.0) for s in steps if f"band/{key}/{bucket}" in s)
    return num / den if den else math.nan


def e1_run_metrics(run: dict, budget: int, steps_per_generation: int) -> dict:
    p_curve = [(r["step"], r["p_rewarded"]) for r in run["probe"]]
    # reward logged at step s belongs to the batch sampled after s - 1 optimizer steps
    reward = [(s - 1, r) for s, r in zip(*series(run["steps"], "reward"))]
    p_step, r_step = first_step(p_curve, 0.5, strict=True), first_step(reward, 0.9, strict=False)
    crossing = p_step if p_step is not None else budget
    entropy = [e for s, e in zip(*series(run["steps"], "entropy")) if s <= crossing]
    out = {
        "p_start": p_curve[0][1],
        "p_final": p_curve[-1][1],
        "steps_to_p05": crossing,
        "p05_censored": p_step is None,
        "batches_to_p05": math.ceil(crossing / steps_per_generation),
        "steps_to_r09": r_step if r_step is not None else budget,
        "r09_censored": r_step is None,
        "batches_to_r09": math.ceil((r_step if r_step is not None else budget) / steps_per_generation),
        "entropy_start": series(run["steps"], "entropy")[1][0],
        "entropy_to_p05": statistics.fmean(entropy) if entropy else math.nan,
        "entropy_final": statistics.fmean(series(run["steps"], "entropy")[1][-steps_per_generation:]),
    }
    for b in BUCKETS:
        out[f"rewarded_clip_up/{b}"] = bucket_fraction(run["steps"], "study/pos_clip_high", "study/pos_tokens", b)
        out[f"rewarded_tokens/{b}"] = sum(s.get(f"study/pos_tokens/{b}", 0.0) for s in run["steps"])
    total = sum(out[f"rewarded_tokens/{b}"] for b in BUCKETS)
    for b in BUCKETS:
        out[f"rewarded_share/{b}"] = out[f"rewarded_tokens/{b}"] / total if total else math.nan
    low = ("p<0.01", "p0.01-0.1")
    num = sum(s.get(f"study/pos_clip_high/{b}", 0.0) for s in run["steps"] for b in low)
    den = sum(s.get(f"study/pos_tokens/{b}", 0.0) for s in run["steps"] for b in low)
    out["rewarded_clip_up/p<0.1"] = num / den if den else math.nan
    return out


def e2_run_metrics(run: dict, tail: float = 0.2) -> dict:
    steps = run["steps"]
    last = steps[-1]["step"]
    cutoff = last * (1 - tail)

    def tail_mean(key: str) -> float:  # the values logged after the cutoff; the last one if a short run has none
        xs, ys = series(steps, key)
        late = [y for x, y in zip(xs, ys) if x > cutoff]
        return statistics.fmean(late or ys[-1:])

    final = run["probe"][-1]
    out = {
        "final_reward": tail_mean("reward"),
        "final_entropy": tail_mean("entropy"),
        "entropy_start": series(steps, "entropy")[1][0],
        "reward_start": series(steps, "reward")[1][0],
        "probe_step": final["step"],
        "distinct_correct": final["distinct_correct"],
        "heldout_pass@1": final["pass@1"],
        "heldout_pass@8": final.get("pass@8", math.nan),
        "heldout_pass@32": final.get("pass@32", math.nan),
        "distinct_correct_start": run["probe"][0]["distinct_correct"],
        "heldout_pass@32_start": run["probe"][0].get("pass@32", math.nan),
    }
    for b in BUCKETS:
        out[f"clip_up/{b}"] = mean_bucket_metric(steps, "clip_high", b)
        out[f"clip_down/{b}"] = mean_bucket_metric(steps, "clip_low", b)
    return out


# (key, label, lower is better: True/False, or None for a description without a call, digits)
OUTCOMES = {
    "e1": [
        ("steps_to_p05", "optimizer steps to mean p(rewarded) > 0.5", True, 1),
        ("batches_to_p05", "generation batches to p > 0.5", True, 1),
        ("steps_to_r09", "optimizer steps to reward >= 0.9", True, 1),
        ("batches_to_r09", "generation batches to reward >= 0.9", True, 1),
        ("entropy_to_p05", "mean token entropy until p > 0.5 (nats)", None, 3),
        ("rewarded_clip_up/p<0.1", "rewarded tokens with old p < 0.1 clipped up", None, 3),
    ],
    "e2": [
        ("distinct_correct", "held-out distinct correct of 32 (final)", False, 2),
        ("final_entropy", "mean token entropy, last 20% (nats)", False, 3),
        ("final_reward", "reward, last 20%", False, 3),
        ("heldout_pass@1", "held-out pass@1 (final)", False, 3),
        ("heldout_pass@32", "held-out pass@32 (final)", False, 3),
        ("clip_up/p0.01-0.1", "tokens with old p in [0.01, 0.1) clipped up", None, 3),
    ],
}
PRIMARY = {"e1": ("band_kl", "steps_to_p05"), "e2": ("band_kl", "distinct_correct")}


def summarize(
    task: str, metrics: dict[str, dict[int, dict]], outcomes: list | None = None, labels: dict = LABELS
) -> tuple[dict, str]:
    """Per rule: mean and 95% CI over seeds of each outcome, and the paired difference from clip (same seed).
    `outcomes` defaults to the task's `OUTCOMES`."""
    outcomes = OUTCOMES[task] if outcomes is None else outcomes
    summary, base = {}, metrics.get("clip", {})
    for method, per_seed in metrics.items():
        entry = {"seeds": sorted(per_seed)}
        for key, _, lower_is_better, _ in outcomes:
            values = {s: m[key] for s, m in per_seed.items()}
            entry[key] = {"per_seed": values, "ci": mean_ci(list(values.values()))}
            if method != "clip" and base:
                diffs = paired_differences(values, {s: m[key] for s, m in base.items()})
                entry[key]["diff_vs_clip"] = diffs
                entry[key]["diff_ci"] = mean_ci(diffs)
                entry[key]["call"] = (
                    call(entry[key]["diff_ci"], lower_is_better) if lower_is_better is not None else ""
                )
        censored = [k for k in ("p05_censored", "r09_censored") if any(m.get(k) for m in per_seed.values())]
        entry["censored"] = {k: sum(bool(m.get(k)) for m in per_seed.values()) for k in censored}
        summary[method] = entry
    header = "| rule | seeds | " + " | ".join(label for _, label, _, _ in outcomes) + " |"
    lines = [header, "|---" * (len(outcomes) + 2) + "|"]
    for method, entry in summary.items():
        cells = [fmt_ci(entry[key]["ci"], digits) for key, _, _, digits in outcomes]
        lines.append(f"| {labels[method]} | {len(entry['seeds'])} | " + " | ".join(cells) + " |")
    lines += ["", "Paired difference from clip (same seed), mean [95% CI], and the pre-registered call:", ""]
    lines += [header.replace("| seeds |", "| pairs |"), lines[1]]
    for method, entry in summary.items():
        if method == "clip":
            continue
        cells = []
        for key, _, _, digits in outcomes:
            if "diff_ci" not in entry[key]:
                cells.append("n/a")
                continue
            text = fmt_ci(entry[key]["diff_ci"], digits, sign=True)
            cells.append(f"{text} ({entry[key]['call']})" if entry[key]["call"] else text)
        pairs = len(entry[outcomes[0][0]].get("diff_vs_clip", []))
        lines.append(f"| {labels[method]} | {pairs} | " + " | ".join(cells) + " |")
    censored = {m: e["censored"] for m, e in summary.items() if e["censored"]}
    if censored:
        lines += ["", f"Censored at the budget (threshold not reached; counted as the budget): {censored}"]
    return summary, "\n".join(lines)


def write_runs_csv(path: Path, metrics: dict[str, dict[int, dict]]) -> None:
    keys = sorted({k for per_seed in metrics.values() for m in per_seed.values() for k in m})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rule", "seed", *keys])
        for method, per_seed in metrics.items():
            for seed, m in sorted(per_seed.items()):
                writer.writerow(
                    [method, seed, *(round(m[k], 5) if isinstance(m.get(k), float) else m.get(k) for k in keys)]
                )


# ----------------------------------------------------------------------------------------------------- plots


def curve_ci(curves: list[list[tuple[int, float]]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Mean and 95% t-interval over runs at the x values every run has."""
    maps = [dict(c) for c in curves]
    xs = sorted(set.intersection(*(set(m) for m in maps)))
    stats = [mean_ci([m[x] for m in maps]) for x in xs]
    mean = [s[0] for s in stats]
    lo = [s[1] if not math.isnan(s[1]) else s[0] for s in stats]
    hi = [s[2] if not math.isnan(s[2]) else s[0] for s in stats]
    return xs, mean, lo, hi


def step_curve(run: dict, key: str, window: int = 1, shift: int = 0) -> list[tuple[int, float]]:
    xs, ys = series(run["steps"], key)
    return list(zip([x - shift for x in xs], smooth(ys, window)))


def plot_curves(
    path: Path, runs: dict, panels: list, title: str, labels: dict = LABELS, colors: dict = COLORS
) -> Path:
    """panels: (title, curve_fn(run) -> [(x, y)], log_y). One line per rule: mean over seeds, shaded 95% CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.1 * len(panels), 3.6), dpi=80)
    for ax, (panel_title, curve_fn, log_y) in zip(axes, panels):
        for method, per_seed in runs.items():
            xs, mean, lo, hi = curve_ci([curve_fn(r) for r in per_seed.values()])
            ax.plot(xs, mean, color=colors[method], label=labels[method], lw=1.3)
            if log_y:  # a t-interval can reach below 0; show it down to the axis
                lo = [max(v, 1e-4) for v in lo]
            ax.fill_between(xs, lo, hi, color=colors[method], alpha=0.15, lw=0)
        if log_y:
            ax.set_yscale("log")
            ax.set_ylim(bottom=5e-3)
        ax.set_title(panel_title, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_small(fig, path)
    plt.close(fig)
    return path


def plot_buckets(
    path: Path, metrics: dict, panels: list, title: str, labels: dict = LABELS, colors: dict = COLORS
) -> Path:
    """panels: (title, metric key prefix). Bars: mean over seeds per old-probability bucket, error bars 95% CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.6), dpi=80)
    axes = list(axes) if len(panels) > 1 else [axes]
    width = 0.8 / len(metrics)
    for ax, (panel_title, prefix) in zip(axes, panels):
        for i, (method, per_seed) in enumerate(metrics.items()):
            cis = [mean_ci([m[f"{prefix}/{b}"] for m in per_seed.values()]) for b in BUCKETS]
            xs = [j + i * width for j in range(len(BUCKETS))]
            mean = [0.0 if math.isnan(c[0]) else c[0] for c in cis]
            err = [
                [0.0 if math.isnan(c[1]) else c[0] - c[1] for c in cis],
                [0.0 if math.isnan(c[2]) else c[2] - c[0] for c in cis],
            ]
            ax.bar(xs, mean, width, yerr=err, capsize=2, color=colors[method], label=labels[method])
        ax.set_xticks([j + width * (len(metrics) - 1) / 2 for j in range(len(BUCKETS))], [f"old {b}" for b in BUCKETS])
        ax.set_title(panel_title, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_small(fig, path)
    plt.close(fig)
    return path


def make_plots(exp: str, runs: dict, metrics: dict, plot_dir: Path, settings: dict, tag: str) -> list[Path]:
    plot_dir.mkdir(parents=True, exist_ok=True)
    task = settings["task"]
    spg = settings["train"]["steps_per_generation"]
    n = max(len(v) for v in runs.values())
    title = f"{tag}: mean over {n} seeds, shaded = 95% CI over seeds"
    if task == "e1":
        panels = [
            ("reward (per generation batch)", lambda r: step_curve(r, "reward", shift=1), False),
            ("mean token entropy (nats)", lambda r: step_curve(r, "entropy"), False),
            (
                "mean p(rewarded answer), exact (log scale)",
                lambda r: [(p["step"], p["p_rewarded"]) for p in r["probe"]],
                True,
            ),
        ]
        bucket_panels = [
            (
                "rewarded tokens clipped up (ratio above the upper bound),\nshare of the bucket's rewarded tokens",
                "rewarded_clip_up",
            ),
            (
                "where the rewarded (positive-advantage) tokens are:\nshare of them in each old-probability bucket",
                "rewarded_share",
            ),
        ]
    else:
        panels = [
            (
                "reward (per generation batch, mean of last 5)",
                lambda r: step_curve(r, "reward", window=5, shift=1),
                False,
            ),
            (
                f"mean token entropy (nats, mean of last {spg} steps)",
                lambda r: step_curve(r, "entropy", window=spg),
                False,
            ),
            (
                "held-out: distinct correct of 32 samples",
                lambda r: [(p["step"], p["distinct_correct"]) for p in r["probe"]],
                False,
            ),
            ("held-out pass@32", lambda r: [(p["step"], p["pass@32"]) for p in r["probe"]], False),
        ]
        bucket_panels = [
            ("clipped up (A > 0, ratio above the upper bound)\nshare of the bucket's tokens", "clip_up"),
            ("clipped down (A < 0, ratio below the lower bound)\nshare of the bucket's tokens", "clip_down"),
        ]
    curves = plot_curves(plot_dir / f"study_{exp}_curves.png", runs, panels, title)
    bucket_title = f"{tag}: token-weighted over all steps, mean over {n} seeds, error bars = 95% CI over seeds"
    buckets = plot_buckets(plot_dir / f"study_{exp}_buckets.png", metrics, bucket_panels, bucket_title)
    return [curves, buckets]


# ----------------------------------------------------------------------------------------------------- main


def experiment_settings(exp: str, quick: bool) -> dict:
    settings = json.loads(json.dumps(SETTINGS[exp]))
    if quick:
        settings["train"].update(QUICK[exp])
        if settings["task"] == "e2":
            settings["probe_every"] = QUICK["e2_probe_every"]
    return settings


def analyze(args, exp: str, settings: dict) -> tuple[dict, str, list[Path]]:
    runs, metrics, task = {}, {}, settings["task"]
    for method in args.methods:
        for seed in args.seeds:
            run = load_run(args.output_dir / exp / "runs" / f"{method}-s{seed}")
            if run is None:
                continue
            runs.setdefault(method, {})[seed] = run
            if task == "e1":
                m = e1_run_metrics(run, settings["train"]["max_steps"], settings["train"]["steps_per_generation"])
            else:
                m = e2_run_metrics(run)
            metrics.setdefault(method, {})[seed] = m
    if not runs:
        return {}, "", []
    summary, table = summarize(task, metrics)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    write_runs_csv(args.results_dir / f"study_{exp}_runs.csv", metrics)
    (args.results_dir / f"study_{exp}_table.md").write_text(table + "\n")
    extra = {}
    if task == "e1":  # the start distribution of p(rewarded) over prompts (same warm-up for every run)
        first = next(iter(next(iter(runs.values())).values()))
        probs = sorted(first["probe"][0]["p_per_prompt"])
        extra["p_start_per_prompt"] = {
            "min": probs[0], "median": statistics.median(probs), "max": probs[-1],
            "in_0.005_0.05": sum(0.005 <= p <= 0.05 for p in probs), "prompts": len(probs),
        }  # fmt: skip
    (args.results_dir / f"study_{exp}_summary.json").write_text(
        json.dumps({"settings": settings, "seeds": args.seeds, **extra, "rules": summary}, indent=1, default=str)
    )
    tag = {"e1": "E1 tail learning", "e2": "E2 exploration, 16-token walks", "e2s": "E2 at lr 1e-3 (sensitivity)"}[exp]
    plots = make_plots(exp, runs, metrics, args.plot_dir, settings, tag + (" (quick)" if args.quick else ""))
    return summary, table, plots


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.study", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experiments", nargs="+", default=["e1", "e2"], choices=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one torch thread each)")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "outputs" / "study")
    parser.add_argument("--warmup-cache", type=Path, default=ROOT / "outputs" / "study_warmup",
                        help="<dir>/<task>/warmup: the task's warm-up, shared by the full and the quick study")  # fmt: skip
    parser.add_argument("--plot-dir", type=Path, default=STUDY_DIR)
    parser.add_argument("--results-dir", type=Path, default=STUDY_DIR)
    parser.add_argument("--quick", action="store_true", help="clip and Band KL x 2 seeds, short runs")
    parser.add_argument("--plot-only", action="store_true", help="only redo tables and plots from the saved runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.methods, args.seeds = ["clip", "band_kl"], args.seeds[:2]
        if args.output_dir == ROOT / "outputs" / "study":
            args.output_dir = ROOT / "outputs" / "study_quick"
        if args.plot_dir == STUDY_DIR:
            args.plot_dir = args.output_dir
        if args.results_dir == STUDY_DIR:
            args.results_dir = args.output_dir
    args.output_dir = args.output_dir.resolve()
    settings = {exp: experiment_settings(exp, args.quick) for exp in args.experiments}

    started = time.time()
    if not args.plot_only:
        from benchmarks.study_tasks import warm_up_task

        model_dirs = {}  # per task: E2's sensitivity arm shares E2's warm-up
        for exp in args.experiments:
            s, task = settings[exp], settings[exp]["task"]
            if task not in model_dirs:
                path = warm_up_task(task, args.warmup_cache / task, s["warmup_steps"], s["warmup_lr"])
                model_dirs[task] = str(Path(path).resolve())
                print(f"{task} warm-up ready: {model_dirs[task]} ({time.time() - started:.0f} s)", flush=True)
        jobs = []
        for seed in args.seeds:  # seed-major: a partial study still covers every rule
            for exp in args.experiments:
                for method in args.methods:
                    run_dir = args.output_dir / exp / "runs" / f"{method}-s{seed}"
                    cmd = run_command(method, seed, model_dirs[settings[exp]["task"]], run_dir, settings[exp])
                    jobs.append((f"{exp} {method} s{seed}", cmd, run_dir))
        run_queue(jobs, args.jobs)
        print(f"runs finished: {time.time() - started:.0f} s", flush=True)
    for exp in args.experiments:
        _, table, plots = analyze(args, exp, settings[exp])
        print(f"\n## {exp}\n\n{table}\n\nplots: {', '.join(map(str, plots))}")
    print(f"wall time {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
