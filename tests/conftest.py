"""Shared fixtures: the tiny locally built model (no Hub access anywhere in the suite), a restored divergence
registry."""

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


@pytest.fixture
def divergence_registry():
    """The divergence registry is restored after the test: divergences it registers (by name or by import path) are
    dropped, and ones it replaces come back."""
    from bandpo_trl import divergences

    registry, aliases = dict(divergences._REGISTRY), dict(divergences._ALIASES)
    yield
    divergences._REGISTRY.clear()
    divergences._REGISTRY.update(registry)
    divergences._ALIASES.clear()
    divergences._ALIASES.update(aliases)
