"""The training state: one typed pytree, every field explicit.

A run's state holds its parameters, optimiser state, step and data key (the batch of step t is sampled from
``fold_in(key, t)``), and what its clamps and batch need as data: ``frozen`` (the snapshots of ``value: frozen``
clamps), and, when runs trained as one program differ in them, ``lr`` (the run's learning rate), ``task`` (the
run's task data fields) and ``gates`` (which of the program's clamps are the run's own). Fields a run does not
need are None, which is an empty pytree: no leaves, nothing to vmap, nothing saved.

The trainer holds R runs stacked on a leading axis (R = 1 for a single run); a checkpoint holds one run's
``saved()`` part, as a dict, so checkpoints written before this type existed still restore.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import struct

SAVED_FIELDS = ("params", "opt_state", "step", "key", "frozen")  # what a checkpoint holds (frozen if present)


@struct.dataclass
class TrainState:
    params: dict  # the model's parameters (TransformerLens names)
    opt_state: Any  # optax's state
    step: jax.Array  # int32: steps taken
    key: jax.Array  # the run's data key
    frozen: dict | None = None  # clamp name -> parameters snapshot taken when its window opened (value: frozen)
    lr: jax.Array | None = None  # float32: this run's learning rate, when runs of one program differ in it
    task: dict | None = None  # this run's task data fields (Task.run_data), when runs of one program differ in them
    gates: dict | None = None  # program clamp name -> 1.0 where it is this run's own (runs of several conditions)

    def saved(self) -> dict:
        """What a checkpoint of this run holds: params, opt_state, step, key, and frozen snapshots if any."""
        return {k: getattr(self, k) for k in SAVED_FIELDS if getattr(self, k) is not None}

    @classmethod
    def from_saved(cls, tree: dict) -> TrainState:
        """The state a checkpoint holds (``saved()``'s dict) as a TrainState."""
        return cls(**{k: tree.get(k) for k in SAVED_FIELDS})

    def run(self, i: int) -> TrainState:
        """Run ``i`` of a stacked state."""
        return jax.tree_util.tree_map(lambda a: a[i], self)
