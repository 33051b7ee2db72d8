"""`bandpo-train` checks its inputs before the model is built: reward outputs are checked and named, bad option values
are refused by name, and the device the recipe asks for is the one every part of the run uses."""

from __future__ import annotations

import json
import math
import re
import warnings
from types import SimpleNamespace

import pytest
import torch
from test_truthful_runs import USER_RECIPE, run_script

from bandpo_trl import train as train_module
from bandpo_trl.arguments import make_parser
from bandpo_trl.rewards import checked_reward, reward_summary

COMPLETIONS = ["1", "2", "3"]


def parse(*argv: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_parser().parse_args_and_config(args=list(argv))


class _Stop(Exception):
    pass


def stop_at_the_model(monkeypatch):
    """Make building or loading the model raise `_Stop`: a check that fires first ran before any expensive work."""

    def no_model(*args, **kwargs):
        raise _Stop

    monkeypatch.setattr(train_module, "resolve_model_name", no_model)


# -------------------------------------------------------------------------------------------- reward outputs


def test_checked_reward_passes_good_outputs_through_and_keeps_the_name():
    def ones(completions, **kwargs):
        return [1.0, 0, None]

    checked = checked_reward(ones, "my_rewards.ones")
    assert checked.__name__ == "ones"  # TRL's metric names
    assert checked(COMPLETIONS) == [1.0, 0, None]  # None for some completions: TRL's "not applicable"
    assert checked_reward(lambda completions, **kw: torch.tensor([1.0, 2.0, 3.0]), "t")(COMPLETIONS) == [1.0, 2.0, 3.0]
    assert checked_reward(lambda completions, **kw: (1, 2, 3), "t")(COMPLETIONS) == (1, 2, 3)


@pytest.mark.parametrize(
    ("output", "message"),
    [
        (None, r"reward function my_rewards\.bad returned None instead of a list of 3 rewards"),
        (1.0, r"my_rewards\.bad returned 1\.0 \(float\) instead of a list of 3 rewards"),
        (["1", "0", "1"], r"my_rewards\.bad returned '1' \(str\) for completion 0; a reward is a number or None"),
        ([1.0, 2.0], r"my_rewards\.bad returned 2 rewards for 3 completions"),
        ([1.0, math.inf, 0.0], r"my_rewards\.bad returned inf \(float\) for completion 1"),
    ],
)
def test_checked_reward_refuses_what_trl_cannot_use_naming_the_function(output, message):
    with pytest.raises(ValueError, match=message):
        checked_reward(lambda completions, **kwargs: output, "my_rewards.bad")(COMPLETIONS)


def test_checked_reward_warns_when_a_whole_batch_is_none():
    checked = checked_reward(lambda completions, **kwargs: [None] * len(completions), "my_rewards.none")
    with pytest.warns(UserWarning, match=r"my_rewards\.none returned None for all 3 completions of a batch"):
        assert checked(COMPLETIONS) == [None, None, None]


def test_checked_reward_keeps_an_async_function_async():
    import asyncio
    import inspect

    async def judge(completions, **kwargs):
        return [0.5] * len(completions)

    checked = checked_reward(judge, "judge")
    assert inspect.iscoroutinefunction(checked)
    assert asyncio.run(checked(COMPLETIONS)) == [0.5, 0.5, 0.5]


def test_reward_summary_skips_missing_rewards():
    history = [{"reward": 0.5}, {"reward": None}, {"reward": float("nan")}, {"loss": 1.0}, {"reward": 1.0}]
    assert reward_summary(history) == "Mean reward: 0.500 over the first 1 logged steps -> 1.000 over the last 1."
    assert reward_summary([{"reward": None}, {"reward": float("nan")}]) == (
        "No finite reward was logged (every logged reward is None or NaN: see the warnings about the reward functions)."
    )
    assert reward_summary([{"loss": 1.0}]) is None


REWARDS_MODULE = """\
def none(completions, **kwargs):
    return [None] * len(completions)


def text(completions, **kwargs):
    return ["1"] * len(completions)
"""


@pytest.mark.slow
def test_a_reward_that_is_none_for_every_completion_trains_saves_and_exits_0(tmp_path):
    (tmp_path / "my_rewards.py").write_text(REWARDS_MODULE)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(USER_RECIPE.replace("reward_funcs: toy_accuracy", "reward_funcs: my_rewards.none"))
    result = run_script(
        "bandpo-train", "--config", str(recipe), "--output_dir", "run", "--max_steps", "2", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "my_rewards.none returned None for all" in result.stderr
    assert "No finite reward was logged" in result.stdout
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "trainer_state.json").read_text())["global_step"] == 2


@pytest.mark.slow
def test_a_reward_returning_text_is_refused_naming_the_function(tmp_path):
    (tmp_path / "my_rewards.py").write_text(REWARDS_MODULE)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(USER_RECIPE.replace("reward_funcs: toy_accuracy", "reward_funcs: my_rewards.text"))
    result = run_script(
        "bandpo-train", "--config", str(recipe), "--output_dir", "run", "--max_steps", "1", cwd=tmp_path
    )
    assert result.returncode != 0
    assert "reward function my_rewards.text returned '1' (str) for completion 0" in result.stderr
    assert not (tmp_path / "run" / "model.safetensors").exists()


# -------------------------------------------------------------------------------------------- option values


@pytest.mark.parametrize("value", ["notjson", '{"low_cpu_mem_usage": true', "[1, 2]"])
def test_model_init_kwargs_that_are_not_a_json_object_are_refused_by_the_parser(tmp_path, monkeypatch, capsys, value):
    stop_at_the_model(monkeypatch)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model_init_kwargs: '{value}'\n")
    for argv in (["--model_init_kwargs", value], ["--config", str(recipe)]):
        with pytest.raises(SystemExit) as exit_info:
            train_module.main(["--output_dir", str(tmp_path), *argv])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert re.search(r"argument --model_init_kwargs(/--model-init-kwargs)?: must be a JSON object", error)
        assert value in error
        assert "Traceback" not in error


def test_model_init_kwargs_set_in_code_are_checked_before_the_model(tmp_path, monkeypatch):
    stop_at_the_model(monkeypatch)
    script_args, training_args, model_args, tiny_args = parse("--output_dir", str(tmp_path))
    training_args.model_init_kwargs = "notjson"
    with pytest.raises(ValueError, match=r"model_init_kwargs must be a JSON object .*got 'notjson'"):
        train_module.train(script_args, training_args, model_args, tiny_args)


def test_yaml_values_of_the_wrong_type_for_a_list_of_names_are_refused(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    for line, message in [
        ("dataset_names: 5", r"dataset_names must be a list of names .*got 5"),
        ("reward_funcs: [toy_accuracy, 3]", r"reward_funcs must be a list of names .*got \['toy_accuracy', 3\]"),
        ("eval_benchmarks: {aime24: 1}", r"eval_benchmarks must be a list of names"),
    ]:
        recipe.write_text(f"{line}\noutput_dir: {tmp_path / 'out'}\n")
        with pytest.raises(ValueError, match=message):
            parse("--config", str(recipe))


def test_installed_bandpo_train_refuses_a_number_for_dataset_names(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"dataset_names: 5\noutput_dir: {tmp_path / 'out'}\n")
    result = run_script("bandpo-train", "--config", str(recipe))
    assert result.returncode != 0
    assert "dataset_names must be a list of names" in result.stderr and "TypeError" not in result.stderr


# -------------------------------------------------------------------------------------------- device


def test_the_warm_up_runs_on_the_device_the_recipe_asks_for(tmp_path, monkeypatch):
    """With a GPU present, `use_cpu: true` keeps the warm-up on the CPU too (it used to follow the GPU, and TRL's
    trainer, following the recipe, then generated with a CPU model from CUDA inputs), and `use_cpu: false` puts it on
    the GPU."""
    import trl

    from bandpo_trl import tiny
    from bandpo_trl.models import load_tiny

    seen = []

    class FakeSFTTrainer:
        def __init__(self, model, args, **kwargs):
            seen.append(args.use_cpu)
            self.model = model

        def train(self):
            pass

    # No GPU here: the SFT config and trainer and accelerate's state are stand-ins that record the device asked for.
    monkeypatch.setattr(trl, "SFTConfig", lambda **kwargs: SimpleNamespace(**kwargs))
    monkeypatch.setattr(trl, "SFTTrainer", FakeSFTTrainer)
    monkeypatch.setattr(tiny, "PartialState", lambda: SimpleNamespace(is_main_process=True, wait_for_everyone=dict))
    runs = [
        parse(
            "--output_dir",
            str(tmp_path / str(use_cpu)),
            "--use_cpu",
            str(use_cpu).lower(),
            "--bf16",
            "false",
            "--tiny_warmup_steps",
            "1",
            "--tiny_warmup_num_samples",
            "8",
            "--tiny_hidden_size",
            "16",
            "--tiny_num_layers",
            "1",
        )  # fmt: skip
        for use_cpu in (True, False)
    ]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # after parsing: TrainingArguments sets devices up
    for _, training_args, _, tiny_args in runs:
        load_tiny(tiny_args, training_args)
    assert seen == [True, False]


@pytest.mark.parametrize(
    ("launcher_cpu", "cuda", "refused"),
    [("False", True, True), ("True", True, False), (None, True, False), ("False", False, False)],
    ids=["gpu-launch-config", "cpu-launch-config", "no-launcher", "gpu-launch-config-without-cuda"],
)
def test_a_cpu_recipe_under_a_gpu_launch_config_is_refused_up_front(
    tmp_path, monkeypatch, launcher_cpu, cuda, refused
):
    """`accelerate launch` sets ACCELERATE_USE_CPU from its config's `use_cpu` (`False` for single_gpu.yaml)."""
    if launcher_cpu is None:
        monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_USE_CPU", launcher_cpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    stop_at_the_model(monkeypatch)
    parsed = parse("--output_dir", str(tmp_path), "--use_cpu", "true", "--bf16", "false")
    if refused:
        with pytest.raises(ValueError) as error:
            train_module.train(*parsed)
        message = str(error.value)
        assert "use_cpu: true" in message and "ACCELERATE_USE_CPU=False" in message
        assert "--use_cpu false" in message and "cpu.yaml" in message
    else:
        with pytest.raises(_Stop):
            train_module.train(*parsed)
