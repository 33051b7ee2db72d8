"""Scoring (`bandpo_trl.evaluation.scoring`): a benchmark's samples are judged by the checker of the reward its
training task uses."""

from __future__ import annotations

from bandpo_trl.evaluation import get_checker, score_completions


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


def test_toy_checker_is_the_toy_reward():
    from bandpo_trl.rewards import toy_accuracy_reward

    checker, extractor = get_checker("toy_arithmetic")
    texts = ["47", " 47\n", "047", "-3", "48", "47 1", "4 7", "", "x"]
    for gold in ("47", "-3"):
        assert [checker(t, gold) for t in texts] == [r == 1.0 for r in toy_accuracy_reward(texts, answer=[gold] * 9)]
    assert [extractor(t) for t in texts] == ["47", "47", "047", "-3", "48", None, None, None, None]
