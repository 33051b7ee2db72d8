"""Rewards on inline completions: right, wrong, malformed, missing answer line, equal LaTeX forms."""

from __future__ import annotations

import pytest

from bandpo_trl.rewards import (
    available_rewards,
    extract_answer,
    format_reward,
    get_reward_funcs,
    is_correct,
    last_boxed_content,
    math_accuracy_reward,
    toy_accuracy_reward,
)


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Step 1: 2 + 2 = 4.\nAnswer: 4", "4"),
        ("Answer: $\\frac{1}{2}$.", "\\frac{1}{2}"),  # $...$ and the final period are not part of the answer
        ("Answer: \\boxed{17}", "17"),
        ("First guess. Answer: 3\nOn reflection:\nAnswer: 5", "5"),  # the last Answer: wins
        ("**Answer:** 12", "12"),
        ("so the result is $\\boxed{\\frac{a}{b^{2}}}$", "\\frac{a}{b^{2}}"),  # no Answer: line -> last boxed
        ("Answer:\nthe result is \\boxed{9}", "9"),  # empty Answer: line -> boxed
        ("I do not know.", None),
        ("Answer:", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_last_boxed_content_balances_braces():
    assert last_boxed_content("\\boxed{1} then \\boxed{\\dfrac{\\sqrt{3}}{2}} end") == "\\dfrac{\\sqrt{3}}{2}"
    assert last_boxed_content("\\boxed 5$") == "5"
    assert last_boxed_content("\\fbox{x}") == "x"
    assert last_boxed_content("\\boxed{\\frac{1}{2}") is None  # unbalanced: malformed
    assert last_boxed_content("no box") is None


@pytest.mark.parametrize(
    ("answer_line", "gold"),
    [
        ("0.5", "\\frac{1}{2}"),
        ("\\dfrac12", "1/2"),
        ("\\frac{3}{2}", "1.5"),
        ("2\\sqrt{3}", "\\sqrt{12}"),
        ("1,000", "1000"),
        ("\\boxed{34}", "34"),
        ("x = 5", "5"),
        ("\\pi/2", "\\frac{\\pi}{2}"),
        ("(1, 2)", "(1,2)"),
        ("x^2+2x+1", "(x+1)^2"),
    ],
)
def test_latex_forms_math_verify_treats_as_equal(answer_line, gold):
    assert is_correct(f"Reasoning...\nAnswer: {answer_line}", gold)


@pytest.mark.parametrize(
    ("text", "gold"),
    [
        ("Answer: 33", "34"),  # wrong
        ("Answer: -3", "3"),  # wrong sign
        ("Answer: \\frac{1}{", "\\frac{1}{2}"),  # malformed
        ("The answer is 34 but I never say it properly", "34"),  # missing answer line and box
        ("Answer: 34\nAnswer: 35", "34"),  # the last answer counts
    ],
)
def test_incorrect_answers(text, gold):
    assert not is_correct(text, gold)


def test_unparseable_gold_falls_back_to_string_comparison():
    assert is_correct("Answer: \\text{(C)}", "\\text{(C)}")
    assert not is_correct("Answer: \\text{(D)}", "\\text{(C)}")


def test_math_accuracy_reward_is_plus_minus_one_for_strings_and_messages():
    completions = ["Answer: 12", "Answer: 13", "no answer", "\\boxed{12}"]
    assert math_accuracy_reward(completions, answer=["12"] * 4) == [1.0, -1.0, -1.0, 1.0]
    assert math_accuracy_reward([chat(c) for c in completions], answer=["12"] * 4) == [1.0, -1.0, -1.0, 1.0]


def test_math_accuracy_reward_ignores_extra_columns_and_checks_lengths():
    assert math_accuracy_reward(["Answer: 1"], answer=["1"], problem_id=["x"], prompts=["p"]) == [1.0]
    with pytest.raises(ValueError):
        math_accuracy_reward(["Answer: 1", "Answer: 2"], answer=["1"])


def test_format_reward():
    completions = [
        "step\nAnswer: 42",  # right format
        "Answer: 42\n\n",  # trailing blank lines do not matter
        "Answer: 42\nHope this helps!",  # answer line not last
        "Answer:",  # empty answer
        "the answer: 42",  # not a line of the form "Answer: ..."
        "",
    ]
    assert format_reward(completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert format_reward([chat(c) for c in completions]) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_toy_accuracy_reward():
    completions = ["12", " 12\n", "13", "12 ", "1 2", "", "x", "-3"]
    answers = ["12"] * 7 + ["-3"]
    assert toy_accuracy_reward(completions, answer=answers) == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert toy_accuracy_reward([chat("7")], answer=["7"]) == [1.0]


def test_registry_by_name_and_unknown_names_list_the_known_ones():
    assert available_rewards() == ["arithmetic_accuracy", "format", "math_accuracy", "toy_accuracy"]
    assert get_reward_funcs(["toy_accuracy", "format"]) == [toy_accuracy_reward, format_reward]
    with pytest.raises(ValueError, match="accuracy_reward") as error:
        get_reward_funcs(["math_accuracy", "accuracy_reward"])
    for name in available_rewards():
        assert name in str(error.value)


def test_math_accuracy_reward_logs_gold_and_extracted_answers_through_log_extra():
    logged = {}
    rewards = math_accuracy_reward(
        ["so\nAnswer: 12", "no answer here", r"\boxed{\frac{1}{2}}"],
        answer=["12", "12", "0.5"],
        log_extra=lambda column, values: logged.__setitem__(column, values),
    )
    assert rewards == [1.0, -1.0, 1.0]
    assert logged == {"answer": ["12", "12", "0.5"], "answer_extracted": ["12", "", r"\frac{1}{2}"]}
