"""mkdocs hook: before a build, execute the notebooks in their small mode into docs/notebooks/, where the
documentation renders them with their outputs (mkdocs-jupyter). A notebook is re-executed only when it is newer
than its executed copy, so `mkdocs serve` rebuilds stay quick; `make docs-build` starts from a clean copy.

Small mode (``LAB_NB_SMALL=1``, as the slow tests run them: tests/test_notebooks.py calls ``run`` below) shortens
every run to seconds, so the pages say so in a first cell."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from unittest import mock

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]
NOTE = ("*Executed when this documentation was built, in the notebook's small mode (`LAB_NB_SMALL=1`): every run "
        "is shortened to a few seconds, so curves are short and a circuit may not have formed. Run the notebook "
        "from `notebooks/` for the full-size runs.*")


def run(src: Path, runs: Path) -> nbformat.NotebookNode:
    """The notebook executed top to bottom in small mode from the repository root, its runs under ``runs``; an
    error in any cell raises. The kernel inherits the environment without MPLBACKEND, so it keeps its inline
    backend and figures become outputs."""
    nb = nbformat.read(src, as_version=4)
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    with mock.patch.dict(os.environ, {**env, "LAB_NB_SMALL": "1", "LAB_NB_ROOT": str(runs)}, clear=True):
        NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    if errors:
        raise RuntimeError(f"{src.name}: {errors[0].get('ename')}: {errors[0].get('evalue')}")
    return nb


def on_pre_build(config, **kwargs) -> None:
    out = Path(config["docs_dir"]) / "notebooks"
    for src in sorted((ROOT / "notebooks").glob("*.ipynb")):
        dst = out / src.name
        if not dst.exists() or dst.stat().st_mtime < src.stat().st_mtime:
            with tempfile.TemporaryDirectory(prefix="lab-docs-nb-") as runs:
                nb = run(src, Path(runs))
            nb.cells.insert(1, nbformat.v4.new_markdown_cell(NOTE))
            dst.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, dst)
