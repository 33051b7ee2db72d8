"""Result files of an evaluation: `<benchmark>.jsonl` (one record per problem) and `summary.json`, each written
atomically (a temporary file renamed over the target), and the early check that they can be written at all."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from typing import IO, Any


def check_writable_dir(path: str, flag: str = "--output_dir") -> None:
    """Fail now, naming `path`, when files cannot be written in it (a parent that is a file, a read-only or virtual
    file system, no permission), so that nothing is generated for nothing. Directories created to find out are
    removed again: a run that fails later leaves no output directory behind.

    Raises:
        OSError: `"<flag> <path>: cannot write results there (<reason>)"`.
    """
    missing, existing = [], os.path.abspath(path)
    while not os.path.exists(existing):
        missing.append(existing)
        existing = os.path.dirname(existing)
    created: list[str] = []
    try:
        if not os.path.isdir(existing):
            raise NotADirectoryError(f"{existing} is a file, not a directory")
        for directory in reversed(missing):
            os.mkdir(directory)
            created.append(directory)
        handle, probe = tempfile.mkstemp(dir=path, prefix=".write-check-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        reason = error.strerror or str(error)
        raise OSError(f"{flag} {path}: cannot write results there ({reason})") from error
    finally:
        for directory in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(directory)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _atomic_open(path: str) -> Iterator[IO[str]]:
    """A text file that replaces `path` only once it is completely written; on an error `path` is left as it was and
    the temporary file is removed."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            yield stream
        os.chmod(temporary, 0o666 & ~_umask())  # the permissions of a file opened with open(path, "w")
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def write_jsonl(path: str, records: Iterable[dict[str, Any]]) -> None:
    """Write one JSON object per line to `path`, creating its directory; atomically (see `_atomic_open`). Nothing is
    created before there are results to write, so a run that fails early leaves no output directory behind."""
    with _atomic_open(path) as stream:
        for record in records:
            stream.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_json(path: str, value: Any) -> None:
    """Write `value` as indented JSON to `path` (e.g. `summary.json`), creating its directory; atomically."""
    with _atomic_open(path) as stream:
        json.dump(value, stream, indent=2)
