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
