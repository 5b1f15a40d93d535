"""The host loop: when to step, log, evaluate, checkpoint and stop, for R runs held in one stacked state.

The loop is the edge around the pure functions of lab.trainer. It talks to each run through that run's
``Sink``, which receives the run's rows and checkpoints and holds its adaptive cadence; a single run is a loop
with one sink, a batch one with R. Each run logs and checkpoints exactly where it would alone: its cadence plans
its stops, the program advances to the nearest planned stop of any run, and only the runs that planned that stop
log there. Every checkpoint step is also a logged row, so a run resumed from any checkpoint logs the rows of an
uninterrupted one, and no state is saved before its losses were checked for NaN.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import numpy as np

from lab.cadence import AdaptiveCadence, CadenceConfig
from lab.errors import LabError, check
from lab.state import TrainState


@dataclass
class TrainerConfig:
    steps: int = 2000
    batch_size: int = 64
    steps_per_call: int = 50  # steps fused under lax.scan per host call
    eval_every: int = 100  # evaluate (and log a row) every N steps; 0: only log-spaced and final
    eval_log_points: int = 0  # extra log-spaced evaluations over the run
    eval_batch_size: int = 250  # sequences per forward pass when evaluating
    # the task's evaluation sets evaluated at each row (null: all of them); a study that reads one metric
    # evaluates one set (Singh's Fig. 5b reads train/loss: [train], a quarter of the evaluation's time)
    eval_sets: list[str] | None = None
    progress: bool = True  # show a progress bar
    seeds: list[int] | None = None  # several seeds trained as one vmapped program (lab.batch), one run dir each
    num_seeds: int = 1  # shorthand: seeds seed, seed+1, ..., seed+num_seeds-1
    memory_limit_gb: float | None = None  # refuse batches of runs needing more (default: the device's free memory)
    on_nonfinite: str = "stop"  # a non-finite loss or gradient: stop (keep the last good checkpoint) | skip the step
    log_unclamped: bool = False  # with clamps: also log each evaluator unclamped, as <evaluator>@unclamped/...

    def validate(self) -> None:
        check(self.steps >= 1, "trainer.steps", self.steps, "must be >= 1")
        check(self.batch_size >= 1, "trainer.batch_size", self.batch_size, "must be >= 1")
        check(self.steps_per_call >= 1, "trainer.steps_per_call", self.steps_per_call, "must be >= 1")
        check(self.eval_every >= 0, "trainer.eval_every", self.eval_every, "must be >= 0")
        check(self.eval_log_points >= 0, "trainer.eval_log_points", self.eval_log_points, "must be >= 0")
        check(self.eval_batch_size >= 1, "trainer.eval_batch_size", self.eval_batch_size, "must be >= 1")
        if self.eval_sets is not None:
            check(len(self.eval_sets) >= 1 and len(set(self.eval_sets)) == len(self.eval_sets), "trainer.eval_sets",
                  self.eval_sets, "a non-empty list of distinct evaluation sets, or null for all")
        check(self.num_seeds >= 1, "trainer.num_seeds", self.num_seeds, "must be >= 1")
        check(self.on_nonfinite in ("stop", "skip"), "trainer.on_nonfinite", self.on_nonfinite, "one of stop, skip")
        if self.seeds is not None:
            check(len(self.seeds) >= 1 and all(int(x) >= 0 for x in self.seeds), "trainer.seeds", self.seeds,
                  "a non-empty list of seeds >= 0")
            check(len(set(self.seeds)) == len(self.seeds), "trainer.seeds", self.seeds, "seeds must be distinct")
            check(self.num_seeds == 1, "trainer.num_seeds", self.num_seeds,
                  "give trainer.seeds or trainer.num_seeds, not both")
        if self.memory_limit_gb is not None:
            check(self.memory_limit_gb > 0, "trainer.memory_limit_gb", self.memory_limit_gb, "must be > 0")


@dataclass(frozen=True)
class Plan:
    """What the host loop does when, for the runs of one program (lab.runs.plan_of makes it from a config):
    train to ``total``; evaluate and log a row at each of ``evaluations``; checkpoint at each of ``checkpoints``
    (and at a run's dense rows too when ``checkpoint_dense``); draw the attention at each of ``pictures`` that is
    no checkpoint; a non-finite step stops the runs, or is skipped (``skip_nonfinite``)."""

    total: int
    checkpoints: frozenset[int]
    evaluations: frozenset[int]
    pictures: frozenset[int] = frozenset()
    checkpoint_dense: bool = False
    skip_nonfinite: bool = False


class NonFiniteError(LabError):
    exit_code = 1  # a run that failed after it started (lab/errors.py's table)


def schedule(total: int, every: int, log_points: int, include_zero: bool = True) -> list[int]:
    """Steps in [0, total]: multiples of ``every``, ``log_points`` log-spaced steps, and the end."""
    s = {total}
    if include_zero:
        s.add(0)
    if every:
        s.update(range(every, total + 1, every))
    if log_points:
        s.update(int(round(v)) for v in np.geomspace(1, total, log_points))
    return sorted(x for x in s if 0 <= x <= total)


class Sink:
    """One run's end of the loop: it receives the run's rows (``log``) and checkpoints (``save``), and holds the
    run's adaptive cadence and the steps it has logged. This one hands them to the given callables (tests,
    notebooks); lab.run.RunSink writes a run directory."""

    def __init__(self, cadence: CadenceConfig, log: Callable[[dict], None] | None = None,
                 save: Callable[[int, TrainState], None] | None = None, history: list[dict] = ()):
        self.cadence = AdaptiveCadence(cadence)
        self._log, self._save = log, save
        self.history = list(history)  # rows already logged (a resumed run's), replayed into the cadence

    def log(self, row: dict) -> None:
        if self._log is not None:
            self._log(row)

    def save(self, step: int, state: TrainState) -> None:
        if self._save is not None:
            self._save(step, state)

    def picture(self, step: int, state: TrainState) -> None:
        """Draw the run at a step asked for (``tracking.attention_at``) that is no checkpoint; lab.run.RunSink's
        draws its attention grid."""


def drive(runs, state: TrainState, sinks: list[Sink], plan: Plan,
          progress: Callable[[int, dict], None] | None = None, start_time: float | None = None) -> TrainState:
    """Train the R = len(sinks) runs of ``state`` (``runs``: a lab.runs.Runs, its program and how to take a run's
    own state out) from its step to ``plan.total``; returns the final state.

    ``progress(step, row)`` after each logged stop. With ``cadence.adaptive``, a run's rows (and checkpoints,
    with ``plan.checkpoint_dense``) come every ``cadence.dense_every`` steps while its watched metric moves."""
    program, watch = runs.program, runs.watch
    total, n_runs = plan.total, len(sinks)
    ckpts, pics, evals = plan.checkpoints, plan.pictures, plan.evaluations
    for sink in sinks:
        for r in sink.history:
            sink.cadence.observe(r["step"], r.get(watch, 0.0))
    step = program.current_step(state)
    t0 = start_time if start_time is not None else time.perf_counter()
    rows = RowMaker(runs, step, n_runs, plan.skip_nonfinite)

    def log_at(step, state, due, perf):
        made = rows.make(step, state, due, perf)
        for i, row in zip(due, made, strict=True):
            sinks[i].cadence.observe(step, row.get(watch, 0.0))
            sinks[i].log(row)
        if progress and made:
            progress(step, made[0])

    first = [i for i in range(n_runs) if not any(r["step"] == step for r in sinks[i].history)]
    if first and (step in evals or step > 0):
        log_at(step, state, first, None)  # the start (a fork's first row)
    if step == 0 and (0 in ckpts or 0 in pics):
        host = jax.device_get(state)
        for i, sink in enumerate(sinks):
            (sink.save if 0 in ckpts else sink.picture)(0, runs.run_state(host, i))
    planned: list[int | None] = [None] * n_runs
    last_t, last_step = time.perf_counter(), step
    while step < total:
        nxt = min(s for s in evals if s > step)
        planned = [p if p is not None and p > step else sink.cadence.next_stop(step, nxt)
                   for p, sink in zip(planned, sinks, strict=True)]
        stop = min(planned)
        state, outs = program.advance(state, stop - step)
        rows.pending.append((stop, outs))
        step = stop
        due = [i for i in range(n_runs) if planned[i] == stop]
        jax.block_until_ready(state.step)  # dispatch is asynchronous: time the steps, not their queueing
        now = time.perf_counter()
        log_at(step, state, due, {"perf/steps_per_sec": (step - last_step) / max(now - last_t, 1e-9),
                                  "perf/elapsed": now - t0})
        last_t, last_step = time.perf_counter(), step
        dense = stop not in evals
        save = stop in ckpts or (dense and plan.checkpoint_dense)
        draw = not save and stop in pics
        # one copy of the stacked state to the host, sliced per run as numpy views: slicing device arrays run by
        # run costs a dispatch per leaf and run (85 leaves x 30 runs), and orbax writes host arrays faster
        host = jax.device_get(state) if due and (save or draw) else None
        for i in due:
            planned[i] = None
            if save:
                sinks[i].save(stop, runs.run_state(host, i))
            elif draw:
                sinks[i].picture(stop, runs.run_state(host, i))
    return state


_TRAIN_NAMES = {"loss": "train/batch_loss", "grad_norm": "train/grad_norm", "update_ratio": "train/update_ratio"}


class RowMaker:
    """Assembles the runs' rows at a stop: the means of the per-step training outputs since each run's last row,
    the non-finite checks, the evaluators and the measures."""

    def __init__(self, runs, step: int, n_runs: int, skip_nonfinite: bool):
        self.runs = runs
        self.last = [step] * n_runs  # the step of each run's latest row
        self.pending: list[tuple[int, list]] = []  # (end step, per-call outputs) not yet logged by every run
        self.skip = skip_nonfinite

    def make(self, step: int, state: TrainState, due: list[int], perf: dict | None) -> list[dict]:
        runs, program = self.runs, self.runs.program
        rows = {i: {"step": step} for i in due}
        since: dict[int, list[int]] = {}
        for i in due:
            since.setdefault(self.last[i], []).append(i)
        for s0, idx in since.items():
            outs = [o for e, ch in self.pending if e > s0 for o in ch]
            if not outs:
                continue
            host = jax.device_get([buf for buf, _ in outs])  # each call's buffers hold n filled steps
            per_step = {k: np.concatenate([np.asarray(h[k], np.float64)[..., :n]
                                           for h, (_, n) in zip(host, outs, strict=True)], axis=-1) for k in host[0]}
            stats = self._means(per_step)
            for i in idx:
                for k, v in stats.items():
                    rows[i][k] = float(np.asarray(v)[i])
                if not all(math.isfinite(rows[i][k]) for k in _TRAIN_NAMES.values()):
                    raise NonFiniteError(self._nonfinite_message(per_step, i, s0, step))
        # a finite loss, gradient and update can still overflow the parameters they are added to: nothing
        # (evaluators, measures, checkpoints) reads non-finite parameters
        finite = np.asarray(program.finite_fn(state.params)).reshape(-1)
        for i in due:
            if not finite[i]:
                raise NonFiniteError(f"non-finite parameters by step {step}{runs.run_label(i)}; stopping (the last "
                                     "good checkpoint is kept; lower optim.lr or set optim.clip_norm)")
        evals = program.evaluate_runs(state)
        measured = program.measures.over_runs(state.params, program.runs)
        out = []
        for i in due:
            row = rows[i]
            row.update(evals[i])
            if "train/loss" not in row and "train/batch_loss" in row:
                row["train/loss"] = row["train/batch_loss"]
            row.update(measured[i])
            if perf:
                row.update(perf)
            out.append(row)
            self.last[i] = step
        self.pending = [(e, o) for e, o in self.pending if e > min(self.last)]
        return out

    def _means(self, per_step: dict) -> dict:
        if not self.skip:
            return {_TRAIN_NAMES[k]: np.mean(per_step[k], axis=-1) for k in _TRAIN_NAMES}
        took = per_step["skipped"] == 0  # means over the steps that were taken; count the skipped ones
        with np.errstate(invalid="ignore", divide="ignore"):
            stats = {_TRAIN_NAMES[k]: np.sum(np.where(took, per_step[k], 0.0), -1) / np.sum(took, -1)
                     for k in _TRAIN_NAMES}
        stats["train/skipped_steps"] = np.sum(per_step["skipped"], -1)
        return stats

    def _nonfinite_message(self, per_step, i, s0, step) -> str:
        """Name the first step whose loss or gradient norm was not finite, and what was."""
        label = self.runs.run_label(i)
        if self.skip:
            return (f"every step from {s0} to {step - 1} was non-finite and skipped{label}; stopping "
                    "(the last good checkpoint is kept)")
        host = {k: np.asarray(v)[i] for k, v in per_step.items()}
        for j in range(host["loss"].shape[0]):
            for k, name in (("loss", "loss"), ("grad_norm", "gradient norm"), ("update_ratio", "update")):
                if not math.isfinite(float(host[k][j])):
                    return (f"non-finite {name}={float(host[k][j])} at step {s0 + j}{label}; stopping "
                            "(the last good checkpoint is kept; trainer.on_nonfinite=skip skips such steps)")
        return f"non-finite training statistics by step {step}{label}; stopping"
