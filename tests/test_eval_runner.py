"""`evaluate_benchmark` (`bandpo_trl.evaluation.runner`): k samples per problem from any generator, scored, recorded
and summarized; prompts encoded as training encodes them, thoughts opened by the template scored as training scores
them."""

from __future__ import annotations

import pytest
from eval_helpers import NO_THINKING, ScriptedGenerator, thinking_tokenizer

from bandpo_trl.evaluation import evaluate_benchmark, format_results_table


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


def test_benchmark_prompts_get_the_chat_template_kwargs():
    from datasets import Dataset

    tokenizer = thinking_tokenizer()
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": "1+1="}]], "answer": ["2"]})
    thinking_off = "user: 1+1=\nassistant: <think>\n\n</think>\n\n"
    generator = ScriptedGenerator(tokenizer, {thinking_off: ["Answer: 2", "Answer: 3"]})
    result = evaluate_benchmark("chat", dataset, generator, tokenizer, k=2, chat_template_kwargs=NO_THINKING)
    assert result.records[0]["correct"] == [True, False]
    with pytest.raises(KeyError):  # without them, the prompt is not the one training saw
        evaluate_benchmark("chat", dataset, generator, tokenizer, k=2)


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
