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
from lab.train import Trainer


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


def _write_config(run_dir: Path, node: DictConfig, overrides: list[str] | None, extra: dict | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(node, resolve=True))
    # the command-line overrides: `lab fork` and `lab replay` re-compose the config from them
    (run_dir / "overrides.json").write_text(json.dumps({"overrides": list(overrides or []), **(extra or {})}))


def execute(trainer: Trainer, node: DictConfig, run_dir: Path, state: dict, quiet: bool = False,
            resume: bool = False, cadence_rows: list[dict] | None = None) -> Path:
    """Train ``state`` on to the end inside ``run_dir``; write metrics, checkpoints, summary, plot."""
    from lab.plots import plot_curves
    from lab.tracking import Tracker, read_metrics

    cfg = trainer.cfg
    config_dict = OmegaConf.to_container(node, resolve=True)
    if not quiet:
        print(f"run directory: {run_dir}", file=sys.stderr)
    tracker = Tracker(run_dir, cfg.tracking, config_dict, name=run_dir.name, group=cfg.experiment,
                      job_type=trainer.clamps.condition, resume=resume)
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    key_metric = trainer.task.key_metric
    bar = None
    if cfg.trainer.progress and not quiet:
        from tqdm import tqdm

        bar = tqdm(total=cfg.trainer.steps, initial=int(state["step"]), desc=f"{cfg.experiment}", unit="step",
                   dynamic_ncols=True, file=sys.stderr)

    def progress(step, row):
        if bar is not None:
            bar.n = step
            post = {"loss": f"{row.get('train/loss', float('nan')):.3f}"}
            if key_metric in row:
                post[key_metric] = f"{row[key_metric]:.3f}"
            bar.set_postfix(post, refresh=False)
            bar.refresh()

    t0 = time.perf_counter()
    start_step = int(state["step"])
    try:
        state = trainer.fit(state, log=tracker.log, save=lambda s, st: ckpt.save(s, st, config_dict),
                            progress=progress, start_time=t0, history=cadence_rows)
        jax.block_until_ready(state)
    finally:
        if bar is not None:
            bar.close()
        ckpt.close()
    wall = time.perf_counter() - t0
    rows = read_metrics(run_dir / "metrics.jsonl")
    metric = trainer.watch
    phase = transitions_of(rows, metric, cfg.watch_threshold)
    final = {k: v for k, v in rows[-1].items() if not k.startswith("perf/")} if rows else {}
    summary = {
        "experiment": cfg.experiment, "condition": trainer.clamps.condition, "seed": cfg.seed,
        "task": cfg.task.name, "steps": cfg.trainer.steps, "batch_size": cfg.trainer.batch_size,
        "wall_time_s": wall, "steps_per_sec": (cfg.trainer.steps - start_step) / wall,
        "final": final, "phase": phase, "checkpoints": ckpt.steps(), "versions": versions(),
    }
    parent = json.loads((run_dir / "overrides.json").read_text()).get("parent") \
        if (run_dir / "overrides.json").exists() else None
    if parent:
        summary["parent"] = parent
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_curves(rows, run_dir / "curves.png", title=f"{cfg.experiment} ({cfg.task.name}, seed {cfg.seed})",
                watch=metric, transitions=phase["transitions"])
    tracker.summary({"wall_time_s": wall, "steps_per_sec": summary["steps_per_sec"]})
    tracker.close()
    if not quiet:
        print(format_summary(summary, run_dir))
    return run_dir


def format_summary(summary: dict, run_dir: Path) -> str:
    lines = [f"done: {summary['steps']} steps in {summary['wall_time_s']:.1f} s "
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
    lines.append(f"run directory: {run_dir}  (curves.png, metrics.jsonl, summary.json, checkpoints/, wandb/)")
    return "\n".join(lines)
