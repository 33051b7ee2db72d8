r"""What a named dataset's rows must hold, and reading them from local files (clusters without Hub access).

Each source of `bandpo_trl.data.DATASET_SOURCES` declares the columns its row mapping reads, as [`Column`]s: the
types a value may take and what it holds. [`check_rows`] refuses rows that lack one of them or hold a null or a value
of another kind, before any row is mapped, so the message names the file (or Hub repository), the dataset, what was
found and what is expected, instead of a `KeyError` or `AttributeError` from inside the mapping.
[`load_local_dataset`] reads a data file, a `save_to_disk` directory, a directory of data files or a local copy of
the Hub repository, and names the path and the dataset in every error.

Example:
```python
>>> from bandpo_trl.data_files import TEXT, check_rows
>>> from datasets import Dataset
>>> check_rows(Dataset.from_list([{"question": None}]), "gsm8k", {"question": TEXT}, "q.jsonl", "openai/gsm8k")
Traceback (most recent call last):
...
ValueError: q.jsonl (gsm8k): column 'question' is empty (null) in 1 of 1 rows (row 0, counting from 0); expected text in every row. Expected the columns of openai/gsm8k: question (text).

```
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

DATA_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}
_SHOWN = 10  # rows or entries named in a message


@dataclass(frozen=True)
class Column:
    """A column a source's rows must have: the Python types its values may take (`bool` never counts as a number),
    what it holds (for messages), and optionally `valid(value) -> bool`, a further check of a value of those types."""

    types: tuple[type, ...]
    holds: str
    valid: Callable[[Any], bool] | None = None

    def accepts(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, self.types):
            return False
        return self.valid is None or bool(self.valid(value))


TEXT = Column((str,), "text")
ANSWER = Column((str, int, float), "the gold answer, text or a number")
ID = Column((str, int), "an id, text or an integer")


def expected_columns(columns: dict[str, Column], layout: str) -> str:
    """`"Expected the columns of <layout>: name (what it holds), ..."`, the end of every message about a source's
    rows."""
    return f"Expected the columns of {layout}: " + ", ".join(f"{name} ({c.holds})" for name, c in columns.items())


def _is_empty(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _rows(indices: Sequence[int]) -> str:
    shown = ", ".join(str(i) for i in indices[:_SHOWN]) + (", ..." if len(indices) > _SHOWN else "")
    return f"{'row' if len(indices) == 1 else 'rows'} {shown}, counting from 0"


def _show(value) -> str:
    text = repr(value)
    return (text if len(text) <= 80 else text[:77] + "...") + f" ({type(value).__name__})"


def check_rows(dataset: Dataset, name: str, columns: dict[str, Column], where: str, layout: str) -> None:
    """Refuse `dataset` (the rows of `name` as read from `where`, a path or a Hub repository) when it has no rows,
    lacks one of `columns`, or holds in one of them an empty value (null or blank text) or one that `Column.accepts`
    refuses; `layout` names the expected source layout (e.g. `"openai/gsm8k (config main)"`).

    Raises:
        ValueError: naming `where`, `name`, the column, the first rows concerned, the value found and what is
            expected.
    """
    label, expected = f"{where} ({name})", expected_columns(columns, layout)
    if len(dataset) == 0:
        raise ValueError(f"{label}: no rows. {expected}.")
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{label}: missing the column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}; found: "
            f"{', '.join(dataset.column_names)}. {expected}."
        )
    for column, spec in columns.items():
        values = dataset[column]
        empty = [i for i, value in enumerate(values) if _is_empty(value)]
        if empty:
            raise ValueError(
                f"{label}: column {column!r} is empty (null) in {len(empty)} of {len(values)} rows ({_rows(empty)}); "
                f"expected {spec.holds} in every row. {expected}."
            )
        wrong = [i for i, value in enumerate(values) if not spec.accepts(value)]
        if wrong:
            others = f" (and {len(wrong) - 1} other rows: {_rows(wrong[1:])})" if len(wrong) > 1 else ""
            raise ValueError(
                f"{label}: column {column!r} in row {wrong[0]} (counting from 0) holds {_show(values[wrong[0]])}"
                f"{others}; expected {spec.holds}. {expected}."
            )


def no_rows_kept(dataset: Dataset, name: str, where: str, kept: str, kept_by: str | None) -> ValueError:
    """The error for a source whose filter keeps none of the rows read from `where`: what is kept (`kept`) and the
    values of the column that decides (`kept_by`) found in the rows."""
    found = ""
    if kept_by and kept_by in dataset.column_names:
        values = sorted({str(value) for value in dataset[kept_by]})
        shown = ", ".join(repr(value) for value in values[:_SHOWN]) + (", ..." if len(values) > _SHOWN else "")
        found = f"; {kept_by} values found: {shown}"
    return ValueError(f"{where} ({name}): none of its {len(dataset)} rows is kept: {name} keeps {kept}{found}.")


# ------------------------------------------------------------------------------------------------ local files


def _read(load: Callable[[], Any], label: str, what: str, expected: str):
    """`load()`, with any error of the reader turned into one that names the path, the dataset and what it read."""
    try:
        return load()
    except Exception as error:
        cause = error.__cause__ or error
        raise ValueError(
            f"{label}: cannot be read as {what} ({type(cause).__name__}: {cause}). {expected}."
        ) from error


def _is_blank_file(path: str, builder: str) -> bool:
    if os.path.getsize(path) == 0:
        return True
    if builder in ("json", "csv") and os.path.getsize(path) < 4096:
        with open(path, "rb") as handle:
            return not handle.read().strip()
    return False


def _csv_header_only(path: str) -> bool:
    if os.path.getsize(path) >= 65536:
        return False
    with open(path, "rb") as handle:
        return len([line for line in handle.read().splitlines() if line.strip()]) == 1


def _readme_configs(path: str) -> list[str] | None:
    """The configs the README.md of a local copy of a Hub repository declares (its YAML header's `configs`), or None
    when it has no README or declares none."""
    readme = os.path.join(path, "README.md")
    if not os.path.isfile(readme):
        return None
    with open(readme, encoding="utf-8", errors="replace") as handle:
        text = handle.read()
    if not text.startswith("---"):
        return None
    try:
        header = yaml.safe_load(text.split("---", 2)[1])
    except (yaml.YAMLError, IndexError):
        return None
    configs = header.get("configs") if isinstance(header, dict) else None
    names = [str(c.get("config_name", "default")) for c in configs or [] if isinstance(c, dict)]
    return names or None


def _data_files(root: str) -> list[str]:
    found = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        found += [
            os.path.relpath(os.path.join(directory, f), root)
            for f in sorted(files)
            if os.path.splitext(f)[1].lower() in DATA_FILE_BUILDERS
        ]
    return found


def _split_of(saved: DatasetDict, split: str, files: Sequence[str], label: str) -> Dataset:
    if split in saved:
        return saved[split]
    # Files that name no split are read as one "train" split: that is the dataset, whatever split the name stands for.
    if list(saved) == ["train"] and files and not any("train" in f.lower() for f in files):
        return saved["train"]
    raise ValueError(f"{label}: no split {split!r}; it has {', '.join(saved)}")


def _load_data_directory(path: str, config: str | None, split: str, label: str, expected: str) -> Dataset:
    """A directory of data files without a README declaring configs: the config's subdirectory when there is one, its
    splits inferred from the file names as the Hub does (`train-00000-of-00001.parquet`, `test.jsonl`, ...)."""
    root = os.path.join(path, config) if config and os.path.isdir(os.path.join(path, config)) else path
    files = _data_files(root)
    if not files:
        entries = sorted(e for e in os.listdir(path) if not e.startswith("."))
        held = ", ".join(entries[:_SHOWN]) + (", ..." if len(entries) > _SHOWN else "") if entries else "nothing"
        raise ValueError(
            f"{label}: no data files ({', '.join(DATA_FILE_BUILDERS)}) in this directory, nor a `save_to_disk` "
            f"dataset (state.json or dataset_dict.json); it holds: {held}. {expected}."
        )
    builders = sorted({DATA_FILE_BUILDERS[os.path.splitext(f)[1].lower()] for f in files})
    if len(builders) > 1:
        raise ValueError(f"{label}: data files of several types ({', '.join(builders)}); keep the files of one type")
    saved = _read(
        lambda: load_dataset(builders[0], data_dir=root), label, f"a directory of {builders[0]} files", expected
    )
    return _split_of(saved, split, files, label)


def load_local_dataset(
    path: str, config: str | None, split: str, name: str = "dataset", expected: str = ""
) -> Dataset:
    """The rows of dataset `name` from a local `path`: a data file (all its rows, `split` unused), a directory written
    by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, a local copy of the Hub repository whose README.md declares
    its configs (read with `load_dataset(path, config)`), or a directory of data files (`config`'s subdirectory when
    there is one; splits inferred from the file names, files that name none being the whole dataset).

    `expected` (see [`expected_columns`]) ends the message of an empty or unreadable file.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: an unknown file type, an empty or unreadable file, a directory without data files, a README that
            does not declare `config`, or a missing split; each message names `path` and `name`.
    """
    label = f"{path} ({name})"
    if os.path.isfile(path):
        builder = DATA_FILE_BUILDERS.get(os.path.splitext(path)[1].lower())
        if builder is None:
            raise ValueError(
                f"{label}: unknown data file type; accepted: {', '.join(DATA_FILE_BUILDERS)} files or a directory"
            )
        if _is_blank_file(path, builder):
            raise ValueError(f"{label}: the file is empty. {expected}.")
        if builder == "csv" and _csv_header_only(path):
            raise ValueError(f"{label}: no rows, only a header line. {expected}.")
        return _read(
            lambda: load_dataset(builder, data_files=path, split="train"), label, f"a {builder} file", expected
        )
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such file or directory (a local dataset path)")
    if os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json")):
        saved = _read(lambda: load_from_disk(path), label, "a `save_to_disk` directory", expected)
        return _split_of(saved, split, [], label) if isinstance(saved, DatasetDict) else saved
    declared = _readme_configs(path)
    if declared is None:
        return _load_data_directory(path, config, split, label, expected)
    if config is not None and config not in declared:
        raise ValueError(f"{label}: its README.md declares the config(s) {', '.join(declared)}, not {config!r}")
    return _read(
        lambda: load_dataset(path, config, split=split), label, "a local copy of a Hub dataset repository", expected
    )


# ------------------------------------------------------------------------------------------------ dataset_paths


def parse_dataset_paths(entries: list[str] | dict[str, str] | None) -> dict[str, str]:
    """`["name=path", ...]` (CLI) or `{name: path}` (YAML) as a dict, each name checked against the datasets.

    >>> parse_dataset_paths(["dapo_math_17k=/data/dapo.parquet"])
    {'dapo_math_17k': '/data/dapo.parquet'}
    """
    from .data import DATASET_SOURCES  # the sources import this module's checks

    if not entries:
        return {}
    if isinstance(entries, dict):
        pairs = list(entries.items())
    else:
        pairs = []
        for entry in [entries] if isinstance(entries, str) else entries:
            name, sep, path = str(entry).partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ValueError(f"dataset path {entry!r} is not of the form NAME=PATH (e.g. gsm8k=/data/gsm8k.jsonl)")
            pairs.append((name.strip(), path.strip()))
    seen: dict[str, str] = {}
    for name, path in pairs:
        if name in seen:
            raise ValueError(
                f"dataset_paths: {name} is given twice ('{name}={seen[name]}' and '{name}={path}'); give one path "
                "per dataset"
            )
        seen[name] = path
        if name not in DATASET_SOURCES:
            raise ValueError(
                f"dataset path given for {name!r}, which is not a dataset with files; accepted: "
                f"{', '.join(sorted(DATASET_SOURCES))}"
            )
    return dict(pairs)


def check_dataset_paths(
    entries: list[str] | dict[str, str] | None, used: Sequence[str], why_unused: Callable[[str], str]
) -> dict[str, str]:
    """`entries` parsed (see `parse_dataset_paths`) and checked against the datasets a run uses: an entry for a dataset
    not in `used` would be ignored, and a path that does not exist would fail only when the dataset is loaded; both
    are refused now, naming the entry. `why_unused(name)` says why `name` is not used and what would use it.

    Raises:
        ValueError: a malformed or duplicate entry, or one for a dataset not in `used`.
        FileNotFoundError: an entry whose path does not exist.
    """
    paths = parse_dataset_paths(entries)
    for name, path in paths.items():
        if name not in used:
            raise ValueError(
                f"dataset_paths entry '{name}={path}' is for a dataset this run does not use: {why_unused(name)}"
            )
        if not os.path.exists(path):
            raise FileNotFoundError(f"dataset_paths entry {name}={path}: no such file or directory")
    return paths
