"""A run never harms another one and refuses bad input before any expensive work: a fresh run into a used
output_dir is refused, resuming with other clip settings is refused, a corrupt newest checkpoint is skipped, zero and
negative counts are named errors, options with no effect are warned about (once), and the model card names BandPO."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_truthful_runs import USER_RECIPE, run_script  # the end-to-end helpers (tests/ is on sys.path)
from trl import GRPOTrainer

from bandpo_trl import BandGRPOConfig, BandGRPOTrainer, checkpoints
from bandpo_trl.checkpoints import checkpoint_problem, latest_complete_checkpoint, resolve_resume_checkpoint
from bandpo_trl.train import ScriptArguments, main

TINY = ["--model_name_or_path", "tiny"]  # the embedded default's model, built where `resolve_model_name` is called


class ReachedModelLoad(Exception):
    """Raised instead of building the tiny model: every check before it has passed."""


@pytest.fixture
def no_model_load(monkeypatch):
    """`bandpo_trl.train.main` stops where the model would be resolved (the tiny model is built there)."""

    def stop(*args, **kwargs):
        raise ReachedModelLoad

    monkeypatch.setattr("bandpo_trl.train.resolve_model_name", stop)


def write_checkpoint(root: Path, step: int, settings: dict | None = None) -> Path:
    """A complete checkpoint whose files load: weights, optimizer, scheduler, RNG state, trainer state."""
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    save_file({"weight": torch.arange(64, dtype=torch.float32)}, str(path / "model.safetensors"))
    torch.save({"state": {0: {"exp_avg": torch.zeros(64)}}, "param_groups": []}, path / "optimizer.pt")
    torch.save({"last_epoch": step}, path / "scheduler.pt")
    torch.save({"cpu": torch.zeros(8, dtype=torch.uint8)}, path / "rng_state.pth")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if settings is not None:
        (path / checkpoints.CLIP_SETTINGS_NAME).write_text(json.dumps(settings))
    return path


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def args_for(tmp_path, **overrides) -> BandGRPOConfig:
    kwargs = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", steps_per_generation=4)
    kwargs.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BandGRPOConfig(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# A fresh run into a used output_dir
# ---------------------------------------------------------------------------------------------------------------


def test_previous_run_outputs_are_checkpoints_and_a_saved_model_not_the_warmup_cache(tmp_path):
    assert checkpoints.previous_run_outputs(str(tmp_path / "missing")) == []
    (tmp_path / "warmup").mkdir()
    (tmp_path / "warmup" / "model.safetensors").write_bytes(b"")
    (tmp_path / "README.md").write_text("notes")
    assert checkpoints.previous_run_outputs(str(tmp_path)) == []
    write_checkpoint(tmp_path, 8)
    write_checkpoint(tmp_path, 12)
    (tmp_path / "checkpoint-4").mkdir()  # cut off while saving: still the other run's
    (tmp_path / "model.safetensors").write_bytes(b"x")
    (tmp_path / "trainer_state.json").write_text("{}")
    assert checkpoints.previous_run_outputs(str(tmp_path)) == [
        "checkpoint-4",
        "checkpoint-8",
        "checkpoint-12",
        "model.safetensors",
        "trainer_state.json",
    ]


def test_a_fresh_run_into_a_used_output_dir_is_refused_before_any_work(tmp_path, no_model_load):
    out = tmp_path / "run"
    write_checkpoint(out, 4)
    write_checkpoint(out, 8)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ValueError) as error:
        main([*TINY, "--output_dir", str(out), "--max_steps", "4", "--save_total_limit", "2"])
    message = str(error.value)
    assert f"output_dir {out} already holds the outputs of an earlier run (checkpoint-4, checkpoint-8)" in message
    assert "--resume_from_checkpoint latest" in message and "--overwrite_output_dir" in message
    assert sorted(p.name for p in out.iterdir()) == before  # no warm-up cache either: refused before any work

    # Resuming it, or only the tiny model's warm-up cache in output_dir: the run goes on to load the model.
    with pytest.raises(ReachedModelLoad):
        main([*TINY, "--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    fresh = tmp_path / "fresh"
    (fresh / "warmup").mkdir(parents=True)
    with pytest.raises(ReachedModelLoad):
        main([*TINY, "--output_dir", str(fresh)])


def test_a_saved_model_alone_counts_as_an_earlier_run(tmp_path, no_model_load):
    out = tmp_path / "run"
    out.mkdir()
    save_file({"weight": torch.zeros(4)}, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"already holds the outputs of an earlier run \(model.safetensors\)"):
        main([*TINY, "--output_dir", str(out)])


def test_overwrite_output_dir_deletes_the_earlier_run_and_keeps_the_warmup_cache(tmp_path, no_model_load, caplog):
    out = tmp_path / "run"
    for step in (4, 8, 12):
        write_checkpoint(out, step)
    save_file({"weight": torch.zeros(4)}, str(out / "model.safetensors"))
    (out / "trainer_state.json").write_text("{}")
    (out / "warmup").mkdir()
    (out / "warmup" / "warmup_key.txt").write_text("key\n")
    (out / "notes.txt").write_text("mine")
    with caplog.at_level("WARNING"), pytest.raises(ReachedModelLoad):
        main([*TINY, "--output_dir", str(out), "--overwrite_output_dir", "true"])
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "warmup"]
    assert (out / "warmup" / "warmup_key.txt").is_file()
    assert "overwrite_output_dir: deleting the earlier run's checkpoint-4, checkpoint-8, checkpoint-12" in caplog.text
    assert latest_complete_checkpoint(str(out)) is None


def test_overwrite_output_dir_and_resume_contradict_each_other(tmp_path, no_model_load):
    with pytest.raises(ValueError, match="overwrite_output_dir and resume_from_checkpoint='latest' contradict"):
        main(
            [
                *TINY,
                "--output_dir",
                str(tmp_path),
                "--overwrite_output_dir",
                "true",
                "--resume_from_checkpoint",
                "latest",
            ]
        )


def test_the_trainer_from_python_warns_before_writing_over_an_earlier_run(
    tmp_path, tiny_model_dir, tiny_train_dataset, monkeypatch
):
    # Trainer semantics from Python (a notebook reruns `trainer.train()` into one output_dir): a warning, no refusal.
    monkeypatch.setattr(GRPOTrainer, "train", lambda self, *args: "trained")
    args = args_for(tmp_path, bf16=False, per_device_train_batch_size=4, num_generations=4, max_completion_length=4)
    trainer = build_trainer(args, tiny_model_dir, tiny_train_dataset)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trainer.train() == "trained"  # an empty output_dir
    write_checkpoint(Path(args.output_dir), 2)
    with pytest.warns(UserWarning, match=r"already holds the outputs of an earlier run \(checkpoint-2\)"):
        assert trainer.train() == "trained"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trainer.train(resume_from_checkpoint=True) == "trained"  # continuing it


@pytest.mark.slow
def test_a_fresh_run_never_destroys_an_earlier_run(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(USER_RECIPE)
    out = tmp_path / "run"
    common = ["--config", str(recipe), "--output_dir", str(out), "--save_steps", "2"]
    first = run_script("bandpo-train", *common, "--max_steps", "6")
    assert first.returncode == 0, first.stderr[-3000:]
    saved = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "warmup" not in p.parts}
    assert {"checkpoint-2", "checkpoint-4", "checkpoint-6"} <= {p.name for p in out.iterdir()}

    again = run_script("bandpo-train", *common, "--max_steps", "2", "--save_total_limit", "2")
    assert again.returncode != 0
    assert "already holds the outputs of an earlier run (checkpoint-2, checkpoint-4, checkpoint-6" in again.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "warmup" not in p.parts} == saved

    over = run_script("bandpo-train", *common, "--max_steps", "2", "--overwrite_output_dir", "true")
    assert over.returncode == 0, over.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    assert latest_complete_checkpoint(str(out)) == str(out / "checkpoint-2")


# ---------------------------------------------------------------------------------------------------------------
# Resuming with other clip settings
# ---------------------------------------------------------------------------------------------------------------


def test_clip_settings_are_the_rule_its_options_and_trls_epsilons(tmp_path):
    band = checkpoints.clip_settings(args_for(tmp_path, band_delta=0.1))
    assert band == {
        "clip_rule": "band",
        "band_divergence": "kl",
        "band_delta": 0.1,
        "band_max_ratio": 10.0,
        "band_relax": False,
        "epsilon": 0.2,
        "epsilon_high": 0.2,
    }
    assert checkpoints.clip_settings(args_for(tmp_path, clip_rule="clip", epsilon_high=0.28)) == {
        "clip_rule": "clip",
        "epsilon": 0.2,
        "epsilon_high": 0.28,
    }
    assert checkpoints.clip_settings(args_for(tmp_path, clip_rule="dcpo"))["dcpo_epsilon_low"] == 0.16


def test_resuming_with_other_clip_settings_is_refused_naming_each(tmp_path, caplog):
    old = checkpoints.clip_settings(args_for(tmp_path, band_delta=0.05))
    checkpoint = write_checkpoint(tmp_path / "out", 4, settings=old)
    checkpoints.check_clip_settings(str(checkpoint), args_for(tmp_path, band_delta=0.05))  # the same: nothing to say
    with pytest.raises(ValueError) as error:
        checkpoints.check_clip_settings(str(checkpoint), args_for(tmp_path, band_delta=0.1, band_divergence="tv"))
    message = str(error.value)
    assert f"{checkpoint} was trained with other clip settings" in message
    assert "band_divergence 'kl' -> 'tv'" in message and "band_delta 0.05 -> 0.1" in message
    assert "--allow_clip_change" in message
    with pytest.raises(ValueError, match=r"clip_rule 'band' -> 'clip'"):
        checkpoints.check_clip_settings(str(checkpoint), args_for(tmp_path, clip_rule="clip"))
    with pytest.warns(UserWarning, match=r"clip_rule 'band' -> 'clip'.*continues with the new ones"):
        checkpoints.check_clip_settings(str(checkpoint), args_for(tmp_path, clip_rule="clip"), allow_change=True)

    older = write_checkpoint(tmp_path / "older", 4)  # saved before checkpoints recorded their clip settings
    with caplog.at_level("INFO"):
        checkpoints.check_clip_settings(str(older), args_for(tmp_path, clip_rule="clip"))
    assert f"{older} has no {checkpoints.CLIP_SETTINGS_NAME}" in caplog.text


def test_resume_with_another_clip_rule_is_refused_before_any_work(tmp_path, no_model_load):
    out = tmp_path / "run"
    write_checkpoint(out, 4, settings=checkpoints.clip_settings(args_for(tmp_path)))
    resume = ["--output_dir", str(out), "--resume_from_checkpoint", "latest"]
    with pytest.raises(ValueError, match=r"other clip settings: clip_rule 'band' -> 'clip'"):
        main([*TINY, *resume, "--clip_rule", "clip"])
    assert not (out / "warmup").exists()
    with pytest.warns(UserWarning, match="clip_rule 'band' -> 'clip'"), pytest.raises(ReachedModelLoad):
        main([*TINY, *resume, "--clip_rule", "clip", "--allow_clip_change", "true"])


@pytest.mark.slow
def test_checkpoints_record_their_clip_settings_and_a_resume_that_changes_them_is_refused(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(USER_RECIPE)
    out = tmp_path / "run"
    common = ["--config", str(recipe), "--output_dir", str(out), "--save_steps", "2"]
    first = run_script("bandpo-train", *common, "--max_steps", "2", "--band_delta", "0.1")
    assert first.returncode == 0, first.stderr[-3000:]
    recorded = json.loads((out / "checkpoint-2" / checkpoints.CLIP_SETTINGS_NAME).read_text())
    assert recorded["clip_rule"] == "band" and recorded["band_delta"] == 0.1

    resume = [*common, "--max_steps", "4", "--resume_from_checkpoint", "latest"]
    changed = run_script("bandpo-train", *resume, "--clip_rule", "clip")
    assert changed.returncode != 0
    assert "other clip settings: clip_rule 'band' -> 'clip'" in changed.stderr
    assert not (out / "checkpoint-4").exists()
    allowed = run_script("bandpo-train", *resume, "--clip_rule", "clip", "--allow_clip_change", "true")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "clip_rule 'band' -> 'clip'" in allowed.stderr
    assert json.loads((out / "checkpoint-4" / checkpoints.CLIP_SETTINGS_NAME).read_text())["clip_rule"] == "clip"


# ---------------------------------------------------------------------------------------------------------------
# A corrupt newest checkpoint
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda c: truncate(c / "model.safetensors"), r"model.safetensors is truncated: .* bytes of tensor data"),
        (lambda c: (c / "model.safetensors").write_bytes(b"\x05"), r"model.safetensors is truncated"),
        (lambda c: truncate(c / "optimizer.pt"), r"optimizer.pt is truncated or corrupt"),
        (lambda c: (c / "scheduler.pt").write_bytes(b""), r"scheduler.pt is empty"),
        (lambda c: truncate(c / "rng_state.pth", keep=0.9), r"rng_state.pth is truncated or corrupt"),
    ],
)
def test_latest_skips_a_newest_checkpoint_whose_files_do_not_load(tmp_path, caplog, damage, reason):
    write_checkpoint(tmp_path, 4)
    newest = write_checkpoint(tmp_path, 8)
    damage(newest)
    with caplog.at_level("WARNING"):
        assert resolve_resume_checkpoint("latest", str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert "Skipping checkpoint" in caplog.text and str(newest) in caplog.text
    assert re.search(reason, caplog.text), caplog.text
    with pytest.raises(ValueError, match=rf"checkpoint-8'? cannot be resumed from: {reason}"):
        resolve_resume_checkpoint(str(newest), str(tmp_path))


def test_sharded_adapter_and_deepspeed_files_are_checked(tmp_path):
    sharded = write_checkpoint(tmp_path, 2)
    (sharded / "model.safetensors").unlink()
    save_file({"a": torch.zeros(8)}, str(sharded / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(8)}, str(sharded / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert checkpoint_problem(str(sharded)) is None
    (sharded / "model-00002-of-00002.safetensors").unlink()
    assert checkpoint_problem(str(sharded)) == (
        "model.safetensors.index.json lists model-00002-of-00002.safetensors, which is missing"
    )

    adapter = write_checkpoint(tmp_path, 3)
    save_file({"lora": torch.zeros(16)}, str(adapter / "adapter_model.safetensors"))
    truncate(adapter / "adapter_model.safetensors", keep=0.8)
    assert checkpoint_problem(str(adapter)).startswith("adapter_model.safetensors is truncated")

    deepspeed = write_checkpoint(tmp_path, 5)
    (deepspeed / "latest").write_text("global_step5")
    (deepspeed / "global_step5").mkdir()
    torch.save({"module": {"w": torch.zeros(32)}}, deepspeed / "global_step5" / "mp_rank_00_model_states.pt")
    torch.save({"state": torch.zeros(32)}, deepspeed / "global_step5" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert checkpoint_problem(str(deepspeed)) is None
    truncate(deepspeed / "global_step5" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert checkpoint_problem(str(deepspeed)).startswith(
        f"global_step5{os.sep}zero_pp_rank_0_mp_rank_00_optim_states.pt is truncated or corrupt"
    )


def test_a_corrupt_explicit_checkpoint_is_refused_before_any_work(tmp_path, no_model_load):
    out = tmp_path / "run"
    checkpoint = write_checkpoint(out, 4)
    truncate(checkpoint / "model.safetensors")
    with pytest.raises(ValueError, match=r"cannot be resumed from: model.safetensors is truncated"):
        main([*TINY, "--output_dir", str(out), "--resume_from_checkpoint", str(checkpoint)])


# ---------------------------------------------------------------------------------------------------------------
# Options that do nothing
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "unread"),
    [
        (dict(clip_rule="clip", band_relax=True), "band_relax=True"),
        (dict(clip_rule="clip", band_divergence="tv", band_delta=0.1), "band_divergence='tv', band_delta=0.1"),
        (dict(clip_rule="dcpo", band_relax=True), "band_relax=True"),
        (dict(clip_rule="dcpo", band_delta=0.1), "band_delta=0.1"),
    ],
)
def test_band_options_with_clip_or_dcpo_warn_once(tmp_path, overrides, unread):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        BandGRPOConfig(output_dir=str(tmp_path), steps_per_generation=4, **overrides)
    messages = [str(w.message) for w in caught if "does not read" in str(w.message)]
    assert len(messages) == 1 and f"does not read {unread}: these settings have no effect" in messages[0]


# ---------------------------------------------------------------------------------------------------------------
# Zero and negative counts
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(num_iterations=0), r"num_iterations must be a positive integer \(1 or more\), got 0"),
        (dict(gradient_accumulation_steps=0), r"gradient_accumulation_steps must be a positive integer .*got 0"),
        (dict(gradient_accumulation_steps=-2), r"gradient_accumulation_steps must be a positive integer .*got -2"),
        (dict(steps_per_generation=0), r"steps_per_generation must be a positive integer .*got 0"),
        (dict(max_steps=-5), r"max_steps must be a positive number of optimizer steps, or -1 .*got -5"),
        (dict(max_steps=0), r"max_steps must be a positive number of optimizer steps, or -1 .*got 0"),
        (dict(num_train_epochs=0), r"num_train_epochs must be > 0 when max_steps=-1 .*got 0"),
        (dict(save_steps=-1), r"save_steps must be > 0 with save_strategy='steps' .*got -1"),
        (dict(save_steps=0), r"save_steps must be > 0 with save_strategy='steps' .*got 0"),
    ],
)
def test_zero_and_negative_counts_are_named_errors(tmp_path, overrides, message):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=message):
            BandGRPOConfig(output_dir=str(tmp_path), **overrides)
    assert not [w for w in caught if issubclass(w.category, UserWarning)]  # no nonsense "0 * 1" warning first


def test_counts_that_are_fine_are_accepted(tmp_path):
    args = args_for(tmp_path, max_steps=-1, num_train_epochs=0.5, save_strategy="no", save_steps=-1)
    assert args.max_steps == -1
    assert args_for(tmp_path, save_steps=0.25).save_steps == 0.25  # a fraction of the run, as Trainer reads it


def test_zero_and_negative_counts_are_refused_by_the_entry_point_before_any_work(tmp_path, no_model_load):
    for flag, value in (("--num_iterations", "0"), ("--gradient_accumulation_steps", "0"), ("--max_steps", "-5")):
        with pytest.raises(ValueError, match=rf"{flag[2:]} must be a positive"):
            main([*TINY, "--output_dir", str(tmp_path), flag, value])
    with pytest.raises(ValueError, match="eval_num_problems must be a positive number of problems"):
        main([*TINY, "--output_dir", str(tmp_path), "--eval_num_problems", "0"])


def test_eval_counts_and_eval_every_steps_without_benchmarks():
    with pytest.raises(ValueError, match=r"eval_num_problems must be a positive number of problems .*got 0"):
        ScriptArguments(eval_num_problems=0)
    with pytest.raises(ValueError, match=r"eval_k must be a positive number of samples per problem, got -1"):
        ScriptArguments(eval_k=-1)
    with pytest.warns(UserWarning, match=r"eval_every_steps=10 is set but eval_benchmarks is empty"):
        ScriptArguments(eval_every_steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ScriptArguments(eval_num_problems=None)
        ScriptArguments(eval_every_steps=0)


# ---------------------------------------------------------------------------------------------------------------
# Warnings once; the model card
# ---------------------------------------------------------------------------------------------------------------


def build_trainer(args, tiny_model_dir, tiny_train_dataset, trainer_cls=BandGRPOTrainer):
    return trainer_cls(
        model=str(tiny_model_dir),
        reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
        args=args,
        train_dataset=tiny_train_dataset,
    )


def test_config_warnings_are_printed_once_per_run(tmp_path, tiny_model_dir, tiny_train_dataset):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # save_steps=3 inside a 2-step generation batch; band_delta with dcpo has no effect.
        args = BandGRPOConfig(
            output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to="none", per_device_train_batch_size=4,
            num_generations=4, steps_per_generation=2, save_strategy="steps", save_steps=3, clip_rule="dcpo",
            band_delta=0.1,
        )  # fmt: skip
        build_trainer(args, tiny_model_dir, tiny_train_dataset)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert sum("generation batch" in m for m in messages) == 1, messages
    assert sum("does not read band_delta" in m for m in messages) == 1, messages

    # A setting changed after the config was built is still checked by the trainer.
    args.save_steps = 5
    with pytest.warns(UserWarning, match="save_steps=5 is not a multiple"):
        build_trainer(args, tiny_model_dir, tiny_train_dataset)
    args.num_iterations = 0
    with pytest.raises(ValueError, match="num_iterations must be a positive integer"):
        build_trainer(args, tiny_model_dir, tiny_train_dataset)


def test_model_card_names_bandpo_and_cites_both_papers(tmp_path, tiny_model_dir, tiny_train_dataset):
    args = args_for(tmp_path, bf16=False, per_device_train_batch_size=4, num_generations=4)
    trainer = build_trainer(args, tiny_model_dir, tiny_train_dataset)
    trainer.create_model_card(model_name="tiny-bandpo")
    card = (Path(args.output_dir) / "README.md").read_text()
    header = card.split("---")[1]
    assert "- bandpo" in header and "- grpo" in header and "- trl" in header
    assert "This model was trained with BandPO, a method introduced in [BandPO: Bridging Trust Regions" in card
    assert "(https://huggingface.co/papers/2603.04918)" in card
    assert "Cite BandPO as:" in card
    assert "eprint       = {arXiv:2603.04918}" in card
    assert "shao2024deepseekmath" in card  # GRPO's own paper stays cited
    assert BandGRPOTrainer._tag_names == ["trl", "grpo", "bandpo"] and GRPOTrainer._tag_names == ["trl", "grpo"]
