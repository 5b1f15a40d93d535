"""mkdocs hook: before a build, execute the notebooks in their small mode into docs/notebooks/, where the
documentation renders them with their outputs (mkdocs-jupyter). A notebook is re-executed only when it is newer
than its executed copy, so `mkdocs serve` rebuilds stay quick; `make docs-build` starts from a clean copy.

Small mode (``LAB_NB_SMALL=1``, as the slow tests run them) shortens every run to seconds, so the pages say so in
a first cell; the runs go to a temporary folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]
NOTE = ("*Executed when this documentation was built, in the notebook's small mode (`LAB_NB_SMALL=1`): every run "
        "is shortened to a few seconds, so curves are short and a circuit may not have formed. Run the notebook "
        "from `notebooks/` for the full-size runs.*")


def execute(src: Path, dst: Path) -> None:
    nb = nbformat.read(src, as_version=4)
    # the kernel inherits the environment; matplotlib keeps the kernel's inline backend, so figures are outputs
    saved = {k: os.environ.get(k) for k in ("LAB_NB_SMALL", "LAB_NB_ROOT", "MPLBACKEND")}
    os.environ.pop("MPLBACKEND", None)
    with tempfile.TemporaryDirectory(prefix="lab-docs-nb-") as runs:
        os.environ.update(LAB_NB_SMALL="1", LAB_NB_ROOT=runs)
        try:
            NotebookClient(nb, timeout=900, kernel_name="python3",
                           resources={"metadata": {"path": str(ROOT)}}).execute()
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    if errors:
        raise RuntimeError(f"{src.name}: {errors[0].get('ename')}: {errors[0].get('evalue')}")
    nb.cells.insert(1, nbformat.v4.new_markdown_cell(NOTE))
    dst.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, dst)


def on_pre_build(config, **kwargs) -> None:
    out = Path(config["docs_dir"]) / "notebooks"
    for src in sorted((ROOT / "notebooks").glob("*.ipynb")):
        dst = out / src.name
        if not dst.exists() or dst.stat().st_mtime < src.stat().st_mtime:
            execute(src, dst)
