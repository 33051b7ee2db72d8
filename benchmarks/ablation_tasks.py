"""The ablation's tasks (docs/ablation.md): the study's E1 and E2 (`benchmarks/study_tasks.py`) plus E1b.

E1b (tail learning from different start probabilities). E1 with one change: the rewarded answer `z` starts at a
different probability on each prompt, spread log-uniformly over 0.005-0.05. 32 prompts `#0` ... `#9`, `#A` ... `#V`,
whose LAST character differs (E1's prompts `#00>` ... all end in `>`, and its warm-up learned only their pooled
frequency). The warm-up set has exactly 1000 rows per prompt: `z` in round(1000 f_i) of them, f_i = 0.005 * 10^(i/31),
the rest `a b c d` with shares 40/30/20/10% rotated per prompt; shuffled with seed 0. Reward, training set and probe
are E1's: reward 1 for `z`, one-token completions, the exact p(`z`) of every prompt after every optimizer step.

A run, like the study's, is one `BandGRPOTrainer` built from `bandpo_trl.train`'s options:

    python -m benchmarks.ablation_tasks --task e1b --model_name_or_path <warm-up dir> --output_dir <run dir> ...

and the warm-up alone (what the ablation runs as a job next to E1's runs):

    python -m benchmarks.ablation_tasks --warm-up e1b --warmup-cache <dir> --warmup-steps 1500 ...
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys

from datasets import Dataset

from benchmarks import study_tasks
from benchmarks.study_tasks import E1_HEAD_WEIGHTS, E1_REWARDED, E1_UNREWARDED, e1_reward, rewarded_probs

E1B_PROMPT_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUV"
E1B_NUM_PROMPTS = len(E1B_PROMPT_CHARS)
E1B_FREQUENCY_RANGE = (0.005, 0.05)
E1B_ROWS_PER_PROMPT = 1000
E1B_SHUFFLE_SEED = 0


def e1b_prompt(i: int) -> str:
    return f"#{E1B_PROMPT_CHARS[i]}"


def e1b_frequency(i: int) -> float:
    """Target warm-up frequency of `z` on prompt i: log-uniform from 0.005 (i = 0) to 0.05 (i = 31)."""
    lo, hi = E1B_FREQUENCY_RANGE
    return math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * i / (E1B_NUM_PROMPTS - 1))


def e1b_warmup_rows(rows_per_prompt: int = E1B_ROWS_PER_PROMPT) -> list[dict]:
    """Supervised warm-up rows: per prompt, `z` in round(f_i * rows) rows (exact counts), the rest over `a b c d`
    by E1's head shares rotated by the prompt index; shuffled with `E1B_SHUFFLE_SEED`."""
    rows = []
    for i in range(E1B_NUM_PROMPTS):
        n_rewarded = round(e1b_frequency(i) * rows_per_prompt)
        rest = rows_per_prompt - n_rewarded
        weights = E1_HEAD_WEIGHTS[i % 4 :] + E1_HEAD_WEIGHTS[: i % 4]
        counts = [round(w * rest) for w in weights]
        counts[0] += rest - sum(counts)
        answers = [E1_REWARDED] * n_rewarded
        for letter, count in zip(E1_UNREWARDED, counts):
            answers += [letter] * count
        rows += [{"prompt": e1b_prompt(i), "completion": a} for a in answers]
    random.Random(E1B_SHUFFLE_SEED).shuffle(rows)
    return rows


def e1b_train_dataset(seed: int, repeats: int = 64) -> Dataset:
    rows = [{"prompt": e1b_prompt(i), "answer": E1_REWARDED} for i in range(E1B_NUM_PROMPTS)] * repeats
    return Dataset.from_list(rows).shuffle(seed=seed)


def e1b_rewarded_probs(model, tokenizer) -> list[float]:
    """Exact p(`z`) as the first completion token of each E1b prompt (temperature 1)."""
    prompts = [e1b_prompt(i) for i in range(E1B_NUM_PROMPTS)]
    return rewarded_probs(model, tokenizer, prompts, [E1_REWARDED] * E1B_NUM_PROMPTS)


def e1b_measure(model, tokenizer, step: int, k: int, seed: int) -> dict:
    probs = e1b_rewarded_probs(model, tokenizer)
    return {"p_rewarded": sum(probs) / len(probs), "p_per_prompt": probs}


def spread_check(probs: list[float], min_at_most: float, max_at_least: float, min_correlation: float) -> dict:
    """The pre-registered check that the warm-up tells E1b's prompts apart: the lowest start p(`z`) is at most
    `min_at_most`, the highest at least `max_at_least`, and the Pearson correlation between log target frequency and
    log measured p is at least `min_correlation`."""
    targets = [math.log(e1b_frequency(i)) for i in range(len(probs))]
    correlation = statistics.correlation(targets, [math.log(p) for p in probs])
    ok = min(probs) <= min_at_most and max(probs) >= max_at_least and correlation >= min_correlation
    return {
        "min": min(probs),
        "median": statistics.median(probs),
        "max": max(probs),
        "max_over_min": max(probs) / min(probs),
        "log_correlation": correlation,
        "thresholds": {"min_at_most": min_at_most, "max_at_least": max_at_least, "min_correlation": min_correlation},
        "passed": ok,
    }


TASKS = {
    **study_tasks.TASKS,
    "e1b": {
        "warmup_rows": e1b_warmup_rows,
        "train_dataset": e1b_train_dataset,
        "reward": e1_reward,
        "measure": e1b_measure,
    },
}


def warm_up(task: str, cache_dir: str, steps: int, learning_rate: float, batch_size: int | None) -> str:
    """The task's warm-up (`study_tasks.warm_up_task`, cached); prints and returns its directory."""
    path = study_tasks.warm_up_task(task, cache_dir, steps, learning_rate, batch_size=batch_size, tasks=TASKS)
    print(f"warm-up ready: {path}", flush=True)
    return path


def main(argv: list[str] | None = None):
    """A run of any task (`study_tasks.main` with E1b added), or with `--warm-up TASK` only that task's warm-up."""
    argv = sys.argv[1:] if argv is None else argv
    if "--warm-up" in argv:
        parser = argparse.ArgumentParser(prog="python -m benchmarks.ablation_tasks --warm-up")
        parser.add_argument("--warm-up", dest="task", choices=list(TASKS), required=True)
        parser.add_argument("--warmup-cache", required=True)
        parser.add_argument("--warmup-steps", type=int, required=True)
        parser.add_argument("--warmup-lr", type=float, required=True)
        parser.add_argument("--warmup-batch-size", type=int, default=None)
        args = parser.parse_args(argv)
        return warm_up(args.task, args.warmup_cache, args.warmup_steps, args.warmup_lr, args.warmup_batch_size)
    return study_tasks.main(argv, tasks=TASKS)


if __name__ == "__main__":
    main()
