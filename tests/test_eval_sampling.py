"""`SamplingSettings` (`bandpo_trl.evaluation.sampling`): one set of defaults for every way of evaluating, checked
values, and the greedy rule (temperature 0) applied alike by every generator."""

from __future__ import annotations

import dataclasses
import inspect
import logging

import pytest
import torch

from bandpo_trl.arguments import ScriptArguments
from bandpo_trl.evaluation import (
    BenchmarkEvalCallback,
    EvalArguments,
    SamplingSettings,
    TransformersGenerator,
    VLLMClientGenerator,
    VLLMGenerator,
    encode_prompt,
    sampling_generation_config,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest

GREEDY_WITH_FILTERS = SamplingSettings(temperature=0, top_p=0.3, top_k=2, max_new_tokens=4, seed=5)


def test_defaults_are_the_papers_evaluation_and_shared():
    paper = SamplingSettings()
    assert (paper.temperature, paper.top_p, paper.top_k, paper.max_new_tokens, paper.seed) == (1.0, 1.0, 0, 4096, 0)
    assert EvalArguments(model="m").sampling == paper  # bandpo-eval's flags default to the settings' values
    # The in-training evaluation differs on purpose: shorter completions, and bandpo-train's defaults are the
    # callback's (k, problems per benchmark).
    callback = BenchmarkEvalCallback(["toy_arithmetic"], every_n_steps=1)
    assert callback.sampling == dataclasses.replace(paper, max_new_tokens=512)
    defaults = inspect.signature(BenchmarkEvalCallback).parameters
    script = ScriptArguments()
    assert (script.eval_k, script.eval_num_problems) == (defaults["k"].default, defaults["num_problems"].default)


def test_eval_arguments_sampling_flags_make_up_the_settings():
    args = EvalArguments(model="m", temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=128, seed=3)
    assert args.sampling == SamplingSettings(temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=128, seed=3)
    with pytest.raises(ValueError, match="`temperature` must be >= 0.*-1"):
        EvalArguments(model="m", temperature=-1)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", -0.1, r"`temperature` must be >= 0 \(0 is greedy decoding\), got -0.1"),
        ("top_p", 0.0, r"`top_p` must be in \(0, 1\], got 0.0"),
        ("top_p", 1.5, r"`top_p` must be in \(0, 1\], got 1.5"),
        ("top_k", -1, r"`top_k` must be >= 0 \(0 disables it\), got -1"),
        ("max_new_tokens", 0, "`max_new_tokens` must be >= 1, got 0"),
    ],
)
def test_bad_values_are_refused_by_name(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingSettings(**{field: value})


def test_settings_are_frozen_and_typed():
    settings = SamplingSettings(temperature=1, top_p=1, max_new_tokens=7.0)
    assert isinstance(settings.temperature, float) and isinstance(settings.top_p, float)
    assert isinstance(settings.max_new_tokens, int) and settings.max_new_tokens == 7
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.temperature = 0.5
    assert settings == SamplingSettings(max_new_tokens=7)  # comparable: the same settings are equal


def test_greedy_rule():
    assert SamplingSettings(temperature=0).greedy and SamplingSettings(temperature=0.0).greedy
    assert not SamplingSettings(temperature=1e-6).greedy
    # Greedy decoding keeps the most likely token, which no top-p / top-k filter removes: the filters are neutral.
    assert GREEDY_WITH_FILTERS.effective() == SamplingSettings(
        temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=4, seed=5
    )
    sampled = SamplingSettings(temperature=0.7, top_p=0.9, top_k=20)
    assert sampled.effective() is sampled


def test_every_generator_applies_the_greedy_rule_alike(tiny_model_dir):
    """transformers, a vLLM engine and a vLLM server get the same greedy request: no sampling, neutral filters."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = sampling_generation_config(model, tokenizer, GREEDY_WITH_FILTERS)
    assert (config.do_sample, config.top_p, config.top_k, config.max_new_tokens) == (False, 1.0, 0, 4)

    engine = VLLMGenerator.from_llm(object(), GREEDY_WITH_FILTERS)
    assert engine.sampling_params(3) == {"n": 3, "temperature": 0.0, "top_p": 1.0, "max_tokens": 4, "seed": 5}
    sampled = VLLMGenerator.from_llm(object(), SamplingSettings(temperature=0.7, top_p=0.9, top_k=20, seed=1))
    assert sampled.sampling_params(2) == {
        "n": 2, "temperature": 0.7, "top_p": 0.9, "max_tokens": 4096, "top_k": 20, "seed": 1
    }  # fmt: skip

    class Client:
        def generate(self, prompts, n, **kwargs):
            self.kwargs = kwargs
            return {"completion_ids": [[tokenizer.eos_token_id]] * (len(prompts) * n)}

    client = Client()
    VLLMClientGenerator(client, tokenizer, GREEDY_WITH_FILTERS).generate([[1, 2]], 2)
    assert {key: client.kwargs[key] for key in ("temperature", "top_p", "top_k", "max_tokens")} == {
        "temperature": 0.0, "top_p": 1.0, "top_k": 0, "max_tokens": 4
    }  # fmt: skip
    assert client.kwargs["generation_kwargs"] == {"seed": 5}


def test_greedy_generation_is_the_argmax_of_the_logits(tiny_model_dir):
    """Temperature 0 with any top-p / top-k: every sample is the token-by-token argmax continuation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = encode_prompt(tokenizer, "12+35=")
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(GREEDY_WITH_FILTERS.max_new_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] == tokenizer.eos_token_id:
                break
    expected = tokenizer.decode(ids[len(prompt) :], skip_special_tokens=True)
    generator = TransformersGenerator(model, tokenizer, GREEDY_WITH_FILTERS, show_progress=False)
    samples = generator.generate([prompt], 3)[0]
    assert [sample.text for sample in samples] == [expected] * 3


def test_greedy_with_several_samples_warns(caplog):
    with caplog.at_level(logging.WARNING):
        EvalArguments(model="m", temperature=0, k=4)
    assert "temperature=0 is greedy decoding: the 4 samples of a problem are identical" in caplog.text
