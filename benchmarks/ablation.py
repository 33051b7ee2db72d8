"""Which side of the band does the work? The pre-registered ablation (design and results: docs/ablation.md).

E1 exactly as in the study (`benchmarks/study.py`) with six rules -- clip, Band KL, Band-upper (Band KL's upper bound,
clip's lower), Band-lower (Band KL's lower bound, clip's upper), flat-upper (clip's lower bound, a constant upper bound
equal to Band KL's at E1's start p) and Clip-Higher -- and E1b, E1 with a different start probability on each prompt
(`benchmarks/ablation_tasks.py`), with all of them but Clip-Higher. Seeds 0-9, paired by seed. The one-sided rules
are registered clip rules (`benchmarks/ablation_rules.py`) named by import path. Runs, queue, statistics and plots
are the study's (`benchmarks.study`); this module adds the ablation's rules, contrasts and E1b's analysis.

    python -m benchmarks.ablation              # the full ablation: E1 (6 rules) and E1b (5 rules) x 10 seeds
    python -m benchmarks.ablation --quick      # 5 rules x 2 seeds, 40 steps, same warm-ups: about 5 minutes
    python -m benchmarks.ablation --plot-only  # tables and plots again from the committed per-step logs

Outputs: raw runs in `<output-dir>/<experiment>/runs/<rule>-s<seed>/` (git-ignored); in `<results-dir>` (default
`docs/ablation/`, `--quick`: the output directory): the per-step logs of every run `ablation_<exp>_logs.jsonl.gz`
(the analysis reads only these), per-run values `ablation_<exp>_runs.csv`, E1b's per-prompt values
`ablation_e1b_prompts.csv`, tables `ablation_<exp>_table.md`, summaries `ablation_<exp>_summary.json`, E1b's start
check `ablation_e1b_start.json`, wall time and load `ablation_timing.json`, and the plots `ablation_*.png`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import statistics
import sys
import threading
import time
from pathlib import Path

from benchmarks import study
from benchmarks import toy_reproduction as toy
from benchmarks.ablation_stats import e1_tables, e1b_prompt_steps, e1b_tables, run_metrics

ROOT = Path(__file__).resolve().parent.parent
ABLATION_DIR = ROOT / "docs" / "ablation"
TASKS_MODULE = "benchmarks.ablation_tasks"
RULES_MODULE = "benchmarks.ablation_rules"

_BAND_KL = {"band_divergence": "kl", "band_delta": 0.05}
_CLIP_EPSILONS = {"epsilon": 0.2, "epsilon_high": 0.2}
METHODS = {
    "clip": toy.METHODS["clip"],
    "band_kl": toy.METHODS["band_kl"],
    "band_upper": {"clip_rule": f"{RULES_MODULE}:band_upper", **_BAND_KL, **_CLIP_EPSILONS},
    "band_lower": {"clip_rule": f"{RULES_MODULE}:band_lower", **_BAND_KL, **_CLIP_EPSILONS},
    "flat_upper": {"clip_rule": f"{RULES_MODULE}:flat_upper", **_BAND_KL, **_CLIP_EPSILONS},
    "clip_higher": toy.METHODS["clip_higher"],
}
LABELS = {
    **{m: toy.LABELS[m] for m in ("clip", "band_kl", "clip_higher")},
    "band_upper": "Band-upper [0.8, u_KL(p)]",
    "band_lower": "Band-lower [l_KL(p), 1.2]",
    "flat_upper": "flat-upper [0.8, 5.17]",
}
COLORS = {
    **{m: toy.COLORS[m] for m in ("clip", "band_kl", "clip_higher")},
    "band_upper": "#ff7f0e",
    "band_lower": "#2ca02c",
    "flat_upper": "#8c564b",
}

# E1: the study's setting and warm-up, unchanged. E1b: E1's training with a 60-step budget (the pilot's prompts all
# crossed p > 0.5 by step 15) and its own warm-up (1000 rows per prompt, 1500 steps of batch 256).
SETTINGS = {
    "e1": study.SETTINGS["e1"],
    "e1b": {
        "train": {**study.SETTINGS["e1"]["train"], "max_steps": 60},
        "task": "e1b",
        "probe_every": 1,
        "warmup_steps": 1500,
        "warmup_lr": 3e-3,
        "warmup_batch_size": 256,
    },
}
RULES = {"e1": list(METHODS), "e1b": [m for m in METHODS if m != "clip_higher"]}
SEEDS = list(range(10))
# E1b counts only if the warm-up spreads the start p(z): lowest <= 0.008, highest >= 0.03, and Pearson r >= 0.9
# between log target frequency and log measured p over the 32 prompts.
SPREAD_THRESHOLDS = {"min_at_most": 0.008, "max_at_least": 0.03, "min_correlation": 0.9}
QUICK = {"rules": ["clip", "band_kl", "band_upper", "band_lower", "flat_upper"], "seeds": 2, "max_steps": 40}


def experiment_settings(exp: str, quick: bool) -> dict:
    settings = json.loads(json.dumps(SETTINGS[exp]))
    if quick:
        settings["train"]["max_steps"] = QUICK["max_steps"]
    return settings


# ----------------------------------------------------------------------------------------------------- logs


def rounded(value, digits: int = 6):
    """Floats rounded to `digits` significant digits, recursively: the committed logs stay small."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else value
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    return value


def write_logs(path: Path, runs: dict[str, dict[int, dict]]) -> None:
    """One JSON line per run: rule, seed, the trainer's per-step log records and the probe's records (rounded)."""
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
        for rule, per_seed in runs.items():
            for seed, run in sorted(per_seed.items()):
                line = {"rule": rule, "seed": seed, "steps": rounded(run["steps"]), "probe": rounded(run["probe"])}
                f.write((json.dumps(line, separators=(",", ":")) + "\n").encode())


def read_logs(path: Path) -> dict[str, dict[int, dict]]:
    runs: dict[str, dict[int, dict]] = {}
    with gzip.open(path, "rt") as f:
        for line in f:
            record = json.loads(line)
            runs.setdefault(record["rule"], {})[record["seed"]] = {"steps": record["steps"], "probe": record["probe"]}
    return runs


def collect_runs(output_dir: Path, exp: str, rules: list[str], seeds: list[int]) -> tuple[dict, list[str]]:
    """The finished runs of an experiment (study.load_run) and the names of the configured ones that are missing."""
    runs, missing = {}, []
    for rule in rules:
        for seed in seeds:
            run = study.load_run(output_dir / exp / "runs" / f"{rule}-s{seed}")
            if run is None:
                missing.append(f"{rule}-s{seed}")
            else:
                runs.setdefault(rule, {})[seed] = run
    return runs, missing


# ----------------------------------------------------------------------------------------------------- plots


def plot_e1b_steps(path: Path, start: list[float], targets: list[float], prompt_steps: dict, summary: dict) -> Path:
    """E1b: measured start p against target; steps to p > 0.5 per prompt against start p (mean over seeds, 95% CI);
    the paired difference from clip against start p with the mean per-seed regression line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=80)
    ax = axes[0]
    ax.loglog(targets, start, "o", ms=4, color="#333333")
    ax.loglog([0.004, 0.06], [0.004, 0.06], "--", color="#999999", lw=1)
    ax.set(xlabel="target warm-up frequency of z", ylabel="measured start p(z), exact")
    ax.set_title("E1b start: the warm-up tells the 32 prompts apart", fontsize=9)
    for rule, per_seed in prompt_steps.items():
        cis = [study.mean_ci([per_seed[s][i][0] for s in per_seed]) for i in range(len(start))]
        err = [
            [c[0] - c[1] if not math.isnan(c[1]) else 0 for c in cis],
            [c[2] - c[0] if not math.isnan(c[2]) else 0 for c in cis],
        ]
        axes[1].errorbar(start, [c[0] for c in cis], yerr=err, fmt="o", ms=3, capsize=1.5, lw=0.8,
                         color=COLORS[rule], label=LABELS[rule], alpha=0.85)  # fmt: skip
        if rule == "clip" or rule not in summary:
            continue
        diffs = [statistics.fmean(per_seed[s][i][0] - prompt_steps["clip"][s][i][0] for s in per_seed
                                  if s in prompt_steps["clip"]) for i in range(len(start))]  # fmt: skip
        axes[2].plot(start, diffs, "o", ms=3, color=COLORS[rule], label=LABELS[rule], alpha=0.85)
        intercept, slope = summary[rule]["intercept"]["ci"][0], summary[rule]["slope"]["ci"][0]
        xs = [min(start), max(start)]
        axes[2].plot(xs, [intercept + slope * math.log10(x) for x in xs], color=COLORS[rule], lw=1.2)
    axes[1].set(xscale="log", xlabel="start p(z) of the prompt", ylabel="optimizer steps to p(z) > 0.5")
    axes[1].set_title("steps to p > 0.5 per prompt: mean over seeds, 95% CI", fontsize=9)
    axes[2].axhline(0, color="#999999", lw=1)
    axes[2].set(xscale="log", xlabel="start p(z) of the prompt", ylabel="steps, rule - clip (same seed)")
    axes[2].set_title("paired difference from clip: mean over seeds; line = mean per-seed fit", fontsize=9)
    ticks = [0.005, 0.01, 0.02, 0.05]
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks], minor=False)
        ax.set_xticks([], minor=True)
    axes[0].set_yticks(ticks, [f"{t:g}" for t in ticks], minor=False)
    axes[0].set_yticks([], minor=True)
    axes[1].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    toy.save_small(fig, path)
    plt.close(fig)
    return path


def make_plots(exp: str, runs: dict, metrics: dict, plot_dir: Path, tag: str) -> list[Path]:
    n = max(len(v) for v in runs.values())
    panels = [
        ("mean p(z) over the prompts, exact (log scale)", lambda r: [(p["step"], p["p_rewarded"]) for p in r["probe"]], True),
        ("reward (per generation batch)", lambda r: study.step_curve(r, "reward", shift=1), False),
        ("mean token entropy (nats)", lambda r: study.step_curve(r, "entropy"), False),
    ]  # fmt: skip
    title = f"{tag}: mean over {n} seeds, shaded = 95% CI over seeds"
    curves = study.plot_curves(plot_dir / f"ablation_{exp}_curves.png", runs, panels, title, LABELS, COLORS)
    bucket_panels = [
        ("rewarded (A > 0) tokens clipped up: ratio above the upper bound\n"
         "share of the bucket's A > 0 tokens, steps up to the p > 0.5 crossing", "pre/pos_clip_up"),
        ("A < 0 tokens clipped down: ratio below the lower bound\n"
         "share of the bucket's A < 0 tokens, steps up to the p > 0.5 crossing", "pre/neg_clip_down"),
    ]  # fmt: skip
    bucket_title = (
        f"{tag}: token-weighted over each run's steps up to p > 0.5, mean over {n} seeds, error bars = 95% CI"
    )
    path = plot_dir / f"ablation_{exp}_buckets.png"
    buckets = study.plot_buckets(path, metrics, bucket_panels, bucket_title, LABELS, COLORS)
    return [curves, buckets]


# ----------------------------------------------------------------------------------------------------- analysis


def analyze(exp: str, results_dir: Path, settings: dict, configured: list[str], quick: bool) -> str:
    """Tables, summaries and plots of one experiment from its per-step logs in `results_dir`."""
    logs = results_dir / f"ablation_{exp}_logs.jsonl.gz"
    if not logs.exists():
        return f"no logs: {logs}"
    runs = read_logs(logs)
    runs = {m: runs[m] for m in METHODS if m in runs}
    budget, spg = settings["train"]["max_steps"], settings["train"]["steps_per_generation"]
    metrics = {m: {s: run_metrics(r, budget, spg) for s, r in per_seed.items()} for m, per_seed in runs.items()}
    study.write_runs_csv(results_dir / f"ablation_{exp}_runs.csv", metrics)
    found = {f"{m}-s{s}" for m, per_seed in runs.items() for s in per_seed}
    header = {"settings": settings, "configured_runs": len(configured), "finished_runs": len(found),
              "missing_runs": sorted(set(configured) - found)}  # fmt: skip
    tag = {"e1": "E1 tail learning", "e1b": "E1b: start p spread over prompts"}[exp] + (" (quick)" if quick else "")
    plots = make_plots(exp, runs, metrics, results_dir, tag)
    if exp == "e1":
        summary, table = e1_tables(metrics, LABELS)
    else:
        start = [float(p) for p in next(iter(next(iter(runs.values())).values()))["probe"][0]["p_per_prompt"]]
        prompt_steps = {
            m: {s: e1b_prompt_steps(r, budget) for s, r in per_seed.items()} for m, per_seed in runs.items()
        }
        summary, table = e1b_tables(prompt_steps, start, metrics, LABELS)
        write_prompts_csv(results_dir / "ablation_e1b_prompts.csv", start, prompt_steps)
        from benchmarks.ablation_tasks import e1b_frequency

        targets = [e1b_frequency(i) for i in range(len(start))]
        path = results_dir / "ablation_e1b_steps_vs_p.png"
        plots.append(plot_e1b_steps(path, start, targets, prompt_steps, summary["contrasts_vs_clip"]))
    if header["missing_runs"]:
        table += f"\n\nConfigured runs without a result (not finished): {', '.join(header['missing_runs'])}"
    (results_dir / f"ablation_{exp}_table.md").write_text(table + "\n")
    (results_dir / f"ablation_{exp}_summary.json").write_text(json.dumps({**header, **summary}, indent=1, default=str))
    return f"{table}\n\nplots: {', '.join(str(p) for p in plots)}"


def write_prompts_csv(path: Path, start: list[float], prompt_steps: dict) -> None:
    from benchmarks.ablation_tasks import e1b_prompt

    lines = ["rule,seed,prompt,start_p,steps_to_p05,censored"]
    for rule, per_seed in prompt_steps.items():
        for seed, steps in sorted(per_seed.items()):
            for i, (k, censored) in enumerate(steps):
                lines.append(f"{rule},{seed},{e1b_prompt(i)},{start[i]:.6g},{k},{int(censored)}")
    path.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------------- main


class LoadMonitor:
    """Samples the 1-minute load average every `every` seconds in a background thread (the CPU is shared)."""

    def __init__(self, every: float = 15.0):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        xs = self.samples or [os.getloadavg()[0]]
        return {"min": min(xs), "mean": round(statistics.fmean(xs), 2), "max": max(xs), "samples": len(xs)}


def measure_start(model_dir: str) -> list[float]:
    """E1b's exact start p(z) per prompt from the warmed-up model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.ablation_tasks import e1b_rewarded_probs

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return e1b_rewarded_probs(model, AutoTokenizer.from_pretrained(model_dir))


def run_ablation(args, settings: dict, timing: dict) -> None:
    from benchmarks.ablation_tasks import spread_check
    from benchmarks.study_tasks import warm_up_task

    started = time.time()
    model_dirs, jobs = {}, []
    if "e1" in args.experiments:  # exactly the study's warm-up, in this process as the study makes it
        import torch

        torch.set_num_threads(1)  # the same weights, bit for bit, as with more threads; far faster on a busy machine
        s = settings["e1"]
        model_dirs["e1"] = str(
            Path(warm_up_task("e1", args.warmup_cache / "e1", s["warmup_steps"], s["warmup_lr"])).resolve()
        )
        print(f"e1 warm-up ready ({time.time() - started:.0f} s)", flush=True)
    if "e1b" in args.experiments:  # a job next to E1's runs, one torch thread
        s, cache = settings["e1b"], (args.warmup_cache / "e1b").resolve()
        cmd = [sys.executable, "-m", TASKS_MODULE, "--warm-up", "e1b", "--warmup-cache", str(cache),
               "--warmup-steps", str(s["warmup_steps"]), "--warmup-lr", str(s["warmup_lr"]),
               "--warmup-batch-size", str(s["warmup_batch_size"])]  # fmt: skip
        jobs.append(("e1b warm-up", cmd, cache / "job"))
        model_dirs["e1b"] = str(cache / "warmup")

    def run_jobs(exp: str) -> list[tuple[str, list[str], Path]]:
        out = []
        for seed in args.seeds:  # seed-major: a partial ablation still covers every rule
            for rule in args.rules[exp]:
                run_dir = args.output_dir / exp / "runs" / f"{rule}-s{seed}"
                cmd = study.run_command(rule, seed, model_dirs[exp], run_dir, settings[exp], METHODS, TASKS_MODULE)
                out.append((f"{exp} {rule} s{seed}", cmd, run_dir))
        return out

    if "e1" in args.experiments:
        jobs += run_jobs("e1")
    timing["runs_s"] = dict(study.run_queue(jobs, args.jobs))
    timing["phase1_s"] = round(time.time() - started)
    if "e1b" in args.experiments:
        start = measure_start(model_dirs["e1b"])
        from benchmarks.ablation_tasks import e1b_frequency

        check = spread_check(start, **SPREAD_THRESHOLDS)
        record = {**check, "start_p": start, "target": [e1b_frequency(i) for i in range(len(start))]}
        (args.results_dir / "ablation_e1b_start.json").write_text(json.dumps(rounded(record), indent=1))
        print(f"e1b start p: {check['min']:.4f}-{check['max']:.4f}, r(log) = {check['log_correlation']:.3f}: "
              f"{'passed' if check['passed'] else 'FAILED'}", flush=True)  # fmt: skip
        if check["passed"] or args.quick:  # --quick is a pipeline check: it reports the spread and goes on
            timing["runs_s"].update(study.run_queue(run_jobs("e1b"), args.jobs))
        else:
            print("E1b's warm-up does not spread the start probabilities enough: E1b is not run (see the design)")
            args.experiments = [e for e in args.experiments if e != "e1b"]
    for exp in args.experiments:
        runs, missing = collect_runs(args.output_dir, exp, args.rules[exp], args.seeds)
        if runs:
            write_logs(args.results_dir / f"ablation_{exp}_logs.jsonl.gz", {m: runs[m] for m in METHODS if m in runs})
        if missing:
            print(f"{exp}: missing runs {missing}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ablation", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experiments", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="restrict the rules (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=SEEDS)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one torch thread each)")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "outputs" / "ablation")
    parser.add_argument("--warmup-cache", type=Path, default=ROOT / "outputs" / "ablation_warmup",
                        help="<dir>/<task>/warmup: the warm-ups, shared by the full and the quick ablation")  # fmt: skip
    parser.add_argument("--results-dir", type=Path, default=ABLATION_DIR)
    parser.add_argument("--quick", action="store_true", help="5 rules x 2 seeds, 40 steps, the same warm-ups")
    parser.add_argument("--plot-only", action="store_true", help="tables and plots again from the per-step logs")
    args = parser.parse_args(argv)
    chosen = args.methods or (QUICK["rules"] if args.quick else list(METHODS))
    args.rules = {exp: [m for m in RULES[exp] if m in chosen] for exp in SETTINGS}
    if args.quick:
        args.seeds = args.seeds[: QUICK["seeds"]]
        if args.output_dir == ROOT / "outputs" / "ablation":
            args.output_dir = ROOT / "outputs" / "ablation_quick"
        if args.results_dir == ABLATION_DIR:
            args.results_dir = args.output_dir
    args.output_dir = args.output_dir.resolve()
    args.results_dir.mkdir(parents=True, exist_ok=True)
    settings = {exp: experiment_settings(exp, args.quick) for exp in args.experiments}

    started = time.time()
    if not args.plot_only:
        timing = {"started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "cpus": os.cpu_count()}
        with LoadMonitor() as load:
            run_ablation(args, settings, timing)
        timing.update(wall_s=round(time.time() - started), load_1min=load.summary())
        (args.results_dir / "ablation_timing.json").write_text(json.dumps(timing, indent=1))
        print(f"runs finished: {timing['wall_s']} s, 1-min load {timing['load_1min']}", flush=True)
    for exp in args.experiments:
        configured = [f"{m}-s{s}" for m in args.rules[exp] for s in args.seeds]
        print(f"\n## {exp}\n\n{analyze(exp, args.results_dir, settings[exp], configured, args.quick)}")
    print(f"wall time {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
