"""Generation (`bandpo_trl.evaluation.generation`): prompts encoded as TRL encodes them, the transformers sampler
(explicit sampling settings, left padding, batching, seeding) and the choice of backend."""

from __future__ import annotations

import importlib.util

import pytest
from eval_helpers import NO_THINKING, thinking_tokenizer

from bandpo_trl.evaluation import (
    SamplingSettings,
    TransformersGenerator,
    encode_prompt,
    generation,
    resolve_backend,
    sampling_generation_config,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest


def test_sampling_config_overrides_the_model_generation_defaults(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # What a Hub checkpoint's generation_config.json often holds: all of it would silently change the distribution.
    model.generation_config.update(do_sample=True, top_k=20, top_p=0.8, temperature=0.6, repetition_penalty=1.05)
    model.generation_config.min_p = 0.1
    config = sampling_generation_config(model, tokenizer, SamplingSettings(temperature=1.0, max_new_tokens=7))
    resolved, _ = model._prepare_generation_config(config)
    assert resolved.do_sample and resolved.temperature == 1.0 and resolved.top_p == 1.0
    assert resolved.top_k == 0 and resolved.repetition_penalty == 1.0 and resolved.min_p == 0.0
    assert resolved.max_new_tokens == 7 and resolved.eos_token_id == [tokenizer.eos_token_id]
    greedy = sampling_generation_config(model, tokenizer, SamplingSettings(temperature=0.0))
    assert not model._prepare_generation_config(greedy)[0].do_sample


def test_encode_prompt_plain_and_conversational(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.decode(encode_prompt(tokenizer, "12+35=")) == "12+35="
    messages = [{"role": "user", "content": "2+2?"}]
    assert tokenizer.decode(encode_prompt(tokenizer, messages)) == "user: 2+2?\nassistant: "


def test_encode_prompt_passes_chat_template_kwargs_like_trl():
    tokenizer = thinking_tokenizer()
    messages = [{"role": "user", "content": "1+1="}]
    assert tokenizer.decode(encode_prompt(tokenizer, messages)) == "user: 1+1=\nassistant: "
    ids = encode_prompt(tokenizer, messages, NO_THINKING)
    assert tokenizer.decode(ids) == "user: 1+1=\nassistant: <think>\n\n</think>\n\n"
    # GRPOTrainer's own call (trl 1.16, `_tokenize_prompts`): the batch form with `**self.chat_template_kwargs`.
    trl_ids = tokenizer.apply_chat_template(
        conversation=[messages], add_generation_prompt=True, tokenize=True, return_dict=True, **NO_THINKING
    )["input_ids"][0]
    assert ids == list(trl_ids)
    assert encode_prompt(tokenizer, messages, '{"enable_thinking": false}') == ids  # the JSON form of the CLI
    assert encode_prompt(tokenizer, "1+1=", NO_THINKING) == encode_prompt(tokenizer, "1+1=")  # no template: unchanged


def test_transformers_generator_left_padding_and_batching(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [encode_prompt(tokenizer, p) for p in ["7=", "12+35=", "1+1+1+1="]]
    kwargs = dict(sampling=SamplingSettings(temperature=0.0, max_new_tokens=5), show_progress=False)
    alone = [TransformersGenerator(model, tokenizer, batch_size=1, **kwargs).generate([p], 1)[0][0] for p in prompts]
    batched = TransformersGenerator(model, tokenizer, batch_size=8, **kwargs).generate(prompts, 1)
    # Greedy decoding of a left-padded batch gives what each prompt gives on its own.
    assert [row[0].text for row in batched] == [c.text for c in alone]
    assert all(c.num_tokens == 5 or c.finished for c in alone)

    calls = []
    original = model.generate

    def counting_generate(*args, **kw):
        out = original(*args, **kw)
        calls.append((kw["input_ids"].shape[0], kw["generation_config"].num_return_sequences, out.shape[0]))
        return out

    model.generate = counting_generate
    sampler = TransformersGenerator(
        model, tokenizer, SamplingSettings(temperature=1.0, max_new_tokens=3), show_progress=False, batch_size=2
    )
    samples = sampler.generate(prompts, 3)  # batch_size < n: 2 + 1 samples per prompt
    assert [len(row) for row in samples] == [3, 3, 3]
    assert calls == [(1, 2, 2), (1, 1, 1)] * 3
    calls.clear()
    TransformersGenerator(
        model, tokenizer, SamplingSettings(max_new_tokens=3), show_progress=False, batch_size=7
    ).generate(prompts, 3)
    assert calls == [(2, 3, 6), (1, 3, 3)]  # 7 // 3 = 2 prompts with all their samples per call


def test_transformers_generator_is_seeded(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    generator = TransformersGenerator(model, tokenizer, SamplingSettings(max_new_tokens=6), show_progress=False)
    prompts = [encode_prompt(tokenizer, "12+35=")]

    def texts(seed):
        set_seed(seed)
        return [c.text for c in generator.generate(prompts, 4)[0]]

    assert texts(0) == texts(0)
    assert texts(0) != texts(1)
    assert len(set(texts(0))) > 1  # temperature 1.0 on a random model: diverse samples


def test_resolve_backend(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(has_vllm):
        return lambda name, *a: (object() if has_vllm else None) if name == "vllm" else real_find_spec(name, *a)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec(False))
    assert resolve_backend("auto") == "transformers"
    assert resolve_backend("transformers") == "transformers"
    with pytest.raises(ImportError, match="vllm"):
        resolve_backend("vllm")
    monkeypatch.setattr(importlib.util, "find_spec", find_spec(True))
    monkeypatch.setattr(generation, "_cuda_available", lambda: False)
    assert resolve_backend("auto") == "transformers"
    with pytest.raises(RuntimeError, match="CUDA"):
        resolve_backend("vllm")
    monkeypatch.setattr(generation, "_cuda_available", lambda: True)
    assert resolve_backend("auto") == "vllm"
    with pytest.raises(ValueError):
        resolve_backend("tgi")
