"""The training entry point: name errors before any work, and a few real steps of the tiny recipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from datasets import Dataset

from bandpo_trl.tiny import build_tiny_tokenizer
from bandpo_trl.train import drop_long_prompts, main

RECIPE = os.path.join(os.path.dirname(__file__), os.pardir, "recipes", "tiny", "bandpo", "config_kl.yaml")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--dataset_names", "gsm9k"], "Unknown dataset 'gsm9k'. Known datasets: aime24, aime25, amc23"),
        (["--eval_benchmarks", "aime26"], "Unknown dataset 'aime26'"),
        (["--reward_funcs", "toy_accuracy", "accuracy"], "Known rewards: format, math_accuracy, toy_accuracy"),
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
