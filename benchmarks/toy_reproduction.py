"""The paper's claim at small scale: does Band keep exploring where ratio clipping collapses?

On the embedded default's task (recipe `recipes/tiny/bandpo/config_kl.yaml`: the tiny local model, toy arithmetic,
exact-answer reward), from one warmed-up policy shared by every run, it trains with

    clip         canonical GRPO clip [0.8, 1.2]
    clip_higher  Clip-Higher [0.8, 1.28]
    dcpo         DCPO's dynamic bounds (eps_l 0.16, eps_h 0.2)
    band_kl, band_tv, band_chi2   Band at delta = 0.05

for the same number of optimizer steps (equal budgets: same prompts, generations, steps and learning rate), several
optimizer steps per generation batch so that the bounds act, over several seeds. Each run is a subprocess of
`python -m bandpo_trl.train` (clean accelerate state), two at a time on a 2-core machine, one torch thread each.

Recorded per optimizer step (logging_steps = 1): reward (per generation batch), TRL's mean token entropy, TRL's
clip fractions and the trainer's clip fractions by old-probability bucket. Outputs:
- `<output-dir>/runs/<method>-s<seed>/trainer_state.json` (TRL's log) and `<output-dir>/steps.csv` (all runs),
- `<output-dir>/summary.json` and `<output-dir>/table.md`,
- plots `docs/toy_reproduction/toy_reproduction_curves.png` and `..._buckets.png` (`--plot-dir`, `--name`).

From the repository root:

    python -m benchmarks.toy_reproduction              # full: 6 methods x 3 seeds (see --help for the setting)
    python -m benchmarks.toy_reproduction --quick      # 3 methods x 2 seeds, fewer steps: a few minutes
    python -m benchmarks.toy_reproduction --plot-only  # redo the table and plots from the saved runs
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

ROOT = Path(__file__).resolve().parent.parent
PLOT_DIR = ROOT / "docs" / "toy_reproduction"  # the committed plots
RECIPE = ROOT / "recipes" / "tiny" / "bandpo" / "config_kl.yaml"

METHODS = {
    "clip": {"clip_rule": "clip", "epsilon": 0.2, "epsilon_high": 0.2},
    "clip_higher": {"clip_rule": "clip", "epsilon": 0.2, "epsilon_high": 0.28},
    "dcpo": {"clip_rule": "dcpo", "dcpo_epsilon_low": 0.16, "dcpo_epsilon_high": 0.2},
    "band_kl": {"clip_rule": "band", "band_divergence": "kl", "band_delta": 0.05},
    "band_tv": {"clip_rule": "band", "band_divergence": "tv", "band_delta": 0.05},
    "band_chi2": {"clip_rule": "band", "band_divergence": "chi2", "band_delta": 0.05},
}
LABELS = {
    "clip": "clip [0.8, 1.2]",
    "clip_higher": "Clip-Higher [0.8, 1.28]",
    "dcpo": "DCPO",
    "band_kl": "Band KL 0.05",
    "band_tv": "Band TV 0.05",
    "band_chi2": "Band chi2 0.05",
}
COLORS = {
    "clip": "#7f7f7f",
    "clip_higher": "#1f77b4",
    "dcpo": "#9467bd",
    "band_kl": "#d62728",
    "band_tv": "#ff7f0e",
    "band_chi2": "#2ca02c",
}
BUCKETS = ("p<0.01", "p0.01-0.1", "p0.1-0.5", "p>=0.5")
STEP_KEYS = (
    "reward",
    "reward_std",
    "entropy",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "band/lower_mean",
    "band/upper_mean",
    "completions/mean_length",
    "kl",
    *(f"band/{kind}/{b}" for kind in ("tokens", "clip_low", "clip_high") for b in BUCKETS),
)


def run_overrides(args) -> list[str]:
    """Command-line overrides of the recipe shared by every run: the reproduction's setting."""
    return [
        "--max_steps", str(args.steps),
        "--learning_rate", str(args.learning_rate),
        "--lr_scheduler_type", "constant_with_warmup",
        "--warmup_steps", str(args.lr_warmup_steps),
        "--per_device_train_batch_size", str(args.batch_size),
        "--steps_per_generation", str(args.steps_per_generation),
        "--gradient_accumulation_steps", "1",
        "--logging_steps", "1",
        "--save_strategy", "no",
        "--report_to", "none",
        "--disable_tqdm", "true",
        "--torch_num_threads", "1",
    ]  # fmt: skip


def flag_args(options: dict) -> list[str]:
    out = []
    for key, value in options.items():
        out += [f"--{key}", str(value)]
    return out


def warm_up(args) -> str:
    """The recipe's warm-up (bandpo_trl.models.load_tiny), once, cached in <warmup-cache>/warmup; its directory."""
    from bandpo_trl.arguments import make_parser
    from bandpo_trl.models import load_tiny

    _, training_args, _, tiny_args = make_parser().parse_args_and_config(
        args=["--config", str(args.recipe), "--output_dir", str(args.warmup_cache), *args.recipe_overrides]
    )
    return load_tiny(tiny_args, training_args)


def launch(args, method: str, seed: int, model_dir: str) -> tuple[subprocess.Popen, Path, float]:
    run_dir = args.output_dir / "runs" / f"{method}-s{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "bandpo_trl.train",
        "--config", str(args.recipe),
        "--model_name_or_path", model_dir,
        "--output_dir", str(run_dir),
        "--overwrite_output_dir", "true",  # a run not kept above (unfinished, or --force) starts over
        "--seed", str(seed),
        *run_overrides(args),
        *args.recipe_overrides,
        *flag_args(METHODS[method]),
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    log = open(run_dir / "train.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    proc.log = log
    return proc, run_dir, time.time()


def run_all(args, model_dir: str) -> None:
    queue = [(m, s) for s in args.seeds for m in args.methods]  # seed-major: a partial run still covers all methods
    running = []
    while queue or running:
        while queue and len(running) < args.jobs:
            method, seed = queue.pop(0)
            if (args.output_dir / "runs" / f"{method}-s{seed}" / "trainer_state.json").exists() and not args.force:
                print(f"  {method} seed {seed}: already done, kept", flush=True)
                continue
            running.append((method, seed, *launch(args, method, seed, model_dir)))
        time.sleep(1)
        for item in list(running):
            method, seed, proc, run_dir, started = item
            if proc.poll() is None:
                continue
            proc.log.close()
            running.remove(item)
            if proc.returncode != 0:
                tail = (run_dir / "train.log").read_text()[-3000:]
                sys.exit(f"{method} seed {seed} failed (see {run_dir / 'train.log'}):\n{tail}")
            print(f"  {method} seed {seed}: {time.time() - started:.0f} s", flush=True)


# ----------------------------------------------------------------------------------------------------- analysis


def load_runs(args) -> dict[str, dict[int, list[dict]]]:
    """{method: {seed: [per-step records]}} from the runs' trainer_state.json."""
    runs = {}
    for method in args.methods:
        for seed in args.seeds:
            path = args.output_dir / "runs" / f"{method}-s{seed}" / "trainer_state.json"
            if not path.exists():
                continue
            history = json.loads(path.read_text())["log_history"]
            steps = [{"step": h["step"], **{k: h[k] for k in STEP_KEYS if k in h}} for h in history if "loss" in h]
            runs.setdefault(method, {})[seed] = steps
    return runs


def series(steps: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for s in steps:
        if key in s and s[key] is not None and not math.isnan(s[key]):
            xs.append(s["step"])
            ys.append(s[key])
    return xs, ys


def smooth(ys: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(ys)):
        part = ys[max(0, i - window + 1) : i + 1]
        out.append(sum(part) / len(part))
    return out


def tail_mean(steps: list[dict], key: str, fraction: float) -> float:
    _, ys = series(steps, key)
    n = max(1, round(len(ys) * fraction))
    return statistics.fmean(ys[-n:]) if ys else float("nan")


def steps_to_threshold(steps: list[dict], threshold: float, window: int) -> int | None:
    """First optimizer step at which the reward, averaged over the last `window` generation batches, reaches it."""
    xs, ys = series(steps, "reward")
    for x, y in zip(xs, smooth(ys, window)):
        if y >= threshold:
            return x
    return None


def mean_std(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def delta(values: list[float], method: str) -> str:
    if method == "clip" or not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):+.3f} ± {sd:.3f}"


def summarize(args, runs) -> tuple[dict, str]:
    summary = {}
    first = next(iter(next(iter(runs.values())).values()))
    initial_reward = statistics.fmean(
        series(r, "reward")[1][0] for per_seed in runs.values() for r in per_seed.values() if series(r, "reward")[1]
    )
    initial_entropy = statistics.fmean(
        series(r, "entropy")[1][0] for per_seed in runs.values() for r in per_seed.values() if series(r, "entropy")[1]
    )
    threshold = args.threshold
    lines = [
        f"Final = mean over the last {int(args.tail * 100)}% of the {first[-1]['step']} optimizer steps; mean ± std "
        f"over seeds. Start (all runs): reward {initial_reward:.3f}, entropy {initial_entropy:.3f}. Steps to reward "
        f"{threshold}: first step where the reward, averaged over the last {args.window} generation batches, "
        "reaches it (median over the seeds that reach it). Δ vs clip: per-seed difference from the clip run of the "
        "same seed (same prompts, same first samples), mean ± std. Clipped: share of tokens whose ratio is clipped "
        "(TRL's clip_ratio/region_mean) and, among tokens with old p < 0.1, the share clipped up (A > 0) and down "
        "(A < 0); averages over all steps.",
        "",
        "| method | seeds | final reward | final entropy | Δ reward vs clip | Δ entropy vs clip | steps to reward "
        f"{threshold} | clipped tokens | clipped up, p < 0.1 | clipped down, p < 0.1 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in args.methods:
        if method not in runs:
            continue
        per_seed = runs[method]
        reach = [steps_to_threshold(r, threshold, args.window) for r in per_seed.values()]
        reached = [x for x in reach if x is not None]

        def run_mean(key, per_seed=per_seed):
            return [
                statistics.fmean(series(r, key)[1]) if series(r, key)[1] else float("nan") for r in per_seed.values()
            ]

        def low_p(r, kind):
            # share of the tokens with old p < 0.1 clipped up (kind="clip_high") or down, token-weighted over the
            # two low buckets and the steps
            num = den = 0.0
            for s in r:
                for b in BUCKETS[:2]:
                    share = s.get(f"band/tokens/{b}", 0.0)
                    num += share * s.get(f"band/{kind}/{b}", 0.0)
                    den += share
            return num / den if den else float("nan")

        entry = {
            "seeds": sorted(per_seed),
            "final_reward": [tail_mean(r, "reward", args.tail) for r in per_seed.values()],
            "final_entropy": [tail_mean(r, "entropy", args.tail) for r in per_seed.values()],
            "steps_to_threshold": reach,
            "clip_region_mean": run_mean("clip_ratio/region_mean"),
            "clip_high_low_p": [low_p(r, "clip_high") for r in per_seed.values()],
            "clip_low_low_p": [low_p(r, "clip_low") for r in per_seed.values()],
        }
        # Paired by seed: a seed fixes the prompts' order and the first samples for every method.
        base = runs.get("clip", {})
        for key, name in (("reward", "delta_reward_vs_clip"), ("entropy", "delta_entropy_vs_clip")):
            entry[name] = [
                tail_mean(r, key, args.tail) - tail_mean(base[seed], key, args.tail)
                for seed, r in per_seed.items()
                if seed in base
            ]
        summary[method] = entry
        reach_text = (
            f"{statistics.median(reached):.0f} ({len(reached)}/{len(reach)} seeds)"
            if reached
            else f"never (0/{len(reach)})"
        )
        lines.append(
            f"| {LABELS[method]} | {len(per_seed)} | {mean_std(entry['final_reward'])} | "
            f"{mean_std(entry['final_entropy'])} | {delta(entry['delta_reward_vs_clip'], method)} | "
            f"{delta(entry['delta_entropy_vs_clip'], method)} | {reach_text} | {mean_std(entry['clip_region_mean'])} | "
            f"{mean_std(entry['clip_high_low_p'])} | {mean_std(entry['clip_low_low_p'])} |"
        )
    return summary, "\n".join(lines)


def write_csv(args, runs) -> None:
    path = args.output_dir / "steps.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["method", "seed", "step", *STEP_KEYS], extrasaction="ignore")
        writer.writeheader()
        for method, per_seed in runs.items():
            for seed, steps in per_seed.items():
                for s in steps:
                    writer.writerow({"method": method, "seed": seed, **s})


def band_stats(runs, method, key, transform=None):
    """Mean curve and min/max over seeds of `key`, on the steps every seed logged."""
    per_seed = [dict(zip(*series(r, key))) for r in runs[method].values()]
    common = sorted(set.intersection(*(set(d) for d in per_seed)))
    cols = [[d[x] for x in common] for d in per_seed]
    if transform:
        cols = [transform(c) for c in cols]
    mean = [statistics.fmean(v) for v in zip(*cols)]
    return common, mean, [min(v) for v in zip(*cols)], [max(v) for v in zip(*cols)]


def save_small(fig, path: Path) -> None:
    """Save as a 256-colour palette PNG: the plots stay well under 200 KB."""
    from PIL import Image

    fig.savefig(path)
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE)
    small.save(path, optimize=True)


def plot(args, runs) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.plot_dir.mkdir(parents=True, exist_ok=True)
    cycle = args.steps_per_generation  # one generation batch: its first step has ratio 1 and clips nothing
    panels = [
        ("reward", f"reward (per generation batch, mean of last {args.window})", lambda c: smooth(c, args.window)),
        ("entropy", f"mean token entropy (nats, mean of last {cycle} steps)", lambda c: smooth(c, cycle)),
        ("clip_ratio/region_mean", f"clipped tokens (share, mean of last {cycle} steps)", lambda c: smooth(c, cycle)),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=80)
    for ax, (key, title, transform) in zip(axes, panels):
        for method in args.methods:
            if method not in runs:
                continue
            xs, mean, lo, hi = band_stats(runs, method, key, transform)
            ax.plot(xs, mean, color=COLORS[method], label=LABELS[method], lw=1.4)
            ax.fill_between(xs, lo, hi, color=COLORS[method], alpha=0.15, lw=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(
        f"Toy reproduction, {args.steps} steps: mean over {len(args.seeds)} seeds, shaded = min..max over seeds",
        fontsize=10,
    )
    fig.tight_layout()
    curves = args.plot_dir / f"{args.name}_curves.png"
    save_small(fig, curves)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6), dpi=80, sharey=False)
    width = 0.8 / len(runs)
    for ax, kind, title in zip(
        axes,
        ("clip_high", "clip_low"),
        ("clipped up (A > 0, ratio above the upper bound)", "clipped down (A < 0, ratio below the lower bound)"),
    ):
        for i, method in enumerate(m for m in args.methods if m in runs):
            values = []
            for b in BUCKETS:
                per_seed = [statistics.fmean(series(r, f"band/{kind}/{b}")[1] or [0.0]) for r in runs[method].values()]
                values.append(statistics.fmean(per_seed))
            ax.bar(
                [j + i * width for j in range(len(BUCKETS))], values, width, color=COLORS[method], label=LABELS[method]
            )
        ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(BUCKETS))], [f"old {b}" for b in BUCKETS])
        ax.set_title(f"{title}\nshare of the bucket's tokens, mean over steps and seeds", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    buckets = args.plot_dir / f"{args.name}_buckets.png"
    save_small(fig, buckets)
    plt.close(fig)
    return [curves, buckets]


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.toy_reproduction",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=320, help="optimizer steps per run (equal for every method)")
    parser.add_argument("--steps-per-generation", type=int, default=8, help="optimizer steps per generation batch")
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--lr-warmup-steps", type=int, default=20, help="linear learning-rate warm-up, then constant")
    parser.add_argument("--batch-size", type=int, default=32, help="completions per optimizer step")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one torch thread each)")
    parser.add_argument("--threshold", type=float, default=0.6, help="reward level for 'steps to threshold'")
    parser.add_argument("--window", type=int, default=5, help="generation batches averaged for the threshold")
    parser.add_argument("--tail", type=float, default=0.2, help="share of the last steps averaged as 'final'")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "outputs" / "toy_reproduction")
    parser.add_argument("--plot-dir", type=Path, default=PLOT_DIR)
    parser.add_argument("--name", default="toy_reproduction", help="plot files: <plot-dir>/<name>_curves.png, ...")
    parser.add_argument(
        "--warmup-cache",
        type=Path,
        default=ROOT / "outputs" / "toy_reproduction",
        help="where the warm-up is cached (<dir>/warmup), shared by the full and the quick run",
    )
    parser.add_argument("--quick", action="store_true", help="clip, Clip-Higher and Band KL, 2 seeds, 96 steps")
    parser.add_argument("--plot-only", action="store_true", help="only redo the table and plots from saved runs")
    parser.add_argument("--force", action="store_true", help="rerun runs that already have results")
    parser.add_argument("recipe_overrides", nargs="*", help="extra recipe overrides after --, e.g. -- --beta 0")
    args = parser.parse_args()
    if args.quick:
        args.methods = ["clip", "clip_higher", "band_kl"]
        args.seeds = args.seeds[:2]
        args.steps = 96
        if args.output_dir == ROOT / "outputs" / "toy_reproduction":
            args.output_dir = ROOT / "outputs" / "toy_reproduction_quick"
        if args.plot_dir == PLOT_DIR:
            args.plot_dir = args.output_dir
    args.output_dir = args.output_dir.resolve()

    started = time.time()
    if not args.plot_only:
        print(f"setting: {' '.join(run_overrides(args) + args.recipe_overrides)} on {args.recipe}", flush=True)
        model_dir = warm_up(args)
        print(f"warm-up ready in {model_dir} ({time.time() - started:.0f} s)", flush=True)
        run_all(args, model_dir)
    runs = load_runs(args)
    if not runs:
        sys.exit(f"no runs in {args.output_dir}")
    write_csv(args, runs)
    summary, table = summarize(args, runs)
    plots = plot(args, runs)
    (args.output_dir / "table.md").write_text(table + "\n")
    summary_path = args.output_dir / "summary.json"
    wall_s = time.time() - started
    if args.plot_only and summary_path.exists():  # keep the training run's own wall time
        wall_s = json.loads(summary_path.read_text()).get("wall_s", wall_s)
    summary_path.write_text(
        json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "wall_s": wall_s, "methods": summary}, indent=1
        )
    )
    print()
    print(table)
    print()
    print("plots: " + ", ".join(str(p) for p in plots))
    print(f"wall time {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
