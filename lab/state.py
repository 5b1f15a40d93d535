"""The training state: one typed pytree, every field explicit.

A run's state holds its parameters, optimiser state, step and data key (the batch of step t is sampled from
``fold_in(key, t)``), and what its clamps and batch need as data: ``frozen`` (the snapshots of ``value: frozen``
clamps), and, when runs trained as one program differ in them, ``lr`` (the run's learning rate), ``task`` (the
run's task data fields) and ``gates`` (which of the program's clamps are the run's own). Fields a run does not
need are None, which is an empty pytree: no leaves, nothing to vmap, nothing saved.

The trainer holds R runs stacked on a leading axis (R = 1 for a single run); a checkpoint holds one run's
``saved()`` part, as a dict, so checkpoints written before this type existed still restore.

Each field says, in its one line, what it is: ``saved`` (a run's own: checkpointed, restored, forked; every
run has it), ``saved_if_any`` (a run's own where it needs one: None otherwise) or ``program`` (what the runs
of one program hold as data to differ in: dropped from a run's own state). ``saved()``, ``from_saved``, the
restore path (lab.rundir) and ``run_state`` (lab.runs) read these lists, so a new field is one line here (plus
its value at step 0 in ``Runs.init_run_state``, and for a saved_if_any field what a fork from a parent without
it starts from, as lab.rundir.restore_state does for ``frozen``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import struct


def saved():
    """A field every run has and checkpoints."""
    return struct.field(metadata={"role": "saved"})


def saved_if_any():
    """A field a run checkpoints where it has one (None otherwise)."""
    return struct.field(default=None, metadata={"role": "saved_if_any"})


def program():
    """A field the runs of one program hold as data to differ in (None for a run trained alone)."""
    return struct.field(default=None, metadata={"role": "program"})


@struct.dataclass
class TrainState:
    params: dict = saved()  # the model's parameters (TransformerLens names)
    opt_state: Any = saved()  # optax's state
    step: jax.Array = saved()  # int32: steps taken
    key: jax.Array = saved()  # the run's data key
    frozen: dict | None = saved_if_any()  # clamp name -> parameters snapshot taken when its window opened
    lr: jax.Array | None = program()  # float32: this run's learning rate, when runs of one program differ in it
    task: dict | None = program()  # this run's task data fields (Task.run_data), when runs of one program differ
    gates: dict | None = program()  # program clamp name -> 1.0 where it is this run's own (several conditions)

    @classmethod
    def fields(cls, *roles: str) -> tuple[str, ...]:
        """The names of the fields with these roles (saved, saved_if_any, program), in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("role") in roles)

    def saved(self) -> dict:
        """What a checkpoint of this run holds: the saved fields, and each saved_if_any one it has."""
        return {k: getattr(self, k) for k in self.fields("saved", "saved_if_any") if getattr(self, k) is not None}

    @classmethod
    def from_saved(cls, tree: dict) -> TrainState:
        """The state a checkpoint holds (``saved()``'s dict) as a TrainState."""
        return cls(**{k: tree.get(k) for k in cls.fields("saved", "saved_if_any")})

    def own(self) -> TrainState:
        """This run's own state: the program's fields dropped (what a run trained alone holds)."""
        return self.replace(**{k: None for k in self.fields("program")})

    def run(self, i: int) -> TrainState:
        """Run ``i`` of a stacked state."""
        return jax.tree_util.tree_map(lambda a: a[i], self)
