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

A checkpoint is complete when its `trainer_state.json` is readable *and* its other files load: every weight file
(`*.safetensors`, sharded indexes and their shards, `*.bin`), `optimizer.pt`, `scheduler.pt`, `rng_state*.pth` and
DeepSpeed's `global_step*/` files. The check is cheap (a safetensors header against the file's size, a torch zip
archive's central directory against its size), so a 3B model's checkpoint is checked in milliseconds.

The same module keeps a run from harming another one: `previous_run_outputs` lists what an earlier run left in an
`output_dir` (checkpoints, a saved model; not the tiny model's warm-up cache), and `clip_settings` /
`check_clip_settings` record each checkpoint's clipping rule and compare it with the run resuming it.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import shutil
import struct
import warnings
import zipfile

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .clip_rules import get_clip_rule, trl_epsilons
from .config import RULE_OPTIONS, band_option, with_band_defaults

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
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            problem = file_problem(os.path.join(root, name), os.path.relpath(os.path.join(root, name), path))
            if problem is not None:
                return problem
    return None


def file_problem(path: str, name: str) -> str | None:
    """Why the checkpoint file `path` (called `name` in messages) would not load, or None. Checks weights
    (`.safetensors`, `.bin`), torch archives (`.pt`, `.pth`) and sharded indexes; other files are not checked."""
    if not name.endswith((".safetensors", ".pt", ".pth", ".bin", ".index.json")):
        return None
    try:
        size = os.path.getsize(path)
        if size == 0:
            return f"{name} is empty"
        if name.endswith(".index.json"):
            return _index_problem(path, name)
        with open(path, "rb") as handle:
            if name.endswith(".safetensors"):
                return _safetensors_problem(handle, name, size)
            return _torch_archive_problem(handle, name, size)
    except OSError as error:
        return f"{name} cannot be read ({error})"


def _safetensors_problem(handle, name: str, size: int) -> str | None:
    # The format: an 8-byte little-endian header length, a JSON header with each tensor's data offsets, the data.
    prefix = handle.read(8)
    if len(prefix) < 8:
        return f"{name} is truncated: {size} bytes, shorter than a safetensors header"
    (header_size,) = struct.unpack("<Q", prefix)
    if 8 + header_size > size:
        return f"{name} is truncated: its header alone needs {header_size} bytes, the file has {size}"
    try:
        header = json.loads(handle.read(header_size))
        data_size = max(
            (entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0
        )
    except (ValueError, KeyError, TypeError, IndexError):
        return f"{name} is corrupt: unreadable safetensors header"
    if 8 + header_size + data_size != size:
        state = "truncated" if 8 + header_size + data_size > size else "corrupt"
        return f"{name} is {state}: its header lists {data_size} bytes of tensor data, the file holds {size - 8 - header_size}"
    return None


def _torch_archive_problem(handle, name: str, size: int) -> str | None:
    # torch.save writes a zip archive whose directory sits at the end: a cut-off file has none.
    if handle.read(4) != b"PK\x03\x04":
        return None  # torch's legacy (pre-1.6) format: not checked
    handle.seek(0)
    try:
        with zipfile.ZipFile(handle) as archive:
            short = [info.filename for info in archive.infolist() if info.header_offset + info.compress_size > size]
    except (zipfile.BadZipFile, ValueError, EOFError) as error:
        return f"{name} is truncated or corrupt ({error})"
    if short:
        return f"{name} is truncated or corrupt ({short[0]} ends past the end of the file)"
    return None


def _index_problem(path: str, name: str) -> str | None:
    # A sharded model: every shard the index lists must be there (each shard is checked as a weight file).
    try:
        with open(path, encoding="utf-8") as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{name} is corrupt: no readable weight_map"
    for shard in shards:
        if not os.path.isfile(os.path.join(os.path.dirname(path), shard)):
            return f"{name} lists {shard}, which is missing"
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


# ----------------------------------------------------------------------------------------------------------------------
# An earlier run in output_dir
# ----------------------------------------------------------------------------------------------------------------------

# What `Trainer.save_model` / `save_state` leave at the top of output_dir: a saved model and its training log.
SAVED_RUN_FILES = (
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model*.bin.index.json",
    "adapter_model.bin",
    "trainer_state.json",
)


def wants_resume(value: str | bool | None) -> bool:
    """Whether a `resume_from_checkpoint` value asks to resume (`latest`, `true` or a path), not to start afresh."""
    if value is None or value is False:
        return False
    return value is True or value.strip().lower() not in ("", "false")


def previous_run_outputs(output_dir: str) -> list[str]:
    """What an earlier run left in `output_dir`: its `checkpoint-N` directories (complete or not, by step), then the
    files of a saved model or training log, by name. The tiny model's warm-up cache (`warmup/`) is no run's output."""
    if not os.path.isdir(output_dir):
        return []
    names = os.listdir(output_dir)
    checkpoints = sorted(
        (int(match.group(1)), name)
        for name in names
        if (match := _CHECKPOINT_DIR.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    )
    files = sorted(
        name
        for name in names
        if os.path.isfile(os.path.join(output_dir, name))
        and any(fnmatch.fnmatch(name, pattern) for pattern in SAVED_RUN_FILES)
    )
    return [name for _, name in checkpoints] + files


def _listing(names: list[str], shown: int = 6) -> str:
    more = f", ... ({len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def check_output_dir(output_dir: str, resume_from_checkpoint, overwrite_output_dir: bool, should_delete: bool) -> None:
    """Refuse a fresh run into an `output_dir` holding an earlier run's outputs, before any work is done.

    The new run would overwrite the checkpoints of the same step, delete others to keep `save_total_limit`, replace
    the saved model, and a later `resume_from_checkpoint=latest` could pick the earlier run's newest checkpoint.
    Resuming (`resume_from_checkpoint` set) continues that run; `overwrite_output_dir` deletes its outputs (on the
    process that saves, `should_delete`) and starts over.

    Raises:
        ValueError: an earlier run's outputs and neither option, or both options at once.
    """
    if overwrite_output_dir and wants_resume(resume_from_checkpoint):
        raise ValueError(
            f"overwrite_output_dir and resume_from_checkpoint={resume_from_checkpoint!r} contradict each other: the "
            "first deletes the earlier run in output_dir, the second continues it. Pass one of them."
        )
    if wants_resume(resume_from_checkpoint):
        return
    outputs = previous_run_outputs(output_dir)
    if not outputs:
        return
    if not overwrite_output_dir:
        raise ValueError(
            f"output_dir {output_dir} already holds the outputs of an earlier run ({_listing(outputs)}): a new run "
            "there would overwrite its checkpoints, delete some to keep save_total_limit and replace its model, and "
            "a later --resume_from_checkpoint latest could pick up the earlier run's checkpoints. Pass "
            "--resume_from_checkpoint latest to continue that run, --overwrite_output_dir to delete these and start "
            "over, or another --output_dir."
        )
    if should_delete:
        logger.warning("overwrite_output_dir: deleting the earlier run's %s in %s.", ", ".join(outputs), output_dir)
        for name in outputs:
            path = os.path.join(output_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)


# ----------------------------------------------------------------------------------------------------------------------
# The clip settings a checkpoint was trained with
# ----------------------------------------------------------------------------------------------------------------------

CLIP_SETTINGS_NAME = "clip_settings.json"
# (checkpoint, message) already told in this process: the entry point and the trainer check the same resume.
_warned_changes: set[tuple[str, str]] = set()


def clip_settings(args, compute_clip_bounds: str | None = None) -> dict:
    """The clipping settings of a run: `clip_rule` (its registered name), the options the rule reads (every option
    of the built-in rules for a rule that declares none) and TRL's `epsilon`, `epsilon_high` (as TRL reads them);
    `compute_clip_bounds`: the overriding method of a trainer subclass, if any."""
    rule = get_clip_rule(band_option(args, "clip_rule"))
    view = with_band_defaults(args)
    options = RULE_OPTIONS if rule.options is None else rule.options
    settings = {"clip_rule": rule.name, **{name: getattr(view, name, None) for name in options}}
    settings["epsilon"], settings["epsilon_high"] = trl_epsilons(args)
    if compute_clip_bounds is not None:
        settings["compute_clip_bounds"] = compute_clip_bounds
    return settings


def write_clip_settings(checkpoint: str, settings: dict) -> None:
    """Write `settings` to `checkpoint/clip_settings.json` (creating the directory)."""
    os.makedirs(checkpoint, exist_ok=True)
    with open(os.path.join(checkpoint, CLIP_SETTINGS_NAME), "w", encoding="utf-8") as handle:
        json.dump(settings, handle, indent=2, default=str)
        handle.write("\n")


def check_clip_settings(checkpoint: str, args, allow_change: bool = False, compute_clip_bounds: str | None = None):
    """Compare the clip settings `checkpoint` was trained with against those of `args`, the run resuming it.

    Each differing setting is named (old -> new): the rule, the options both read, TRL's epsilons and an overriding
    `compute_clip_bounds`. A checkpoint saved without `clip_settings.json` is resumed as it is (logged).

    Raises:
        ValueError: settings differ and `allow_change` is False (with it: a warning, once per checkpoint and change).
    """
    path = os.path.join(checkpoint, CLIP_SETTINGS_NAME)
    if not os.path.isfile(path):
        if (checkpoint, "") in _warned_changes:
            return
        _warned_changes.add((checkpoint, ""))
        logger.info(
            "%s has no %s (saved by an older bandpo_trl): its clip settings are not compared with this run's.",
            checkpoint,
            CLIP_SETTINGS_NAME,
        )
        return
    try:
        with open(path, encoding="utf-8") as handle:
            saved = json.load(handle)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{path} is unreadable ({error}); delete it to resume without comparing clip settings"
        ) from error
    current = clip_settings(args, compute_clip_bounds)
    always = ("clip_rule", "compute_clip_bounds")
    names = [name for name in saved if name in current or name in always]
    names += [name for name in always if name in current and name not in saved]
    changes = [f"{n} {saved.get(n)!r} -> {current.get(n)!r}" for n in names if saved.get(n) != current.get(n)]
    if not changes:
        return
    message = f"{checkpoint} was trained with other clip settings: {', '.join(changes)}"
    if not allow_change:
        raise ValueError(
            f"resume_from_checkpoint: {message}. Resuming would change how the ratios are clipped mid-run. Resume "
            "with the checkpoint's settings, or pass --allow_clip_change to continue with the new ones."
        )
    if (checkpoint, message) not in _warned_changes:
        _warned_changes.add((checkpoint, message))
        warnings.warn(f"{message}; the run continues with the new ones.", UserWarning, stacklevel=2)


def warn_on_earlier_run(args, resume_from_checkpoint, compute_clip_bounds: str | None = None) -> None:
    """What `BandGRPOTrainer.train` checks (warnings only, as `Trainer` never refuses an output_dir): a fresh run into
    an `output_dir` with an earlier run's outputs, or a resume whose checkpoint had other clip settings."""
    if not wants_resume(resume_from_checkpoint):
        outputs = previous_run_outputs(args.output_dir)
        if outputs and args.should_save:
            warnings.warn(
                f"output_dir {args.output_dir} already holds the outputs of an earlier run ({_listing(outputs)}): "
                "this run will overwrite its checkpoints of the same step, may delete others to keep "
                "save_total_limit and will replace its model. Pass resume_from_checkpoint=True to continue it, or use "
                "another output_dir (the bandpo-train entry point refuses this without --overwrite_output_dir).",
                UserWarning,
                stacklevel=3,
            )
        return
    checkpoint = resume_from_checkpoint
    if checkpoint is True or str(checkpoint).strip().lower() in LATEST:
        checkpoint = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    if checkpoint and os.path.isdir(checkpoint):
        check_clip_settings(checkpoint, args, allow_change=True, compute_clip_bounds=compute_clip_bounds)


def check_run_outputs(args, overwrite_output_dir: bool, allow_clip_change: bool) -> str | None:
    """What an entry point checks of `args.output_dir` before anything is loaded; returns the checkpoint to resume from.

    Never harms an earlier run there (`check_output_dir`), resumes only from a checkpoint whose files load
    (`resolve_resume_checkpoint`) and only with the clip settings it was trained with (`check_clip_settings`)."""
    check_output_dir(
        args.output_dir, args.resume_from_checkpoint, overwrite_output_dir, should_delete=args.should_save
    )
    resume_from = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if resume_from is not None:
        check_clip_settings(resume_from, args, allow_change=allow_clip_change)
    return resume_from
