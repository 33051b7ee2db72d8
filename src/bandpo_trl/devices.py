"""Where a run computes: the recipe's `use_cpu` is the one choice, and a launcher that asks for something else is
refused before any work.

`accelerate launch` passes its config's `use_cpu` on as the environment variable `ACCELERATE_USE_CPU` (`"False"` for
`single_gpu.yaml`, `ddp.yaml`, the DeepSpeed and FSDP configs; `"True"` for `cpu.yaml` or `--cpu`); without a launcher
it is unset. A recipe with `use_cpu: true` under a GPU config on a machine with a GPU would have part of the run on
each device (the tiny model's warm-up and TRL's trainer), so it is refused, naming both settings.

Example:
```python
from bandpo_trl.devices import check_launch_device

check_launch_device(training_args)  # raises ValueError for use_cpu=True under a GPU launch config, on a GPU machine
```
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from accelerate.utils import str_to_bool

if TYPE_CHECKING:
    from .config import BandGRPOConfig

LAUNCHER_CPU_VARIABLE = "ACCELERATE_USE_CPU"


def launcher_wants_gpu() -> bool:
    """Whether `accelerate launch` started this process with a config that does not ask for the CPU
    (`ACCELERATE_USE_CPU` set to a false value). False without a launcher."""
    value = os.environ.get(LAUNCHER_CPU_VARIABLE)
    if value is None:
        return False
    try:
        return not str_to_bool(value)
    except ValueError:
        return False


def check_launch_device(training_args: BandGRPOConfig) -> None:
    """Refuse a recipe that asks for the CPU (`use_cpu: true`) when `accelerate launch` asks for a GPU and one is
    present: the recipe's choice would silently win for the whole run. On a machine without a GPU the run goes to the
    CPU whatever the launcher says, so nothing is refused.

    Raises:
        ValueError: naming the recipe's `use_cpu`, the launcher's `ACCELERATE_USE_CPU` and both ways out.
    """
    if training_args.use_cpu and launcher_wants_gpu() and torch.cuda.is_available():
        raise ValueError(
            "The recipe says use_cpu: true, but accelerate launch asks for a GPU (its config's use_cpu: false, passed "
            f"on as {LAUNCHER_CPU_VARIABLE}={os.environ[LAUNCHER_CPU_VARIABLE]}) and this machine has one. To train "
            "on the GPU, add --use_cpu false (and --bf16 true for bf16); to train on the CPU, launch with "
            "--config_file recipes/accelerate_configs/cpu.yaml."
        )
