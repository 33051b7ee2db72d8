"""Models and tokenizers (`bandpo_trl.models`): named models resolved to a local directory in one place, and the one
tokenizer loader of training and evaluation."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest

from bandpo_trl import models
from bandpo_trl.arguments import TinyModelArguments, make_parser
from bandpo_trl.evaluation import load_model_and_tokenizer
from bandpo_trl.models import (
    NAMED_MODELS,
    TINY_MODEL_NAME,
    available_models,
    load_tokenizer,
    resolve_model_name,
    tokenizer_source,
)


@pytest.fixture
def training_args(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # on-policy defaults: Band is a no-op, which these tests do not care about
        _, args, _, _ = make_parser().parse_args_and_config(args=["--output_dir", str(tmp_path), "--use_cpu", "true"])
    return args


def test_hub_ids_and_paths_pass_through(training_args, tmp_path):
    assert available_models() == sorted([TINY_MODEL_NAME, "smollm2-135m-instruct"])
    for name in ("Qwen/Qwen2.5-3B-Instruct", str(tmp_path), "./tiny-copy", "tiny2"):
        assert resolve_model_name(name, training_args) == name
    assert list(tmp_path.iterdir()) == []  # nothing was built


def test_a_named_model_is_built_by_its_registered_builder(training_args, monkeypatch):
    calls = []

    def build(args, tiny_args):
        calls.append((args, tiny_args))
        return f"{args.output_dir}/converted"

    monkeypatch.setitem(NAMED_MODELS, "my-model", build)
    assert "my-model" in available_models()
    assert resolve_model_name("my-model", training_args) == f"{training_args.output_dir}/converted"
    assert calls == [(training_args, TinyModelArguments())]  # the named models' options, defaults when not given


def test_tiny_resolves_to_its_warmed_up_directory(training_args, monkeypatch):
    tiny_args = TinyModelArguments(tiny_warmup_steps=3)
    seen = []
    monkeypatch.setattr(models, "load_tiny", lambda tiny, args: seen.append((tiny, args)) or "built/warmup")
    assert resolve_model_name(TINY_MODEL_NAME, training_args, tiny_args) == "built/warmup"
    assert seen == [(tiny_args, training_args)]


def test_load_tokenizer_pads_and_truncates_on_the_left_like_trl(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert (tokenizer.padding_side, tokenizer.truncation_side) == ("left", "left")
    batch = tokenizer(["1+1=", "12+35="], padding=True)
    assert batch["input_ids"][0][0] == tokenizer.pad_token_id  # the shorter prompt is padded in front


def test_the_tokenizer_of_an_adapter_directory_wins_when_it_has_one(tiny_model_dir, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model_dir)}))
    assert tokenizer_source(str(tiny_model_dir), str(adapter)) == str(tiny_model_dir)  # no tokenizer there
    assert len(load_tokenizer(str(tiny_model_dir), str(adapter))) == len(load_tokenizer(str(tiny_model_dir)))
    # Training added a token and saved the tokenizer with the adapter: that one is loaded.
    changed = load_tokenizer(str(tiny_model_dir))
    changed.add_tokens(["<step>"])
    changed.save_pretrained(adapter)
    assert tokenizer_source(str(tiny_model_dir), str(adapter)) == str(adapter)
    assert len(load_tokenizer(str(tiny_model_dir), str(adapter))) == len(changed)
    assert load_tokenizer(str(tiny_model_dir), str(adapter)).padding_side == "left"


def test_evaluation_loads_the_same_tokenizer_as_training(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    _, tokenizer = load_model_and_tokenizer(str(model_dir), device="cpu")
    reference = load_tokenizer(str(model_dir))
    assert type(tokenizer) is type(reference) and tokenizer.get_vocab() == reference.get_vocab()
    assert (tokenizer.padding_side, tokenizer.truncation_side) == ("left", "left")
