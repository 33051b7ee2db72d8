"""Study E3 (pre-registered in docs/smollm2.md): clip, Clip-Higher, DCPO and Band KL on SmolLM2-135M-Instruct.

    python -m benchmarks.e3 run --budget-s 360 --out-archive $OUT/e3_runs.tar.gz   # the study, on one GPU
    python -m benchmarks.e3 run --dry-run --out-archive outputs/e3_dry/e3_runs.tar.gz  # a few steps on the CPU
    python -m benchmarks.e3 analyze outputs/e3 --results-dir docs/e3                 # tables from the runs

`run` starts every run at once (`RULES` x `SEEDS`, each `python -m benchmarks.e3_run` on a recipe of
`recipes/SmolLM2-135M-Instruct/`, one process each, all on the one GPU), with a deadline: runs stop after the first
optimizer step past `budget - STOP_MARGIN_S`, and any still alive at `budget - KILL_MARGIN_S` are killed. While
they run, and once more at the end, everything under the output directory is packed into `--out-archive`
(written whole, then renamed), so a command cut off at its time limit still returns what had finished. The first
process to need the model converts the GGUF (`bandpo_trl.smollm2`, under a file lock); the others wait for it.

`analyze` applies the pre-registered analysis: the analysis step, per-run outcomes, mean and 95% t-interval per rule,
differences from clip paired by seed, and the call. Outputs: `<results-dir>/e3_{runs.csv,table.md,summary.json}`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from benchmarks.study import call, fmt_ci, mean_ci, paired_differences

ROOT = Path(__file__).resolve().parent.parent
RUN_MODULE = "benchmarks.e3_run"  # run with the repository root as working directory
RECIPES = ROOT / "recipes" / "SmolLM2-135M-Instruct"
RULES = {
    "clip": "grpo/config_clip.yaml",
    "clip_higher": "clip_higher/config.yaml",
    "dcpo": "dcpo/config.yaml",
    "band_kl": "bandpo/config_kl.yaml",
}
LABELS = {
    "clip": "clip [0.8, 1.2]",
    "clip_higher": "Clip-Higher [0.8, 1.28]",
    "dcpo": "DCPO",
    "band_kl": "Band KL 0.05",
}
SEEDS = (1, 2, 3, 4, 5)
BENCHMARK = "arithmetic_add1"
K = 8  # samples per held-out problem (the dry run has fewer: read from the records)
BUCKETS = ("p<0.01", "p0.01-0.1", "p0.1-0.5", "p>=0.5")
# Seconds before the end of the budget: no optimizer step starts after `STOP_MARGIN_S` (so the runs' last
# evaluations and the packing fit), and runs still alive at `KILL_MARGIN_S` are killed.
STOP_MARGIN_S = 45
KILL_MARGIN_S = 15
# Minimum of complete clip/Band KL pairs for a verdict.
MIN_PAIRS = 3

# The CPU dry run: the same script and recipes, shrunk to a few seconds of training per run.
DRY_RUN = {
    "seeds": (1,),
    "parallel": 2,
    "overrides": {
        "max_steps": 2,
        "num_generations": 2,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "steps_per_generation": 2,
        "max_completion_length": 8,
        "eval_num_problems": 2,
        "eval_k": 2,
        "eval_every_steps": 1,
        "use_cpu": "true",
        "bf16": "false",
        "torch_num_threads": 1,
        "dataset_num_samples": 64,
    },
}


# ----------------------------------------------------------------------------------------------------------- run


def pack(source: Path, archive: Path) -> None:
    """`source` as a .tar.gz at `archive`, written next to it and renamed, so the archive is always whole."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(archive.name + ".part")
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(source, arcname=source.name)
    os.replace(partial, archive)


def run_command(rule: str, seed: int, run_dir: Path, deadline: float, overrides: dict) -> list[str]:
    command = [
        sys.executable, "-m", RUN_MODULE,
        "--config", str(RECIPES / RULES[rule]),
        "--output_dir", str(run_dir),
        "--seed", str(seed),
        "--deadline", f"{deadline:.0f}",
    ]  # fmt: skip
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    return command


def run_study(args) -> int:
    start = time.time()
    deadline, kill_at = start + args.budget_s - STOP_MARGIN_S, start + args.budget_s - KILL_MARGIN_S
    out_dir = Path(args.output_dir)
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    overrides = dict(DRY_RUN["overrides"]) if args.dry_run else {}
    seeds = DRY_RUN["seeds"] if args.dry_run else args.seeds
    parallel = args.parallel or (DRY_RUN["parallel"] if args.dry_run else len(args.rules) * len(seeds))
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True",
        PYTHONUNBUFFERED="1",
    )
    # Seed-major: if the budget ends with runs still queued, every rule has its first seeds.
    queue = [(rule, seed) for seed in seeds for rule in args.rules]
    active, finished = [], []
    manifest = {"budget_s": args.budget_s, "started": start, "deadline": deadline, "dry_run": args.dry_run, "runs": []}
    last_pack = 0.0

    def log(message: str) -> None:
        line = f"[e3 {time.time() - start:6.1f} s] {message}"
        print(line, flush=True)
        with open(out_dir / "driver.log", "a") as handle:
            handle.write(line + "\n")

    log(
        f"{len(queue)} runs, {parallel} at a time, deadline in {deadline - start:.0f} s, kill in {kill_at - start:.0f} s"
    )
    while queue or active:
        while queue and len(active) < parallel and time.time() < deadline:
            rule, seed = queue.pop(0)
            run_dir = out_dir / "runs" / f"{rule}-s{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            handle = open(run_dir / "train.log", "w")
            command = run_command(rule, seed, run_dir, deadline, overrides)
            proc = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
            active.append({"rule": rule, "seed": seed, "proc": proc, "log": handle, "started": time.time()})
            log(f"started {rule} seed {seed} (pid {proc.pid})")
        if queue and time.time() >= deadline:
            for rule, seed in queue:
                manifest["runs"].append({"rule": rule, "seed": seed, "returncode": None, "status": "not started"})
            log(f"deadline: {len(queue)} runs never started")
            queue = []
        time.sleep(1)
        if time.time() >= kill_at:
            for run in active:
                if run["proc"].poll() is None:
                    log(f"killing {run['rule']} seed {run['seed']} (past the budget)")
                    run["proc"].send_signal(signal.SIGTERM)
            time.sleep(3)
            for run in active:
                if run["proc"].poll() is None:
                    run["proc"].kill()
                run["proc"].wait()
        for run in list(active):
            code = run["proc"].poll()
            if code is None:
                continue
            run["log"].close()
            active.remove(run)
            status = "finished" if code == 0 else "killed" if time.time() >= kill_at else "failed"
            entry = {"rule": run["rule"], "seed": run["seed"], "returncode": code, "status": status}
            entry["wall_s"] = round(time.time() - run["started"], 1)
            manifest["runs"].append(entry)
            finished.append(entry)
            log(f"{run['rule']} seed {run['seed']}: {status} (exit {code}) after {entry['wall_s']} s")
            if code not in (0, None) and status == "failed":
                tail = (out_dir / "runs" / f"{run['rule']}-s{run['seed']}" / "train.log").read_text()[-2000:]
                log(f"tail of its log:\n{tail}")
        if args.out_archive and (time.time() - last_pack > args.pack_every_s or not active):
            (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
            pack(out_dir, Path(args.out_archive))
            last_pack = time.time()
    manifest["elapsed_s"] = round(time.time() - start, 1)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    try:
        summary = analyze(out_dir, out_dir / "analysis", rules=args.rules)
        log(f"analysis step {summary['analysis_step']}: {summary['primary']['call']}")
    except Exception as error:  # the raw runs still come back
        log(f"analysis failed: {error!r}")
    if args.out_archive:
        pack(out_dir, Path(args.out_archive))
        log(f"packed into {args.out_archive} ({Path(args.out_archive).stat().st_size / 2**20:.1f} MiB)")
    failed = [e for e in manifest["runs"] if e["status"] == "failed"]
    log(f"done in {manifest['elapsed_s']} s: {len(finished)} runs ended, {len(failed)} failed")
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------------ analysis


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_run(run_dir: Path) -> dict:
    """A run's records: evaluations, step logs, its run.json (absent when it was killed) and its exit status."""
    run_json = run_dir / "run.json"
    return {
        "evals": {record["step"]: record for record in read_jsonl(run_dir / "eval.jsonl")},
        "logs": [record for record in read_jsonl(run_dir / "log.jsonl") if "loss" in record],
        "run": json.loads(run_json.read_text()) if run_json.is_file() else None,
        "dir": run_dir,
    }


def analysis_step(runs: dict[str, dict[int, dict]], budget: int, crashed: set[tuple[str, int]]) -> int:
    """The pre-registered analysis step: the budget if every clip and Band KL run evaluated it, otherwise the largest
    evaluation step that every clip and Band KL run reached; runs that crashed (and their seed's partner) aside."""
    steps = []
    for rule in ("clip", "band_kl"):
        for seed, run in runs.get(rule, {}).items():
            if (rule, seed) in crashed or ("clip", seed) in crashed or ("band_kl", seed) in crashed:
                continue
            steps.append(max(run["evals"], default=0))
    return min(min(steps, default=0), budget)


def format_metrics(records: list[dict]) -> dict[str, float]:
    """What the policy writes: length in tokens, truncation, no number at all, and the share of replies whose last
    number follows an `=` (an equation such as `23 + 45 = 68`) or that are a bare number."""
    completions = [c for record in records for c in record.get("completions", [])]
    tokens = [t for record in records for t in record["completion_tokens"]]
    finished = [f for record in records for f in record["finished"]]
    answers = [a for record in records for a in record["answers"]]
    n = max(len(tokens), 1)
    equation = sum(bool(re.search(r"=\s*-?\d+(?:\.\d+)?\D*$", c.strip())) for c in completions)
    bare = sum(bool(re.fullmatch(r"-?\d+(?:\.\d+)?\.?", c.strip())) for c in completions)
    return {
        "mean_tokens": sum(tokens) / n,
        "truncated": 1 - sum(finished) / n,
        "no_number": sum(a is None for a in answers) / n,
        "equation_format": equation / max(len(completions), 1),
        "bare_number": bare / max(len(completions), 1),
    }


def bucket_fraction(logs: list[dict], kind: str, bucket: str) -> float:
    """Token-weighted fraction of the bucket's tokens clipped (kind: clip_high = up, clip_low = down) over steps."""
    num = sum(s.get(f"band/{kind}/{bucket}", 0.0) * s.get(f"band/tokens/{bucket}", 0.0) for s in logs)
    den = sum(s.get(f"band/tokens/{bucket}", 0.0) for s in logs if f"band/{kind}/{bucket}" in s)
    return num / den if den else math.nan


def eval_value(record: dict, name: str) -> float:
    """`mean@k` / `pass@k` of an evaluation record, whatever its k (the dry run samples fewer than K)."""
    key = next(
        (k for k in record if re.fullmatch(rf"eval/{BENCHMARK}/{name}@(\d+)", k) and not k.endswith("@1")), None
    )
    return record[key] if key else math.nan


def run_metrics(run: dict, step: int) -> dict:
    evaluation, start = run["evals"][step], run["evals"][0]
    logs = [s for s in run["logs"] if s["step"] <= step]
    entropy = [s["entropy"] for s in logs if "entropy" in s]
    rewards = [s["reward"] for s in logs if "reward" in s]
    out = {
        f"mean@{K}": eval_value(evaluation, "mean"),
        f"pass@{K}": eval_value(evaluation, "pass"),
        f"mean@{K}_start": eval_value(start, "mean"),
        f"pass@{K}_start": eval_value(start, "pass"),
        "entropy_mean": statistics.fmean(entropy) if entropy else math.nan,
        "entropy_first": entropy[0] if entropy else math.nan,
        "entropy_last": entropy[-1] if entropy else math.nan,
        "reward_first": rewards[0] if rewards else math.nan,
        "reward_last_quarter": statistics.fmean(rewards[-max(1, len(rewards) // 4) :]) if rewards else math.nan,
        "completion_length_last": logs[-1].get("completions/mean_length", math.nan) if logs else math.nan,
    }
    for bucket in BUCKETS:
        out[f"clip_up/{bucket}"] = bucket_fraction(logs, "clip_high", bucket)
        out[f"clip_down/{bucket}"] = bucket_fraction(logs, "clip_low", bucket)
    records = read_jsonl(run["dir"] / "benchmark_eval" / f"step-{step}" / f"{BENCHMARK}.jsonl")
    if records:
        out.update({f"learned/{key}": value for key, value in format_metrics(records).items()})
    return out


# (key, label, called: the pre-registered better/worse call applies, digits)
OUTCOMES = [
    (f"mean@{K}", f"held-out mean@{K} (primary)", True, 3),
    (f"pass@{K}", f"held-out pass@{K}", True, 3),
    ("entropy_mean", "mean token entropy over training (nats)", False, 3),
    ("clip_up/p<0.01", "clipped up, old p < 0.01", False, 4),
    ("clip_up/p0.01-0.1", "clipped up, old p 0.01-0.1", False, 4),
    ("clip_up/p>=0.5", "clipped up, old p >= 0.5", False, 4),
    ("clip_down/p>=0.5", "clipped down, old p >= 0.5", False, 4),
    ("learned/mean_tokens", "held-out reply length (tokens)", False, 1),
    ("learned/equation_format", "replies ending in '= N'", False, 3),
]


def analyze(runs_dir: Path, results_dir: Path, rules=tuple(RULES), budget: int | None = None) -> dict:
    """The pre-registered analysis of the runs under `runs_dir/runs`; writes the tables to `results_dir`."""
    runs_dir, results_dir = Path(runs_dir), Path(results_dir)
    manifest_path = runs_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"runs": []}
    crashed = {(e["rule"], e["seed"]) for e in manifest["runs"] if e["status"] == "failed"}
    runs: dict[str, dict[int, dict]] = {}
    for run_dir in sorted((runs_dir / "runs").glob("*-s*")):
        rule, seed = run_dir.name.rsplit("-s", 1)
        if rule in rules:
            runs.setdefault(rule, {})[int(seed)] = load_run(run_dir)
    if budget is None:
        budgets = [r["run"]["max_steps"] for per in runs.values() for r in per.values() if r["run"]]
        budget = (
            max(budgets)
            if budgets
            else max((max(r["evals"], default=0) for p in runs.values() for r in p.values()), default=0)
        )
    step = analysis_step(runs, budget, crashed)
    metrics = {
        rule: {
            seed: run_metrics(run, step)
            for seed, run in per_seed.items()
            if step in run["evals"] and 0 in run["evals"] and (rule, seed) not in crashed
        }
        for rule, per_seed in runs.items()
    }
    summary = {"analysis_step": step, "budget": budget, "crashed": sorted(crashed), "rules": {}}
    base = metrics.get("clip", {})
    for rule in [r for r in rules if r in metrics]:
        per_seed = metrics[rule]
        entry = {
            "seeds": sorted(per_seed),
            "complete": sorted(s for s, r in runs[rule].items() if r["run"] and r["run"]["completed"]),
        }
        for key, _, called, _ in OUTCOMES:
            values = {seed: m.get(key, math.nan) for seed, m in per_seed.items()}
            entry[key] = {"per_seed": values, "ci": mean_ci(list(values.values()))}
            if rule != "clip" and base:
                diffs = paired_differences(values, {s: m.get(key, math.nan) for s, m in base.items()})
                entry[key]["diff_vs_clip"] = diffs
                entry[key]["diff_ci"] = mean_ci(diffs)
                entry[key]["call"] = call(entry[key]["diff_ci"], lower_is_better=False) if called else ""
        summary["rules"][rule] = entry
    pairs = len(summary["rules"].get("band_kl", {}).get(f"mean@{K}", {}).get("diff_vs_clip", []))
    primary = summary["rules"].get("band_kl", {}).get(f"mean@{K}", {})
    if step == 0 or pairs < MIN_PAIRS:
        verdict = f"inconclusive: {pairs} complete clip/Band KL pairs at step {step} (fewer than {MIN_PAIRS})"
    else:
        verdict = primary.get("call", "n/a")
        if step < budget:
            verdict += f" (at step {step} of the {budget}-step budget)"
    summary["primary"] = {"pairs": pairs, "diff_ci": primary.get("diff_ci"), "call": verdict}

    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "e3_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    write_runs_csv(results_dir / "e3_runs.csv", metrics, runs)
    (results_dir / "e3_table.md").write_text(table(summary, rules))
    return summary


def table(summary: dict, rules) -> str:
    present = [r for r in rules if r in summary["rules"]]
    header = "| rule | seeds | " + " | ".join(label for _, label, _, _ in OUTCOMES) + " |"
    rule_line = "|---" * (len(OUTCOMES) + 2) + "|"
    lines = [
        f"Analysis step {summary['analysis_step']} of the {summary['budget']}-step budget.",
        "",
        header,
        rule_line,
    ]
    for rule in present:
        entry = summary["rules"][rule]
        cells = [fmt_ci(entry[key]["ci"], digits) for key, _, _, digits in OUTCOMES]
        lines.append(f"| {LABELS[rule]} | {len(entry['seeds'])} | " + " | ".join(cells) + " |")
    lines += ["", "Difference from clip, paired by seed, mean [95% CI], and the pre-registered call:", ""]
    lines += [header.replace("| seeds |", "| pairs |"), rule_line]
    for rule in present:
        if rule == "clip":
            continue
        entry, cells = summary["rules"][rule], []
        for key, _, _, digits in OUTCOMES:
            if "diff_ci" not in entry[key]:
                cells.append("n/a")
                continue
            text = fmt_ci(entry[key]["diff_ci"], digits, sign=True)
            cells.append(f"{text} ({entry[key]['call']})" if entry[key]["call"] else text)
        pairs = len(entry[OUTCOMES[0][0]].get("diff_vs_clip", []))
        lines.append(f"| {LABELS[rule]} | {pairs} | " + " | ".join(cells) + " |")
    lines += ["", f"Primary outcome (Band KL minus clip, held-out mean@{K}): **{summary['primary']['call']}**"]
    if summary["crashed"]:
        lines.append(f"Crashed runs (excluded with their pair): {summary['crashed']}")
    return "\n".join(lines) + "\n"


def write_runs_csv(path: Path, metrics: dict, runs: dict) -> None:
    keys = sorted({k for per_seed in metrics.values() for m in per_seed.values() for k in m})
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["rule", "seed", "completed", "last_eval_step", *keys])
        for rule, per_seed in runs.items():
            for seed, run in sorted(per_seed.items()):
                m = metrics.get(rule, {}).get(seed, {})
                completed = bool(run["run"] and run["run"]["completed"])
                row = [round(m[k], 5) if isinstance(m.get(k), float) else m.get(k, "") for k in keys]
                writer.writerow([rule, seed, completed, max(run["evals"], default=""), *row])


# ----------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the study (every rule x seed at once) and pack the results")
    run.add_argument("--output-dir", default="outputs/e3")
    run.add_argument("--out-archive", default=None, help="pack the output directory into this .tar.gz as runs end")
    run.add_argument("--budget-s", type=float, default=360, help="wall-clock budget of the whole command")
    run.add_argument("--parallel", type=int, default=None, help="runs at once (default: all of them)")
    run.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    run.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    run.add_argument("--pack-every-s", type=float, default=30)
    run.add_argument("--dry-run", action="store_true", help="CPU, 1 seed, 2 steps per run, tiny batches")
    ana = sub.add_parser("analyze", help="the pre-registered analysis of finished runs")
    ana.add_argument("runs_dir")
    ana.add_argument("--results-dir", default="docs/e3")
    args = parser.parse_args(argv)
    if args.command == "run":
        return run_study(args)
    summary = analyze(Path(args.runs_dir), Path(args.results_dir))
    print((Path(args.results_dir) / "e3_table.md").read_text())
    return 0 if summary["analysis_step"] else 1


if __name__ == "__main__":
    sys.exit(main())
