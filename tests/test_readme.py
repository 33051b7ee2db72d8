"""README.md's Python examples run as written (in a fresh interpreter, in a temporary directory).

The first example, the one-import swap, names a Hub model, a reward and a dataset that the README leaves to the
reader: it runs with the tiny local model, a constant reward and a small dataset put in their place, and with
`bf16=False` as the README says to add on a CPU-only machine. `old_logps` of the operator example is given.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)

PRELUDE = """\
import torch
from datasets import Dataset

old_logps = torch.log(torch.tensor([[1e-4, 0.01, 0.2, 0.5, 0.9, 0.999]]))
accuracy_reward = lambda completions, **kwargs: [0.0] * len(completions)
dataset = Dataset.from_dict({"prompt": [f"{i}+{i}=" for i in range(32)]})
"""


def test_every_python_example_is_covered():
    assert len(BLOCKS) == 6, "a Python example was added to or removed from README.md: update this test"
    assert 'model="Qwen/Qwen2.5-3B-Instruct"' in BLOCKS[0] and "trainer.train()" in BLOCKS[0]


def test_readme_python_examples_run(tiny_model_dir, tmp_path):
    swap = BLOCKS[0].replace('"Qwen/Qwen2.5-3B-Instruct"', repr(str(tiny_model_dir)))
    swap = swap.replace('output_dir="qwen-bandpo",', 'output_dir="qwen-bandpo", bf16=False, max_steps=1,')
    script = "\n".join([PRELUDE, swap, *BLOCKS[1:], "print('README examples ran')"])
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PATH": ""},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "README examples ran" in result.stdout
