"""Band metrics of a fixed batch, computed by `BandGRPOTrainer.log_clip_metrics` on one or several processes.

Under torchrun each rank takes its contiguous share of the rows (as TRL splits a batch across processes) and the
trainer reduces the sums across ranks; run alone, one process sees every row. Writes `<output_dir>/metrics.json`
(rank 0): the trainer's metric lists for each clipping rule, and, when run alone, the same for each rank's share
computed separately (what averaging per-rank ratios would give), so a test can show the data tells them apart.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from datasets import Dataset

from bandpo_trl import BandGRPOConfig, BandGRPOTrainer

ROWS, COLUMNS, MICRO_BATCHES = 8, 12, 2


def make_batch(seed: int) -> dict:
    """Old/new log-probs over all four probability buckets, mixed-sign advantages, and completion lengths that differ
    a lot between the first and second half of the rows (so per-rank token counts differ)."""
    g = torch.Generator().manual_seed(seed)
    old = torch.log(10 ** (-4 * torch.rand(ROWS, COLUMNS, generator=g))).clamp(max=-1e-3)  # p log-uniform in [1e-4, 1)
    new = old + 0.4 * torch.randn(ROWS, COLUMNS, generator=g)
    advantages = torch.randn(ROWS, generator=g)
    lengths = torch.cat(
        [
            torch.randint(8, COLUMNS + 1, (ROWS // 2,), generator=g),
            torch.randint(1, 5, (ROWS - ROWS // 2,), generator=g),
        ]
    )
    mask = (torch.arange(COLUMNS).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return {"old": old, "new": new, "advantages": advantages, "completion_mask": mask}


def rows(batch: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] for k, v in batch.items()}


def band_metrics(trainer, batches: list[dict]) -> dict:
    trainer._metrics["train"].clear()
    for batch in batches:
        inputs = {"completion_mask": batch["completion_mask"], "advantages": batch["advantages"]}
        lower, upper = trainer.compute_clip_bounds(batch["old"], inputs)
        trainer.log_clip_metrics(inputs, batch["old"], batch["new"], lower, upper)
    return {k: list(v) for k, v in trainer._metrics["train"].items()}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument(
        "--shards", type=int, default=2, help="shares of the batch (the world size of the parallel run)"
    )
    args = parser.parse_args(argv)

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    batches = [make_batch(seed) for seed in range(MICRO_BATCHES)]
    dataset = Dataset.from_dict({"prompt": ["1+1="] * 8})
    results = {}
    for rule, options in {
        "band_kl": {"clip_rule": "band", "band_divergence": "kl", "band_delta": 0.05},
        "band_tv": {"clip_rule": "band", "band_divergence": "tv", "band_delta": 0.05},
        "dcpo": {"clip_rule": "dcpo"},
        "clip": {"clip_rule": "clip", "epsilon": 0.2, "epsilon_high": 0.28},
    }.items():
        config = BandGRPOConfig(
            output_dir=args.output_dir,
            use_cpu=True,
            bf16=False,
            report_to="none",
            per_device_train_batch_size=4,
            num_generations=4,
            steps_per_generation=8,
            ddp_backend="gloo" if world_size > 1 else None,
            **options,
        )
        trainer = BandGRPOTrainer(
            model=args.model,
            reward_funcs=lambda completions, **kw: [0.0] * len(completions),
            args=config,
            train_dataset=dataset,
        )
        trainer.model.train()
        rank, size = trainer.accelerator.process_index, trainer.accelerator.num_processes
        share = ROWS // size
        results[rule] = {
            "reduced": band_metrics(trainer, [rows(b, rank * share, (rank + 1) * share) for b in batches])
        }
        if size == 1:  # each share on its own, as the ranks of the parallel run see them before the reduction
            share = ROWS // args.shards
            results[rule]["shards"] = [
                band_metrics(trainer, [rows(b, i * share, (i + 1) * share) for b in batches])
                for i in range(args.shards)
            ]
        results[rule]["world_size"] = size
    if int(os.environ.get("RANK", "0")) == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    sys.exit(main())
