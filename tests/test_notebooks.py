"""Every notebook in examples/notebooks/ runs top to bottom, and is stored without outputs.

The kernel is this interpreter (a kernelspec written to a temporary directory points at
sys.executable), with MPLBACKEND=Agg and JAX_PLATFORMS=cpu. A cell that raises fails
the test (nbclient raises CellExecutionError).
"""

import json
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402 (after the skips)
from jupyter_client.manager import KernelManager  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "examples" / "notebooks").glob("*.ipynb"))
KERNEL = "jenga-jax-test"

# Runs in the kernel before the notebook's cells: it must be this interpreter.
_CHECK_KERNEL = f"""
import os, sys
assert os.path.realpath(sys.executable) == {repr(str(pathlib.Path(sys.executable).resolve()))}, (
    sys.executable
)
assert os.environ["JAX_PLATFORMS"] == "cpu" and os.environ["MPLBACKEND"] == "Agg"
"""


@pytest.fixture(scope="module")
def kernel_spec_manager(tmp_path_factory):
    """A kernelspec running ipykernel on sys.executable, in a directory of its own."""
    kernels = tmp_path_factory.mktemp("kernels")
    spec_dir = kernels / KERNEL
    spec_dir.mkdir()
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python {sys.version.split()[0]} ({sys.executable})",
        "language": "python",
        "env": {"MPLBACKEND": "Agg", "JAX_PLATFORMS": "cpu"},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, kernel_spec_manager, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(_CHECK_KERNEL))
    km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=kernel_spec_manager)
    client = nbclient.NotebookClient(
        nb,
        km=km,
        kernel_name=KERNEL,
        timeout=None,  # no wall-clock limit: a loaded machine compiles slowly
        resources={"metadata": {"path": str(ROOT)}},
    )
    client.execute()  # raises CellExecutionError naming the failing cell


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"cell {i} has outputs"
