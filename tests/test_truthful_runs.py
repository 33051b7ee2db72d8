"""A run's outcome is told truthfully: the installed console scripts exit 0 only on success, a run with nothing to
train on fails and says why, resuming picks the newest complete checkpoint, bad arguments are refused by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import save_file

from bandpo_trl import BandGRPOConfig
from bandpo_trl.arguments import ScriptArguments, make_parser
from bandpo_trl.checkpoints import latest_complete_checkpoint, resolve_resume_checkpoint
from bandpo_trl.data import (
    check_enough_prompts,
    check_no_empty_prompts,
    drop_long_prompts,
    load_named_dataset,
    math_prompt,
)
from bandpo_trl.tiny import build_tiny_tokenizer
from bandpo_trl.train import main

BIN = Path(sys.executable).parent
ENV = dict(
    os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"
)

# A recipe a user might write for the tiny model: no `bf16: false` (TRL's default is bf16), a short warm-up, a
# few steps of 4 prompts x 4 completions, 2 optimizer steps per generation batch.
USER_RECIPE = """\
model_name_or_path: tiny
tiny_warmup_steps: 5
tiny_warmup_num_samples: 128
dataset_num_samples: 64
reward_funcs: toy_accuracy
num_generations: 4
per_device_train_batch_size: 8
steps_per_generation: 2
max_completion_length: 3
max_steps: 4
use_cpu: true
report_to: none
disable_tqdm: true
torch_num_threads: 1
logging_steps: 1
"""


def run_script(name: str, *args: str, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    """Run an installed console script (not `python -m`): its exit status is what a scheduler sees."""
    script = BIN / name
    assert script.is_file(), f"console script {script} is not installed"
    return subprocess.run(
        [str(script), *args],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=cwd,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


# -------------------------------------------------------------------------------------------- exit status


@pytest.mark.slow
def test_installed_bandpo_train_exits_0_and_resumes_from_the_newest_complete_checkpoint(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(USER_RECIPE)
    out = tmp_path / "run"
    first = run_script("bandpo-train", "--config", str(recipe), "--output_dir", str(out), "--save_steps", "2")
    # Succeeds on the first run although the recipe leaves TRL's bf16 default on (the warm-up follows it).
    assert first.returncode == 0, first.stderr[-3000:]
    assert "BandGRPOTrainer object" not in first.stderr  # the old exit status 1 came from printing the trainer
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir()

    # A kill while checkpoint-4 was being saved: its trainer_state.json (written last) is missing.
    (out / "checkpoint-4" / "trainer_state.json").unlink()
    resumed = run_script(
        "bandpo-train", "--config", str(recipe), "--output_dir", str(out), "--save_steps", "2",
        "--max_steps", "6", "--resume_from_checkpoint", "latest",
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Skipping checkpoint" in resumed.stderr and "checkpoint-4" in resumed.stderr
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    steps = [entry["step"] for entry in history if "loss" in entry]
    assert steps == [1, 2, 3, 4, 5, 6]  # 1-2 restored from checkpoint-2, then 3-6 trained again


def test_installed_bandpo_train_exits_nonzero_on_a_bad_recipe(tmp_path):
    result = run_script("bandpo-train", "--dataset_names", "gsm9k", "--output_dir", str(tmp_path / "out"))
    assert result.returncode != 0
    assert "Unknown dataset 'gsm9k'" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--max_prompt_length", "2"], "No training prompts left: all 64 loaded prompts are longer than"),
        (["--dataset_num_samples", "3"], "The training set has 3 prompts, fewer than one generation batch needs"),
    ],
)
def test_a_run_with_nothing_to_train_on_fails_and_saves_nothing(tmp_path, override, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(USER_RECIPE)
    out = tmp_path / "run"
    result = run_script("bandpo-train", "--config", str(recipe), "--output_dir", str(out), *override)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (out / "model.safetensors").exists()


def test_installed_bandpo_eval_names_a_missing_directory_and_leaves_no_output(tmp_path):
    missing = tmp_path / "no" / "such-run"
    out = tmp_path / "eval"
    result = run_script(
        "bandpo-eval", "--model", str(missing), "--benchmarks", "toy_arithmetic", "--output_dir", str(out)
    )
    assert result.returncode != 0
    assert f"--model {missing}: no such directory" in result.stderr
    assert "Repo id must be" not in result.stderr
    assert not out.exists()


def test_installed_bandpo_eval_names_missing_tokenizer_files(tmp_path, tiny_model_dir):
    model_only = tmp_path / "model-only"
    model_only.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (Path(tiny_model_dir) / name).exists():
            (model_only / name).write_bytes((Path(tiny_model_dir) / name).read_bytes())
    out = tmp_path / "eval"
    result = run_script(
        "bandpo-eval", "--model", str(model_only), "--benchmarks", "toy_arithmetic", "--output_dir", str(out)
    )
    assert result.returncode != 0
    assert f"--model {model_only}: no tokenizer files" in result.stderr
    assert "sentencepiece" not in result.stderr.lower()
    assert not out.exists()


@pytest.mark.slow
def test_installed_bandpo_eval_exits_0(tmp_path, tiny_model_dir):
    out = tmp_path / "eval"
    result = run_script(
        "bandpo-eval", "--model", str(tiny_model_dir), "--benchmarks", "toy_arithmetic", "--num_problems", "4",
        "--k", "2", "--pass_k", "1", "2", "--max_new_tokens", "3", "--output_dir", str(out), "--torch_num_threads", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "summary.json").is_file()


# -------------------------------------------------------------------------------------------- arguments


def test_dataset_num_samples_zero_or_negative_is_refused(tmp_path):
    for value in ("0", "-5"):
        with pytest.raises(ValueError, match=f"dataset_num_samples must be a positive number of rows.*got {value}"):
            main(["--output_dir", str(tmp_path), "--dataset_num_samples", value])
    with pytest.raises(ValueError, match="num_samples must be a positive number of rows, got 0"):
        load_named_dataset("toy_arithmetic", num_samples=0)
    assert len(load_named_dataset("toy_arithmetic", num_samples=3)) == 3


def test_yaml_scalar_where_a_list_is_expected_is_a_one_element_list(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("reward_funcs: toy_accuracy\ndataset_names: toy_arithmetic\noutput_dir: out\n")
    script_args, *_ = make_parser().parse_args_and_config(args=["--config", str(recipe)])
    assert script_args.reward_funcs == ["toy_accuracy"]
    assert script_args.dataset_names == ["toy_arithmetic"]


def test_eval_benchmarks_without_eval_every_steps_warns():
    with pytest.warns(UserWarning, match="eval_every_steps=0, so no benchmark will be evaluated"):
        ScriptArguments(eval_benchmarks=["toy_arithmetic"], eval_every_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ScriptArguments(eval_benchmarks=["toy_arithmetic"], eval_every_steps=10)


# -------------------------------------------------------------------------------------------- data


def test_drop_long_prompts_refuses_to_drop_everything():
    tokenizer = build_tiny_tokenizer()
    plain = Dataset.from_dict({"prompt": ["1+1=", "11+11="]})
    with pytest.raises(ValueError, match=r"all 2 loaded prompts are longer than max_prompt_length=3 .*shortest has 4"):
        drop_long_prompts(plain, tokenizer, 3)


def test_fewer_prompts_than_one_generation_batch_is_refused_with_the_arithmetic(tmp_path):
    args = BandGRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, per_device_train_batch_size=8, num_generations=4,
        steps_per_generation=4, report_to="none",
    )  # fmt: skip
    # 8 completions x 1 process x 4 steps = 32 completions per generation batch = 8 distinct prompts.
    with pytest.raises(ValueError, match=r"has 7 prompts.*= 32 completions / num_generations \(4\) = 8 distinct"):
        check_enough_prompts(Dataset.from_dict({"prompt": ["1+1="] * 7}), args)
    check_enough_prompts(Dataset.from_dict({"prompt": ["1+1="] * 8}), args)


def test_empty_prompts_are_refused_by_row():
    rows = {
        "prompt": ["1+1=", "", "  ", "2+2="],
        "problem_id": ["a", "b", "c", "d"],
    }
    with pytest.raises(ValueError, match=r"2 of 4 rows have an empty prompt \(rows 1, 2; problem ids b, c\)"):
        check_no_empty_prompts(Dataset.from_dict(rows), "mine")
    chat = Dataset.from_dict({"prompt": [math_prompt("1+1?"), math_prompt(""), [{"role": "user", "content": ""}]]})
    with pytest.raises(ValueError, match=r"2 of 3 rows have an empty prompt \(rows 1, 2"):
        check_no_empty_prompts(chat)
    check_no_empty_prompts(Dataset.from_dict({"prompt": [math_prompt("1+1?")]}))


# -------------------------------------------------------------------------------------------- checkpoints


def _checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    save_file({"weight": torch.zeros(4)}, str(path / "model.safetensors"))
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_latest_complete_checkpoint_skips_half_written_ones(tmp_path, caplog):
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 10)  # numerically newest complete; "checkpoint-4" sorts after it as text
    _checkpoint(tmp_path, 4)
    _checkpoint(tmp_path, 12, complete=False)
    (_checkpoint(tmp_path, 14) / "trainer_state.json").write_text('{"global_st')  # cut off mid-write
    (tmp_path / "checkpoint-x").mkdir()
    with caplog.at_level("WARNING"):
        assert latest_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert "checkpoint-14: unreadable trainer_state.json" in caplog.text
    assert "checkpoint-12: no trainer_state.json" in caplog.text


def test_resolve_resume_checkpoint(tmp_path, caplog):
    assert resolve_resume_checkpoint(None, str(tmp_path)) is None
    assert resolve_resume_checkpoint("false", str(tmp_path)) is None
    with caplog.at_level("WARNING"):
        assert resolve_resume_checkpoint("latest", str(tmp_path)) is None  # first run of a job script
    assert "no complete checkpoint" in caplog.text
    good = _checkpoint(tmp_path, 3)
    assert resolve_resume_checkpoint("true", str(tmp_path)) == str(good)
    assert resolve_resume_checkpoint("LATEST", str(tmp_path)) == str(good)
    assert resolve_resume_checkpoint(str(good), str(tmp_path)) == str(good)
    bad = _checkpoint(tmp_path, 5, complete=False)
    with pytest.raises(ValueError, match=r"checkpoint-5'? cannot be resumed from: no trainer_state.json"):
        resolve_resume_checkpoint(str(bad), str(tmp_path))
    with pytest.raises(ValueError, match="no such directory"):
        resolve_resume_checkpoint(str(tmp_path / "nope"), str(tmp_path))


# -------------------------------------------------------------------------------------------- custom code


def test_reward_funcs_accept_import_paths(tmp_path, monkeypatch):
    from bandpo_trl.rewards import get_reward_funcs, toy_accuracy_reward

    (tmp_path / "my_rewards.py").write_text(
        "def short(completions, **kwargs):\n    return [-len(c) for c in completions]\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    funcs = get_reward_funcs(["toy_accuracy", "my_rewards.short", "my_rewards:short"])
    assert funcs[0] is toy_accuracy_reward and funcs[1] is funcs[2]
    assert funcs[1](["ab", "abc"]) == [-2, -3]
    assert get_reward_funcs("toy_accuracy") == [toy_accuracy_reward]
    with pytest.raises(ValueError, match=r"Unknown reward function\(s\) \['accuracy'\].*or an import path"):
        get_reward_funcs(["accuracy"])
    with pytest.raises(ValueError, match="my_rewards"):
        get_reward_funcs(["my_rewards.missing"])


@pytest.mark.slow
def test_a_recipe_trains_with_its_own_reward_divergence_and_clip_rule_modules(tmp_path):
    (tmp_path / "my_rewards.py").write_text(
        "def ones(completions, **kwargs):\n    return [float(c.count('1')) for c in completions]\n"
    )
    (tmp_path / "my_divergences.py").write_text(
        "import torch\n\nfrom bandpo_trl import register_divergence\n\n"
        "register_divergence('js', lambda u: 0.5 * (torch.xlogy(u, u) - torch.xlogy(u + 1, (u + 1) / 2)))\n"
    )
    # Band's upper bound (of the recipe's divergence) with a fixed lower bound of 0.7.
    (tmp_path / "my_rules.py").write_text(
        "from bandpo_trl import band_bounds, register_clip_rule\n\n"
        "@register_clip_rule('js_upper', options=('band_divergence', 'band_delta', 'band_max_ratio'))\n"
        "def js_upper(old_logps, args):\n"
        "    return 0.7, band_bounds(old_logps, args.band_divergence, args.band_delta, args.band_max_ratio)[1]\n"
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        USER_RECIPE.replace("reward_funcs: toy_accuracy", "reward_funcs: [toy_accuracy, my_rewards.ones]")
        + "band_divergence: my_divergences:js\nband_delta: 0.02\nclip_rule: my_rules:js_upper\nmax_steps: 2\n"
    )
    result = run_script("bandpo-train", "--config", str(recipe), "--output_dir", "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    logs = [entry for entry in state["log_history"] if "loss" in entry]
    assert any("rewards/ones/mean" in entry for entry in logs)  # logged on the steps that generate
    assert all(entry["band/lower_mean"] == pytest.approx(0.7) for entry in logs)
    assert all(entry["band/upper_mean"] > 1.0 for entry in logs)


# -------------------------------------------------------------------------------------------- configuration


def test_band_config_runs_as_written_on_a_cpu_only_machine(tmp_path):
    # The README's example, verbatim: no bf16/use_cpu flags. TRL's GRPOConfig would turn bf16 on and fail here.
    args = BandGRPOConfig(output_dir=str(tmp_path), band_divergence="tv", band_delta=0.05,
                          gradient_accumulation_steps=4, steps_per_generation=16, loss_type="grpo", beta=0.001)  # fmt: skip

    assert args.bf16 == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    assert BandGRPOConfig(output_dir=str(tmp_path), bf16=False, steps_per_generation=4).bf16 is False
    assert BandGRPOConfig(output_dir=str(tmp_path), fp16=False, bf16=True, use_cpu=True).bf16 is True


@pytest.mark.parametrize(("save_steps", "warns"), [(6, True), (8, False), (4, False)])
def test_checkpoints_inside_a_generation_batch_warn(tmp_path, save_steps, warns):
    # 16 micro-steps per generation / 4 accumulation steps = 4 optimizer steps per generation batch.
    kwargs = dict(output_dir=str(tmp_path), gradient_accumulation_steps=4, steps_per_generation=16)
    kwargs.update(save_strategy="steps", save_steps=save_steps)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        BandGRPOConfig(**kwargs)
    messages = [str(w.message) for w in caught if "generation batch" in str(w.message)]
    assert bool(messages) == warns
    if warns:
        assert "save_steps=6 is not a multiple of the 4 optimizer steps per generation batch" in messages[0]


def test_on_policy_and_old_logps_mirror_trls_condition():
    from types import SimpleNamespace

    from bandpo_trl.config import computes_old_logps, is_on_policy

    def args(ga, spg, iterations=1, vllm=False, correction=True):
        return SimpleNamespace(gradient_accumulation_steps=ga, steps_per_generation=spg, num_iterations=iterations,
                               use_vllm=vllm, vllm_importance_sampling_correction=correction)  # fmt: skip

    assert is_on_policy(args(4, 4)) and not computes_old_logps(args(4, 4))
    assert not is_on_policy(args(4, 16)) and computes_old_logps(args(4, 16))
    assert not is_on_policy(args(4, 4, iterations=2)) and computes_old_logps(args(4, 4, iterations=2))
    # TRL's vLLM branch: old log-probs are computed for the importance-sampling correction, from the same weights,
    # so the clip still sees a ratio of 1.
    assert computes_old_logps(args(4, 4, vllm=True)) and is_on_policy(args(4, 4, vllm=True))
    assert not computes_old_logps(args(4, 4, vllm=True, correction=False))
