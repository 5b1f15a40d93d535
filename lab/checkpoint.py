"""Checkpoints with orbax-checkpoint's CheckpointManager (the ``args=`` API).

A checkpoint holds the whole training state (parameters, optimiser state, step, data RNG key)
as one pytree, plus the resolved config as JSON, so a run can be restored, replayed or forked
from its directory alone. Saves are asynchronous by default; orbax writes each step to a
temporary directory and renames it when complete, so a step directory that exists is whole.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from lab.errors import LabError, check
from lab.runlog import LOG_NAME, log_closed_loop_reports


@dataclass
class CheckpointConfig:
    every: int = 0  # save every N steps (0: only log-spaced and final)
    log_points: int = 0  # extra log-spaced saves over the run
    keep: int | None = None  # keep the newest N (None: keep all)
    async_save: bool = True

    def validate(self) -> None:
        check(self.every >= 0, "checkpoint.every", self.every, "must be >= 0")
        check(self.log_points >= 0, "checkpoint.log_points", self.log_points, "must be >= 0")
        check(self.keep is None or self.keep >= 1, "checkpoint.keep", self.keep, "must be >= 1 or null")


class CheckpointReadError(LabError):
    """A checkpoint that cannot be read back into the given structure (damaged files, or other shapes)."""


class Checkpointer:
    def __init__(self, directory: str | Path, cfg: CheckpointConfig | None = None, read_only: bool = False):
        cfg = cfg or CheckpointConfig()
        self.directory = Path(directory).absolute()
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save, create=not read_only,
            read_only=read_only, **({"save_interval_steps": 0} if read_only else {}),
        )
        # orbax warns that a read-only manager is read-only: noise on every resume, fork and replay
        absl_log = logging.getLogger("absl")
        level = absl_log.level
        if read_only:
            absl_log.setLevel(logging.ERROR)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=opts)
        finally:
            absl_log.setLevel(level)

    def save(self, step: int, state, config: dict | None = None) -> None:
        """Save ``state`` as checkpoint ``step``. A step already committed is left as it is: a run is a pure
        function of its config, so it holds this very state (a run resumed from its step-0 checkpoint
        reaches step 0's save again)."""
        if step in self.manager.all_steps():
            return
        # orbax writes host (numpy) arrays about 3x faster than device arrays (85 small leaves: 56 against 159 ms
        # a save on 2 cores), and a checkpoint restores into device arrays from its `like` either way
        args = {"state": ocp.args.StandardSave(jax.device_get(state))}
        if config is not None:
            args["config"] = ocp.args.JsonSave(config)
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, step: int, like=None):
        """The state saved at ``step``, with the structure, shapes and dtypes of ``like`` (None: as saved)."""
        if step not in self.steps():
            raise LabError(f"step={step}: no checkpoint at that step in {self.directory} (have {self.steps()})")
        abstract = None if like is None else jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        log_closed_loop_reports(self.directory.parent / LOG_NAME)  # a failed read's leftovers: to the run's log
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        except Exception as e:  # orbax raises many types for truncated or foreign files: one line, never half a state
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise CheckpointReadError(f"checkpoint {step} in {self.directory} cannot be read "
                                      f"({type(e).__name__}: {msg})") from e
        return out["state"]

    def restore_config(self, step: int) -> dict:
        out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return out["config"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
