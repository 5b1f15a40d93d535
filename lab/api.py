"""The lab from Python: train a run, load one, look inside it, fork it, replay it, compare runs.

    import lab
    run = lab.train("experiment=demo", "seed=3")      # or lab.load("runs/demo/...")
    run.metrics                                       # pandas DataFrame, one row per logged step
    run.steps                                         # the complete checkpoint steps
    logits, cache = run.cache(run.steps[-1], ["blocks.1.attn.hook_pattern"])
    child = run.fork(1000, "clamp=prev_token")
    lab.compare([run.dir, child.dir], out="compare")

Everything a Run shows is read from its run directory, as the command line reads it (``lab show``,
``lab replay``, ``lab fork`` call the same functions), so a notebook and a shell see the same run.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import pandas as pd

from lab.batch import is_batch, train_batch
from lab.comparison import compare
from lab.config import Config, load_config
from lab.errors import LabError
from lab.replay import fork_run, replay_run
from lab.run import train_run
from lab.rundir import check_run_dir, complete_steps, load_run_config, restore_state
from lab.runs import Runs
from lab.state import TrainState
from lab.tracking import read_metrics

__all__ = ["Run", "compare", "load", "train"]


class Run:
    """One run directory: its config, metrics, summary and checkpoints, and what to do with them."""

    def __init__(self, run_dir: str | Path):
        self.dir = check_run_dir(run_dir)

    def __repr__(self) -> str:
        return f"Run({str(self.dir)!r})"

    # ---- what the directory holds ------------------------------------------------------------
    @cached_property
    def _config(self) -> tuple[Config, object]:
        return load_run_config(self.dir)

    @property
    def config(self) -> Config:
        """The run's typed config (re-composed from its recorded overrides, else its config.yaml)."""
        return self._config[0]

    @property
    def metrics(self) -> pd.DataFrame:
        """Every logged row (metrics.jsonl), one per step, indexed by step; read afresh at each access."""
        rows = read_metrics(self.dir / "metrics.jsonl") if (self.dir / "metrics.jsonl").is_file() else []
        return pd.DataFrame(rows).set_index("step", drop=False) if rows else pd.DataFrame({"step": []})

    @property
    def summary(self) -> dict:
        """summary.json: final metrics, phase transitions, the circuit summary; {} while training."""
        f = self.dir / "summary.json"
        return json.loads(f.read_text()) if f.is_file() else {}

    @property
    def phase(self) -> dict:
        """The watched metric's detected transitions and first step below the threshold (summary.json)."""
        return self.summary.get("phase", {})

    @property
    def steps(self) -> list[int]:
        """The complete checkpoint steps."""
        return complete_steps(self.dir)

    # ---- looking inside ----------------------------------------------------------------------
    @cached_property
    def trainer(self) -> Runs:
        """The run's task, model and clamps, built from its config (no training happens)."""
        return Runs(self.config)

    def _step(self, step: int | None) -> int:
        have = self.steps
        if not have:
            raise LabError(f"run_dir={self.dir}: has no complete checkpoint")
        if step is None:
            return have[-1]
        if step not in have:
            raise LabError(f"step={step}: no complete checkpoint at that step in {self.dir}; have {have}")
        return step

    def state(self, step: int | None = None) -> TrainState:
        """The training state saved at ``step`` (default: the last checkpoint): ``.params``, ``.opt_state``,
        ``.step``, ``.key`` (and ``.frozen`` for a run with frozen clamps)."""
        return restore_state(self.trainer, self.dir, self._step(step))

    def params(self, step: int | None = None) -> dict:
        """The parameters at checkpoint ``step`` (default: the last), as a nested dict of arrays."""
        return self.state(step).params

    def batch(self, evaluator: str | None = None) -> dict:
        """A fixed evaluation batch of the run's task or of one of its registered ``evaluators`` (default: the
        task's first)."""
        evals = self.trainer.evals
        name = evaluator or next(iter(evals))
        if name not in evals:
            raise LabError(f"evaluator={name}: the run (task {self.config.task.name}) has {', '.join(evals)}")
        return evals[name]

    def cache(self, step: int | None = None, names: list[str] | tuple[str, ...] | None = None,
              batch: dict | None = None):
        """(logits, {site: activation}) of the model at checkpoint ``step`` on ``batch`` (default: the task's
        first evaluation batch); ``names``: TransformerLens site names (default: every site). Unclamped."""
        model = self.trainer.model
        if names is not None:
            unknown = [n for n in names if n not in model.site_names()]
            if unknown:
                raise LabError(f"names={unknown}: no such site; sites: {', '.join(model.site_names())}")
        return model.run_with_cache(self.params(step), self.batch() if batch is None else batch,
                                    None if names is None else list(names))

    # ---- new runs from this one --------------------------------------------------------------
    def fork(self, step: int, *overrides: str, run_dir: str | None = None, quiet: bool = True) -> Run:
        """A new run from this run's checkpoint at ``step`` with changed settings (``lab fork``)."""
        return Run(fork_run(self.dir, step, list(overrides), run_dir=run_dir, quiet=quiet))

    def replay(self, *overrides: str, steps: list[int] | None = None, measures: list[str] | None = None,
               name: str = "replay.jsonl", quiet: bool = True) -> pd.DataFrame:
        """Evaluate the evaluators and measures (and probe clamps in ``overrides``) at saved checkpoints
        (``lab replay``); the rows, one per checkpoint, also go to RUN_DIR/``name`` and to wandb."""
        out = replay_run(self.dir, steps=steps, measures=measures, overrides=list(overrides), out_name=name,
                         quiet=quiet)
        return pd.DataFrame(read_metrics(out)).set_index("step", drop=False)


def train(*overrides: str, quiet: bool = True) -> Run | list[Run]:
    """Train as ``lab train OVERRIDES...`` does; returns the Run, or one Run per (condition, seed) when the
    overrides ask for several (``trainer.num_seeds``, ``conditions``, ``optim.lrs``), trained as one program."""
    cfg, node = load_config(list(overrides))
    if is_batch(cfg):
        root = train_batch(cfg, node, list(overrides), quiet=quiet)  # its index: root/batch.json (no name)
        return [Run(root / r["dir"]) for r in json.loads((root / "batch.json").read_text())["runs"]]
    return Run(train_run(cfg, node, quiet=quiet, overrides=list(overrides)))


def load(run_dir: str | Path) -> Run:
    """The run in ``run_dir`` (written by ``lab train``, a batch, a fork or a sweep)."""
    return Run(run_dir)
