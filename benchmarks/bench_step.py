"""Cost of Band in training: `GRPOTrainer` (canonical clip) vs `BandGRPOTrainer` (Band KL), side by side.

Both trainers run the same configuration (same seed, same initial weights, same prompts, same reward) in separate,
interleaved subprocesses (A B, B A, A B, ...), so drift in the machine's load hits both alike. They do identical
work except the clip:
- `steps_per_generation > gradient_accumulation_steps`, so both compute old log-probs and the ratio is not 1;
- `min_new_tokens = max_completion_length`, so every completion has the same length in both runs even after
  their weights diverge (identical tensor shapes, identical FLOPs).

Time: the wall time between consecutive optimizer-step ends (`on_step_end` callback), which covers everything in
the loop: generation (every `steps_per_generation / gradient_accumulation_steps` steps), forward/backward, optimizer,
and the per-step logging (`logging_steps=1`, where Band's extra metrics are reduced). The first `--skip` steps
are dropped (allocator and thread-pool warm-up). Per run we take the median step time; the ratio is the median of
the per-repetition ratios Band / GRPO, each repetition's two runs being adjacent in time.

Memory:
- CPU, `peak RSS`: the process's resident-set high-water mark (`getrusage`, Linux `ru_maxrss`); it includes the
  Python interpreter and libraries (several hundred MiB), so it is reported with `RSS growth`, the high-water
  mark minus the RSS when training starts (psutil).
- CPU, `tensor peak`: the peak of bytes held by torch's CPU allocator during `--profile-steps` optimizer steps,
  above what was held when the window opened, from torch's profiler allocation events (`profile_memory=True`). This
  is the figure closest to CUDA's `max_memory_allocated`: it sees every tensor, and nothing else. It comes from
  one extra, untimed run per trainer (the profiler slows the step).
- CUDA: `torch.cuda.max_memory_allocated()` over the training (reset when training starts).

    python -m benchmarks.bench_step                   # CPU, tiny model, the default recipe's settings, 16 repetitions
    python -m benchmarks.bench_step --quick           # 2 repetitions of 16 steps
    python -m benchmarks.bench_step --device cuda --model qwen2-0.5b --reps 2 --steps 20   # on a GPU, bf16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

TRAINERS = ("grpo", "band")
LABELS = {"grpo": "GRPOTrainer (clip 0.2)", "band": "BandGRPOTrainer (band kl 0.05)"}


# --------------------------------------------------------------------------------------------------- worker


def bench_reward(completions, answer, **kwargs):
    """Dense reward so that groups have non-zero advantages even for a random-init model: the share of the gold
    answer's characters matched at the start of the completion, plus a little for digits."""
    rewards = []
    for text, gold in zip(completions, answer):
        text = text if isinstance(text, str) else "".join(m["content"] for m in text)
        match = 0
        for a, b in zip(text, gold):
            if a != b:
                break
            match += 1
        digits = sum(c.isdigit() for c in text) / max(len(text), 1)
        rewards.append(match / len(gold) + 0.1 * digits)
    return rewards


def build_model(name: str, tokenizer, device: str):
    import torch

    from bandpo_trl.tiny import build_tiny_model

    if name == "tiny":
        return build_tiny_model(tokenizer, seed=0)
    if name == "qwen2-0.5b":
        from transformers import AutoModelForCausalLM, Qwen2Config

        # Qwen2.5-0.5B's shapes (494M parameters with its 151,936-token vocabulary), random init. Ids beyond the
        # character tokenizer's 100 decode to nothing: the reward sees shorter text, the compute is the real one.
        config = Qwen2Config(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        )
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = None
        return model
    raise ValueError(f"unknown model {name!r}: use 'tiny' or 'qwen2-0.5b'")


def prepare_model(args, out_dir: Path) -> Path:
    """Build the random-init model once (seed 0) and save it: both trainers start from these weights."""
    from bandpo_trl.tiny import build_tiny_tokenizer

    path = out_dir / f"model-{args.model}"
    if not (path / "config.json").exists():
        tokenizer = build_tiny_tokenizer()
        build_model(args.model, tokenizer, args.device).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def _profiled_peak_bytes(prof) -> int:
    """Peak of the running sum of CPU allocation sizes (allocations minus frees) seen by the profiler."""
    from torch._C._profiler import _EventType

    allocations = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            allocations.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    total = peak = 0
    for _, size in sorted(allocations):
        total += size
        peak = max(peak, total)
    return peak


def worker(args) -> None:
    import psutil
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from bandpo_trl import BandGRPOConfig, BandGRPOTrainer
    from bandpo_trl.data import load_named_dataset
    from bandpo_trl.tiny import build_tiny_tokenizer

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    from transformers import AutoModelForCausalLM

    tokenizer = build_tiny_tokenizer()
    # Loaded from the directory the driver saved, so that TRL can build the reference model (beta > 0) from it.
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16 if cuda else torch.float32)
    dataset = load_named_dataset("toy_arithmetic", num_samples=4096, seed=0)
    common = dict(
        output_dir=str(Path(args.result).parent / f"run-{args.worker}"),
        per_device_train_batch_size=args.batch,
        num_generations=args.num_generations,
        max_completion_length=args.completion_length,
        generation_kwargs={"min_new_tokens": args.completion_length},
        gradient_accumulation_steps=args.ga,
        steps_per_generation=args.spg,
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        loss_type=args.loss_type,
        beta=args.beta,
        gradient_checkpointing=args.gradient_checkpointing,
        temperature=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        bf16=cuda,
        use_cpu=not cuda,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    if args.worker == "band":
        config = BandGRPOConfig(**common, clip_rule="band", band_divergence="kl", band_delta=0.05)
        trainer_cls = BandGRPOTrainer
    else:
        config = GRPOConfig(**common)
        trainer_cls = GRPOTrainer

    def sync():
        if cuda:
            torch.cuda.synchronize()

    class Probe(TrainerCallback):
        def __init__(self):
            self.times, self.last, self.prof = [], None, None

        def on_train_begin(self, *a, **k):
            sync()
            self.rss_start = psutil.Process().memory_info().rss
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            self.last = time.perf_counter()

        def on_step_end(self, a, state, control, **k):
            sync()
            now = time.perf_counter()
            self.times.append(now - self.last)
            if args.profile_steps:
                if state.global_step == args.skip:
                    self.prof = torch.profiler.profile(
                        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
                    )
                    self.prof.start()
                elif state.global_step == args.skip + args.profile_steps:
                    self.prof.stop()
            self.last = time.perf_counter()  # what the probe itself costs is not counted

    probe = Probe()
    trainer = trainer_cls(
        model=model,
        reward_funcs=bench_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[probe],
    )
    band_code = []  # (optimizer step, seconds) spent in Band's own methods, per call
    if args.worker == "band" and not cuda:
        for name in ("compute_clip_bounds", "log_clip_metrics"):
            method = getattr(trainer, name)

            def timed(*a, _method=method, _name=name, **k):
                start = time.perf_counter()
                try:
                    return _method(*a, **k)
                finally:
                    band_code.append((trainer.state.global_step, _name, time.perf_counter() - start))

            setattr(trainer, name, timed)
    trainer.train()
    steps = [h for h in trainer.state.log_history if "step_time" in h]
    measured = probe.times[args.skip :]
    result = {
        "trainer": args.worker,
        "model": args.model,
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": args.device,
        "threads": torch.get_num_threads(),
        "step_times": probe.times,
        "median_step_s": statistics.median(measured),
        "mean_step_s": statistics.fmean(measured),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_growth_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - probe.rss_start / 2**20,
        "clip_region_mean": statistics.fmean(h.get("clip_ratio/region_mean", 0.0) for h in steps),
        "completion_length": statistics.fmean(
            h["completions/mean_length"] for h in steps if "completions/mean_length" in h
        ),
    }
    if band_code:
        # two timed calls per micro-batch, summed per optimizer step; the steps timed above only
        per_step = {name: [0.0] * args.steps for _, name, _ in band_code}
        for step, name, seconds in band_code:
            per_step[name][step] += seconds
        total = [sum(v) for v in zip(*per_step.values())][args.skip :]
        result["band_code_s_per_step"] = statistics.median(total)
        result["band_code_share"] = sum(total) / sum(measured)
        result["band_code_split_s"] = {name: statistics.median(v[args.skip :]) for name, v in per_step.items()}
    if cuda:
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if probe.prof is not None:
        result["tensor_peak_mib"] = _profiled_peak_bytes(probe.prof) / 2**20
    Path(args.result).write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------------- driver


def start_worker(args, trainer: str, out_dir: Path, tag: str, profile_steps: int = 0):
    result = out_dir / f"{tag}-{trainer}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", trainer, "--result", str(result)]
    cmd += ["--model-dir", str(args.model_dir)]
    for name in (
        "model",
        "device",
        "batch",
        "num_generations",
        "completion_length",
        "ga",
        "spg",
        "steps",
        "skip",
        "threads",
        "learning_rate",
        "loss_type",
        "beta",
    ):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    cmd += ["--profile-steps", str(profile_steps)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(args.threads))
    log = open(out_dir / f"{tag}-{trainer}.log", "w")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), result, log


def finish_worker(handle) -> dict:
    proc, result, log = handle
    proc.wait()
    log.close()
    if proc.returncode != 0:
        sys.exit(f"worker failed, see {log.name}:\n{Path(log.name).read_text()[-4000:]}")
    return json.loads(result.read_text())


def run_worker(args, trainer: str, out_dir: Path, tag: str, profile_steps: int = 0) -> dict:
    return finish_worker(start_worker(args, trainer, out_dir, tag, profile_steps))


# two-sided 95% Student t quantiles by degrees of freedom (beyond 30: normal)
_T95 = {
    1: 12.71,
    2: 4.30,
    3: 3.18,
    4: 2.78,
    5: 2.57,
    6: 2.45,
    7: 2.36,
    8: 2.31,
    9: 2.26,
    10: 2.23,
    12: 2.18,
    15: 2.13,
    20: 2.09,
    25: 2.06,
    30: 2.04,
}


def fmt_ratio(values: list[float]) -> str:
    """Median of the paired ratios, and their geometric mean with a 95% confidence interval (t on log-ratios)."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    logs = [math.log(v) for v in values]
    mean, sem = statistics.fmean(logs), statistics.stdev(logs) / math.sqrt(len(logs))
    df = len(logs) - 1
    t = _T95[max(k for k in _T95 if k <= df)] if df <= 30 else 1.96
    return (
        f"median {statistics.median(values):.4f}; geometric mean {math.exp(mean):.4f}, 95% CI "
        f"[{math.exp(mean - t * sem):.4f}, {math.exp(mean + t * sem):.4f}] over {len(values)} pairs"
    )


def fmt_share(values: list[float]) -> str:
    return f"{100 * statistics.median(values):.2f}% (min {100 * min(values):.2f}%, max {100 * max(values):.2f}%)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=["tiny", "qwen2-0.5b"])
    parser.add_argument("--device", default="cpu")
    # Defaults: the embedded default's recipe (recipes/tiny/bandpo/config_kl.yaml), completions forced to full length.
    parser.add_argument("--reps", type=int, default=16, help="repetitions; each runs both trainers, order alternating")
    parser.add_argument("--steps", type=int, default=48, help="optimizer steps per run")
    parser.add_argument("--skip", type=int, default=4, help="first steps not timed")
    parser.add_argument("--batch", type=int, default=64, help="per_device_train_batch_size")
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--completion-length", type=int, default=4, help="max_completion_length = min_new_tokens")
    parser.add_argument("--ga", type=int, default=1, help="gradient_accumulation_steps")
    parser.add_argument("--spg", type=int, default=4, help="steps_per_generation (> ga: old log-probs exist)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--loss-type", default="grpo")
    parser.add_argument("--beta", type=float, default=0.001, help="KL coefficient (> 0 loads a reference model)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="TRL's default; off in the recipe")
    parser.add_argument("--profile-steps", type=int, default=8, help="steps in the tensor-memory window (CPU)")
    parser.add_argument(
        "--concurrent",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the two trainers of a repetition at the same time (default on CPU; off on CUDA)",
    )
    parser.add_argument("--quick", action="store_true", help="2 repetitions of 16 steps")
    parser.add_argument("--output-dir", default="outputs/bench_step")
    parser.add_argument("--worker", choices=TRAINERS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.reps, args.steps = 2, 16
    if args.concurrent is None:
        args.concurrent = args.device == "cpu"
    if args.spg <= args.ga:
        parser.error("--spg must exceed --ga, or every ratio is 1 and there is nothing to clip")
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    started = time.time()
    args.model_dir = prepare_model(args, out_dir)
    print(
        f"model={args.model} device={args.device} batch={args.batch} generations={args.num_generations} "
        f"completion={args.completion_length} ga={args.ga} spg={args.spg} loss={args.loss_type} beta={args.beta} "
        f"checkpointing={args.gradient_checkpointing} steps={args.steps} (first {args.skip} "
        f"untimed) reps={args.reps} threads={args.threads} concurrent={args.concurrent} load={os.getloadavg()[0]:.2f}",
        flush=True,
    )
    runs = {t: [] for t in TRAINERS}
    for rep in range(args.reps):
        order = TRAINERS if rep % 2 == 0 else TRAINERS[::-1]
        if args.concurrent:  # both at once, each on its own core: they see the same machine load at the same time
            handles = {t: start_worker(args, t, out_dir, f"rep{rep}") for t in order}
            results = {t: finish_worker(handles[t]) for t in order}
        else:  # one after the other, the order alternating (A B, B A, ...)
            results = {t: run_worker(args, t, out_dir, f"rep{rep}") for t in order}
        for trainer in order:
            r = results[trainer]
            runs[trainer].append(r)
            line = (
                f"rep {rep} {trainer:<4} median {r['median_step_s'] * 1e3:8.1f} ms  mean {r['mean_step_s'] * 1e3:8.1f} ms"
                f"  peak RSS {r['peak_rss_mib']:7.1f} MiB (growth {r['rss_growth_mib']:6.1f})"
            )
            if "cuda_peak_mib" in r:
                line += f"  CUDA peak {r['cuda_peak_mib']:8.1f} MiB"
            print(line + f"  clipped {r['clip_region_mean']:.4f}", flush=True)

    profiled = {}
    if args.device != "cuda" and args.profile_steps:
        prof_args = argparse.Namespace(**vars(args))
        prof_args.steps = args.skip + args.profile_steps + 1
        for trainer in TRAINERS:
            profiled[trainer] = run_worker(prof_args, trainer, out_dir, "profile", profile_steps=args.profile_steps)

    def paired(key):
        return [b[key] / a[key] for a, b in zip(runs["grpo"], runs["band"])]

    def med(trainer, key):
        return statistics.median(r[key] for r in runs[trainer])

    first = runs["grpo"][0]
    print()
    print(
        f"parameters {first['parameters']:,}; mean completion length {first['completion_length']:.1f} tokens; "
        f"clipped-token share grpo {med('grpo', 'clip_region_mean'):.4f}, band {med('band', 'clip_region_mean'):.4f}"
    )
    header = f"{'':<32} {'median step ms':>15} {'mean step ms':>13} {'peak RSS MiB':>13} {'RSS growth MiB':>15}"
    extra = []
    if args.device == "cuda":
        header += f" {'CUDA peak MiB':>14}"
        extra.append("cuda_peak_mib")
    if profiled:
        header += f" {'tensor peak MiB':>16}"
    print(header)
    print("-" * len(header))
    for trainer in TRAINERS:
        line = (
            f"{LABELS[trainer]:<32} {med(trainer, 'median_step_s') * 1e3:15.1f} {med(trainer, 'mean_step_s') * 1e3:13.1f}"
            f" {med(trainer, 'peak_rss_mib'):13.1f} {med(trainer, 'rss_growth_mib'):15.1f}"
        )
        if args.device == "cuda":
            line += f" {med(trainer, 'cuda_peak_mib'):14.1f}"
        if profiled:
            line += f" {profiled[trainer]['tensor_peak_mib']:16.2f}"
        print(line)
    summary = {
        "args": {k: str(v) for k, v in vars(args).items() if k not in ("worker", "result")},
        "time_ratio_median_step": paired("median_step_s"),
        "time_ratio_mean_step": paired("mean_step_s"),
        "peak_rss_ratio": paired("peak_rss_mib"),
        "runs": runs,
        "profiled": profiled,
        "wall_s": time.time() - started,
    }
    print()
    print(f"time ratio band/grpo, median step: {fmt_ratio(summary['time_ratio_median_step'])}   (goal <= 1.02)")
    print(f"time ratio band/grpo, mean step:   {fmt_ratio(summary['time_ratio_mean_step'])}")
    print(f"peak RSS ratio band/grpo:          {fmt_ratio(summary['peak_rss_ratio'])}   (goal <= 1.01)")
    if args.device == "cuda":
        summary["cuda_peak_ratio"] = paired("cuda_peak_mib")
        print(f"CUDA peak memory ratio band/grpo:  {fmt_ratio(summary['cuda_peak_ratio'])}   (goal <= 1.01)")
    if profiled:
        a, b = profiled["grpo"]["tensor_peak_mib"], profiled["band"]["tensor_peak_mib"]
        summary["tensor_peak_ratio"] = b / a
        print(f"tensor peak ratio band/grpo:       {b / a:.4f}   ({b - a:+.3f} MiB; goal <= 1.01)")
    shares = [r["band_code_share"] for r in runs["band"] if "band_code_share" in r]
    if shares:
        per_step = statistics.median(r["band_code_s_per_step"] for r in runs["band"]) * 1e3
        summary["band_code_share"] = shares
        split = ", ".join(
            f"{name} {statistics.median(r['band_code_split_s'][name] for r in runs['band']) * 1e3:.2f} ms"
            for name in runs["band"][0]["band_code_split_s"]
        )
        print(
            f"Band's own code, timed inside the Band runs: {per_step:.2f} ms per optimizer step ({split}) = "
            f"{fmt_share(shares)} of the time of all timed steps"
        )
    print(f"wall time {summary['wall_s']:.0f} s; load average now {os.getloadavg()[0]:.2f}")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
