"""The training entry point: name errors before any work, and a few real steps of the tiny recipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from datasets import Dataset

from bandpo_trl.data import drop_long_prompts
from bandpo_trl.tiny import build_tiny_tokenizer
from bandpo_trl.train import main

RECIPE = os.path.join(os.path.dirname(__file__), os.pardir, "recipes", "tiny", "bandpo", "config_kl.yaml")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--dataset_names", "gsm9k"], "Unknown dataset 'gsm9k'. Known datasets: aime24, aime25, amc23"),
        (["--eval_benchmarks", "aime26"], "Unknown dataset 'aime26'"),
        (
            ["--reward_funcs", "toy_accuracy", "accuracy"],
            "Known rewards: arithmetic_accuracy, format, math_accuracy, toy_accuracy",
        ),
    ],
)
def test_unknown_names_fail_before_any_training(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        main(["--config", RECIPE, "--output_dir", str(tmp_path), *override])
    assert not os.path.exists(tmp_path / "warmup")  # failed before the warm-up


def test_drop_long_prompts_counts_the_tokens_the_trainer_sees():
    tokenizer = build_tiny_tokenizer()  # one token per character
    # "user: " + content + "\n" + "assistant: " is 18 tokens around the content.
    chat = Dataset.from_dict({"prompt": [[{"role": "user", "content": "x" * n}] for n in (1, 2, 3)]})
    assert [len(p[0]["content"]) for p in drop_long_prompts(chat, tokenizer, 20)["prompt"]] == [1, 2]
    plain = Dataset.from_dict({"prompt": ["1+1=", "11+11="]})
    assert drop_long_prompts(plain, tokenizer, 4)["prompt"] == ["1+1="]
    assert len(drop_long_prompts(plain, tokenizer, None)) == 2


@pytest.mark.slow
def test_tiny_recipe_trains_through_the_entry_point(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "bandpo_trl.train", "--config", RECIPE,
        "--output_dir", str(out), "--max_steps", "8", "--logging_steps", "4",
        "--tiny_warmup_steps", "100",
        # In-training evaluation wired through the entry point: 8 toy problems x 2 samples every 4 steps.
        "--eval_benchmarks", "toy_arithmetic", "--eval_every_steps", "4", "--eval_k", "2", "--eval_num_problems", "8",
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"saved to {out}" in result.stdout

    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "trainer_state.json",
        "warmup/model.safetensors",
    ):
        assert (out / name).is_file(), name
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    logs = [entry for entry in state["log_history"] if "reward" in entry]
    assert [entry["step"] for entry in logs] == [4, 8]
    evals = [entry for entry in state["log_history"] if "eval/toy_arithmetic/mean@2" in entry]
    assert [entry["step"] for entry in evals] == [4, 8]
    assert all(0.0 <= entry["eval/toy_arithmetic/mean@2"] <= 1.0 for entry in evals)
    # The warmed-up policy is diverse and imperfect: 4 x 64 sampled answers, neither all wrong nor all right.
    assert 0.1 < logs[0]["reward"] < 0.9
    assert 0.0 <= logs[0]["frac_reward_zero_std"] < 1.0  # some groups have a learning signal
    # The Band clip ran: its bounds are logged, with the KL band's l < 1 < u.
    assert logs[0]["band/lower_mean"] < 1.0 < logs[0]["band/upper_mean"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tokenizer("3+4=", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > ids["input_ids"].shape[1]


def test_model_init_kwargs_are_built_like_trls_grpo_script(tmp_path):
    from bandpo_trl.arguments import make_parser
    from bandpo_trl.models import model_init_kwargs

    argv = ["--output_dir", str(tmp_path), "--use_cpu", "true", "--model_name_or_path", "org/model"]
    argv += ["--dtype", "bfloat16", "--attn_implementation", "sdpa", "--model_revision", "v2"]
    argv += ["--model_init_kwargs", '{"low_cpu_mem_usage": true, "dtype": "float16"}']
    _, training_args, model_args, tiny_args = make_parser().parse_args_and_config(args=argv)
    assert model_init_kwargs(model_args, training_args) == {
        "revision": "v2",
        "trust_remote_code": False,
        "attn_implementation": "sdpa",
        "dtype": "float16",  # the recipe's model_init_kwargs win, as in TRL's script
        "low_cpu_mem_usage": True,
    }
    assert tiny_args.tiny_warmup_steps == 100  # the tiny model's options parse into their own dataclass


@pytest.mark.slow
def test_local_dataset_and_model_dtype_reach_trls_loading(tmp_path, tiny_model_dir):
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i}"} for i in range(16)]
    data_file = tmp_path / "gsm8k.jsonl"
    Dataset.from_list(rows).to_json(str(data_file))
    out = tmp_path / "run"
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "bandpo-train"),
        "--model_name_or_path", str(tiny_model_dir), "--dtype", "bfloat16",
        "--dataset_names", "gsm8k", "--dataset_paths", f"gsm8k={data_file}", "--reward_funcs", "math_accuracy",
        "--output_dir", str(out), "--use_cpu", "true", "--bf16", "false", "--report_to", "none",
        "--num_generations", "4", "--per_device_train_batch_size", "8", "--steps_per_generation", "2",
        "--max_completion_length", "4", "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no",
        "--disable_tqdm", "true", "--torch_num_threads", "1",
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    # TRL loaded the policy from its path with the recipe's dtype (the tiny model was saved in float32).
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
