"""Result files of an evaluation: `<benchmark>.jsonl` (one record per problem) and `summary.json`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any


def write_jsonl(path: str, records: Iterable[dict[str, Any]]) -> None:
    """Write one JSON object per line to `path`, creating its directory. Nothing is created before there are results
    to write, so a run that fails early leaves no output directory behind."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_json(path: str, value: Any) -> None:
    """Write `value` as indented JSON to `path` (e.g. `summary.json`), creating its directory."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2)
