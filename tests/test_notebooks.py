"""The notebooks run top to bottom on small settings, through the library's API."""

import importlib.util

import nbformat
import pytest

from tests.conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_notebooks_are_stripped():
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    """Top to bottom in small mode, as the documentation build executes them (docs/hooks/notebooks.py): no cell
    errs, the runs are written, and every figure the notebook draws is an output."""
    hook = _docs_hook()
    nb = hook.run(path, tmp_path)  # raises on an error in any cell
    assert len(NOTEBOOKS) == 3 and any(tmp_path.iterdir())
    drawn = sum("plt.subplots" in "".join(c.source) for c in nb.cells if c.cell_type == "code")
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert images >= drawn


def _docs_hook():
    spec = importlib.util.spec_from_file_location("docs_notebooks_hook", ROOT / "docs" / "hooks" / "notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
