"""The Python API (lab/api.py) sees a run as the command line writes it."""

import json

import jax
import numpy as np
import pytest

import lab
from lab.checkpoint import Checkpointer
from lab.errors import LabError
from tests.conftest import TINY


@pytest.mark.slow  # ~10-20 s: in CI's slow suite, to keep `make test` inside its 10 minutes
def test_train_load_look_inside_fork_replay(tmp_path):
    run = lab.train(*TINY, f"run.dir={tmp_path / 'a'}")
    assert isinstance(run, lab.Run) and run.dir == tmp_path / "a"
    rows = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    m = run.metrics
    assert list(m["step"]) == [r["step"] for r in rows] and m.loc[60, "test/loss"] == rows[-1]["test/loss"]
    assert run.steps == Checkpointer(run.dir / "checkpoints", read_only=True).steps() == [0, 30, 60]
    assert run.config.trainer.steps == 60 and run.phase == run.summary["phase"]
    # params(step) are the checkpoint's, and the last one by default
    p30, p60 = run.params(30), run.params()
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), p60,
                                                         run.state(60).params))
    assert not np.array_equal(p30["blocks"]["1"]["attn"]["W_K"], p60["blocks"]["1"]["attn"]["W_K"])
    logits, cache = run.cache(30, ["blocks.1.attn.hook_pattern"])
    batch = run.batch()
    assert logits.shape[:2] == batch["tokens"].shape and set(cache) == {"blocks.1.attn.hook_pattern"}
    np.testing.assert_allclose(np.asarray(cache["blocks.1.attn.hook_pattern"]).sum(-1), 1.0, rtol=1e-5)
    with pytest.raises(LabError, match="step=45"):
        run.params(45)
    # a fork is a Run whose config records its parent
    child = run.fork(30, "optim.lr=1e-3", run_dir=str(tmp_path / "child"))
    assert child.dir == tmp_path / "child" and child.steps[-1] == 60
    assert json.loads((child.dir / "overrides.json").read_text())["parent"]["step"] == 30
    # replay: one row per checkpoint, as RUN_DIR/replay.jsonl holds them
    rep = run.replay(steps=[30, 60])
    assert list(rep["step"]) == [30, 60] and "test/loss" in rep
    assert rep.loc[60, "test/loss"] == pytest.approx(m.loc[60, "test/loss"], rel=1e-5)


@pytest.mark.slow  # 10-40 s: in CI's slow suite, to keep `make test` inside its 10 minutes
def test_train_of_several_seeds_returns_a_run_each(tmp_path):
    runs = lab.train(*TINY, "trainer.num_seeds=2", "trainer.steps=20", "checkpoint.every=20",
                     f"run.dir={tmp_path}")
    assert [r.config.seed for r in runs] == [0, 1]
    assert all(r.steps == [0, 20] for r in runs) and runs[0].dir != runs[1].dir


@pytest.mark.slow  # the full demo and a fork of it, ~1-2 min
def test_the_readme_python_tour_runs_as_written(tmp_path, monkeypatch):
    """The README's "From Python" block, executed verbatim in a fresh folder: it trains the demo (seed 3), finds
    the circuit, forks it clamped and compares the two."""
    import re

    from tests.conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## From Python"):]
    (code,) = re.findall(r"```python\n(.*?)```", section[:section.index("\n## ", 5)], re.S)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    run, child = scope["run"], scope["child"]
    assert scope["same"].dir == run.dir and run.dir.resolve().is_relative_to(tmp_path.resolve() / "runs" / "demo")
    assert run.summary["circuit"]["is_induction_circuit"], run.summary["circuit"]["line"]
    assert scope["cache"]["blocks.1.attn.hook_pattern"].shape[-2:] == (32, 32)
    assert child.summary["parent"]["step"] == 1000 and "circuit_as_trained" in child.summary
    assert (tmp_path / "compare" / "report.html").is_file()


def test_importing_the_lab_leaves_the_users_matplotlib_backend_alone(tmp_path):
    """A notebook keeps its inline figures after `import lab` and the lab's plotting: the lab draws on Figure
    objects straight to files and never calls matplotlib.use."""
    import subprocess
    import sys

    code = ("import matplotlib; matplotlib.use('svg'); import lab.plots, lab.comparison, lab.devinterp, lab.run; "
            "lab.plots.plot_curves([{'step': 1, 'train/loss': 1.0}, {'step': 2, 'train/loss': 0.5}], 'c.png'); "
            "import matplotlib.pyplot as plt; print(matplotlib.get_backend(), len(plt.get_fignums()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["svg", "0"] and (tmp_path / "c.png").stat().st_size > 10_000
