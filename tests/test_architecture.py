"""The trainer is built from parts: a Program compiles the step and evaluation from a task, a model, clamps,
an optimiser and measures handed to it, with no config and no disk; the runs layer above it (lab/runs.py)
reads configs and checkpoints. And no module of the lab outside lab/tasks/ names a particular task."""

import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lab import plugins
from lab.clamp import ClampConfig, ClampSet
from lab.config import load_config
from lab.measures import Measures, MeasuresConfig
from lab.model import ModelConfig, build_model
from lab.runs import Runs
from lab.state import TrainState
from lab.tasks import make_task
from lab.trainer import Parts, Program
from tests.conftest import TINY

LAB = Path(__file__).resolve().parent.parent / "lab"


def test_the_program_imports_neither_configs_nor_run_directories():
    """In a fresh process, importing the program (and all it imports) loads neither the configs, nor run
    directories, nor the runs layer."""
    code = "import sys, lab.trainer; print(' '.join(m for m in sys.modules if m.startswith('lab')))"
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                cwd=LAB.parent).stdout.split())
    assert "lab.trainer" in loaded and not {"lab.config", "lab.rundir", "lab.runs"} & loaded


@pytest.mark.slow  # two programs compiled, ~15 s: in CI's slow suite, to keep `make test` inside its 10 minutes
def test_a_program_from_parts_trains_as_the_runs_layer_builds_it():
    """Parts made by hand (no Config anywhere) train bit for bit as the runs layer's program of the same
    settings: the Program is all there is to the step."""
    overrides = TINY + ["+clamps.z={site: blocks.0.attn.hook_z, value: zero, heads: [1], windows: [[3, 7]]}"]
    cfg, _ = load_config(overrides)
    runs = Runs(cfg)
    task = make_task({"name": "repeat", "vocab_size": 32, "seq_len": 16, "seg_len": 8, "eval_size": 40})
    model = build_model(ModelConfig(n_layers=2, n_heads=2, d_model=16, positions="shortformer"), task, seed=0)
    clamps = ClampSet({"z": ClampConfig(site="blocks.0.attn.hook_z", value="zero", heads=[1], windows=[[3, 7]])},
                      model, task)
    opt = optax.adam(3e-3)
    parts = Parts(task=task, model=model, clamps=clamps, optimizer=lambda lr: opt, frozen_mask=None, batch_size=16,
                  chunk=10, skip_nonfinite=False, eval_batch_size=250)
    program = Program(parts, runs=1, measures=Measures(MeasuresConfig(names=["prev_token"]), model, task),
                      evals=task.evals, views=[("", clamps)])
    params = model.params()
    state = TrainState(params=params, opt_state=opt.init(params), step=jnp.zeros((), jnp.int32),
                       key=jax.random.fold_in(jax.random.PRNGKey(0), 1))
    mine, _ = program.advance(jax.tree_util.tree_map(lambda a: a[None], state), 20)
    theirs, _ = runs.program.advance(runs.init_state(), 20)
    for a, b in zip(jax.tree_util.tree_leaves(mine.params), jax.tree_util.tree_leaves(theirs.params), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert program.evaluate(mine) == runs.program.evaluate(theirs)
    assert "prev_token/L0H1" in program.measures(params)


def test_no_module_outside_the_tasks_names_a_task():
    """Task-specific knowledge lives with the task (its attributes and methods): elsewhere no string is a
    registered task's name (the registry's own listing, not a list here)."""
    names = {n for n, e in plugins.tasks.items() if e.package == "lab"}
    pattern = re.compile("[\"'](" + "|".join(sorted(names)) + ")[\"']")
    offenders = []
    for path in LAB.rglob("*.py"):
        if "tasks" in path.relative_to(LAB).parts:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if pattern.search(code):
                offenders.append(f"{path.relative_to(LAB)}:{i}: {line.strip()}")
    assert not offenders, offenders
