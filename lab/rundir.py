"""Run directories: where a run goes, the files it writes first, the lock, its complete checkpoints, and the one
way a checkpoint is read back.

A run directory holds ``config.yaml`` (resolved), ``overrides.json`` (the command-line overrides, from which
``lab fork`` and ``lab replay`` re-compose the config, plus ``parent`` / ``batch`` provenance), ``metrics.jsonl``,
``summary.json``, ``checkpoints/`` (orbax), ``wandb/`` and ``curves.png``. Training, resume, fork, replay, the
Python API and the ``reference`` clamp all find, lock and read run directories through this module.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from datetime import datetime
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig, OmegaConf

from lab import plugins
from lab.checkpoint import Checkpointer, CheckpointReadError
from lab.config import compose, from_yaml, to_config, with_experiment
from lab.errors import LabError
from lab.state import TrainState

MIN_FREE_BYTES = 64 * 2 ** 20
_LOCKS: dict[str, int] = {}  # absolute run directory -> the open file descriptor holding its lock


# ---- naming ----------------------------------------------------------------------------------------
def free_path(base: Path) -> Path:
    """``base``, or the first of ``base-2``, ``base-3``, ... that does not exist yet."""
    path, i = Path(base), 1
    while path.exists():
        i += 1
        path = Path(base).with_name(f"{Path(base).name}-{i}")
    return path


def default_run_dir(cfg) -> Path:
    """``run.root/<experiment>/<run.name or task-sSEED-TIME>``; two runs started in the same second get distinct
    directories."""
    name = cfg.run.name or f"{cfg.task.name}-s{cfg.seed}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return free_path(Path(cfg.run.root) / cfg.experiment / name)


def resolve_run_dir(cfg) -> Path:
    """``run.dir`` if given (it must be new or empty: a run directory is never overwritten), else the default."""
    if cfg.run.dir:
        path = Path(cfg.run.dir)
        check_empty(path)
        return path
    return default_run_dir(cfg)


def check_empty(path: Path) -> None:
    """Refuse a run directory that exists and is not an empty directory (a run directory is never overwritten)."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise LabError(f"run.dir={path}: exists and is not empty; choose a new directory "
                       "(a run directory is never overwritten)")


# ---- creating and locking ------------------------------------------------------------------------
def check_writable(run_dir: Path) -> None:
    """Refuse, before training, a run directory that cannot be created or written, or a nearly full disk."""
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


def lock(run_dir: Path) -> None:
    """Hold an exclusive lock on the run directory while this process writes it: a second writer (another
    `lab resume`, a replay of a run still training) is refused. The OS releases it when the process dies."""
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


def unlock(run_dir: Path) -> None:
    fd = _LOCKS.pop(str(Path(run_dir).absolute()), None)
    if fd is not None:
        os.close(fd)


def create(run_dir: Path, node: DictConfig, overrides: list[str] | None, extra: dict | None = None) -> None:
    """Create and lock ``run_dir`` and write its ``config.yaml`` and ``overrides.json`` (``extra``: provenance
    such as ``parent`` or ``batch``, recorded beside the overrides; the packages of the plug-ins the run uses
    are recorded there too, as ``plugins``)."""
    check_writable(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LabError(f"run.dir={run_dir}: cannot be created ({e.strerror})") from e
    lock(run_dir)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(node, resolve=True))
    used = plugins.used_by(to_config(node, validate=False))
    overrides = with_experiment(overrides or [])  # as composed: re-composing them later gives this run again
    (run_dir / "overrides.json").write_text(json.dumps({"overrides": overrides, **(extra or {}),
                                                        **({"plugins": used} if used else {})}))


# ---- reading -------------------------------------------------------------------------------------
def check_run_dir(run_dir: str | Path) -> Path:
    """The run directory, refused in one line if it is not one, or if it was trained with plug-ins this
    environment lacks (naming their packages)."""
    path = Path(run_dir)
    if not (path / "config.yaml").is_file() or not (path / "checkpoints").is_dir():
        raise LabError(f"run_dir={run_dir}: not a run directory (needs config.yaml and checkpoints/)")
    lacking = plugins.missing(provenance(path).get("plugins", {}))
    if lacking:
        raise LabError(f"run_dir={run_dir}: {lacking}")
    return path


def provenance(run_dir: Path) -> dict:
    """overrides.json as a dict (``overrides``, and ``parent`` / ``batch`` where recorded); {} without one."""
    f = Path(run_dir) / "overrides.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def run_overrides(run_dir: Path) -> list[str] | None:
    """The overrides a run was composed from; a run recorded before a task chosen without an experiment meant
    ``experiment=none`` (its overrides name no experiment) was composed with the demo's, and gets it back."""
    saved = provenance(run_dir)
    return with_experiment(saved["overrides"], default="demo") if "overrides" in saved else None


def load_run_config(run_dir: Path, extra: list[str] = ()):
    """The run's config: re-composed from its overrides plus ``extra`` where it recorded them,
    else its config.yaml (then ``extra`` must be plain field=value overrides)."""
    saved = run_overrides(run_dir)
    if saved is not None:
        node = compose([o for o in saved if not o.startswith("run.dir=")] + list(extra))
        return to_config(node), node
    cfg, node = from_yaml(Path(run_dir) / "config.yaml")
    if extra:
        try:
            node = OmegaConf.merge(node, OmegaConf.from_dotlist(list(extra)))
        except Exception as e:  # omegaconf's many error types for a malformed dotlist: one line for the user
            raise LabError(f"overrides {list(extra)}: {e}") from e
        cfg = to_config(node)
    return cfg, node


def complete_steps(run_dir: Path) -> list[int]:
    """Checkpoint steps that are complete (orbax finalises a step by renaming its directory)."""
    return Checkpointer(Path(run_dir) / "checkpoints", read_only=True).steps()


def restore(run_dir: Path, step: int, like=None):
    """The one read of a checkpoint: the state saved at ``step``, shaped like ``like`` (None: as saved)."""
    return Checkpointer(Path(run_dir) / "checkpoints", read_only=True).restore(step, like)


def restore_state(trainer, run_dir: Path, step: int) -> TrainState:
    """Run 0's training state saved at ``step`` of ``run_dir``, shaped for ``trainer`` (a resume, a fork with
    other settings, a replay): a run whose clamps freeze activations gets its saved snapshots, or, forked from
    a parent without them, snapshots of the restored parameters."""
    like = trainer.init_run_state().saved()  # what a checkpoint of this run holds
    base = {k: like[k] for k in TrainState.fields("saved")}
    if len(like) > len(base):  # the run holds saved_if_any fields too (a frozen clamp's snapshots)
        try:
            return TrainState.from_saved(restore(run_dir, step, like))
        except CheckpointReadError:
            if set(like) - set(base) != {"frozen"}:
                raise
            # a parent without snapshots: they start from the restored parameters (below)
    try:
        got = restore(run_dir, step, base)
    except CheckpointReadError as e:
        cause = str(e).split("cannot be read ", 1)[-1]
        raise CheckpointReadError(f"checkpoint {step} of {run_dir} cannot be restored into this model/optimiser: its "
                                  f"files are damaged or its shapes differ {cause}") from e
    if "frozen" in like:
        got["frozen"] = {n: jax.tree_util.tree_map(jnp.copy, got["params"]) for n in like["frozen"]}
    return TrainState.from_saved(got)


def reference_params(run_dir: str, step: int | None, model):
    """Parameters of another run's checkpoint (default: its latest), checked to match ``model``'s shapes (the
    ``reference`` clamp's source)."""
    path = Path(run_dir)
    if not (path / "checkpoints").is_dir():
        raise LabError(f"reference_dir={run_dir}: not a run directory (no checkpoints/)")
    steps = complete_steps(path)
    if not steps:
        raise LabError(f"reference_dir={run_dir}: has no complete checkpoint")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise LabError(f"reference_step={step}: no checkpoint at that step in {run_dir}; have {steps}")
    try:
        params = restore(path, step)["params"]
    except CheckpointReadError as e:
        raise LabError(f"reference_dir={run_dir}: checkpoint {step} cannot be read "
                       f"({type(e.__cause__ or e).__name__})") from e
    mine = model.params()
    ok = jax.tree_util.tree_structure(mine) == jax.tree_util.tree_structure(params) and all(
        np.shape(a) == np.shape(b) for a, b in zip(jax.tree_util.tree_leaves(mine), jax.tree_util.tree_leaves(params),
                                                    strict=True))
    if not ok:
        raise LabError(f"reference_dir={run_dir}: its model does not match this run's model (shapes differ)")
    return jax.tree_util.tree_map(jnp.asarray, params)
