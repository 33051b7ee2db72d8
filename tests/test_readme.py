"""README.md's Python examples run as written (in a fresh interpreter, in a temporary directory).

The first example, the one-import swap, names a Hub model, a reward and a dataset that the README leaves to the
reader: it runs with the tiny local model, a constant reward and a small dataset put in their place, and with
`bf16=False` as the README says to add on a CPU-only machine. `old_logps` of the operator example is given. The
asynchronous example runs on its own, with the tiny model and the in-process stand-ins for its vLLM server
(`bandpo_trl.stale_rollouts`) handed to the trainer.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
ASYNC = [block for block in BLOCKS if "BandAsyncGRPOTrainer(" in block]
SYNC = [block for block in BLOCKS if "BandAsyncGRPOTrainer(" not in block]
ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PATH": ""}

PRELUDE = """\
import torch
from datasets import Dataset

old_logps = torch.log(torch.tensor([[1e-4, 0.01, 0.2, 0.5, 0.9, 0.999]]))
accuracy_reward = lambda completions, **kwargs: [0.0] * len(completions)
dataset = Dataset.from_dict({"prompt": [f"{i}+{i}=" for i in range(32)]})
"""


def test_every_python_example_is_covered():
    assert len(BLOCKS) == 7, "a Python example was added to or removed from README.md: update this test"
    assert len(ASYNC) == 1
    assert 'model="Qwen/Qwen2.5-3B-Instruct"' in SYNC[0] and "trainer.train()" in SYNC[0]


def test_readme_python_examples_run(tiny_model_dir, tmp_path):
    swap = SYNC[0].replace('"Qwen/Qwen2.5-3B-Instruct"', repr(str(tiny_model_dir)))
    swap = swap.replace('output_dir="qwen-bandpo",', 'output_dir="qwen-bandpo", bf16=False, max_steps=1,')
    script = "\n".join([PRELUDE, swap, *SYNC[1:], "print('README examples ran')"])
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "README examples ran" in result.stdout


def test_readme_async_example_runs(tiny_model_dir, tmp_path):
    stand_ins = f"""
from bandpo_trl.stale_rollouts import SnapshotWeightTransfer, StaleRolloutWorker, cpu_async_grpo
from transformers import AutoTokenizer

MODEL = {str(tiny_model_dir)!r}
transfer = SnapshotWeightTransfer()
worker = StaleRolloutWorker(MODEL, AutoTokenizer.from_pretrained(MODEL), dataset, transfer, staleness=1,
                            num_generations=4, max_completion_length=4)
"""
    replacements = {
        '"Qwen/Qwen2.5-3B-Instruct"': "MODEL",
        'output_dir="out",': 'output_dir="out", max_steps=1, token_budget=0, num_generations=4,',
        "train_dataset=dataset,": "train_dataset=dataset, rollout_worker=worker, weight_transfer=transfer,",
    }
    example = ASYNC[0]
    for old, new in replacements.items():
        assert old in example, old
        example = example.replace(old, new)
    # Inside cpu_async_grpo(): TRL's FlashAttention-3 kernel is replaced by an eager equivalent.
    example = "with cpu_async_grpo():\n" + textwrap.indent(example, "    ")
    script = "\n".join([PRELUDE, stand_ins, example, "print('async example ran', trainer.state.global_step)"])
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "async example ran 1" in result.stdout
