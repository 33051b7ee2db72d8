"""A few BandGRPO steps on the tiny model; run directly, under torchrun, or with DeepSpeed by the end-to-end tests.

Writes `result.json` in the output dir: world size, global step, the log history.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from datasets import Dataset

from bandpo_trl import BandGRPOConfig, BandGRPOTrainer


def digit_reward(completions, **kwargs):
    # Dense and easy to move: rewards completions with many "1"s, so advantages are non-zero from the start.
    return [float(c.count("1")) / 4 for c in completions]


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_steps", type=int, default=4)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--steps_per_generation", type=int, default=4)
    parser.add_argument("--deepspeed_zero2", action="store_true")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--save_steps", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--learning_rate", type=float, default=5e-3)
    parser.add_argument("--band_delta", type=float, default=0.05)
    args = parser.parse_args(argv)

    deepspeed = None
    if args.deepspeed_zero2:
        deepspeed = {
            "zero_optimization": {"stage": 2},
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "bf16": {"enabled": False},
            "fp16": {"enabled": False},
        }
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
        logging_steps=1,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        seed=0,
        deepspeed=deepspeed,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    dataset = Dataset.from_dict({"prompt": [f"{i}+{i}=" for i in range(32)]})
    trainer = BandGRPOTrainer(
        model=args.model, reward_funcs=digit_reward, args=config, train_dataset=dataset, peft_config=peft_config
    )
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    if trainer.accelerator.is_main_process:
        result = {
            "world_size": trainer.accelerator.num_processes,
            "global_step": trainer.state.global_step,
            "is_peft": hasattr(trainer.model, "peft_config"),
            "deepspeed": trainer.is_deepspeed_enabled,
            "log_history": trainer.state.log_history,
        }
        with open(os.path.join(args.output_dir, "result.json"), "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    sys.exit(main())
