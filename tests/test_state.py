"""The training state: which fields a checkpoint holds and which belong to the program come from one
definition (each field's role), so a new field is one line."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lab.checkpoint import Checkpointer
from lab.state import TrainState, program, saved_if_any


@struct.dataclass
class MoreState(TrainState):
    seen: jax.Array | None = saved_if_any()  # the one line: a run's own counter, checkpointed
    mix: jax.Array | None = program()  # and one the program holds


def one(i: int) -> MoreState:
    params = {"w": jnp.full((2, 3), float(i))}
    return MoreState(params=params, opt_state=(jnp.zeros(3),), step=jnp.int32(i), key=jax.random.PRNGKey(i),
                     seen=jnp.int32(10 + i), mix=jnp.float32(i / 2))


def test_a_new_field_is_saved_stacked_and_restored(tmp_path):
    assert MoreState.fields("saved_if_any") == ("frozen", "seen") and MoreState.fields("program")[-1] == "mix"
    states = [one(0), one(1)]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *states)  # R = 2 runs on a leading axis
    assert stacked.seen.shape == (2,) and stacked.mix.shape == (2,)
    run1 = stacked.run(1).own()  # run 1 as it would train alone: the program's fields dropped, its own kept
    assert run1.mix is None and run1.lr is None and int(run1.seen) == 11
    held = run1.saved()
    assert set(held) == {"params", "opt_state", "step", "key", "seen"}  # frozen is None: not saved
    ckpt = Checkpointer(tmp_path / "checkpoints")
    ckpt.save(1, held)
    ckpt.close()
    back = MoreState.from_saved(Checkpointer(tmp_path / "checkpoints", read_only=True).restore(1, held))
    assert isinstance(back, MoreState) and int(back.seen) == 11 and back.mix is None
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(run1), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
