"""The two tasks of the study (docs/study.md): E1 tail learning and E2 exploration over long completions.

Each task defines its prompts, its supervised warm-up set, its reward, and a probe (a `TrainerCallback`) that
measures what the study needs during training. A run is one `BandGRPOTrainer` (the project's trainer, TRL's
training loop) built from the options of `bandpo_trl.train` and the task's dataset:

    python -m benchmarks.study_tasks --task e1 --model_name_or_path <warm-up dir> --output_dir <run dir> \
        --clip_rule band --band_divergence kl ...   # any bandpo_trl.train option

E1 (tail learning). 32 prompts `#00>` ... `#31>`; the answer is one character. The rewarded answer is `z`; the
warm-up data give it to prompt i with frequency 0.5%, 1%, 2% or 4% (i mod 4; 8 prompts each) and spread the rest
over the unrewarded answers `a b c d` (shares 40/30/20/10%, rotated per prompt). Reward 1 if the completion's first character is the prompt's
rewarded answer, else 0. Completions are one token long (`max_completion_length=1`), so every sampled token is an
answer. Probe: the exact probability of the rewarded answer on each prompt, from the policy's logits (temperature 1,
as sampled), every optimizer step.

E2 (exploration over long completions). Prompt `s>e:` (digits s, e of equal parity); a correct completion is a walk
of exactly 16 digits w1..w16 with |w1 - s| = 1, |w_i - w_{i-1}| = 1 and w16 = e (digits stay in 0..9). Every prompt
has hundreds to thousands of correct completions. 40 of the 50 (s, e) pairs are trained on, 10 are held out. The
warm-up set mixes uniformly drawn correct walks with unconstrained random walks (mostly ending elsewhere). Reward 1
for a correct completion, else 0. Probe, every `--probe-every` steps: 32 samples per held-out prompt (temperature 1)
-> correct share, distinct correct completions, pass@k (unbiased, `bandpo_trl.metrics`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback

from bandpo_trl import BandGRPOTrainer
from bandpo_trl.arguments import make_parser
from bandpo_trl.clip_metrics import PROB_BUCKETS, in_bucket
from bandpo_trl.metrics import problem_pass_at_k
from bandpo_trl.models import load_tokenizer, model_init_kwargs
from bandpo_trl.rewards import completion_text

# ------------------------------------------------------------------------------------------------------------ E1

E1_NUM_PROMPTS = 32
E1_REWARDED = "z"
E1_UNREWARDED = "abcd"
E1_FREQUENCIES = (0.005, 0.01, 0.02, 0.04)
E1_ROWS_PER_PROMPT = 400
# Shares of the unrewarded answers (rotated per prompt), so each prompt has its own head.
E1_HEAD_WEIGHTS = (0.4, 0.3, 0.2, 0.1)


def e1_prompt(i: int) -> str:
    return f"#{i:02d}>"


def e1_rewarded(i: int) -> str:
    return E1_REWARDED


def e1_frequency(i: int) -> float:
    """Warm-up frequency of the rewarded answer on prompt i: 0.5%, 1%, 2%, 4% for i mod 4 = 0, 1, 2, 3."""
    return E1_FREQUENCIES[i % len(E1_FREQUENCIES)]


def e1_warmup_rows(rows_per_prompt: int = E1_ROWS_PER_PROMPT) -> list[dict]:
    """Supervised warm-up rows: for each prompt, the rewarded answer in round(f * rows) rows, the rest split over
    the unrewarded answers by `E1_HEAD_WEIGHTS` (rotated by the prompt index)."""
    rows = []
    for i in range(E1_NUM_PROMPTS):
        n_rewarded = round(e1_frequency(i) * rows_per_prompt)
        rest = rows_per_prompt - n_rewarded
        weights = E1_HEAD_WEIGHTS[i % 4 :] + E1_HEAD_WEIGHTS[: i % 4]
        counts = [round(w * rest) for w in weights]
        counts[0] += rest - sum(counts)
        answers = [e1_rewarded(i)] * n_rewarded
        for letter, count in zip(E1_UNREWARDED, counts):
            answers += [letter] * count
        rows += [{"prompt": e1_prompt(i), "completion": a} for a in answers]
    random.Random("e1-warmup").shuffle(rows)
    return rows


def e1_train_dataset(seed: int, repeats: int = 64) -> Dataset:
    rows = [{"prompt": e1_prompt(i), "answer": e1_rewarded(i)} for i in range(E1_NUM_PROMPTS)] * repeats
    return Dataset.from_list(rows).shuffle(seed=seed)


def e1_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    """1.0 if the completion starts with the prompt's rewarded answer.

    >>> e1_reward(["w", "a", "x", ""], answer=["w", "w", "w", "w"])
    [1.0, 0.0, 0.0, 0.0]
    """
    return [1.0 if completion_text(c).startswith(a) else 0.0 for c, a in zip(completions, answer, strict=True)]


@torch.no_grad()
def rewarded_probs(model, tokenizer, prompts: list[str], answers: list[str]) -> list[float]:
    """Probability of each prompt's one-token answer as the first completion token (temperature 1). The prompts must
    tokenize to the same length (no padding)."""
    ids = tokenizer(prompts, return_tensors="pt")["input_ids"]
    targets = torch.tensor([tokenizer.convert_tokens_to_ids(a) for a in answers])
    logits = model(input_ids=ids.to(model.device)).logits[:, -1].float()
    return logits.softmax(-1).gather(1, targets[:, None].to(logits.device))[:, 0].tolist()


def e1_rewarded_probs(model, tokenizer) -> list[float]:
    """Probability of each E1 prompt's rewarded answer as the first completion token (temperature 1)."""
    prompts = [e1_prompt(i) for i in range(E1_NUM_PROMPTS)]
    return rewarded_probs(model, tokenizer, prompts, [e1_rewarded(i) for i in range(E1_NUM_PROMPTS)])


def e1_measure(model, tokenizer, step: int, k: int, seed: int) -> dict:
    """E1's probe record: the exact p(rewarded) per prompt and its mean."""
    probs = e1_rewarded_probs(model, tokenizer)
    return {"p_rewarded": sum(probs) / len(probs), "p_per_prompt": probs}


# ------------------------------------------------------------------------------------------------------------ E2

E2_LENGTH = 16
E2_HELD_OUT = ((0, 4), (1, 7), (2, 2), (3, 9), (4, 0), (5, 5), (6, 8), (7, 1), (8, 6), (9, 3))
E2_PAIRS = tuple((s, e) for s in range(10) for e in range(10) if (s - e) % 2 == 0)
E2_TRAIN = tuple(p for p in E2_PAIRS if p not in E2_HELD_OUT)
E2_ROWS_PER_PAIR = 160
E2_CORRECT_SHARE = 0.5


def e2_prompt(s: int, e: int) -> str:
    return f"{s}>{e}:"


def e2_neighbours(d: int) -> tuple[int, ...]:
    return tuple(x for x in (d - 1, d + 1) if 0 <= x <= 9)


def e2_count_table(length: int = E2_LENGTH) -> list[list[int]]:
    """ways[k][d * 10 + e]: the number of k-step walks (each step +-1, staying inside 0..9) from digit d to digit e."""
    ways = [[1 if d == e else 0 for d in range(10) for e in range(10)]]
    for _ in range(length):
        prev = ways[-1]
        ways.append([sum(prev[n * 10 + e] for n in e2_neighbours(d)) for d in range(10) for e in range(10)])
    return ways


_E2_WAYS = e2_count_table()


def e2_num_correct(s: int, e: int, length: int = E2_LENGTH) -> int:
    """How many distinct correct completions the prompt `s>e:` has."""
    return _E2_WAYS[length][s * 10 + e]


def e2_uniform_walk(s: int, e: int, rng: random.Random, length: int = E2_LENGTH) -> str:
    """A correct walk from s to e drawn uniformly among all correct ones."""
    out, d = [], s
    for k in range(length, 0, -1):
        options = [n for n in e2_neighbours(d) if _E2_WAYS[k - 1][n * 10 + e] > 0]
        d = rng.choices(options, weights=[_E2_WAYS[k - 1][n * 10 + e] for n in options])[0]
        out.append(str(d))
    return "".join(out)


def e2_random_walk(s: int, rng: random.Random, length: int = E2_LENGTH) -> str:
    out, d = [], s
    for _ in range(length):
        d = rng.choice(e2_neighbours(d))
        out.append(str(d))
    return "".join(out)


def e2_is_correct(s: int, e: int, text: str, length: int = E2_LENGTH) -> bool:
    """
    >>> e2_is_correct(3, 3, "4343434343434343"), e2_is_correct(3, 5, "4343434343434343"), e2_is_correct(3, 3, "43")
    (True, False, False)
    """
    if len(text) != length or not text.isdigit():
        return False
    prev = s
    for ch in text:
        if abs(int(ch) - prev) != 1:
            return False
        prev = int(ch)
    return prev == e


def e2_warmup_rows(rows_per_pair: int = E2_ROWS_PER_PAIR, correct_share: float = E2_CORRECT_SHARE) -> list[dict]:
    rng = random.Random("e2-warmup")
    rows = []
    for s, e in E2_TRAIN:
        n_correct = round(correct_share * rows_per_pair)
        walks = [e2_uniform_walk(s, e, rng) for _ in range(n_correct)]
        walks += [e2_random_walk(s, rng) for _ in range(rows_per_pair - n_correct)]
        rows += [{"prompt": e2_prompt(s, e), "completion": w} for w in walks]
    rng.shuffle(rows)
    return rows


def e2_train_dataset(seed: int, repeats: int = 64) -> Dataset:
    rows = [{"prompt": e2_prompt(s, e), "answer": e2_prompt(s, e)} for s, e in E2_TRAIN] * repeats
    return Dataset.from_list(rows).shuffle(seed=seed)


def e2_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    """1.0 for a correct walk; `answer` carries the prompt `s>e:`.

    >>> e2_reward(["4343434343434343", "4343434343434345"], answer=["3>3:", "3>3:"])
    [1.0, 0.0]
    """
    return [
        1.0 if e2_is_correct(int(a[0]), int(a[2]), completion_text(c).strip()) else 0.0
        for c, a in zip(completions, answer, strict=True)
    ]


@torch.no_grad()
def e2_sample_held_out(model, tokenizer, k: int, seed: int) -> dict:
    """k samples per held-out prompt (temperature 1, no top-k/top-p, the training sampler's settings): correct share,
    distinct correct completions per prompt, pass@1/8/k. Uses its own random stream (training's is untouched)."""
    prompts = [e2_prompt(s, e) for s, e in E2_HELD_OUT]
    ids = tokenizer(prompts, return_tensors="pt")["input_ids"].to(model.device)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=E2_LENGTH + 1,
            num_return_sequences=k,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    model.train(was_training)
    texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    correct, distinct = [], []
    for j, (s, e) in enumerate(E2_HELD_OUT):
        samples = [t.strip() for t in texts[j * k : (j + 1) * k]]
        flags = [e2_is_correct(s, e, t) for t in samples]
        correct.append(flags)
        distinct.append(len({t for t, ok in zip(samples, flags) if ok}))
    return {
        "accuracy": sum(map(sum, correct)) / (len(correct) * k),
        "distinct_correct": sum(distinct) / len(distinct),
        "distinct_correct_per_prompt": distinct,
        **{f"pass@{n}": problem_pass_at_k(correct, n) for n in sorted({1, min(8, k), k})},
    }


def e2_measure(model, tokenizer, step: int, k: int, seed: int) -> dict:
    """E2's probe record: k held-out samples per prompt from a stream fixed by the run's seed and the step."""
    return e2_sample_held_out(model, tokenizer, k, seed=seed * 100_003 + step)


# ------------------------------------------------------------------------------------------------- probes, trainer


class Probe(TrainerCallback):
    """Measures the task's quantity (`measure(model, tokenizer, step, k, seed) -> dict`) at the start and every
    `every` optimizer steps; writes `<run>/probe.json`."""

    def __init__(self, measure, tokenizer, output_dir: str, every: int, k: int, seed: int):
        self.measure_fn, self.tokenizer, self.path = measure, tokenizer, Path(output_dir) / "probe.json"
        self.every, self.k, self.seed = every, k, seed
        self.records: list[dict] = []

    def measure(self, model, step: int) -> None:
        self.records.append({"step": step, **self.measure_fn(model, self.tokenizer, step, self.k, self.seed)})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.measure(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.measure(model, state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.path.write_text(json.dumps(self.records))


class StudyTrainer(BandGRPOTrainer):
    """`BandGRPOTrainer` plus per-bucket counts of the positive-advantage tokens (in E1: the rewarded answers),
    `study/pos_tokens/<bucket>` and `study/pos_clip_high/<bucket>` (ratio above the upper bound), and of the
    negative-advantage tokens, `study/neg_tokens/<bucket>` and `study/neg_clip_low/<bucket>` (ratio below the lower
    bound). Counts, so that a run's fraction is a token-weighted sum over steps. Nothing else changes."""

    def clip_metric_sums(self, old_logps, logps, lower, upper, advantages, mask):
        sums = super().clip_metric_sums(old_logps, logps, lower, upper, advantages, mask)
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        ratio = torch.exp(logps - old_logps)
        positive = (advantages > 0).float() * mask
        negative = (advantages < 0).float() * mask
        high = (ratio > upper).float() * positive
        low = (ratio < lower).float() * negative
        probs = torch.exp(old_logps)
        for lo, hi, name in PROB_BUCKETS:
            bucket = in_bucket(probs, lo, hi)
            sums[f"study/pos_tokens/{name}"] = (bucket * positive).sum()
            sums[f"study/pos_clip_high/{name}"] = (bucket * high).sum()
            sums[f"study/neg_tokens/{name}"] = (bucket * negative).sum()
            sums[f"study/neg_clip_low/{name}"] = (bucket * low).sum()
        return sums

    def clip_metrics_from_sums(self, totals):
        metrics = super().clip_metrics_from_sums(totals)
        metrics.update({name: value for name, value in totals.items() if name.startswith("study/")})
        return metrics


# A task: its warm-up rows, its training set (by seed), its reward function and its probe's measurement.
TASKS = {
    "e1": {
        "warmup_rows": e1_warmup_rows,
        "train_dataset": e1_train_dataset,
        "reward": e1_reward,
        "measure": e1_measure,
    },
    "e2": {
        "warmup_rows": e2_warmup_rows,
        "train_dataset": e2_train_dataset,
        "reward": e2_reward,
        "measure": e2_measure,
    },
}


def warm_up_task(
    task: str,
    cache_dir: str | os.PathLike,
    steps: int,
    learning_rate: float,
    seed: int = 0,
    batch_size: int | None = None,
    tasks: dict = TASKS,
) -> str:
    """The task's supervised warm-up of the tiny model (`bandpo_trl.tiny.warm_up_cached`), shared by every run;
    `batch_size` None keeps `warm_up`'s default (64)."""
    from bandpo_trl.tiny import warm_up_cached

    rows = tasks[task]["warmup_rows"]()
    extra = {} if batch_size is None else {"batch_size": batch_size}  # the cache key of the study's warm-ups is kept
    return warm_up_cached(
        str(cache_dir),
        Dataset.from_list(rows),
        model_kwargs={"seed": seed},
        max_steps=steps,
        learning_rate=learning_rate,
        seed=seed,
        **extra,
    )


def main(argv: list[str] | None = None, tasks: dict = TASKS) -> BandGRPOTrainer:
    """One run: `bandpo_trl.train`'s options (parsed by its own parser) with the task's data, reward and probe."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--task", choices=list(tasks), required=True)
    parser.add_argument("--probe_every", type=int, default=1)
    parser.add_argument("--probe_k", type=int, default=32)
    known, rest = parser.parse_known_args(argv)
    script_args, training_args, model_args, _ = make_parser().parse_args_and_config(args=rest)
    torch.set_num_threads(script_args.torch_num_threads or 1)
    # The warmed-up model is loaded by TRL's trainer from its directory, as `bandpo-train` loads any model.
    tokenizer = load_tokenizer(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    task = tasks[known.task]
    probe = Probe(
        task["measure"], tokenizer, training_args.output_dir, known.probe_every, known.probe_k, training_args.seed
    )
    trainer = StudyTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=[task["reward"]],
        args=training_args,
        train_dataset=task["train_dataset"](training_args.seed),
        processing_class=tokenizer,
        callbacks=[probe],
    )
    trainer.train()
    trainer.save_state()  # trainer_state.json: the per-step log
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
