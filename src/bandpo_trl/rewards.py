r"""Reward functions with TRL's signature `fn(completions, **kwargs) -> list[float]`, and a registry by name.

`completions` holds strings (plain-text prompts) or lists of `{"role": "assistant", "content": ...}` messages
(conversational prompts); both are accepted. The gold answers arrive as the dataset column `answer=[...]`.

- `math_accuracy_reward`: +1 if the final answer is mathematically equal to the gold one, -1 otherwise (the paper's
  reward). The answer is the text after the last `Answer:`, else the last `\boxed{...}`, of the final response
  (after `</think>` for reasoning models; a thought never closed has none); equality is decided by `math_verify`, so
  `\frac{1}{2}`, `0.5` and `\dfrac12` all match `1/2`. For a chat template whose generation prompt opens `<think>`
  (DeepSeek-R1-Distill), `bandpo_trl.train` scores the completions with `in_open_think`.
- `format_reward`: 1 if the last non-empty line is `Answer: <something>`, 0 otherwise.
- `toy_accuracy_reward`: 1 if the toy completion is exactly the gold integer, 0 otherwise.
- `arithmetic_accuracy` (`bandpo_trl.arithmetic`): +1 if the last number of the reply is the gold integer, -1
  otherwise (the `arithmetic_<level>` datasets).

Example:
```python
>>> from bandpo_trl.rewards import get_reward_funcs
>>> [accuracy] = get_reward_funcs(["math_accuracy"])
>>> accuracy(["so x = 3.\nAnswer: \\frac{1}{2}", "Answer: 3"], answer=["0.5", "4"])
[1.0, -1.0]

```
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import numbers
import re
import threading
import warnings
from collections.abc import Callable

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from .arithmetic import arithmetic_accuracy_reward
from .utils import import_object, is_import_path

_ANSWER_LINE = re.compile(r"answer\s*:\**\s*(.*)", re.IGNORECASE)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_TOY_ANSWER = re.compile(r"-?\d+")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# What a chat template that opens a thought ends its generation prompt with (DeepSeek-R1-Distill: `<think>\n`).
OPEN_THOUGHT = f"{THINK_OPEN}\n"

# How the extracted answer and the gold answer are read: LaTeX first (we wrap them in `$...$`), then a plain
# expression such as `1/2` or `3.5`.
_EXTRACTION_CONFIG = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]


def completion_text(completion) -> str:
    """The text of one completion: the string itself, or the assistant messages' contents joined."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if m.get("role", "assistant") == "assistant")


def last_boxed_content(text: str) -> str | None:
    r"""Content of the last `\boxed{...}` (or `\fbox{...}`) in `text`, braces balanced; `None` if there is none.

    `\boxed 5` (no braces, as MATH sometimes writes) gives `"5"`.

    >>> last_boxed_content(r"so $\boxed{\frac{1}{2}}$.")
    '\\frac{1}{2}'
    """
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    if start < len(text) and text[start] != "{":
        token = re.match(r"[^\s$]+", text[start:])
        return token.group(0) if token else None
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    return None  # unbalanced braces: malformed


def final_response(text: str) -> str | None:
    """The part of a completion after the model's reasoning (R1-style `<think> ... </think>`): the text after the
    last `</think>`; `None` when a `<think>` block is opened and never closed (a truncated thought has no final
    answer); the whole text when there are no think tags.

    >>> final_response("<think>\\nAnswer: 3?\\n</think>\\n\\nAnswer: 4"), final_response("<think>\\nAnswer: 3")
    ('\\n\\nAnswer: 4', None)
    """
    if THINK_CLOSE in text:
        return text.rsplit(THINK_CLOSE, 1)[1]
    if THINK_OPEN in text:
        return None
    return text


def opens_think_block(tokenizer) -> bool:
    """Whether the tokenizer's chat template ends the generation prompt inside a `<think>` block, as
    DeepSeek-R1-Distill's does (`<｜Assistant｜><think>\\n`): its completions then start inside the thought."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    try:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "1+1"}], add_generation_prompt=True, tokenize=False
        )
    except Exception:  # a template that cannot render a bare user turn opens nothing we can see
        return False
    return isinstance(prompt, str) and prompt.rstrip().endswith(THINK_OPEN)


def open_thought_prefix(tokenizer, prompt) -> str:
    """What a completion of `prompt` continues without writing it: `"<think>\\n"` (`OPEN_THOUGHT`) when `prompt` is
    conversational and the tokenizer's chat template opens a thought in the generation prompt (`opens_think_block`),
    else `""` (a plain-text prompt gets no template). Training's rewards (`in_open_think`) and evaluation score
    prefix + completion, so a thought cut off at the length limit has no final answer."""
    return OPEN_THOUGHT if not isinstance(prompt, str) and opens_think_block(tokenizer) else ""


def in_open_think(func: Callable[..., list[float]]) -> Callable[..., list[float]]:
    """`func` scoring completions that start inside a `<think>` block opened by the prompt: each is scored as
    `<think>\\n` + its text, so the reward sees where the thought ends, and a thought never closed (a completion
    truncated at max_completion_length) has no final answer. Same name as `func` (TRL's metric names)."""

    @functools.wraps(func)
    def scored_after_the_opener(completions: list, **kwargs) -> list[float]:
        return func([OPEN_THOUGHT + completion_text(c) for c in completions], **kwargs)

    return scored_after_the_opener


def _reward_output_problem(output, num_completions: int) -> str | None:
    """What is wrong with a reward function's output for TRL, or None: one value per completion, each a finite number
    or None (TRL's "not applicable", which it turns into NaN)."""
    if not isinstance(output, (list, tuple)):
        shown = "None" if output is None else f"{output!r} ({type(output).__name__})"
        return f"returned {shown} instead of a list of {num_completions} rewards (one float or None per completion)"
    if len(output) != num_completions:
        return f"returned {len(output)} rewards for {num_completions} completions (one float or None per completion)"
    for i, value in enumerate(output):
        if value is None:
            continue
        if isinstance(value, numbers.Real) and math.isfinite(value):
            continue
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        return f"returned {shown} ({type(value).__name__}) for completion {i}; a reward is a number or None"
    return None


def checked_reward(func: Callable[..., list[float]], name: str | None = None) -> Callable[..., list[float]]:
    """`func` with its output checked on every call, so that a reward TRL cannot use fails at the first batch naming
    the function (`name`, e.g. the import path a recipe gives; default: its `__name__`) and what it returned, not
    deep inside TRL or torch: a list (or tuple, or 1-D tensor or array) with one finite number or None per completion.

    None is TRL's "not applicable" (TRL turns it into NaN and averages the other rewards); a function that returns
    None for every completion of a batch gets a warning, since that batch then has no signal from it. Keeps
    `func.__name__` (TRL's metric names) and works for async reward functions.

    >>> checked_reward(lambda completions, **kwargs: ["1"] * len(completions), "my_reward")(["a"])
    Traceback (most recent call last):
    ...
    ValueError: reward function my_reward returned '1' (str) for completion 0; a reward is a number or None
    """
    label = name or getattr(func, "__name__", repr(func))

    def check(output, completions):
        if not isinstance(output, (list, tuple)) and hasattr(output, "tolist"):  # a tensor or an array
            output = output.tolist()
        problem = _reward_output_problem(output, len(completions))
        if problem is not None:
            raise ValueError(f"reward function {label} {problem}")
        if output and all(value is None for value in output):
            warnings.warn(
                f"reward function {label} returned None for all {len(output)} completions of a batch: it gives this "
                "batch no reward signal (TRL counts None as not applicable)",
                UserWarning,
                stacklevel=3,
            )
        return output

    if inspect.iscoroutinefunction(func):

        @functools.wraps(func)
        async def checked_async(completions: list, **kwargs):
            return check(await func(completions, **kwargs), completions)

        return checked_async

    @functools.wraps(func)
    def checked(completions: list, **kwargs):
        return check(func(completions, **kwargs), completions)

    return checked


def reward_summary(log_history: list[dict]) -> str | None:
    """The line `bandpo-train` prints at the end of a run: the mean logged reward over the first and the last fifth
    of the logged steps. Steps whose reward is missing (None or NaN: every reward function returned None) are
    skipped; None when no step logged a reward at all.

    >>> reward_summary([{"reward": 0.25}, {"reward": None}, {"reward": 0.75}])
    'Mean reward: 0.250 over the first 1 logged steps -> 0.750 over the last 1.'
    """
    logged = [entry["reward"] for entry in log_history if "reward" in entry]
    if not logged:
        return None
    rewards = [r for r in logged if isinstance(r, numbers.Real) and math.isfinite(r)]
    if not rewards:
        return (
            "No finite reward was logged (every logged reward is None or NaN: see the warnings about the reward "
            "functions)."
        )
    size = max(1, len(rewards) // 5)
    head, tail = rewards[:size], rewards[-size:]
    return (
        f"Mean reward: {sum(head) / len(head):.3f} over the first {len(head)} logged steps -> "
        f"{sum(tail) / len(tail):.3f} over the last {len(tail)}."
    )


def extract_answer(text: str) -> str | None:
    r"""The final answer of a completion: what follows the last `Answer:` on its line, else the last `\boxed{}`.

    Only the final response is read (see `final_response`): an answer inside `<think> ... </think>` does not count,
    and a thought never closed has none. A `\boxed{}` or `$...$` wrapper and a trailing period on the `Answer:` line
    are removed. Returns `None` when there is neither an `Answer:` line with content nor a boxed answer.

    >>> extract_answer("2 + 2 = 4\nAnswer: $4$.")
    '4'
    >>> extract_answer(r"... so the result is \boxed{17}") , extract_answer("no idea")
    ('17', None)
    """
    text = final_response(text)
    if text is None:
        return None
    matches = _ANSWER_LINE.findall(text)
    candidate = matches[-1].strip() if matches else ""
    if candidate:
        boxed = last_boxed_content(candidate)
        if boxed is not None:
            candidate = boxed
        candidate = candidate.strip().rstrip(".").strip()
        if candidate.startswith("$") and candidate.endswith("$"):
            candidate = candidate.strip("$").strip()
        if candidate:
            return candidate
    boxed = last_boxed_content(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    return None


def _parse(expression: str, timeout: int | None):
    return parse(f"${expression}$", extraction_config=_EXTRACTION_CONFIG, parsing_timeout=timeout)


def is_correct(text: str, gold: str) -> bool:
    r"""Whether the final answer of `text` (see `extract_answer`) equals `gold`, decided by `math_verify`.

    When `math_verify` cannot read the gold answer (free text such as `"\text{(C)}"`), falls back to comparing
    the two strings without whitespace.

    >>> is_correct("Answer: 0.5", r"\frac{1}{2}"), is_correct("Answer: 2", "3"), is_correct("I give up", "3")
    (True, False, False)
    """
    predicted = extract_answer(text)
    if predicted is None:
        return False
    # math_verify times out with signal.alarm, which only works in the main thread.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    if timeout is None:
        logging.getLogger("math_verify").setLevel(logging.ERROR)
    gold_parsed = _parse(str(gold), timeout)
    if not gold_parsed:
        return re.sub(r"\s+", "", predicted) == re.sub(r"\s+", "", str(gold))
    predicted_parsed = _parse(predicted, timeout)
    if not predicted_parsed:
        return False
    return bool(verify(gold_parsed, predicted_parsed, timeout_seconds=timeout))


def math_accuracy_reward(
    completions: list, answer: list[str], log_extra: Callable[[str, list], None] | None = None, **kwargs
) -> list[float]:
    r"""+1.0 if a completion's final answer equals its gold `answer`, else -1.0 (wrong, malformed or missing).

    `log_extra` is TRL's hook for extra columns of the completions table (`log_completions=True`); given, it logs
    the gold answer (`answer`) and the extracted one (`answer_extracted`, empty when none was found), as
    `trl.rewards.accuracy_reward` does.

    >>> math_accuracy_reward(
    ...     [[{"role": "assistant", "content": "Answer: 12"}], [{"role": "assistant", "content": "Answer: 13"}]],
    ...     answer=["12", "12"],
    ... )
    [1.0, -1.0]
    """
    texts = [completion_text(c) for c in completions]
    rewards = [1.0 if is_correct(text, gold) else -1.0 for text, gold in zip(texts, answer, strict=True)]
    if log_extra is not None:
        log_extra("answer", [str(gold) for gold in answer])
        log_extra("answer_extracted", [extract_answer(text) or "" for text in texts])
    return rewards


def format_reward(completions: list, **kwargs) -> list[float]:
    """1.0 if the last non-empty line of a completion is `Answer: <something>` (the paper's format), else 0.0.

    >>> format_reward(["step 1\\nAnswer: 42", "Answer: 42\\nhope that helps", "Answer:"])
    [1.0, 0.0, 0.0]
    """
    rewards = []
    for c in completions:
        lines = [line.strip() for line in completion_text(c).strip().splitlines() if line.strip()]
        rewards.append(1.0 if lines and re.fullmatch(r"Answer:\s*\S.*", lines[-1]) else 0.0)
    return rewards


def toy_extract_answer(text: str) -> str | None:
    """The toy task's answer: the stripped completion when it is an integer, else `None`.

    >>> toy_extract_answer(" 47\\n"), toy_extract_answer("47 apples")
    ('47', None)
    """
    text = text.strip()
    return text if _TOY_ANSWER.fullmatch(text) else None


def toy_is_correct(text: str, gold: str) -> bool:
    """Whether a toy completion, stripped, is exactly the gold integer: the check of `toy_accuracy_reward`."""
    answer = toy_extract_answer(text)
    return answer is not None and int(answer) == int(gold)


def toy_accuracy_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    """1.0 if a toy completion, stripped, is exactly the gold integer, else 0.0.

    >>> toy_accuracy_reward(["47", " 47\\n", "48", "47 1", ""], answer=["47"] * 5)
    [1.0, 1.0, 0.0, 0.0, 0.0]
    """
    return [
        1.0 if toy_is_correct(completion_text(c), gold) else 0.0 for c, gold in zip(completions, answer, strict=True)
    ]


REWARD_FUNCS: dict[str, Callable[..., list[float]]] = {
    "math_accuracy": math_accuracy_reward,
    "format": format_reward,
    "toy_accuracy": toy_accuracy_reward,
    "arithmetic_accuracy": arithmetic_accuracy_reward,
}


def available_rewards() -> list[str]:
    """Names accepted by `get_reward_funcs`, sorted."""
    return sorted(REWARD_FUNCS)


def get_reward_funcs(names: list[str]) -> list[Callable[..., list[float]]]:
    """The reward functions named in `names`, in order: a registered name (`available_rewards()`) or the import
    path of your own function, `my_pkg.rewards.my_reward` or `my_pkg.rewards:my_reward` (imported now, with the
    working directory on `sys.path`, as TRL's GRPO script does). A reward function takes `completions` and the
    dataset's columns (`answer`, `problem_id`, ...) as keyword arguments and returns one float per completion.

    Raises:
        ValueError: a name that is neither registered nor an import path (the message lists the known ones), or
            an import path that does not lead to a callable.
    """
    if isinstance(names, str):
        names = [names]
    unknown = [name for name in names if name not in REWARD_FUNCS and not is_import_path(name)]
    if unknown:
        raise ValueError(
            f"Unknown reward function(s) {unknown}. Known rewards: {', '.join(available_rewards())}, or an import "
            "path such as my_pkg.rewards.my_reward"
        )
    return [
        REWARD_FUNCS[name] if name in REWARD_FUNCS else import_object(name, require_callable=True) for name in names
    ]
