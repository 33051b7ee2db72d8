r"""Named datasets for training and evaluation, each mapped to the paper's prompt and a gold answer.

Every dataset, whatever its source layout, comes out with the same three columns:

- `prompt`: the paper's instruction (step-by-step reasoning, last line `Answer: $Answer`) around the problem, as a
  conversational prompt `[{"role": "user", "content": ...}]`. For `toy_arithmetic`, a plain-text prompt `"3+5="`
  sized for the tiny character-level model of the embedded default.
- `answer`: the gold final answer as a string (e.g. `"34"`, `"\frac{1}{2}"`), what the rewards compare against.
- `problem_id`: a stable string id, `"<dataset name>/<source id or content hash>"`.

Each source has a pure per-row mapping function (`map_<source>_row`), tested on inline rows with the real column
layout, so the Hub is only needed to fetch the real data. A run's training set is the named datasets concatenated
(`load_train_dataset`), less the prompts over `max_prompt_length` tokens (`drop_long_prompts`), and must fill one
generation batch (`check_enough_prompts`); a benchmark's problems come from `load_eval_dataset`.

Example:
```python
>>> from bandpo_trl.data import load_named_dataset
>>> ds = load_named_dataset("toy_arithmetic", num_samples=2, seed=0)
>>> ds.column_names
['prompt', 'answer', 'problem_id']
>>> train = load_named_dataset("dapo_math_17k")  # downloads open-r1/DAPO-Math-17k-Processed (config "en")
```
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from datasets import Dataset, Features, List, Value, concatenate_datasets, load_dataset

from .arithmetic import ARITHMETIC_DATASETS, generate_arithmetic
from .data_files import (
    ANSWER,
    ID,
    TEXT,
    Column,
    check_rows,
    expected_columns,
    load_local_dataset,
    no_rows_kept,
    parse_dataset_paths,
)
from .rewards import last_boxed_content

if TYPE_CHECKING:
    from .arguments import ScriptArguments
    from .config import BandGRPOConfig

logger = logging.getLogger(__name__)

# The instruction of the paper's training data (DAPO-Math-17k ships its problems wrapped in exactly this text).
MATH_PROMPT_TEMPLATE = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{problem}\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)
_DAPO_PREFIX = MATH_PROMPT_TEMPLATE.split("{problem}")[0]
_DAPO_SUFFIX = MATH_PROMPT_TEMPLATE.split("{problem}")[1]

MATH_TRAIN_LEVELS = ("Level 3", "Level 4", "Level 5")


def math_prompt(problem: str) -> list[dict[str, str]]:
    """The paper's conversational prompt for one math problem."""
    return [{"role": "user", "content": MATH_PROMPT_TEMPLATE.format(problem=problem.strip())}]


def _content_id(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def _answer_to_str(value) -> str:
    """Gold answers stored as numbers (e.g. `27.0` in some AMC dumps) become `"27"`; strings are stripped."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


# Per-source row mappings: real column layout in, {"prompt", "answer", "problem_id"} out.


def map_dapo_math_17k_row(row: dict) -> dict:
    """`open-r1/DAPO-Math-17k-Processed`: `prompt` (problem already wrapped in the DAPO instruction), `solution`
    (the gold answer) and `extra_info.index` (a UUID). The wrapper is stripped and re-applied, so the prompt is
    the paper's whatever the source's whitespace."""
    problem = row["prompt"].strip()
    if problem.startswith(_DAPO_PREFIX.strip()):
        problem = problem[len(_DAPO_PREFIX.strip()) :]
    if problem.endswith(_DAPO_SUFFIX.strip()):
        problem = problem[: -len(_DAPO_SUFFIX.strip())]
    problem = problem.strip()
    index = (row.get("extra_info") or {}).get("index") or _content_id(problem)
    return {
        "prompt": math_prompt(problem),
        "answer": _answer_to_str(row["solution"]),
        "problem_id": f"dapo_math_17k/{index}",
    }


def map_math_row(row: dict) -> dict:
    r"""MATH (`DigitalLearningGmbH/MATH-lighteval`, `EleutherAI/hendrycks_math`): `problem`, `level` ("Level 3"),
    `type`, `solution`; the gold answer is the last `\boxed{...}` of the solution."""
    answer = last_boxed_content(row["solution"])
    return {
        "prompt": math_prompt(row["problem"]),
        "answer": "" if answer is None else answer.strip(),
        "problem_id": f"math_l3_5/{_content_id(row['problem'])}",
    }


def is_math_train_row(row: dict) -> bool:
    """MATH levels 3-5 with an extractable boxed answer (the paper's MATH training subset)."""
    return row["level"] in MATH_TRAIN_LEVELS and last_boxed_content(row["solution"]) is not None


def map_gsm8k_row(row: dict) -> dict:
    """`openai/gsm8k` (config "main"): `question`, and `answer` = worked solution ending in `#### 72`."""
    answer = row["answer"].split("####")[-1].strip().replace(",", "")
    return {
        "prompt": math_prompt(row["question"]),
        "answer": answer,
        "problem_id": f"gsm8k/{_content_id(row['question'])}",
    }


def map_aime24_row(row: dict) -> dict:
    """`HuggingFaceH4/aime_2024`: `id`, `problem`, `solution`, `answer`, `url`, `year`."""
    return {
        "prompt": math_prompt(row["problem"]),
        "answer": _answer_to_str(row["answer"]),
        "problem_id": f"aime24/{row['id']}",
    }


def map_aime25_row(row: dict) -> dict:
    """`math-ai/aime25`: `problem`, `answer`, `id`."""
    return {
        "prompt": math_prompt(row["problem"]),
        "answer": _answer_to_str(row["answer"]),
        "problem_id": f"aime25/{row['id']}",
    }


def map_amc23_row(row: dict) -> dict:
    """`math-ai/amc23`: `question`, `answer` (may be stored as a float, e.g. `27.0`), and an `id` when present."""
    pid = row.get("id")
    pid = _content_id(row["question"]) if pid is None else pid
    return {
        "prompt": math_prompt(row["question"]),
        "answer": _answer_to_str(row["answer"]),
        "problem_id": f"amc23/{pid}",
    }


def map_math500_row(row: dict) -> dict:
    """`HuggingFaceH4/MATH-500`: `problem`, `solution`, `answer`, `subject`, `level` (int), `unique_id`."""
    return {
        "prompt": math_prompt(row["problem"]),
        "answer": _answer_to_str(row["answer"]),
        "problem_id": f"math500/{row['unique_id']}",
    }


# The toy task of the embedded default: generated in code, answer checkable exactly.

# Single-digit operands: 100 distinct problems, learnable by a 0.4M-parameter model in seconds, so the embedded
# default shows RL improving a policy rather than a policy failing to learn the task.
TOY_MAX_OPERAND = 9
TOY_DEFAULT_SIZE = 4096


def make_toy_arithmetic_row(a: int, b: int, op: str = "+") -> dict:
    """One toy problem `"a+b="` (or `-`) with its exact answer, e.g. `{"prompt": "12+35=", "answer": "47", ...}`."""
    if op not in "+-":
        raise ValueError(f"op must be '+' or '-', got {op!r}")
    value = a + b if op == "+" else a - b
    expr = f"{a}{op}{b}"
    return {"prompt": f"{expr}=", "answer": str(value), "problem_id": f"toy_arithmetic/{expr}"}


def generate_toy_arithmetic(num_samples: int, seed: int = 0, split: str = "train") -> Dataset:
    """`num_samples` random sums of two integers in [0, `TOY_MAX_OPERAND`], reproducible from (`seed`, `split`).

    Different splits draw from different streams, so `"test"` is not a copy of `"train"`.
    """
    rng = random.Random(f"toy_arithmetic/{split}/{seed}")
    rows = [
        make_toy_arithmetic_row(rng.randint(0, TOY_MAX_OPERAND), rng.randint(0, TOY_MAX_OPERAND))
        for _ in range(num_samples)
    ]
    return Dataset.from_list(rows)


@dataclass(frozen=True)
class DatasetSource:
    """Where a named dataset lives on the Hub, the columns its rows must have (`columns`, checked before mapping, see
    `bandpo_trl.data_files.check_rows`) and how they map to (prompt, answer, problem_id). `keep_row`, when set,
    filters the rows first; `kept` says which it keeps and `kept_by` names the column that decides (for the message
    when none is kept)."""

    path: str
    config: str | None
    split: str
    map_row: Callable[[dict], dict]
    columns: dict[str, Column]
    keep_row: Callable[[dict], bool] | None = None
    kept: str = ""
    kept_by: str | None = None

    @property
    def layout(self) -> str:
        """The source's layout as messages name it, e.g. `"openai/gsm8k (config main)"`."""
        return self.path + (f" (config {self.config})" if self.config else "")


# The mapped rows of every Hub source: a conversational prompt, the gold answer and the problem id, all text.
MAPPED_FEATURES = Features(
    {
        "prompt": List({"role": Value("string"), "content": Value("string")}),
        "answer": Value("string"),
        "problem_id": Value("string"),
    }
)


def _has_final_answer_line(solution: str) -> bool:
    return "####" in solution and bool(solution.split("####")[-1].strip())


GSM8K_SOLUTION = Column((str,), "the worked solution ending in '#### <final answer>'", _has_final_answer_line)

DATASET_SOURCES: dict[str, DatasetSource] = {
    # Training sets (docs/method.md §7.3). The English, deduplicated DAPO-Math-17k.
    "dapo_math_17k": DatasetSource(
        "open-r1/DAPO-Math-17k-Processed",
        "en",
        "train",
        map_dapo_math_17k_row,
        {"prompt": Column((str,), "the problem in the DAPO instruction"), "solution": ANSWER},
    ),
    "math_l3_5": DatasetSource(
        "DigitalLearningGmbH/MATH-lighteval",
        "default",
        "train",
        map_math_row,
        {"problem": TEXT, "level": Column((str,), "text such as 'Level 3'"), "solution": TEXT},
        keep_row=is_math_train_row,
        kept=f"the problems of level {', '.join(map(repr, MATH_TRAIN_LEVELS))} whose solution has a \\boxed{{}} answer",
        kept_by="level",
    ),
    "gsm8k": DatasetSource(
        "openai/gsm8k", "main", "train", map_gsm8k_row, {"question": TEXT, "answer": GSM8K_SOLUTION}
    ),
    # Evaluation sets.
    "aime24": DatasetSource(
        "HuggingFaceH4/aime_2024", None, "train", map_aime24_row, {"id": ID, "problem": TEXT, "answer": ANSWER}
    ),
    "aime25": DatasetSource(
        "math-ai/aime25", None, "test", map_aime25_row, {"problem": TEXT, "answer": ANSWER, "id": ID}
    ),
    "amc23": DatasetSource("math-ai/amc23", None, "test", map_amc23_row, {"question": TEXT, "answer": ANSWER}),
    "math500": DatasetSource(
        "HuggingFaceH4/MATH-500", None, "test", map_math500_row, {"problem": TEXT, "answer": ANSWER, "unique_id": ID}
    ),
}
TRAIN_DATASETS = ("dapo_math_17k", "math_l3_5", "gsm8k", "toy_arithmetic", *ARITHMETIC_DATASETS)
EVAL_DATASETS = ("aime24", "aime25", "amc23", "math500", "toy_arithmetic", *ARITHMETIC_DATASETS)
# The split each benchmark is evaluated on, when it is not the dataset's default. The toy task draws from a stream of
# problems independent of the training one; the arithmetic levels are evaluated on their held-out problems.
EVAL_SPLITS = {"toy_arithmetic": "test", **dict.fromkeys(ARITHMETIC_DATASETS, "test")}


def available_datasets() -> list[str]:
    """Names accepted by `load_named_dataset`, sorted."""
    return sorted({*DATASET_SOURCES, "toy_arithmetic", *ARITHMETIC_DATASETS})


def load_named_dataset(
    name: str, split: str | None = None, num_samples: int | None = None, seed: int = 0, path: str | None = None
) -> Dataset:
    """Load a dataset by name and map it to the columns `prompt`, `answer`, `problem_id`.

    Args:
        name: one of `available_datasets()`.
        split: the source split; defaults to the one the name stands for (e.g. `"train"` for MATH, `"test"` for
            MATH-500). For `toy_arithmetic` any string selects an independent stream of problems.
        num_samples: if set, keep a random subset of this many rows (drawn with `seed`); `toy_arithmetic`
            generates exactly this many (default 4096).
        seed: seed of the subset (and of the toy generator).
        path: load the rows from here instead of the Hub (offline clusters), with the same column layout and row
            mapping: a data file (`.parquet`, `.json`, `.jsonl`, `.csv`, `.arrow`; all its rows, `split` unused),
            a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, or a local copy of the Hub
            repository (e.g. from `hf download --repo-type dataset`), read with `load_dataset(path, config)`.

    Raises:
        ValueError: unknown `name` (the message lists the known ones), `num_samples` <= 0, a local `path` that
            cannot be read, rows that lack a column of the source (`DatasetSource.columns`) or hold an empty or
            wrongly typed value in one, a filter that keeps no row, or rows whose prompt is empty; each message names
            the file (or Hub repository) and the dataset (see `bandpo_trl.data_files`).
        RuntimeError: the Hub copy cannot be loaded (e.g. offline); the message suggests `dataset_paths`.
    """
    if num_samples is not None and num_samples <= 0:
        raise ValueError(f"num_samples must be a positive number of rows, got {num_samples} (None keeps every row)")
    if name == "toy_arithmetic":
        if path is not None:
            raise ValueError("toy_arithmetic is generated in code and has no files; remove its local path")
        num_samples = TOY_DEFAULT_SIZE if num_samples is None else num_samples
        return generate_toy_arithmetic(num_samples, seed=seed, split=split or "train")
    if name in ARITHMETIC_DATASETS:  # generated in code too: bandpo_trl.arithmetic
        if path is not None:
            raise ValueError(f"{name} is generated in code and has no files; remove its local path")
        return generate_arithmetic(name, num_samples=num_samples, seed=seed, split=split or "train")
    if name not in DATASET_SOURCES:
        raise ValueError(f"Unknown dataset {name!r}. Known datasets: {', '.join(available_datasets())}")
    source = DATASET_SOURCES[name]
    split = split or source.split
    if path is None:
        where = f"{source.path} on the Hub"
        try:
            dataset = load_dataset(source.path, source.config, split=split)
        except Exception as error:
            raise RuntimeError(
                f"{name}: cannot load {source.layout} (split {split}) from the Hub: {type(error).__name__}: {error}. "
                f"Without Hub access, give a local copy: --dataset_paths {name}=PATH (a data file or directory)."
            ) from error
    else:
        where = path
        dataset = load_local_dataset(path, source.config, split, name, expected_columns(source.columns, source.layout))
    check_rows(dataset, name, source.columns, where, source.layout)
    if source.keep_row is not None:
        kept = dataset.filter(source.keep_row)
        if len(kept) == 0:
            raise no_rows_kept(dataset, name, where, source.kept, source.kept_by)
        dataset = kept
    if num_samples is not None and num_samples < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(num_samples))
    # Explicit output types: a source column of mixed types (an answer stored as text in some rows and as a number in
    # others) is read as JSON, and `map` would keep that type for the mapped `answer`.
    dataset = dataset.map(source.map_row, remove_columns=dataset.column_names, features=MAPPED_FEATURES)
    check_no_empty_prompts(dataset, name)
    return dataset


def load_eval_dataset(name: str, num_problems: int | None = None, seed: int = 0, path: str | None = None) -> Dataset:
    """The problems of benchmark `name` (its evaluation split, `EVAL_SPLITS`): all of them, or a random subset of
    `num_problems` drawn with `seed` (the toy task generates that many); from the local copy `path` when given (see
    `load_named_dataset`)."""
    return load_named_dataset(name, split=EVAL_SPLITS.get(name), num_samples=num_problems, seed=seed, path=path)


def _prompt_is_empty(prompt) -> bool:
    if isinstance(prompt, str):
        return not prompt.strip()
    # Conversational: empty when no message has content, or when it is the paper's template around no problem.
    return prompt == _EMPTY_MATH_PROMPT or not any(str(message.get("content") or "").strip() for message in prompt)


_EMPTY_MATH_PROMPT = math_prompt("")


def check_no_empty_prompts(dataset: Dataset, name: str = "dataset") -> None:
    """Refuse a dataset with empty prompts (or the math template around an empty problem), naming the rows.

    TRL would otherwise fail deep inside generation with a tensor dtype error on the empty prompt.
    """
    empty = [i for i, prompt in enumerate(dataset["prompt"]) if _prompt_is_empty(prompt)]
    if empty:
        shown = ", ".join(str(i) for i in empty[:10]) + (", ..." if len(empty) > 10 else "")
        ids = dataset.select(empty[:3])["problem_id"] if "problem_id" in dataset.column_names else []
        raise ValueError(
            f"{name}: {len(empty)} of {len(dataset)} rows have an empty prompt (rows {shown}"
            + (f"; problem ids {', '.join(ids)}" if ids else "")
            + "). Remove them from the data before training."
        )


# ------------------------------------------------------------------------------------------------- the training set


def load_train_dataset(script_args: ScriptArguments, seed: int) -> Dataset:
    """The named training datasets, mapped to (prompt, answer, problem_id), concatenated and shuffled."""
    paths = parse_dataset_paths(script_args.dataset_paths)
    parts = [
        load_named_dataset(
            name,
            split=script_args.dataset_split,
            num_samples=script_args.dataset_num_samples,
            seed=seed,
            path=paths.get(name),
        )
        for name in script_args.dataset_names
    ]
    dataset = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    return dataset.shuffle(seed=seed)


def prompt_lengths(dataset: Dataset, tokenizer) -> list[int]:
    """Each row's prompt length in tokens, as the trainer will tokenize it (chat template applied)."""

    def length(prompt) -> int:
        if isinstance(prompt, str):
            return len(tokenizer(prompt)["input_ids"])
        return len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))

    return [length(prompt) for prompt in dataset["prompt"]]


def drop_long_prompts(dataset: Dataset, tokenizer, max_prompt_length: int | None) -> Dataset:
    """Remove rows whose prompt, as the trainer will tokenize it, exceeds `max_prompt_length` tokens.

    Raises:
        ValueError: every prompt is longer than `max_prompt_length` (the message gives the shortest length).
    """
    if max_prompt_length is None:
        return dataset
    lengths = prompt_lengths(dataset, tokenizer)
    kept = dataset.select([i for i, n in enumerate(lengths) if n <= max_prompt_length])
    if len(dataset) and not len(kept):
        raise ValueError(
            f"No training prompts left: all {len(dataset)} loaded prompts are longer than max_prompt_length="
            f"{max_prompt_length} tokens (the shortest has {min(lengths)}). Raise max_prompt_length."
        )
    if len(kept) < len(dataset):
        logger.warning(
            "Dropped %d of %d prompts longer than %d tokens.",
            len(dataset) - len(kept),
            len(dataset),
            max_prompt_length,
        )
    return kept


def check_enough_prompts(dataset: Dataset, training_args: BandGRPOConfig) -> None:
    """Refuse a training set smaller than one generation batch: TRL's sampler would yield no batch at all and the
    run would "train" 0 steps and save the untouched model."""
    needed = training_args.generation_batch_size // training_args.num_generations
    if len(dataset) < needed:
        raise ValueError(
            f"The training set has {len(dataset)} prompts, fewer than one generation batch needs: "
            f"per_device_train_batch_size ({training_args.per_device_train_batch_size}) x processes "
            f"({training_args.world_size}) x steps_per_generation ({training_args.steps_per_generation}) = "
            f"{training_args.generation_batch_size} completions / num_generations ({training_args.num_generations}) "
            f"= {needed} distinct prompts. Use more data (dataset_num_samples, max_prompt_length) or a smaller batch."
        )
