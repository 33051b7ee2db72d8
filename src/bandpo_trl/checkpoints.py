"""Finding the checkpoint to resume from: the newest *complete* one, so a kill during saving costs one interval.

`transformers.Trainer` writes a checkpoint's files in order (model, optimizer and scheduler, RNG states) and its
`trainer_state.json` last, so a checkpoint without a readable `trainer_state.json` was cut off while being saved.
`Trainer.train(resume_from_checkpoint=True)` takes the highest-numbered `checkpoint-N` whatever its state and fails
on a half-written one; `resolve_resume_checkpoint` skips those with a warning instead.

Example:
```python
from bandpo_trl.checkpoints import resolve_resume_checkpoint

trainer.train(resume_from_checkpoint=resolve_resume_checkpoint("latest", args.output_dir))
```
"""

from __future__ import annotations

import json
import logging
import os
import re

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

LATEST = ("true", "latest")
_CHECKPOINT_DIR = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def checkpoint_problem(path: str) -> str | None:
    """Why `path` cannot be resumed from (a short reason), or None for a complete checkpoint."""
    if not os.path.isdir(path):
        return "no such directory"
    state = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(state):
        return "no trainer_state.json (saving was interrupted)"
    try:
        with open(state, encoding="utf-8") as handle:
            json.load(handle)["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return "unreadable trainer_state.json (saving was interrupted)"
    return None


def latest_complete_checkpoint(output_dir: str) -> str | None:
    """The highest-numbered complete `checkpoint-N` in `output_dir`; incomplete newer ones are skipped with a
    warning. None when there is none."""
    if not os.path.isdir(output_dir):
        return None
    numbered = sorted(
        ((int(match.group(1)), name) for name in os.listdir(output_dir) if (match := _CHECKPOINT_DIR.match(name))),
        reverse=True,
    )
    for _, name in numbered:
        path = os.path.join(output_dir, name)
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("Skipping checkpoint %s: %s.", path, problem)
    return None


def resolve_resume_checkpoint(value: str | bool | None, output_dir: str) -> str | None:
    """What to pass to `Trainer.train(resume_from_checkpoint=...)` for a `--resume_from_checkpoint` value.

    - unset, `false`: None (start from scratch);
    - `true` or `latest`: the newest complete checkpoint in `output_dir`, or None with a warning when there is
      none yet (so a job script can always pass it, first run included);
    - a path: that checkpoint, which must be complete.

    Raises:
        ValueError: a path that is not a complete checkpoint (the message says what is missing).
    """
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in ("", "false")):
        return None
    if value is True or value.strip().lower() in LATEST:
        path = latest_complete_checkpoint(output_dir)
        if path is None:
            logger.warning(
                "resume_from_checkpoint=%s: no complete checkpoint in %s yet; training from the start.",
                value,
                output_dir,
            )
        else:
            logger.info("Resuming from %s.", path)
        return path
    problem = checkpoint_problem(value)
    if problem is not None:
        raise ValueError(
            f"resume_from_checkpoint={value!r} cannot be resumed from: {problem}. Pass a complete checkpoint "
            f"directory, or 'latest' for the newest complete one in output_dir ({output_dir})."
        )
    return value
