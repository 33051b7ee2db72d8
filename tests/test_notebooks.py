"""The notebooks: committed without outputs, and each one runs top to bottom headless on the CPU (no downloads).

Outputs are stripped in git (see notebooks/README.md); these tests execute every notebook with nbclient in a kernel
running this interpreter, with the Agg backend and all outputs under a temporary directory.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = ["01_band_bounds.ipynb", "02_custom_bound_rule.ipynb", "03_lora_finetune.ipynb"]
CELL_TIMEOUT_S = 600


def test_the_notebooks_are_there():
    assert [path.name for path in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code_cells
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: cell {index} has outputs; strip them before committing"
            assert cell.execution_count is None, f"{path.name}: cell {index} has an execution count"
        assert "attachments" not in cell or not cell.attachments, f"{path.name}: cell {index} has attachments"
    assert "widgets" not in nb.metadata, f"{path.name}: widget state in the metadata"


def _kernel_env(monkeypatch, output_dir: Path) -> None:
    # The kernel inherits this process's environment.
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("BANDPO_NOTEBOOK_OUTPUT", str(output_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # Whatever the shell's PATH (`make test` runs `.venv/bin/python -m pytest` without activating the venv), tools the
    # kernel looks up by name come from this interpreter's environment.
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))


def _execute(nb, cwd: Path):
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()
    return nb


@pytest.fixture(scope="session")
def notebook_output_dir(tmp_path_factory):
    # Shared by the notebooks, so that 03 reuses the tiny model warmed up by 02.
    return tmp_path_factory.mktemp("notebook-outputs")


@pytest.mark.slow
def test_kernel_runs_this_interpreter(monkeypatch, notebook_output_dir):
    _kernel_env(monkeypatch, notebook_output_dir)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys; print(sys.prefix)")])
    _execute(nb, NOTEBOOK_DIR)
    printed = "".join(o["text"] for o in nb.cells[0].outputs if o.get("name") == "stdout").strip()
    assert os.path.realpath(printed) == os.path.realpath(sys.prefix)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_runs_top_to_bottom(path, monkeypatch, notebook_output_dir):
    _kernel_env(monkeypatch, notebook_output_dir)
    before = sorted(p.name for p in NOTEBOOK_DIR.iterdir())
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    _execute(nb, NOTEBOOK_DIR)  # raises CellExecutionError, with the cell and its traceback, on any error
    print(f"{path.name}: {time.perf_counter() - start:.0f} s")
    errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert sorted(p.name for p in NOTEBOOK_DIR.iterdir()) == before, "the notebook wrote into notebooks/"
    if path.name == "03_lora_finetune.ipynb":
        adapter = notebook_output_dir / "03-lora-adapter"
        assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
        assert (notebook_output_dir / "03-lora-merged" / "config.json").is_file()
