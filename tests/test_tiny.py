"""The embedded default's tokenizer, model and warm-up, all built locally."""

from __future__ import annotations

import os

import pytest
import torch

import bandpo_trl.tiny as tiny
from bandpo_trl.data import load_named_dataset
from bandpo_trl.tiny import CHARACTERS, build_tiny_model, build_tiny_tokenizer, warm_up_cached


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_tokenizer_is_one_token_per_character_and_round_trips(tokenizer):
    text = "Solve: 3+5=?\nAnswer: $\\frac{1}{2}$ (x_1, y^2) ~ 100%"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens(tokenizer("3+5=")["input_ids"]) == ["3", "+", "5", "="]


def test_tokenizer_special_tokens(tokenizer):
    assert len(tokenizer) == len(CHARACTERS) + 3
    assert len({tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id}) == 3
    ids = tokenizer("7<|endoftext|>")["input_ids"]
    assert ids == [tokenizer.convert_tokens_to_ids("7"), tokenizer.eos_token_id]  # eos is one token, not 13 chars
    assert tokenizer("é")["input_ids"] == [tokenizer.unk_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "7"
    batch = tokenizer(["1=", "12+3="], padding=True)["input_ids"]
    assert batch[0][:3] == [tokenizer.pad_token_id] * 3  # left padding, as generation needs


def test_chat_template(tokenizer):
    messages = [{"role": "user", "content": "2+2="}]
    assert (
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        == "user: 2+2=\nassistant: "
    )


def test_model_is_seeded_float32_and_matches_the_tokenizer(tokenizer):
    a = build_tiny_model(tokenizer, hidden_size=32, num_hidden_layers=1, seed=1)
    b = build_tiny_model(tokenizer, hidden_size=32, num_hidden_layers=1, seed=1)
    c = build_tiny_model(tokenizer, hidden_size=32, num_hidden_layers=1, seed=2)
    weight = "model.embed_tokens.weight"
    assert torch.equal(a.state_dict()[weight], b.state_dict()[weight])
    assert not torch.equal(a.state_dict()[weight], c.state_dict()[weight])
    assert a.dtype == torch.float32
    assert a.config.vocab_size == len(tokenizer)
    assert a.generation_config.eos_token_id == tokenizer.eos_token_id
    # Seeding the model leaves the global random stream alone.
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    build_tiny_model(tokenizer, hidden_size=32, num_hidden_layers=1, seed=5)
    assert torch.equal(torch.rand(1), expected)


@pytest.fixture
def one_thread():
    """The tiny model trains fastest on one thread (its matrices are too small to split); restore afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sft_rows(num_samples=256, seed=0):
    rows = load_named_dataset("toy_arithmetic", split="warmup", num_samples=num_samples, seed=seed)
    return rows.map(lambda r: {"completion": r["answer"]}).select_columns(["prompt", "completion"])


def test_warm_up_learns_and_is_cached(tmp_path, monkeypatch, tokenizer, one_thread):
    sft = sft_rows()
    kwargs = {"max_steps": 40, "learning_rate": 3e-3, "batch_size": 32}
    model_kwargs = {"hidden_size": 32, "num_hidden_layers": 1}

    path = warm_up_cached(str(tmp_path), sft, model_kwargs=model_kwargs, **kwargs)
    assert path == os.path.join(str(tmp_path), "warmup")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "warmup_key.txt"):
        assert os.path.isfile(os.path.join(path, name)), name

    # The warmed-up model puts far more mass on the right answers than the random-init one (log 1/100 per answer).
    from transformers import AutoModelForCausalLM

    def answer_logprob(model):
        texts = [p + c + tokenizer.eos_token for p, c in zip(sft["prompt"][:64], sft["completion"][:64])]
        total = 0.0
        for text, prompt in zip(texts, sft["prompt"][:64]):
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            with torch.no_grad():
                logps = model(ids).logits.log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
            total += logps[len(prompt) - 1 :].sum().item()
        return total / len(texts)

    fresh = build_tiny_model(tokenizer, **model_kwargs)
    warm = AutoModelForCausalLM.from_pretrained(path)
    assert answer_logprob(warm) > answer_logprob(fresh) + 3.0

    # Same settings and the same rows (built again, as a rerun would): reused. Other settings or data: trained again.
    def fail(*args, **kwargs):
        raise AssertionError("warm-up should have been reused")

    monkeypatch.setattr(tiny, "warm_up", fail)
    assert warm_up_cached(str(tmp_path), sft_rows(), model_kwargs=model_kwargs, **kwargs) == path
    with pytest.raises(AssertionError, match="reused"):
        warm_up_cached(str(tmp_path), sft_rows(), model_kwargs=model_kwargs, **dict(kwargs, max_steps=41))
    with pytest.raises(AssertionError, match="reused"):
        warm_up_cached(str(tmp_path), sft_rows(seed=1), model_kwargs=model_kwargs, **kwargs)
