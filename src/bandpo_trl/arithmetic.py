r"""Arithmetic word and number problems at a few difficulty levels, generated in code, for a small instruct model.

Each level is a named dataset (`arithmetic_<level>`) with the project's columns (`prompt` as a chat message,
`answer`, `problem_id`), and the reward `arithmetic_accuracy` scores it:

| level | dataset | problems | example |
| --- | --- | ---: | --- |
| `add1` | `arithmetic_add1` | 100 | What is 3 + 5? |
| `add2` | `arithmetic_add2` | 8,100 | What is 23 + 45? |
| `sub2` | `arithmetic_sub2` | 4,095 | What is 71 - 38? (never negative) |
| `mul` | `arithmetic_mul` | 720 | What is 23 * 7? (two digits times one) |
| `word` | `arithmetic_word` | 103,680 | Tom has 23 apples. Tom buys 15 more. How many apples does Tom have now? |

Every prompt ends with the format it asks for, `Keep your reply short and end it with the answer.`; the answer is
the last number of the reply (after `</think>` for a reasoning model), and the reward is +1 when it equals the gold
integer and -1 otherwise (no number, wrong number), as the math accuracy reward's ±1.

Held-out split: a problem belongs to the `test` split when the sha1 of its text is 0 mod 5 (a fifth of every level,
21 of the 100 one-digit sums), so `train` (sampled with replacement, seeded) never shows a test problem. The test
split comes in one fixed order whatever the seed: its first N problems are the same for every run.

Example:
```python
>>> from bandpo_trl.arithmetic import arithmetic_accuracy_reward, generate_arithmetic
>>> ds = generate_arithmetic("add2", num_samples=2, seed=0)
>>> ds.column_names
['prompt', 'answer', 'problem_id']
>>> arithmetic_accuracy_reward(["23 + 45 = 68.", "It is 67", "no idea"], answer=["68", "68", "68"])
[1.0, -1.0, -1.0]

```
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from collections.abc import Callable, Iterator

INSTRUCTION = "Keep your reply short and end it with the answer."
DATASET_PREFIX = "arithmetic_"
SPLITS = ("train", "test")
TRAIN_DEFAULT_SIZE = 4096
TEST_DEFAULT_SIZE = 500
# A fifth of the problems of every level is held out.
TEST_MODULUS = 5

NAMES = ("Tom", "Anna", "Sam", "Maria", "Ben", "Lucy")
ITEMS = ("apples", "books", "marbles", "pencils", "stickers", "shells")
# (template, operation): a one-step problem with operands a (10..49) and b (2..19).
WORD_TEMPLATES = (
    ("{name} has {a} {item}. {name} buys {b} more. How many {item} does {name} have now?", "+"),
    ("There are {a} {item} in a box. {name} puts in {b} more. How many {item} are in the box now?", "+"),
    ("{name} has {a} {item} and gives {b} of them to a friend. How many {item} does {name} have left?", "-"),
    ("A shelf holds {a} {item}. {name} takes {b} of them away. How many {item} are left on the shelf?", "-"),
)


def _number_problems(op: str, a_range: range, b_range: range, keep=None) -> Iterator[tuple[str, int]]:
    values = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}[op]
    for a, b in itertools.product(a_range, b_range):
        if keep is None or keep(a, b):
            yield f"What is {a} {op} {b}?", values(a, b)


def _word_problems() -> Iterator[tuple[str, int]]:
    for (template, op), name, item, a, b in itertools.product(
        WORD_TEMPLATES, NAMES, ITEMS, range(10, 50), range(2, 20)
    ):
        yield template.format(name=name, item=item, a=a, b=b), a + b if op == "+" else a - b


# Level -> every (question, answer) of the level.
LEVELS: dict[str, Callable[[], Iterator[tuple[str, int]]]] = {
    "add1": lambda: _number_problems("+", range(10), range(10)),
    "add2": lambda: _number_problems("+", range(10, 100), range(10, 100)),
    "sub2": lambda: _number_problems("-", range(10, 100), range(10, 100), keep=lambda a, b: a >= b),
    "mul": lambda: _number_problems("*", range(10, 100), range(2, 10)),
    "word": _word_problems,
}
ARITHMETIC_DATASETS = tuple(DATASET_PREFIX + level for level in LEVELS)


def _digest(question: str) -> int:
    return int(hashlib.sha1(question.encode("utf-8")).hexdigest(), 16)


def is_test_problem(question: str) -> bool:
    """Whether a question is held out (the `test` split): its sha1 is 0 mod 5."""
    return _digest(question) % TEST_MODULUS == 0


def arithmetic_prompt(question: str) -> list[dict[str, str]]:
    """The conversational prompt of a question: the question, then the answer format asked for."""
    return [{"role": "user", "content": f"{question} {INSTRUCTION}"}]


def _row(level: str, question: str, answer: int) -> dict:
    return {
        "prompt": arithmetic_prompt(question),
        "answer": str(answer),
        "problem_id": f"{DATASET_PREFIX}{level}/{hashlib.sha1(question.encode('utf-8')).hexdigest()[:12]}",
    }


def level_of(name: str) -> str:
    """`"arithmetic_add2"` -> `"add2"`; raises ValueError naming the known datasets for anything else."""
    level = name[len(DATASET_PREFIX) :] if name.startswith(DATASET_PREFIX) else None
    if level not in LEVELS:
        raise ValueError(f"Unknown arithmetic dataset {name!r}. Known: {', '.join(ARITHMETIC_DATASETS)}")
    return level


def generate_arithmetic(level: str, num_samples: int | None = None, seed: int = 0, split: str = "train"):
    """Problems of one level as a `datasets.Dataset` with columns `prompt`, `answer`, `problem_id`.

    Args:
        level: one of `LEVELS` (`add1`, `add2`, `sub2`, `mul`, `word`); `arithmetic_<level>` is accepted too.
        num_samples: rows to return. `train`: drawn with replacement from the training problems (default 4096).
            `test`: the first `num_samples` held-out problems in their fixed order (default 500, at most all of them:
            21 for `add1`).
        seed: the training draw's seed (the test split does not depend on it).
        split: `"train"` or `"test"`.

    Raises:
        ValueError: an unknown level or split, or `num_samples` <= 0.
    """
    from datasets import Dataset

    if level.startswith(DATASET_PREFIX):
        level = level_of(level)
    if level not in LEVELS:
        raise ValueError(f"Unknown arithmetic level {level!r}. Known: {', '.join(LEVELS)}")
    if split not in SPLITS:
        raise ValueError(f"arithmetic_{level} has the splits {', '.join(SPLITS)}, not {split!r}")
    if num_samples is not None and num_samples <= 0:
        raise ValueError(f"num_samples must be a positive number of rows, got {num_samples}")
    problems = [(q, a) for q, a in LEVELS[level]() if is_test_problem(q) == (split == "test")]
    if split == "test":
        problems.sort(key=lambda problem: _digest(problem[0]))  # a fixed order, the same for every seed
        chosen = problems[: num_samples or TEST_DEFAULT_SIZE]
    else:
        rng = random.Random(f"arithmetic/{level}/train/{seed}")
        chosen = [rng.choice(problems) for _ in range(num_samples or TRAIN_DEFAULT_SIZE)]
    return Dataset.from_list([_row(level, q, a) for q, a in chosen])


# The answer: the last number of the reply. A minus sign counts only where it cannot be an operator ("71-38" reads
# as 71 and 38); "12.5" is one number, the period of "68." is not part of it.
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?|\d+(?:\.\d+)?")


def extract_arithmetic_answer(text: str) -> str | None:
    """The last number of a reply's final response (see `bandpo_trl.rewards.final_response`), or None.

    >>> extract_arithmetic_answer("23 + 45 = 68."), extract_arithmetic_answer("So 71-38 = 33"), extract_arithmetic_answer("?")
    ('68', '33', None)
    """
    from .rewards import final_response  # not at the top: rewards registers this module's reward

    text = final_response(text)
    if text is None:
        return None
    numbers = _NUMBER.findall(text.replace(",", ""))
    return numbers[-1] if numbers else None


def arithmetic_is_correct(text: str, gold: str) -> bool:
    """Whether the last number of `text` equals the integer `gold` (`68.0` counts as 68, `68.5` does not)."""
    answer = extract_arithmetic_answer(text)
    if answer is None:
        return False
    return float(answer) == int(gold)


def arithmetic_accuracy_reward(completions: list, answer: list[str], log_extra=None, **kwargs) -> list[float]:
    """+1.0 if the last number of a completion equals its gold `answer`, else -1.0 (wrong or no number).

    `log_extra` (TRL's hook for extra columns of the completions table) gets the gold and the extracted answers, as
    for the math accuracy reward.
    """
    from .rewards import completion_text

    texts = [completion_text(c) for c in completions]
    rewards = [1.0 if arithmetic_is_correct(text, gold) else -1.0 for text, gold in zip(texts, answer, strict=True)]
    if log_extra is not None:
        log_extra("answer", [str(gold) for gold in answer])
        log_extra("answer_extracted", [extract_arithmetic_answer(text) or "" for text in texts])
    return rewards
