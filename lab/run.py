"""One training run, from a config to a complete run directory.

The run directory holds ``config.yaml`` (resolved), ``metrics.jsonl``, ``summary.json``,
``checkpoints/`` (orbax), ``wandb/`` and ``curves.png``. Everything that can be checked is
checked before the directory is created: a bad config or input file leaves nothing behind, and
an existing run directory is never overwritten.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from datetime import datetime
from pathlib import Path

import jax
from omegaconf import DictConfig, OmegaConf

from lab.checkpoint import Checkpointer
from lab.config import Config
from lab.errors import LabError
from lab.measures.phase import detect_transitions, first_crossing
from lab.trainer import Trainer


def default_run_dir(cfg: Config) -> Path:
    name = cfg.run.name or f"{cfg.task.name}-s{cfg.seed}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    base = Path(cfg.run.root) / cfg.experiment / name
    path, i = base, 1
    while path.exists():  # two runs started in the same second get distinct directories
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path


def resolve_run_dir(cfg: Config) -> Path:
    if cfg.run.dir:
        path = Path(cfg.run.dir)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise LabError(f"run.dir={cfg.run.dir}: exists and is not empty; choose a new directory "
                           "(a run directory is never overwritten)")
        return path
    return default_run_dir(cfg)


def versions() -> dict:
    import flax
    import hydra
    import optax
    import orbax.checkpoint
    import wandb

    return {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "orbax-checkpoint": orbax.checkpoint.__version__,
            "wandb": wandb.__version__, "hydra-core": hydra.__version__, "platform": platform.platform(),
            "device": str(jax.devices()[0].device_kind)}


def transitions_of(rows: list[dict], metric: str, threshold: float | None) -> dict:
    steps = [r["step"] for r in rows if metric in r and isinstance(r[metric], (int, float))]
    vals = [r[metric] for r in rows if metric in r and isinstance(r[metric], (int, float))]
    out = {"metric": metric, "transitions": detect_transitions(steps, vals)}
    if threshold is not None:
        out["threshold"] = threshold
        out["first_below"] = first_crossing(steps, vals, threshold, below=True)
    return out


def train_run(cfg: Config, node: DictConfig, quiet: bool = False, overrides: list[str] | None = None) -> Path:
    """Train one run and write its directory. Returns the run directory."""
    trainer = Trainer(cfg)  # builds task and model: bad input files fail here, before any write
    run_dir = resolve_run_dir(cfg)
    _write_config(run_dir, node, overrides)
    return execute(trainer, node, run_dir, trainer.init_state(), quiet=quiet)


MIN_FREE_BYTES = 64 * 2 ** 20
_LOCKS: dict[str, int] = {}


def check_writable(run_dir: Path) -> None:
    """Refuse, before training, a run directory that cannot be created or written, or a nearly full disk."""
    import os
    import shutil

    anc = Path(run_dir).absolute()
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise LabError(f"run.dir={run_dir}: cannot be created ({anc} is a file, not a directory)")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise LabError(f"run.dir={run_dir}: cannot be created or written ({anc} is not writable)")
    free = shutil.disk_usage(anc).free
    if free < MIN_FREE_BYTES:
        raise LabError(f"run.dir={run_dir}: only {free / 2 ** 20:.0f} MiB free on its disk; "
                       f"a run needs at least {MIN_FREE_BYTES // 2 ** 20} MiB")


def lock_run_dir(run_dir: Path) -> None:
    """Hold an exclusive lock on the run directory while this process writes it: a second writer (another
    `lab resume`, a replay of a run still training) is refused. The OS releases it when the process dies."""
    import fcntl
    import os

    key = str(Path(run_dir).absolute())
    if key in _LOCKS:
        return
    fd = os.open(Path(run_dir) / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise LabError(f"run_dir={run_dir}: another process (pid {other}) is writing this run directory; "
                       "wait for it or stop it first") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _LOCKS[key] = fd


def unlock_run_dir(run_dir: Path) -> None:
    import os

    fd = _LOCKS.pop(str(Path(run_dir).absolute()), None)
    if fd is not None:
        os.close(fd)


def _write_config(run_dir: Path, node: DictConfig, overrides: list[str] | None, extra: dict | None = None) -> None:
    check_writable(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LabError(f"run.dir={run_dir}: cannot be created ({e.strerror})") from e
    lock_run_dir(run_dir)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(node, resolve=True))
    # the command-line overrides: `lab fork` and `lab replay` re-compose the config from them
    (run_dir / "overrides.json").write_text(json.dumps({"overrides": list(overrides or []), **(extra or {})}))


def execute(trainer: Trainer, node: DictConfig, run_dir: Path, state: dict, quiet: bool = False,
            resume: bool = False, cadence_rows: list[dict] | None = None) -> Path:
    """Train ``state`` on to the end inside ``run_dir``; write metrics, checkpoints, summary, plot."""
    execute_runs(trainer, [node], [run_dir], state, quiet=quiet, resume=resume,
                 histories=[cadence_rows or []], conditions=[trainer.clamps.condition])
    return run_dir


def execute_runs(trainer: Trainer, nodes: list[DictConfig], run_dirs: list[Path], state: dict, quiet: bool = False,
                 resume: bool = False, histories: list[list[dict]] | None = None,
                 conditions: list[str] | None = None) -> list[Path]:
    """``execute`` for the runs of one program (one run, or a lab.batch.BatchTrainer's stacked runs):
    each run directory is written as if its run had trained alone."""
    from lab.plots import plot_curves
    from lab.tracking import Tracker, read_metrics

    n = len(run_dirs)
    cfgs = getattr(trainer, "cfgs", [trainer.cfg])
    conditions = conditions or [trainer.clamps.condition] * n
    config_dicts = [OmegaConf.to_container(nd, resolve=True) for nd in nodes]
    if not quiet:
        for d in run_dirs if n <= 4 else run_dirs[:1]:
            print(f"run directory: {d}", file=sys.stderr)
    for d in run_dirs:
        lock_run_dir(d)
    trackers = [Tracker(d, c.tracking, cd, name=d.name, group=c.experiment, job_type=cond, resume=resume)
                for d, c, cd, cond in zip(run_dirs, cfgs, config_dicts, conditions, strict=True)]
    ckpts = [Checkpointer(d / "checkpoints", c.checkpoint) for d, c in zip(run_dirs, cfgs, strict=True)]
    key_metric = trainer.task.key_metric
    cfg = trainer.cfg
    bar = None
    if cfg.trainer.progress and not quiet:
        from tqdm import tqdm

        bar = tqdm(total=cfg.trainer.steps, initial=trainer.current_step(state),
                   desc=cfg.experiment + (f" x{n}" if n > 1 else ""), unit="step", dynamic_ncols=True, file=sys.stderr)

    def progress(step, row):
        if bar is not None:
            bar.n = step
            post = {"loss": f"{row.get('train/loss', float('nan')):.3f}"}
            if key_metric in row:
                post[key_metric] = f"{row[key_metric]:.3f}"
            bar.set_postfix(post, refresh=False)
            bar.refresh()

    def saver(ck, cd):
        return lambda s, st: ck.save(s, st, cd)

    t0 = time.perf_counter()
    start_step = trainer.current_step(state)
    try:
        state = trainer.drive(state, [t.log for t in trackers],
                              [saver(ck, cd) for ck, cd in zip(ckpts, config_dicts, strict=True)],
                              progress=progress, start_time=t0, histories=histories)
        jax.block_until_ready(state)
    except BaseException:
        for t in trackers:  # a failed run's wandb run ends here, not in the next run of this process
            t.close()
        raise
    finally:
        if bar is not None:
            bar.close()
        for ck in ckpts:
            ck.close()
    wall = time.perf_counter() - t0
    circuit_of = CircuitSummaries(trainer, cfgs, state)
    circuits = [None] * n
    for i, run_dir in enumerate(run_dirs):
        c = cfgs[i]
        rows = read_metrics(run_dir / "metrics.jsonl")
        metric = trainer.watch
        phase = transitions_of(rows, metric, c.watch_threshold)
        final = {k: v for k, v in rows[-1].items() if not k.startswith("perf/")} if rows else {}
        summary = {
            "experiment": c.experiment, "condition": conditions[i], "seed": c.seed,
            "task": c.task.name, "steps": c.trainer.steps, "batch_size": c.trainer.batch_size,
            "steps_this_session": c.trainer.steps - start_step,  # fewer than steps for a resume or fork
            "wall_time_s": wall, "steps_per_sec": (c.trainer.steps - start_step) / wall,
            "final": final, "phase": phase, "checkpoints": ckpts[i].steps(), "versions": versions(),
        }
        circuits[i] = circuit_of(i, final)
        if circuits[i] is not None:
            summary["circuit"] = circuits[i]
        if n > 1:
            summary["batched_runs"] = n
        saved = json.loads((run_dir / "overrides.json").read_text()) if (run_dir / "overrides.json").exists() else {}
        for k in ("parent", "batch"):
            if saved.get(k):
                summary[k] = saved[k]
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_curves(rows, run_dir / "curves.png", title=f"{c.experiment} ({c.task.name}, seed {c.seed})",
                    watch=metric, transitions=phase["transitions"], note=circuits[i] and circuits[i]["line"])
        trackers[i].summary({"wall_time_s": wall, "steps_per_sec": summary["steps_per_sec"],
                             **(circuit_flat(circuits[i]) if circuits[i] else {})})
        trackers[i].close()
        if not quiet and (n == 1 or i == 0):
            print(format_summary(summary, run_dir))
        unlock_run_dir(run_dir)
    return list(run_dirs)


class CircuitSummaries:
    """Each run's circuit summary at its final parameters (None where the task has none or it is off), with
    the run's own task (batched runs may differ in its data fields); one summariser per distinct task."""

    def __init__(self, trainer: Trainer, cfgs: list, state):
        self.trainer, self.cfgs, self.state, self.built = trainer, cfgs, state, {}

    def __call__(self, i: int, final: dict) -> dict | None:
        from lab.measures.mechanism import CircuitSummary
        from lab.tasks import make_task

        c, tr = self.cfgs[i], self.trainer
        if not (tr.task.mechanism_metric and c.measures.circuit):
            return None
        key = repr(c.task)
        if key not in self.built:
            # the trainer's task is cfgs[0]'s: a batched run whose task differs in data fields gets its own
            self.built[key] = CircuitSummary(tr.model, tr.task if c.task == self.cfgs[0].task else make_task(c.task))
        return self.built[key](tr.run_state(self.state, i)["params"], final)


def circuit_flat(circuit: dict) -> dict:
    from lab.measures.mechanism import flat

    return {**flat(circuit), "circuit/line": circuit["line"], "circuit/induction_head": circuit["induction_head"],
            "circuit/prev_token_head": circuit["prev_token_head"]}


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
        big = max(ts, key=lambda t: abs(t["after"] - t["before"]))
        lines.append(f"transition in {ph['metric']}: {big['before']:.3f} -> {big['after']:.3f}, "
                     f"onset step {big['onset']:.0f}, midpoint {big['mid']:.0f}, end {big['end']:.0f}")
    else:
        lines.append(f"no transition detected in {ph['metric']}")
    if ph.get("threshold") is not None:
        fb = ph.get("first_below")
        lines.append(f"{ph['metric']} first below {ph['threshold']:.4f} at step "
                     f"{'never' if fb is None else int(fb)}")
    if summary.get("circuit"):
        lines.append(summary["circuit"]["line"])
    lines.append(f"run directory: {run_dir}  (curves.png, metrics.jsonl, summary.json, checkpoints/, wandb/)")
    return "\n".join(lines)
