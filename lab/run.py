"""One training run, or the runs of one program, from a config to complete run directories.

The run directory holds ``config.yaml`` (resolved), ``metrics.jsonl``, ``summary.json``,
``checkpoints/`` (orbax), ``wandb/`` and ``curves.png``. Everything that can be checked is
checked before the directory is created: a bad config or input file leaves nothing behind, and
an existing run directory is never overwritten. Each run's ``RunSink`` owns its directory while it
trains: its tracker (metrics.jsonl and wandb), its checkpointer, its cadence and history.
"""

from __future__ import annotations

import contextlib
import json
import platform
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future
from importlib.metadata import version
from pathlib import Path

import jax
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from lab import rundir
from lab.checkpoint import Checkpointer
from lab.config import Config
from lab.loop import Sink, drive
from lab.measures.mechanism import CircuitSummary, flat
from lab.measures.phase import detect_transitions, first_crossing, main_transition
from lab.measures.phase import flat as phase_flat
from lab.pictures import AttentionPictures
from lab.plots import plot_curves
from lab.runlog import LOG_NAME, background_log
from lab.runs import Runs, make_clamps
from lab.state import TrainState
from lab.tasks import make_task
from lab.tracking import Tracker, read_metrics, wandb_id


def versions() -> dict:
    return {"python": platform.python_version(),
            **{p: version(p) for p in ("jax", "flax", "optax", "orbax-checkpoint", "wandb", "hydra-core")},
            "platform": platform.platform(), "device": str(jax.devices()[0].device_kind)}


def transitions_of(rows: list[dict], metric: str, threshold: float | None, smooth: int = 3) -> dict:
    steps = [r["step"] for r in rows if metric in r and isinstance(r[metric], (int, float))]
    vals = [r[metric] for r in rows if metric in r and isinstance(r[metric], (int, float))]
    out = {"metric": metric, "transitions": detect_transitions(steps, vals, smooth=smooth)}
    if threshold is not None:
        out["threshold"] = threshold
        out["first_below"] = first_crossing(steps, vals, threshold, below=True)
    return out


def train_run(cfg: Config, node: DictConfig, quiet: bool = False, overrides: list[str] | None = None) -> Path:
    """Train one run and write its directory. Returns the run directory."""
    trainer = Runs(cfg)  # builds task and model: bad input files fail here, before any write
    state = trainer.init_state()
    run_dir = create_run(trainer, state, node, overrides)
    execute(trainer, [RunSink(run_dir, cfg, node, trainer.condition(0))], state, quiet=quiet)
    return run_dir


def create_run(trainer: Runs, state: TrainState, node: DictConfig, overrides: list[str] | None,
               extra: dict | None = None) -> Path:
    """The directory of a new run (trained or forked) of ``trainer`` from ``state`` (stacked), created only after
    the step has been traced for that state: what only tracing finds (a plug-in clamp value of the wrong shape) is
    refused before anything is written. jit keeps the trace for the step's first call."""
    trainer.program.scan_fn.check(state)
    run_dir = rundir.resolve_run_dir(trainer.cfg)
    rundir.create(run_dir, node, overrides, extra)
    return run_dir


class RunSink(Sink):
    """One run's directory while it trains: rows go to metrics.jsonl and wandb (its Tracker), checkpoints to
    orbax (its Checkpointer, with the resolved config beside each); ``finish`` writes summary.json and
    curves.png. ``history``: the rows a resumed run has already logged."""

    def __init__(self, run_dir: Path, cfg: Config, node: DictConfig, condition: str, resume: bool = False,
                 history: list[dict] = ()):
        super().__init__(cfg.cadence, history=history)
        self.dir, self.cfg, self.condition = Path(run_dir), cfg, condition
        self.config = OmegaConf.to_container(node, resolve=True)
        rundir.lock(self.dir)
        parent = rundir.provenance(self.dir).get("parent")
        lineage = {} if not parent else {"parent": {  # a fork names the run and checkpoint it started from
            "run_dir": parent["run_dir"], "step": parent["step"], "wandb_id": wandb_id(Path(parent["run_dir"])),
            "overrides": parent.get("overrides", [])}}
        self.tracker = Tracker(self.dir, cfg.tracking, {**self.config, **lineage}, name=self.dir.name,
                               group=cfg.experiment, job_type=condition, resume=resume,
                               sequences_per_step=cfg.trainer.batch_size)
        self.checkpointer = Checkpointer(self.dir / "checkpoints", cfg.checkpoint)
        self.pictures: AttentionPictures | None = None  # execute() gives the program's one renderer
        self._picture: tuple[int, Path, Future] | None = None  # the picture being drawn in the background

    def log(self, row: dict) -> None:
        self.picture_done()  # a picture's wandb image goes before any later step's row (wandb's steps only rise)
        self.tracker.log(row)

    def save(self, step: int, state: TrainState) -> None:
        self.checkpointer.save(step, state.saved(), self.config)
        self.picture(step, state)  # the heads' attention at every checkpoint

    def picture(self, step: int, state: TrainState) -> None:
        """attention/step0001000.png and the wandb image ``attention`` at that step. The patterns are computed
        here; the PNG is filled and written on the pictures' thread while training goes on (a picture costs
        milliseconds, the first one the frame's render), and logged to wandb once written: at this run's next
        row, next picture or close, whichever comes first (one picture in flight per run)."""
        if self.pictures is not None:
            self.picture_done()
            path = self.dir / "attention" / f"step{step:07d}.png"
            self._picture = (step, path, self.pictures.submit(state.params, path))

    def picture_done(self) -> None:
        """Wait for the picture in flight (its write error, a full disk, is raised here) and log it to wandb."""
        if self._picture is not None:
            step, path, done = self._picture
            self._picture = None
            done.result()
            self.tracker.image("attention", path, step, caption=f"step {step}")  # the picture labels itself

    def close(self) -> None:
        """End the wandb run and metrics.jsonl (execute closes the checkpointer, once, when training stops)."""
        try:
            self.picture_done()
        finally:
            self.tracker.close()

    def finish(self, watch: str, wall: float, start_step: int, circuit_at: Callable[[dict], dict | None],
               batched: int, data: dict | None = None) -> dict:
        """Write summary.json and curves.png from the run's metrics (``circuit_at(final row)``: the circuit
        summary's views at the final parameters, {"circuit": ..., "circuit_as_trained": ...} for a run with
        clamps, or {}; ``data``: what the task's data came from, ``task.info``); returns the summary."""
        c = self.cfg
        rows = read_metrics(self.dir / "metrics.jsonl")
        phase = transitions_of(rows, watch, c.watch_threshold, c.watch_smooth)
        final = {k: v for k, v in rows[-1].items() if not k.startswith("perf/")} if rows else {}
        views = circuit_at(final)
        circuit = views.get("circuit")
        summary = {
            "experiment": c.experiment, "condition": self.condition, "seed": c.seed,
            "task": c.task.name, "steps": c.trainer.steps, "batch_size": c.trainer.batch_size,
            "steps_this_session": c.trainer.steps - start_step,  # fewer than steps for a resume or fork
            "wall_time_s": wall, "steps_per_sec": (c.trainer.steps - start_step) / wall,
            "final": final, "phase": phase, "checkpoints": self.checkpointer.steps(), "versions": versions(),
        }
        if data:
            summary["data"] = data
        summary.update(views)  # circuit (the model without clamps); circuit_as_trained (with the run's clamps)
        if batched > 1:
            summary["batched_runs"] = batched
        saved = rundir.provenance(self.dir)
        for k in ("parent", "batch"):
            if saved.get(k):
                summary[k] = saved[k]
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_curves(rows, self.dir / "curves.png", title=f"{c.experiment} ({c.task.name}, seed {c.seed})",
                    watch=watch, transitions=phase["transitions"],
                    note=circuit and " | ".join(v["line"] for v in views.values()))
        if rows:
            self.tracker.image("curves", self.dir / "curves.png", rows[-1]["step"])
        # the wandb summary holds summary.json's essentials, so the UI can tabulate "condition -> phase-change
        # step" over runs (the last value of every logged metric is there already)
        self.tracker.summary({"experiment": c.experiment, "condition": self.condition, "seed": c.seed,
                              "sequences_seen": c.trainer.steps * c.trainer.batch_size, "wall_time_s": wall,
                              "steps_per_sec": summary["steps_per_sec"], **phase_flat(phase),
                              **{k: v for name, view in views.items() for k, v in circuit_flat(view, name).items()}})
        return summary


def execute(trainer: Runs, sinks: list[RunSink], state: TrainState, quiet: bool = False) -> list[Path]:
    """Train the runs of ``state`` (one per sink) to the end; each run directory is written as if its run had
    trained alone: metrics, checkpoints, then summary, curves and the circuit summary. Libraries' and background
    threads' reports go to the first run's ``run.log`` (lab.runlog); a failed write that names no file (orbax's
    savers on a full disk) is reported as a failure to write under that run's directory."""
    with background_log(sinks[0].dir / LOG_NAME):
        try:
            return _execute(trainer, sinks, state, quiet)
        except OSError as e:
            if not e.filename:
                e.filename = str(sinks[0].dir)
            raise


def _execute(trainer: Runs, sinks: list[RunSink], state: TrainState, quiet: bool = False) -> list[Path]:
    n = len(sinks)
    cfg = trainer.cfg
    if not quiet:
        for s in sinks if n <= 4 else sinks[:1]:
            print(f"run directory: {s.dir}", file=sys.stderr)
    bar = None
    if cfg.trainer.progress and not quiet:
        bar = tqdm(total=cfg.trainer.steps, initial=trainer.program.current_step(state),
                   desc=cfg.experiment + (f" x{n}" if n > 1 else ""), unit="step", dynamic_ncols=True, file=sys.stderr)
    key_metric = trainer.task.key_metric

    def progress(step, row):
        if bar is not None:
            bar.n = step
            post = {"loss": f"{row.get('train/loss', float('nan')):.3f}"}
            if key_metric in row:
                post[key_metric] = f"{row[key_metric]:.3f}"
            bar.set_postfix(post, refresh=False)
            bar.refresh()

    if cfg.tracking.attention_images:
        pictures = AttentionPictures(trainer.model, trainer.task)
        for s in sinks:
            s.pictures = pictures
    t0 = time.perf_counter()
    start_step = trainer.program.current_step(state)
    try:
        state = drive(trainer, state, sinks, trainer.plan, progress=progress, start_time=t0)
        jax.block_until_ready(state)
    except BaseException:
        for s in sinks:  # a failed run's wandb run ends here, not in the next run of this process
            with contextlib.suppress(Exception):  # the error that stopped training is the one to report
                s.close()
        raise
    finally:
        if bar is not None:
            bar.close()
        for s in sinks:
            s.checkpointer.close()
    wall = time.perf_counter() - t0
    circuit_of = CircuitSummaries(trainer, state)
    for i, sink in enumerate(sinks):
        summary = sink.finish(trainer.watch, wall, start_step, lambda final, i=i: circuit_of(i, final), n,
                              data=trainer.task.info)
        sink.close()
        if not quiet and (n == 1 or i == 0):
            print(format_summary(summary, sink.dir))
        rundir.unlock(sink.dir)
    return [s.dir for s in sinks]


class CircuitSummaries:
    """Each run's circuit summary at its final parameters ({} where the task has none or it is off), with the
    run's own task (batched runs may differ in its data fields): ``circuit``, the model without clamps, and
    for a run with clamps ``circuit_as_trained``, with its own clamps acting as at its last step. One
    summariser per distinct task (and clamp condition)."""

    def __init__(self, trainer: Runs, state: TrainState):
        self.trainer, self.state, self.built = trainer, state, {}

    def __call__(self, i: int, final: dict) -> dict:
        tr = self.trainer
        c = tr.cfgs[i]
        if not (tr.task.mechanism_metric and c.measures.circuit):
            return {}
        key = repr(c.task)
        if key not in self.built:
            # the trainer's task is cfgs[0]'s: a batched run whose task differs in data fields gets its own
            self.built[key] = CircuitSummary(tr.model, tr.task if c.task == tr.cfg.task else make_task(c.task))
        own = tr.run_state(self.state, i)
        views = {"circuit": self.built[key](own.params, final)}
        if c.clamps:
            task = self.built[key].task
            step = int(own.step)
            clamped = CircuitSummary(tr.model, task, clamps=make_clamps(c.clamps, tr.model, task), step=step,
                                     frozen=own.frozen)
            views["circuit_as_trained"] = clamped(own.params, final)
        return views


def circuit_flat(circuit: dict, prefix: str = "circuit") -> dict:
    """A view's essentials as flat wandb summary keys ``<prefix>/...``."""
    return {**flat(circuit, f"{prefix}/"), f"{prefix}/line": circuit["line"],
            f"{prefix}/induction_head": circuit["induction_head"],
            f"{prefix}/prev_token_head": circuit["prev_token_head"]}


def format_summary(summary: dict, run_dir: Path) -> str:
    ran = summary.get("steps_this_session", summary["steps"])
    upto = f" (from step {summary['steps'] - ran} to {summary['steps']})" if ran != summary["steps"] else ""
    lines = [f"done: {ran} steps{upto} in {summary['wall_time_s']:.1f} s "
             f"({summary['steps_per_sec']:.0f} steps/s, compilation included)"]
    fin = summary["final"]
    shown = [k for k in fin if k.endswith("/loss") or k.endswith("acc")][:8]
    if shown:
        lines.append("final: " + ", ".join(f"{k}={fin[k]:.3f}" for k in shown))
    ph = summary["phase"]
    ts = ph["transitions"]
    if ts:
        big = main_transition(ts)
        lines.append(f"transition in {ph['metric']}: {big['before']:.3f} -> {big['after']:.3f}, "
                     f"onset step {big['onset']:.0f}, midpoint {big['mid']:.0f}, end {big['end']:.0f}")
    else:
        lines.append(f"no transition detected in {ph['metric']}")
    if ph.get("threshold") is not None:
        fb = ph.get("first_below")
        lines.append(f"{ph['metric']} first below {ph['threshold']:.4f} at step "
                     f"{'never' if fb is None else int(fb)}")
    if summary.get("circuit"):
        clamped = summary.get("circuit_as_trained")
        lines.append(("without clamps: " if clamped else "") + summary["circuit"]["line"])
        if clamped:
            lines.append(clamped["line"])
    lines.append(f"run directory: {run_dir}  (curves.png, metrics.jsonl, summary.json, checkpoints/, wandb/)")
    return "\n".join(lines)
