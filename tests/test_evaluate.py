"""Evaluation: the pass@k / mean@k estimators, scoring, generation backends, the `bandpo-eval` command and the callback.

The end-to-end runs use tiny models built and trained here in a few seconds: an "oracle" that memorised the answers of
the toy problems it is evaluated on (so mean@k = pass@k = 1 through real sampling), and a LoRA adapter that turns a
base model with swapped answers (mean@k = 0) into one with the right answers.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import pytest
import torch

from bandpo_trl.evaluation import (
    BenchmarkEvalCallback,
    Completion,
    EvalArguments,
    SamplingSettings,
    TransformersGenerator,
    encode_prompt,
    evaluate_benchmark,
    format_results_table,
    generation,
    get_checker,
    main,
    resolve_backend,
    resolve_model_and_adapter,
    sampling_generation_config,
    score_completions,
)
from bandpo_trl.metrics import mean_at_k, pass_at_k, problem_pass_at_k

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_TOY = 2  # toy problems of the end-to-end runs


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy 2-core machine they slow everything down a lot.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------------------------
# Estimators
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 2, 0.7),  # 1 - C(3, 2) / C(5, 2) = 1 - 3/10
        (4, 1, 2, 0.5),  # 1 - C(3, 2) / C(4, 2) = 1 - 3/6
        (3, 1, 2, 2 / 3),  # 1 - C(2, 2) / C(3, 2) = 1 - 1/3
        (6, 2, 3, 0.8),  # 1 - C(4, 3) / C(6, 3) = 1 - 4/20
        (10, 3, 1, 0.3),  # pass@1 = c / n
        (32, 4, 1, 0.125),
        (32, 1, 32, 1.0),  # one correct sample is enough for pass@n
        (32, 1, 16, 0.5),  # 1 - C(31, 16) / C(32, 16) = 1 - 16/32
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-15)


def test_pass_at_k_edge_cases():
    for n in (1, 2, 7, 32):
        for k in range(1, n + 1):
            assert pass_at_k(n, 0, k) == 0.0  # c = 0
            assert pass_at_k(n, n, k) == 1.0  # c = n
        for c in range(1, n + 1):
            assert pass_at_k(n, c, n) == 1.0  # k = n: solved iff any sample is correct
    assert pass_at_k(10, 3, 1) == 0.3  # pass@1 exactly c / n, no rounding drift
    with pytest.raises(ValueError, match=r"k=5 > n=4"):
        pass_at_k(4, 1, 5)  # k > n
    with pytest.raises(ValueError, match="k=33 > n=32"):
        pass_at_k(32, 0, 33)
    for bad in [(4, 5, 1), (4, -1, 1), (4, 1, 0), (0, 0, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)
    for bad in [(4.0, 1, 1), (4, 1, True)]:
        with pytest.raises(TypeError):
            pass_at_k(*bad)


def test_pass_at_k_equals_binomial_formula_and_is_monotone():
    for n in range(1, 13):
        for c in range(n + 1):
            values = [pass_at_k(n, c, k) for k in range(1, n + 1)]
            for k, value in zip(range(1, n + 1), values):
                assert value == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-14)
            assert values == sorted(values)  # more tries never hurt
            if c < n:
                assert pass_at_k(n, c, 1) <= pass_at_k(n, c + 1, 1)


def test_pass_at_k_large_n_is_stable():
    assert pass_at_k(1000, 1, 1) == 0.001
    # log-space reference: C(n - c, k) / C(n, k) = exp(lgamma terms)
    n, c, k = 10_000, 30, 500
    log_ratio = (
        math.lgamma(n - c + 1) - math.lgamma(n - c - k + 1) - math.lgamma(n + 1) + math.lgamma(n - k + 1)
    )  # C(n-c, k) / C(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.exp(log_ratio), rel=1e-9)
    assert 0 < pass_at_k(n, 1, 1) < pass_at_k(n, 1, 2) < 1


def test_mean_at_k_and_benchmark_pass_at_k():
    correct = [[True, False, False, False], [True, True, True, True], [False, False, False, False]]
    assert mean_at_k(correct) == pytest.approx(5 / 12)
    assert problem_pass_at_k(correct, 1) == pytest.approx((1 / 4 + 1 + 0) / 3)
    assert problem_pass_at_k(correct, 1) == pytest.approx(mean_at_k(correct))  # pass@1 = mean@k for equal n
    assert problem_pass_at_k(correct, 2) == pytest.approx((0.5 + 1 + 0) / 3)  # 1 - C(3,2)/C(4,2) = 0.5
    assert problem_pass_at_k(correct, 4) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="k=5 > n=4"):
        problem_pass_at_k(correct, 5)
    with pytest.raises(ValueError):
        mean_at_k([])
    with pytest.raises(ValueError):
        mean_at_k([[True], []])


# --------------------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------------------


def test_score_math_samples_with_the_accuracy_reward_checker():
    from bandpo_trl.rewards import math_accuracy_reward

    completions = [
        "Half of one is a half.\nAnswer: 0.5",
        r"So the result is $\boxed{\frac{1}{2}}$.",
        "Answer: \\dfrac12",
        "Answer: 2",
        "I am not sure.",
    ]
    answers, correct = score_completions(completions, r"\frac{1}{2}")
    assert correct == [True, True, True, False, False]
    assert answers == ["0.5", r"\frac{1}{2}", "\\dfrac12", "2", None]
    # The same verdicts as the reward used in training.
    rewards = math_accuracy_reward(completions, answer=[r"\frac{1}{2}"] * len(completions))
    assert [r == 1.0 for r in rewards] == correct
    checker, _ = get_checker("aime24")
    assert checker("Answer: 204", "204") and not checker("Answer: 205", "204")


def test_score_toy_samples_with_the_toy_reward_checker():
    checker, extractor = get_checker("toy_arithmetic")
    answers, correct = score_completions(["47", " 47\n", "48", "47 apples", ""], "47", checker, extractor)
    assert correct == [True, True, False, False, False]
    assert answers == ["47", "47", "48", None, None]


class ScriptedGenerator:
    """Returns pre-written completions per prompt (keyed by the prompt's token ids)."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script, self.calls = tokenizer, script, []

    def generate(self, prompts, n, desc=None):
        self.calls.append((len(prompts), n))
        out = []
        for ids in prompts:
            texts = self.script[self.tokenizer.decode(ids)]
            assert len(texts) == n
            out.append([Completion(text=t, num_tokens=len(t) + 1, finished=t != "") for t in texts])
        return out


def test_evaluate_benchmark_metrics_and_records():
    from datasets import Dataset

    from bandpo_trl.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    dataset = Dataset.from_dict(
        {"prompt": ["1+1=", "2+2=", "3+3="], "answer": ["2", "4", "6"], "problem_id": ["a", "b", "c"]}
    )
    script = {"1+1=": ["2", "3", "3", "3"], "2+2=": ["4", "4", "4", "4"], "3+3=": ["5", "", "x", "7"]}
    generator = ScriptedGenerator(tokenizer, script)
    result = evaluate_benchmark("toy_arithmetic", dataset, generator, tokenizer, k=4, pass_k=[1, 2, 4])
    assert generator.calls == [(3, 4)]
    metrics = result.metrics
    assert metrics["num_problems"] == 3 and metrics["num_samples"] == 12 and metrics["num_correct"] == 5
    assert metrics["mean@4"] == pytest.approx(5 / 12)
    assert metrics["pass@1"] == pytest.approx(5 / 12)
    assert metrics["pass@2"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert metrics["pass@4"] == pytest.approx(2 / 3)
    assert metrics["no_answer_rate"] == pytest.approx(2 / 12)
    assert metrics["truncated_rate"] == pytest.approx(1 / 12)
    first = result.records[0]
    assert first["problem_id"] == "a" and first["gold"] == "2" and first["prompt"] == "1+1="
    assert first["answers"] == ["2", "3", "3", "3"] and first["correct"] == [True, False, False, False]
    assert first["completions"] == script["1+1="] and first["num_correct"] == 1
    table = format_results_table({"toy_arithmetic": metrics}, 4, [1, 2, 4])
    assert (
        table.splitlines()[0]
        == "| benchmark | problems | samples | mean@4 (%) | pass@1 (%) | pass@2 (%) | pass@4 (%) |"
    )
    assert table.splitlines()[2] == "| toy_arithmetic | 3 | 12 | 41.67 | 41.67 | 50.00 | 66.67 |"


def test_eval_arguments():
    args = EvalArguments(model="m")
    assert (args.benchmarks, args.k, args.pass_k, args.temperature, args.top_p) == (
        ["aime24", "aime25", "amc23"],
        32,
        [32],
        1.0,
        1.0,
    )
    assert EvalArguments(model="m", benchmarks=["aime24,amc23", "math500"], k=8, pass_k=[8, 1]).benchmarks == [
        "aime24",
        "amc23",
        "math500",
    ]
    with pytest.raises(ValueError, match="pass_k"):
        EvalArguments(model="m", k=4, pass_k=[8])
    with pytest.raises(ValueError, match="backend"):
        EvalArguments(model="m", backend="tgi")


# --------------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------------


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


# A Qwen3-style template: `enable_thinking=False` (a chat_template_kwargs entry) pre-fills an empty thinking block.
THINKING_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: "
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
NO_THINKING = {"enable_thinking": False}


def _thinking_tokenizer():
    from bandpo_trl.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = THINKING_TEMPLATE
    return tokenizer


def test_encode_prompt_passes_chat_template_kwargs_like_trl():
    tokenizer = _thinking_tokenizer()
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


def test_chat_template_kwargs_argument_from_the_cli_and_yaml(tmp_path):
    from trl import TrlParser

    assert EvalArguments(model="m").chat_template_kwargs == {}
    assert EvalArguments(model="m", chat_template_kwargs='{"enable_thinking": false}').chat_template_kwargs == (
        NO_THINKING
    )
    for bad in ["enable_thinking=False", "[1, 2]"]:
        with pytest.raises(ValueError, match="chat_template_kwargs"):
            EvalArguments(model="m", chat_template_kwargs=bad)
    parser = TrlParser(dataclass_types=[EvalArguments])
    (args,) = parser.parse_args_and_config(
        args=["--model", "m", "--chat_template_kwargs", '{"enable_thinking": false}']
    )
    assert args.chat_template_kwargs == NO_THINKING
    config = tmp_path / "eval.yaml"
    config.write_text("model: m\nchat_template_kwargs:\n  enable_thinking: false\n")
    (args,) = parser.parse_args_and_config(args=["--config", str(config)])
    assert args.chat_template_kwargs == NO_THINKING


def test_benchmark_prompts_get_the_chat_template_kwargs():
    from datasets import Dataset

    tokenizer = _thinking_tokenizer()
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": "1+1="}]], "answer": ["2"]})
    thinking_off = "user: 1+1=\nassistant: <think>\n\n</think>\n\n"
    generator = ScriptedGenerator(tokenizer, {thinking_off: ["Answer: 2", "Answer: 3"]})
    result = evaluate_benchmark("chat", dataset, generator, tokenizer, k=2, chat_template_kwargs=NO_THINKING)
    assert result.records[0]["correct"] == [True, False]
    with pytest.raises(KeyError):  # without them, the prompt is not the one training saw
        evaluate_benchmark("chat", dataset, generator, tokenizer, k=2)


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


# --------------------------------------------------------------------------------------------------------------------
# End to end: tiny models that know the toy answers
# --------------------------------------------------------------------------------------------------------------------


def _toy_problems():
    from bandpo_trl.data import load_named_dataset

    # What `bandpo-eval --benchmarks toy_arithmetic --num_problems 2 --seed 0` evaluates.
    return load_named_dataset("toy_arithmetic", split="test", num_samples=NUM_TOY, seed=0)


def _memorize(model, tokenizer, pairs, steps, lr):
    """Plain-torch supervised training of `prompt -> answer<eos>` pairs (completion-only loss)."""
    sequences = [(tokenizer(p)["input_ids"], tokenizer(a)["input_ids"] + [tokenizer.eos_token_id]) for p, a in pairs]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for _ in range(steps):
            loss = sum(
                model(input_ids=torch.tensor([p + c]), labels=torch.tensor([[-100] * len(p) + c])).loss
                for p, c in sequences
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return loss.item()


@pytest.fixture(scope="module")
def toy_pairs():
    problems = _toy_problems()
    assert len(set(problems["answer"])) == NUM_TOY
    return list(zip(problems["prompt"], problems["answer"]))


@pytest.fixture(scope="module")
def oracle_model_dir(tmp_path_factory, toy_pairs):
    """A tiny model that answers the evaluated toy problems right (trained to a loss of ~1e-3)."""
    from bandpo_trl.tiny import build_tiny_model, build_tiny_tokenizer

    path = tmp_path_factory.mktemp("oracle")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    assert _memorize(model, tokenizer, toy_pairs, steps=100, lr=1e-2) < 0.01
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base_and_adapter_dirs(tmp_path_factory, toy_pairs):
    """A base model that gives each problem the other one's answer, and a LoRA adapter that fixes it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from bandpo_trl.tiny import build_tiny_model, build_tiny_tokenizer

    root = tmp_path_factory.mktemp("lora")
    tokenizer = build_tiny_tokenizer()
    base = build_tiny_model(tokenizer, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    swapped = [(p, a) for (p, _), (_, a) in zip(toy_pairs, toy_pairs[::-1])]
    assert _memorize(base, tokenizer, swapped, steps=100, lr=1e-2) < 0.01
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    # Loaded from disk, so that the adapter records where its base model is (`base_model_name_or_path`).
    base = AutoModelForCausalLM.from_pretrained(root / "base")
    lora = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    assert _memorize(lora, tokenizer, toy_pairs, steps=150, lr=1e-2) < 0.01
    lora.save_pretrained(root / "adapter")  # adapter only: the tokenizer comes from the base model
    return root / "base", root / "adapter"


def _read_results(output_dir, benchmark="toy_arithmetic"):
    with open(os.path.join(output_dir, f"{benchmark}.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    with open(os.path.join(output_dir, "summary.json")) as handle:
        summary = json.load(handle)
    return records, summary


def _toy_cli_args(model, output_dir, *extra):
    return [
        "--model", str(model), "--benchmarks", "toy_arithmetic", "--k", "4", "--pass_k", "1", "4",
        "--num_problems", str(NUM_TOY), "--max_new_tokens", "5", "--batch_size", "8", "--seed", "0",
        "--output_dir", str(output_dir), "--show_progress", "false", *extra,
    ]  # fmt: skip


def test_cli_end_to_end_real_generation(oracle_model_dir, toy_pairs, tmp_path):
    """`python -m bandpo_trl.evaluate` in a subprocess, real sampling at temperature 1.0, the oracle model: 1.0."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, "-m", "bandpo_trl.evaluate", *_toy_cli_args(oracle_model_dir, out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| benchmark | problems | samples | mean@4 (%) | pass@1 (%) | pass@4 (%) |" in proc.stdout
    assert "| toy_arithmetic | 2 | 8 | 100.00 | 100.00 | 100.00 |" in proc.stdout
    records, summary = _read_results(out)
    assert [(r["prompt"], r["gold"]) for r in records] == toy_pairs
    assert [r["problem_id"] for r in records] == [f"toy_arithmetic/{p[:-1]}" for p, _ in toy_pairs]
    for record in records:
        assert record["completions"] == [record["gold"]] * 4 and record["answers"] == [record["gold"]] * 4
        assert record["correct"] == [True] * 4 and all(record["finished"])
    results = summary["results"]["toy_arithmetic"]
    assert results["mean@4"] == results["pass@4"] == results["pass@1"] == 1.0
    assert summary["backend"] == "transformers" and summary["config"]["temperature"] == 1.0


def test_cli_random_model_records_are_consistent_and_reproducible(tiny_model_dir, tmp_path, capsys):
    main(_toy_cli_args(tiny_model_dir, tmp_path / "a"))
    # The same run from a YAML config (TrlParser's --config), one flag overriding it.
    config = tmp_path / "eval.yaml"
    config.write_text(
        f"model: {tiny_model_dir}\nbenchmarks: [toy_arithmetic]\nk: 4\npass_k: [1, 4]\nnum_problems: {NUM_TOY}\n"
        "max_new_tokens: 5\nbatch_size: 8\nseed: 0\nshow_progress: false\noutput_dir: elsewhere\n"
    )
    main(["--config", str(config), "--output_dir", str(tmp_path / "b")])
    assert "| toy_arithmetic | 2 | 8 |" in capsys.readouterr().out
    records, summary = _read_results(tmp_path / "a")
    assert records == _read_results(tmp_path / "b")[0]  # seeded
    assert len(records) == NUM_TOY and all(len(r["completions"]) == 4 for r in records)
    results = summary["results"]["toy_arithmetic"]
    assert results["mean@4"] == pytest.approx(mean_at_k([r["correct"] for r in records]))
    assert results["pass@4"] == pytest.approx(problem_pass_at_k([r["correct"] for r in records], 4))
    assert all(t <= 5 for r in records for t in r["completion_tokens"])


def test_lora_adapter_through_the_cli(base_and_adapter_dirs, tmp_path, monkeypatch):
    import peft

    base, adapter = base_and_adapter_dirs
    loaded_with_auto_peft = []
    original = peft.AutoPeftModelForCausalLM.from_pretrained.__func__

    def spy(cls, path, *args, **kwargs):
        loaded_with_auto_peft.append(str(path))
        return original(cls, path, *args, **kwargs)

    monkeypatch.setattr(peft.AutoPeftModelForCausalLM, "from_pretrained", classmethod(spy))
    main(_toy_cli_args(base, tmp_path / "base"))
    assert _read_results(tmp_path / "base")[1]["results"]["toy_arithmetic"]["mean@4"] == 0.0
    # --adapter, and the default output directory <adapter>/eval
    args = _toy_cli_args(base, "unused", "--adapter", str(adapter))
    del args[args.index("--output_dir") : args.index("--output_dir") + 2]
    main(args)
    records, summary = _read_results(adapter / "eval")
    results = summary["results"]["toy_arithmetic"]
    assert results["pass@4"] == 1.0 and results["mean@4"] >= 0.9
    assert summary["config"]["adapter"] == str(adapter)
    # An adapter directory given as --model stands for base + adapter.
    assert resolve_model_and_adapter(str(adapter)) == (str(base), str(adapter))
    main(_toy_cli_args(adapter, tmp_path / "as-model"))
    assert _read_results(tmp_path / "as-model")[0] == records
    # The transformers backend merges in memory: peft's AutoPeftModelForCausalLM (base recorded in the adapter).
    assert loaded_with_auto_peft == [str(adapter), str(adapter)]


def install_stand_in_vllm(monkeypatch, answers, adapter_answers=None, seen=None):
    """A stand-in `vllm` package (vLLM is not installed here) that records what it is handed and answers each prompt
    from `answers` (prompt text -> completion), or from `adapter_answers` when a LoRARequest comes with the call."""
    from transformers import AutoTokenizer

    seen = {} if seen is None else seen

    class LLM:
        def __init__(self, model, tokenizer, **kwargs):
            assert os.path.isfile(os.path.join(model, "config.json"))  # a full checkpoint: the base model
            seen["llm"] = dict(model=model, tokenizer=tokenizer, **kwargs)
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)

        def generate(self, prompts, params, use_tqdm=True, lora_request=None):
            seen.setdefault("prompts", []).extend(p["prompt_token_ids"] for p in prompts)
            seen["params"] = params.kwargs
            seen.setdefault("lora_requests", []).append(lora_request)
            if lora_request is not None:  # vLLM refuses a LoRARequest unless LoRA was enabled
                assert seen["llm"].get("enable_lora") is True and seen["llm"].get("max_lora_rank", 0) >= 1
            table = adapter_answers if lora_request is not None else answers
            out = []
            for p in prompts:
                gold = table[self.tokenizer.decode(p["prompt_token_ids"])]
                sample = types.SimpleNamespace(text=gold, token_ids=[0] * (len(gold) + 1), finish_reason="stop")
                out.append(types.SimpleNamespace(outputs=[sample] * params.kwargs["n"]))
            return out

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class LoRARequest:  # vllm.lora.request.LoRARequest(lora_name, lora_int_id, lora_path)
        def __init__(self, lora_name, lora_int_id, lora_path):
            self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path

    modules = {name: types.ModuleType(name) for name in ("vllm", "vllm.lora", "vllm.lora.request")}
    modules["vllm"].LLM, modules["vllm"].SamplingParams = LLM, SamplingParams
    modules["vllm.lora.request"].LoRARequest = LoRARequest
    modules["vllm"].lora, modules["vllm.lora"].request = modules["vllm.lora"], modules["vllm.lora.request"]
    for name, module in modules.items():
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=name != "vllm.lora.request")
        if name != "vllm.lora.request":
            module.__path__ = []
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(generation, "_cuda_available", lambda: True)  # what a GPU machine with vLLM looks like
    return seen


def test_vllm_backend_code_path_with_a_stand_in_vllm(oracle_model_dir, tmp_path, monkeypatch):
    """What the vLLM backend hands vLLM and how it reads the outputs, through the stand-in."""
    from transformers import AutoTokenizer

    toy_pairs_for_stub = list(zip(_toy_problems()["prompt"], _toy_problems()["answer"]))
    seen = install_stand_in_vllm(monkeypatch, answers=dict(toy_pairs_for_stub))
    main([*_toy_cli_args(oracle_model_dir, tmp_path / "v"), "--backend", "auto"])
    records, summary = _read_results(tmp_path / "v")
    assert summary["backend"] == "vllm" and summary["results"]["toy_arithmetic"]["mean@4"] == 1.0
    assert seen["llm"]["model"] == str(oracle_model_dir) and seen["llm"]["seed"] == 0
    assert seen["params"] == {"n": 4, "temperature": 1.0, "top_p": 1.0, "max_tokens": 5}
    tokenizer = AutoTokenizer.from_pretrained(oracle_model_dir)
    assert seen["prompts"] == [encode_prompt(tokenizer, p) for p, _ in toy_pairs_for_stub]
    assert seen["lora_requests"] == [None] and "enable_lora" not in seen["llm"]  # no adapter: no LoRA


def test_vllm_backend_serves_a_lora_adapter_natively(base_and_adapter_dirs, tmp_path, monkeypatch):
    """With an adapter, vLLM loads the base model with LoRA enabled and gets the adapter as a LoRARequest with every
    generate call: no merged checkpoint is written, to a temporary directory or anywhere."""
    from transformers import PreTrainedModel

    base, adapter = base_and_adapter_dirs
    pairs = list(zip(_toy_problems()["prompt"], _toy_problems()["answer"]))
    swapped = dict(zip([p for p, _ in pairs], [a for _, a in pairs][::-1]))
    # Without the adapter the stand-in answers as the base model does (the swapped answers), with it as the adapter.
    seen = install_stand_in_vllm(monkeypatch, answers=swapped, adapter_answers=dict(pairs))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    def no_saving(*args, **kwargs):
        raise AssertionError("the vLLM backend must not write a merged checkpoint")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", no_saving)
    runs = {
        "va": _toy_cli_args(base, tmp_path / "va", "--adapter", str(adapter)),
        "vm": _toy_cli_args(adapter, tmp_path / "vm"),
    }
    for out, cli in runs.items():  # --model BASE --adapter ADAPTER, and the adapter directory as --model
        seen.clear()
        main([*cli, "--backend", "vllm"])
        _, summary = _read_results(tmp_path / out)
        assert summary["results"]["toy_arithmetic"]["mean@4"] == 1.0  # the adapter's answers: the LoRARequest arrived
        assert seen["llm"]["model"] == str(base) and seen["llm"]["tokenizer"] == str(base)  # no tokenizer in adapter/
        assert seen["llm"]["enable_lora"] is True and seen["llm"]["max_lora_rank"] == 8  # the adapter's r=8
        (request,) = seen["lora_requests"]
        assert (request.lora_path, request.lora_int_id) == (str(adapter), 1)
    assert os.listdir(scratch) == []  # no temporary directory either

    # max_lora_rank: the adapter's largest rank rounded up to a value vLLM accepts, or the flag.
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    for r, rank_pattern, expected in [(8, {}, 8), (12, {}, 16), (8, {"q_proj": 40}, 64), (1, {}, 1)]:
        config_path.write_text(json.dumps({**config, "r": r, "rank_pattern": rank_pattern}))
        assert generation.vllm_max_lora_rank(str(adapter)) == expected
    config_path.write_text(json.dumps({**config, "r": 600}))
    with pytest.raises(ValueError, match="600"):
        generation.vllm_max_lora_rank(str(adapter))
    config_path.write_text(json.dumps(config))
    main([*runs["va"], "--backend", "vllm", "--vllm_max_lora_rank", "32"])
    assert seen["llm"]["max_lora_rank"] == 32


# --------------------------------------------------------------------------------------------------------------------
# During training
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attached", [False, True], ids=["callbacks=", "attach"])
def test_callback_logs_benchmark_metrics_during_training(oracle_model_dir, tmp_path, attached):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from bandpo_trl.rewards import toy_accuracy_reward

    callback = BenchmarkEvalCallback(
        benchmarks=["toy_arithmetic"],
        every_n_steps=2,
        k=2,
        num_problems=NUM_TOY,
        sampling=SamplingSettings(max_new_tokens=5),
    )
    args = GRPOConfig(
        output_dir=str(tmp_path / "run"),
        use_cpu=True,
        bf16=False,
        report_to="none",
        learning_rate=0.0,  # the policy stays the oracle: the logged accuracy must be 1
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=4,
        max_steps=4,
        logging_steps=3,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = GRPOTrainer(
        model=str(oracle_model_dir),
        reward_funcs=toy_accuracy_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["1+1=", "2+2="] * 4, "answer": ["2", "4"] * 4}),
        callbacks=[callback],
    )
    if attached:  # first in line, and generation through the trainer (unwrap_model_for_generation)
        callback.attach(trainer)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "eval/toy_arithmetic/mean@2" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]  # every 2 steps, besides the regular logs at step 3
    for entry in logged:
        assert entry["eval/toy_arithmetic/mean@2"] == entry["eval/toy_arithmetic/pass@2"] == 1.0
    assert any("loss" in entry for entry in logged)  # they join the trainer's own log entry of that step
    records = [
        json.loads(line) for line in open(tmp_path / "run" / "benchmark_eval" / "step-2" / "toy_arithmetic.jsonl")
    ]
    assert len(records) == NUM_TOY and all(r["correct"] == [True, True] for r in records)
    assert [h["step"] for h in callback.history] == [2, 4]


def test_callback_progress_bar_follows_disable_tqdm(tiny_model_dir, capfd):
    """The sampling bar shows unless the trainer's `disable_tqdm` (or the callback's own `show_progress`) hides it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerControl, TrainerState, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    state = TrainerState()
    state.global_step = 1

    def bar_shown(callback, disable_tqdm):
        args = TrainingArguments(output_dir=str(tiny_model_dir), disable_tqdm=disable_tqdm, report_to="none")
        capfd.readouterr()
        callback._last_step = -1
        callback.on_step_end(args, state, TrainerControl(), model=model, processing_class=tokenizer)
        return "sample" in capfd.readouterr().err

    def make(**kwargs):
        return BenchmarkEvalCallback(
            ["toy_arithmetic"],
            1,
            k=1,
            num_problems=1,
            sampling=SamplingSettings(max_new_tokens=2),
            save_results=False,
            **kwargs,
        )

    assert bar_shown(make(), disable_tqdm=False)
    assert not bar_shown(make(), disable_tqdm=True)
    assert not bar_shown(make(show_progress=False), disable_tqdm=False)
    assert bar_shown(make(show_progress=True), disable_tqdm=True)


def test_callback_leaves_the_training_rng_alone_and_can_be_disabled(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerControl, TrainerState

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    callback = BenchmarkEvalCallback(
        ["toy_arithmetic"], every_n_steps=1, k=2, num_problems=1, sampling=SamplingSettings(max_new_tokens=2)
    )
    model.train()
    state = torch.get_rng_state()
    metrics = callback.evaluate(model, tokenizer)
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training  # restored after generation
    assert set(metrics) == {"eval/toy_arithmetic/mean@2", "eval/toy_arithmetic/pass@2"}

    disabled = BenchmarkEvalCallback(["toy_arithmetic"], every_n_steps=0)
    control = TrainerControl()
    train_state = TrainerState()
    train_state.global_step = 5
    disabled.on_step_end(None, train_state, control, model=model, processing_class=tokenizer)
    assert not control.should_log and disabled.history == []


def test_callback_encodes_prompts_with_the_trainer_chat_template_kwargs(tiny_model_dir):
    """`on_step_end` takes the trainer's `args.chat_template_kwargs` (GRPOConfig), as GRPOTrainer encodes prompts."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerControl, TrainerState
    from trl import GRPOConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = _thinking_tokenizer()
    seen = []
    original = model.generate

    def recording_generate(*args, **kwargs):
        seen.extend(
            tokenizer.decode(row[mask.bool()]) for row, mask in zip(kwargs["input_ids"], kwargs["attention_mask"])
        )
        return original(*args, **kwargs)

    model.generate = recording_generate
    chat = Dataset.from_dict({"prompt": [[{"role": "user", "content": "1+1="}]], "answer": ["2"]})
    state = TrainerState()
    state.global_step = 1
    for config_kwargs, own, expected in [
        ('{"enable_thinking": false}', None, "<think>\n\n</think>\n\n"),  # GRPOConfig parses the JSON string
        (None, None, ""),
        ('{"enable_thinking": false}', {"enable_thinking": True}, ""),  # the callback's own value wins
    ]:
        args = GRPOConfig(
            output_dir=str(tiny_model_dir), chat_template_kwargs=config_kwargs, report_to="none", use_cpu=True
        )
        callback = BenchmarkEvalCallback(
            ["chat"], 1, k=1, sampling=SamplingSettings(max_new_tokens=1), datasets={"chat": chat}, save_results=False,
            show_progress=False,
            chat_template_kwargs=own,
        )  # fmt: skip
        seen.clear()
        callback.on_step_end(args, state, TrainerControl(), model=model, processing_class=tokenizer)
        assert seen == ["user: 1+1=\nassistant: " + expected]


# --------------------------------------------------------------------------------------------------------------------
# The callback on TRL's utilities: split / gather, unwrap_model_for_generation, the trainer's vLLM engine
# --------------------------------------------------------------------------------------------------------------------


def _records_before(callback, model, tokenizer):
    """What the callback computed before the split/gather rewrite, on one process: each benchmark sampled whole, in
    turn, under one `torch.manual_seed(seed + rank)` in a forked RNG state."""
    from bandpo_trl.evaluation.scoring import summarize_benchmark

    expected = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(callback.sampling.seed)
        generator = TransformersGenerator(
            model, tokenizer, callback.sampling, batch_size=callback.batch_size, show_progress=False
        )
        for name in callback.benchmarks:
            dataset = callback._dataset(name)
            result = evaluate_benchmark(name, dataset, generator, tokenizer, k=callback.k, show_progress=False)
            records = json.loads(json.dumps(result.records))  # as written to the .jsonl file
            expected[name] = records, summarize_benchmark(records, callback.k, callback.pass_k)
    return expected


def _grpo_trainer(model_dir, tmp_path, **config):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from bandpo_trl.rewards import toy_accuracy_reward

    args = GRPOConfig(
        output_dir=str(tmp_path / "run"), use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=2,
        num_generations=2, max_completion_length=4, max_steps=1, save_strategy="no", disable_tqdm=True, **config,
    )  # fmt: skip
    dataset = Dataset.from_dict({"prompt": ["1+1=", "2+2="], "answer": ["2", "4"]})
    return GRPOTrainer(model=str(model_dir), reward_funcs=toy_accuracy_reward, args=args, train_dataset=dataset)


def test_callback_split_and_gather_on_one_process_gives_the_records_of_before(tiny_model_dir, tmp_path, monkeypatch):
    """On one process, split_between_processes hands over every problem and gather_object gives them back: the same
    samples, records and metrics as before, with or without the trainer (unwrap_model_for_generation, once)."""
    from bandpo_trl.evaluation import callback as callback_module

    trainer = _grpo_trainer(tiny_model_dir, tmp_path)
    tokenizer = trainer.processing_class
    unwraps = []
    original = callback_module.unwrap_model_for_generation

    def spy(model, accelerator, **kwargs):
        unwraps.append((model, kwargs["gather_deepspeed3_params"]))
        return original(model, accelerator, **kwargs)

    monkeypatch.setattr(callback_module, "unwrap_model_for_generation", spy)
    from datasets import Dataset

    chat = Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": f"{i}+{i}="}] for i in range(4)], "answer": ["0", "2", "4", "6"]}
    )
    kwargs = dict(
        k=3, num_problems=3, sampling=SamplingSettings(max_new_tokens=4, temperature=1.0, seed=7), pass_k=[1, 3]
    )
    kwargs["datasets"] = {"chat": chat}
    expected = _records_before(
        BenchmarkEvalCallback(["toy_arithmetic", "chat"], 1, **kwargs), trainer.model, tokenizer
    )
    for attached in (False, True):
        callback = BenchmarkEvalCallback(["toy_arithmetic", "chat"], 1, **kwargs)
        if attached:
            callback.attach(trainer)
            assert trainer.callback_handler.callbacks[0] is callback
        out = tmp_path / f"attached-{attached}"
        metrics = callback.evaluate(trainer.model, tokenizer, step=1, output_dir=str(out), show_progress=False)
        for name, (records, summary) in expected.items():
            assert [json.loads(line) for line in open(out / f"{name}.jsonl")] == records
            assert metrics[f"eval/{name}/mean@3"] == summary["mean@3"]
            assert metrics[f"eval/{name}/pass@1"] == summary["pass@1"]
            assert metrics[f"eval/{name}/pass@3"] == summary["pass@3"]
        # TRL's unwrap, once for the whole evaluation (ZeRO-3: one parameter gathering), with the trainer only.
        assert unwraps == ([(trainer.model_wrapped, True)] if attached else [])
    # Another model than the trainer's (e.g. a reloaded checkpoint) generates itself.
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    callback.evaluate(other, tokenizer, show_progress=False)
    assert len(unwraps) == 1


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("n", [1, 2, 5, 7])
def test_callback_shards_cover_every_problem_once(world, n):
    """The sharding of several processes, simulated with accelerate's own split: equal shares (lockstep), and the
    gathered records merge back to every problem once, in order."""
    from accelerate import PartialState

    from bandpo_trl.evaluation.callback import merge_shards

    shares = []
    for rank in range(world):
        fake_state = types.SimpleNamespace(num_processes=world, process_index=rank)
        with PartialState.split_between_processes(fake_state, list(range(n)), apply_padding=True) as share:
            shares.append(list(share))
    assert len({len(share) for share in shares}) == 1  # the same number of generate calls on every process
    gathered = [(i, f"record of {i} on rank {rank}") for rank, share in enumerate(shares) for i in share]
    merged = merge_shards(gathered)
    assert [record.split()[2] for record in merged] == [str(i) for i in range(n)]


def _stand_in_sampling_params(monkeypatch):
    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    vllm = types.ModuleType("vllm")
    vllm.SamplingParams = SamplingParams
    vllm.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    monkeypatch.setitem(sys.modules, "vllm", vllm)


class FakeColocatedLLM:
    """The trainer's colocated `vllm.LLM`, standing in: answers every toy prompt right, records the calls."""

    def __init__(self, tokenizer, answers):
        self.tokenizer, self.answers, self.calls, self.events = tokenizer, answers, [], []

    def generate(self, prompts, sampling_params, use_tqdm=True, **kwargs):
        self.calls.append(([p["prompt_token_ids"] for p in prompts], sampling_params.kwargs, kwargs))
        out = []
        for p in prompts:
            gold = self.answers[self.tokenizer.decode(p["prompt_token_ids"])]
            sample = types.SimpleNamespace(text=gold, token_ids=[0] * (len(gold) + 1), finish_reason="stop")
            out.append(types.SimpleNamespace(outputs=[sample] * sampling_params.kwargs["n"]))
        return out

    def wake_up(self, tags):
        self.events.append(("wake_up", tuple(tags)))

    def sleep(self, level):
        self.events.append(("sleep", level))


def test_callback_generates_with_the_trainer_vllm_engine(tiny_model_dir, monkeypatch):
    """`args.use_vllm`: the trainer's engine samples (not the model), with the current weights pushed first, as
    GRPOTrainer 1.16 holds it (`trainer.vllm_generation.llm`) or as a trainer exposing `.llm` itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerControl, TrainerState

    _stand_in_sampling_params(monkeypatch)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def no_transformers_generation(*args, **kwargs):
        raise AssertionError("with use_vllm, the trainer's vLLM engine generates")

    model.generate = no_transformers_generation
    from bandpo_trl.data import load_named_dataset

    problems = load_named_dataset("toy_arithmetic", split="test", num_samples=NUM_TOY, seed=11)  # the callback's
    answers = dict(zip(problems["prompt"], problems["answer"]))
    state = TrainerState()
    state.global_step = 4
    args = types.SimpleNamespace(use_vllm=True, vllm_mode="colocate", output_dir="unused", disable_tqdm=True)

    for layout in ("vllm_generation", "trainer.llm", "sleep mode"):
        llm = FakeColocatedLLM(tokenizer, answers)
        syncs = []
        engine = types.SimpleNamespace(
            mode="colocate", llm=llm, tensor_parallel_size=1, enable_sleep_mode=layout == "sleep mode",
            sync_weights=functools.partial(syncs.append, "sync"),
        )  # fmt: skip
        trainer = types.SimpleNamespace(model=model, args=args, _last_loaded_step=3)
        if layout == "trainer.llm":
            trainer.llm, trainer.vllm_mode, trainer._move_model_to_vllm = llm, "colocate", engine.sync_weights
        else:
            trainer.vllm_generation = engine
        callback = BenchmarkEvalCallback(
            ["toy_arithmetic"], 2, k=3, num_problems=NUM_TOY, sampling=SamplingSettings(max_new_tokens=5, seed=11),
            save_results=False, trainer=trainer,
        )  # fmt: skip
        control = callback.on_step_end(args, state, TrainerControl(), model=model, processing_class=tokenizer)
        assert control.should_log and callback._pending["eval/toy_arithmetic/mean@3"] == 1.0
        (prompts, params, extra), = llm.calls  # fmt: skip
        assert prompts == [encode_prompt(tokenizer, p) for p in problems["prompt"]]
        assert params == {"n": 3, "temperature": 1.0, "top_p": 1.0, "max_tokens": 5, "seed": 11} and extra == {}
        assert syncs == ["sync"] and trainer._last_loaded_step == 4  # pushed once; the trainer need not push again
        if layout == "sleep mode":
            assert llm.events == [("wake_up", ("kv_cache",)), ("sleep", 2)] and engine._llm_weights_sleeping
        callback.evaluate(model, tokenizer, step=4, show_progress=False)
        assert syncs == ["sync"]  # already current at this step


def test_callback_generates_through_the_trainer_vllm_server(tiny_model_dir, monkeypatch):
    """Server mode: the main process sends the prompts (token ids) to the trainer's vLLM client and decodes the
    returned token ids; a completion is finished when it ends with EOS, as TRL counts truncation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    from bandpo_trl.data import load_named_dataset

    problems = load_named_dataset("toy_arithmetic", split="test", num_samples=NUM_TOY, seed=3)  # the callback's
    answers = dict(zip(problems["prompt"], problems["answer"]))
    calls = []

    class FakeClient:
        def generate(self, prompts, n, **kwargs):
            calls.append((prompts, n, kwargs))
            rows = []
            for ids in prompts:
                gold = tokenizer(answers[tokenizer.decode(ids)])["input_ids"]
                rows += [gold + [tokenizer.eos_token_id]] * (n - 1) + [gold + gold]  # the last one cut at max_tokens
            return {"prompt_ids": prompts, "completion_ids": rows, "logprobs": None}

    engine = types.SimpleNamespace(mode="server", vllm_client=FakeClient(), sync_weights=lambda: None)
    trainer = types.SimpleNamespace(
        model=model, vllm_generation=engine, args=types.SimpleNamespace(use_vllm=True, vllm_mode="server")
    )
    callback = BenchmarkEvalCallback(
        ["toy_arithmetic"], 1, k=2, num_problems=NUM_TOY, sampling=SamplingSettings(max_new_tokens=5, seed=3),
        trainer=trainer,
    )  # fmt: skip
    metrics = callback.evaluate(model, tokenizer, step=1, show_progress=False)
    (prompts, n, kwargs), = calls  # fmt: skip
    assert prompts == [encode_prompt(tokenizer, p) for p in problems["prompt"]] and n == 2
    assert kwargs["max_tokens"] == 5 and kwargs["generation_kwargs"] == {"seed": 3} and kwargs["logprobs"] is None
    assert metrics["eval/toy_arithmetic/pass@2"] == 1.0 and metrics["eval/toy_arithmetic/mean@2"] == 0.5


def test_r1_style_thoughts_opened_by_the_template_are_scored_as_in_training():
    """A template that opens <think> in the generation prompt: a completion that never closes the thought has no
    final answer (even if it wrote one inside), one that closes it is scored on what follows, as `in_open_think`
    scores training's rewards. Plain-text prompts get no template and so no opener."""
    from datasets import Dataset

    from bandpo_trl.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}A:<think>\n{% endif %}"
    )
    chat = [{"role": "user", "content": "1+1?"}]
    dataset = Dataset.from_dict({"prompt": [chat], "answer": ["2"], "problem_id": ["p"]})
    texts = ["so it is 2. Answer: 2", "so 2\n</think>\nAnswer: 2", "Answer: 2\n</think>\nAnswer: 3"]
    generator = ScriptedGenerator(tokenizer, {"1+1?\nA:<think>\n": texts})
    result = evaluate_benchmark("aime24", dataset, generator, tokenizer, k=3, show_progress=False)
    assert result.records[0]["correct"] == [False, True, False]
    assert result.records[0]["completions"] == texts  # saved as generated

    plain = Dataset.from_dict({"prompt": ["1+1?"], "answer": ["2"], "problem_id": ["p"]})
    generator = ScriptedGenerator(tokenizer, {"1+1?": texts})
    result = evaluate_benchmark("aime24", plain, generator, tokenizer, k=3, show_progress=False)
    assert result.records[0]["correct"] == [True, True, False]
