"""A few BandGRPO steps on the tiny model; run directly, under torchrun, or with DeepSpeed / FSDP by the end-to-end tests.

Writes `result.json` in the output dir (rank 0): world size, global step, how the model is sharded, the log history.
Every rank also writes `band_local_rank<r>.json`: the per-micro-batch sums it fed into the cross-process reduction of
the band metrics, so a test can recompute the logged (reduced) values from what each rank saw.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import yaml
from datasets import Dataset

from bandpo_trl import BandGRPOConfig, BandGRPOTrainer


def digit_reward(completions, **kwargs):
    # Dense and easy to move: rewards completions with many "1"s, so advantages are non-zero from the start.
    return [float(c.count("1")) / 4 for c in completions]


class RecordingTrainer(BandGRPOTrainer):
    """BandGRPOTrainer that also keeps, per loss call, this rank's unreduced band sums (nothing else changes)."""

    local_band_sums: list[dict]

    def clip_metric_sums(self, old_logps, logps, lower, upper, advantages, mask):
        sums = super().clip_metric_sums(old_logps, logps, lower, upper, advantages, mask)
        self.local_band_sums.append(
            {
                "step": self.state.global_step + 1,  # the optimizer step this micro-batch belongs to
                "tokens": sums["tokens"].item(),
                "lower": sums["lower"].item(),
                "upper": sums["upper"].item(),
            }
        )
        return sums


def deepspeed_config_from_accelerate(ds: dict) -> dict:
    """The DeepSpeed JSON config an accelerate `deepspeed_config` section stands for, in float32 for the CPU."""
    zero = {"stage": ds["zero_stage"]}
    if ds.get("offload_optimizer_device", "none") != "none":
        zero["offload_optimizer"] = {"device": ds["offload_optimizer_device"]}
    if ds.get("offload_param_device", "none") != "none":
        zero["offload_param"] = {"device": ds["offload_param_device"]}
    if ds["zero_stage"] == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = bool(ds.get("zero3_save_16bit_model", False))
    return {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }


def force_fsdp_on_cpu():
    """Let accelerate build its FSDP plugin on a CPU-only machine.

    accelerate 1.16's `AcceleratorState` turns `ACCELERATE_USE_FSDP` / the FSDP plugin on only for the MULTI_GPU-like
    distributed types (state.py, "elif self.distributed_type in [DistributedType.MULTI_GPU, ...]"); under torchrun on
    the CPU the type is MULTI_CPU and the plugin is silently dropped (the run is then plain DDP). Relabelling the
    process group's type before the trainer creates its Accelerator takes the FSDP branch; the model is then wrapped
    with torch's `fully_shard` on the CPU/gloo mesh, as on GPUs. Test-only: users on GPUs need none of this.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = PartialState()
    if state.distributed_type == DistributedType.MULTI_CPU:
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def sharding(trainer) -> str | None:
    """How the policy's parameters are actually held: 'fsdp2' (DTensor shards), 'zero3' (DeepSpeed partitions), None."""
    params = list(trainer.model_wrapped.parameters())
    try:
        from torch.distributed.tensor import DTensor

        if params and all(isinstance(p, DTensor) for p in params):
            return "fsdp2"
    except ImportError:
        pass
    if params and all(hasattr(p, "ds_id") for p in params):
        return "zero3"
    return None


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_steps", type=int, default=4)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--steps_per_generation", type=int, default=4)
    parser.add_argument("--deepspeed_zero2", action="store_true")
    parser.add_argument(
        "--accelerate_config",
        help="A DeepSpeed or FSDP accelerate config (recipes/accelerate_configs/*.yaml): its sharding settings are "
        "applied through the training arguments, since `accelerate launch --cpu` runs one process only (use torchrun).",
    )
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--save_steps", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--learning_rate", type=float, default=5e-3)
    parser.add_argument("--band_delta", type=float, default=0.05)
    parser.add_argument("--beta", type=float, default=0.0, help="KL coefficient; > 0 loads a reference model too")
    args = parser.parse_args(argv)

    deepspeed = None
    if args.deepspeed_zero2:
        deepspeed = deepspeed_config_from_accelerate({"zero_stage": 2})
    fsdp, fsdp_config = False, None
    if args.accelerate_config:
        with open(args.accelerate_config) as f:
            accelerate_config = yaml.safe_load(f)
        if accelerate_config["distributed_type"] == "DEEPSPEED":
            deepspeed = deepspeed_config_from_accelerate(accelerate_config["deepspeed_config"])
        elif accelerate_config["distributed_type"] == "FSDP":
            fsdp, fsdp_config = True, dict(accelerate_config["fsdp_config"])  # transformers strips the fsdp_ prefix
        else:
            raise ValueError(f"not a DeepSpeed or FSDP config: {args.accelerate_config}")
    config = BandGRPOConfig(
        output_dir=args.output_dir,
        bf16=False,
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        steps_per_generation=args.steps_per_generation,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        band_delta=args.band_delta,
        beta=args.beta,
        logging_steps=1,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        seed=0,
        deepspeed=deepspeed,
        fsdp=fsdp,
        fsdp_config=fsdp_config,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )
    if fsdp:
        force_fsdp_on_cpu()
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    dataset = Dataset.from_dict({"prompt": [f"{i}+{i}=" for i in range(32)]})
    trainer = RecordingTrainer(
        model=args.model, reward_funcs=digit_reward, args=config, train_dataset=dataset, peft_config=peft_config
    )
    trainer.local_band_sums = []
    trainer.train(resume_from_checkpoint=True if args.resume else None)

    rank = trainer.accelerator.process_index
    with open(os.path.join(args.output_dir, f"band_local_rank{rank}.json"), "w") as f:
        json.dump(trainer.local_band_sums, f)
    if trainer.accelerator.is_main_process:
        state = trainer.accelerator.state
        result = {
            "world_size": trainer.accelerator.num_processes,
            "global_step": trainer.state.global_step,
            "is_peft": hasattr(trainer.model, "peft_config"),
            "deepspeed": trainer.is_deepspeed_enabled,
            "zero_stage": state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None,
            "fsdp_version": state.fsdp_plugin.fsdp_version if trainer.is_fsdp_enabled else None,
            "sharding": sharding(trainer),
            "reference_model": trainer.ref_model is not None,
            "log_history": trainer.state.log_history,
        }
        with open(os.path.join(args.output_dir, "result.json"), "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    sys.exit(main())
