"""The arithmetic task: problems and answers checked by recomputing them from the question text, the held-out split,
the last-number answer, and its registration as datasets, reward and evaluation checker."""

from __future__ import annotations

import re

import pytest

from bandpo_trl.arithmetic import (
    ARITHMETIC_DATASETS,
    INSTRUCTION,
    LEVELS,
    WORD_TEMPLATES,
    arithmetic_accuracy_reward,
    arithmetic_is_correct,
    extract_arithmetic_answer,
    generate_arithmetic,
    is_test_problem,
)
from bandpo_trl.data import available_datasets, load_named_dataset
from bandpo_trl.evaluation import EVAL_SPLITS, get_checker
from bandpo_trl.rewards import get_reward_funcs

SIZES = {"add1": 100, "add2": 8100, "sub2": 90 * 91 // 2, "mul": 90 * 8, "word": 4 * 6 * 6 * 40 * 18}
NUMBER_QUESTION = re.compile(r"What is (\d+) ([-+*]) (\d+)\?")
ADDING = ("buys", "puts in")  # the word templates' verbs of addition; "gives", "takes" subtract


def recompute(question: str) -> int:
    """The answer of a question from its text alone."""
    match = NUMBER_QUESTION.fullmatch(question)
    if match:
        a, op, b = int(match[1]), match[2], int(match[3])
        return {"+": a + b, "-": a - b, "*": a * b}[op]
    a, b = (int(n) for n in re.findall(r"\d+", question))
    return a + b if any(verb in question for verb in ADDING) else a - b


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_every_problem_of_a_level_has_the_right_answer(level):
    problems = list(LEVELS[level]())
    assert len(problems) == len({q for q, _ in problems}) == SIZES[level]
    for question, answer in problems:
        assert recompute(question) == answer, question
        if level == "sub2":
            assert answer >= 0
        numbers = [int(n) for n in re.findall(r"\d+", question)]
        digits = {"add1": (1, 1), "add2": (2, 2), "sub2": (2, 2), "mul": (2, 1)}.get(level)
        if digits:
            assert tuple(len(str(n)) for n in numbers) == digits, question


def test_word_templates_say_their_operation():
    for template, op in WORD_TEMPLATES:
        assert any(verb in template for verb in ADDING) == (op == "+"), template


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_held_out_split_is_a_fifth_and_never_trained_on(level):
    test = generate_arithmetic(level, split="test", num_samples=10**6)
    train = generate_arithmetic(level, split="train", num_samples=2000, seed=1)
    assert set(test["problem_id"]).isdisjoint(train["problem_id"])
    held_out = sum(is_test_problem(q) for q, _ in LEVELS[level]())
    assert len(set(test["problem_id"])) == len(test) == held_out  # num_samples above all: every held-out problem
    assert len(generate_arithmetic(level, split="test")) == min(held_out, 500)  # the default
    share = held_out / SIZES[level]
    assert 0.14 < share < 0.26  # sha1 mod 5


def test_split_reproducibility():
    # The held-out problems: one fixed order whatever the seed, so a smaller set is a prefix of a larger one.
    assert (
        generate_arithmetic("add2", 40, seed=0, split="test").to_list()
        == generate_arithmetic("add2", 40, seed=9, split="test").to_list()
    )
    assert (
        generate_arithmetic("add2", 10, split="test")["problem_id"]
        == generate_arithmetic("add2", 40, split="test")["problem_id"][:10]
    )
    assert len(generate_arithmetic("add1", split="test")) == 21  # all of them: fewer than the default 500
    # Training draws: reproducible per seed, different across seeds.
    assert generate_arithmetic("add2", 50, seed=3).to_list() == generate_arithmetic("add2", 50, seed=3).to_list()
    assert generate_arithmetic("add2", 50, seed=3)["answer"] != generate_arithmetic("add2", 50, seed=4)["answer"]
    assert len(generate_arithmetic("mul")) == 4096


def test_rows_are_chat_prompts_with_the_format_request():
    row = generate_arithmetic("word", 1, seed=0)[0]
    assert set(row) == {"prompt", "answer", "problem_id"}
    [message] = row["prompt"]
    assert message["role"] == "user" and message["content"].endswith(" " + INSTRUCTION)
    assert recompute(message["content"][: -len(INSTRUCTION) - 1]) == int(row["answer"])
    assert row["problem_id"].startswith("arithmetic_word/")


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("23 + 45 = 68.", "68"),
        ("1. 59 + 63 = 176.", "176"),
        ("So 71-38 = 33", "33"),  # a minus between numbers is an operator
        ("The result is -5.", "-5"),
        ("It is 12.5 apples", "12.5"),
        ("The total is 1,234", "1234"),
        ("<think>\n23 + 45 = 67\n</think>\n\n68", "68"),  # after the thought
        ("<think>\n23 + 45 = 68", None),  # a thought never closed has no answer
        ("I do not know.", None),
        ("", None),
    ],
)
def test_the_answer_is_the_last_number(text, answer):
    assert extract_arithmetic_answer(text) == answer


def test_reward_is_plus_or_minus_one_and_logs_the_answers():
    logged = {}
    completions = [
        [{"role": "assistant", "content": "23 + 45 = 68."}],
        [{"role": "assistant", "content": "68 is what 23 + 45 makes"}],  # the last number is 45
        [{"role": "assistant", "content": "68.0"}],
        [{"role": "assistant", "content": "no idea"}],
    ]
    rewards = arithmetic_accuracy_reward(completions, answer=["68"] * 4, log_extra=logged.__setitem__)
    assert rewards == [1.0, -1.0, 1.0, -1.0]
    assert logged == {"answer": ["68"] * 4, "answer_extracted": ["68", "45", "68.0", ""]}
    assert not arithmetic_is_correct("68.5", "68")


def test_registered_as_datasets_reward_and_benchmarks():
    assert set(ARITHMETIC_DATASETS) <= set(available_datasets())
    assert get_reward_funcs(["arithmetic_accuracy"]) == [arithmetic_accuracy_reward]
    checker, extractor = get_checker("arithmetic_add2")
    assert (checker, extractor) == (arithmetic_is_correct, extract_arithmetic_answer)
    assert all(EVAL_SPLITS[name] == "test" for name in ARITHMETIC_DATASETS)
    held_out = load_named_dataset("arithmetic_sub2", split="test", num_samples=5)
    assert held_out.to_list() == generate_arithmetic("sub2", 5, split="test").to_list()
    assert len(load_named_dataset("arithmetic_add1")) == 4096


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"level": "add3"}, "Unknown arithmetic level 'add3'"),
        ({"level": "arithmetic_div"}, "Known: arithmetic_add1"),
        ({"level": "add2", "split": "validation"}, "splits train, test, not 'validation'"),
        ({"level": "add2", "num_samples": 0}, "positive number of rows"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        generate_arithmetic(**kwargs)


def test_generated_dataset_refuses_a_local_path():
    with pytest.raises(ValueError, match="generated in code"):
        load_named_dataset("arithmetic_add2", path="/data/add2.jsonl")
