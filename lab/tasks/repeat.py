"""Repeated random tokens (Olsson et al. 2022), in layouts that only an induction circuit can solve.

docs/science.md §1.5.

Why the layout is random. The first version of this task put BOS, then a segment repeated from
position 1 to the end: the second copy always sat ``seg_len`` positions after the first, and a
one-layer head that attends ``seg_len - 1`` positions back, by position alone, solved it (the demo's
layer-0 heads did exactly that and failed on any other segment length). So by default (``layout:
random``) every sequence draws its own layout:

- a segment length L, uniform over ``[seg_min, seg_max]`` (or exactly ``seg_len`` when set);
- where the two copies go: the ``seq_len - 2L`` filler tokens are split into a prefix, a gap
  between the copies and a suffix, uniformly over all such splits (so the distance from a token to
  its earlier copy, L + gap, varies per sequence and no fixed offset predicts anything);
- the tokens: every filler and segment token is distinct (drawn without replacement from
  ``vocab_size`` tokens), so the second copy is the only repetition in the sequence and "the token
  after the earlier occurrence of the current token" is unambiguous.

A head that attends a fixed distance back cannot solve this; neither can a layer-1 head reading
positions that layer 0 copied along (that route needs positions in the residual stream, which the
repeat experiments' Shortformer positions never put there). What is left is an induction circuit:
the previous-token head in layer 0 and the induction head in layer 1 reading it (K-composition), or,
with several layer-0 heads, an "offset" variant (keys from a head d back, values from one d - 1 back,
the layer-1 head attending d - 1 after the match), which the circuit summary reports as not the
canonical circuit (its layer-1 head does not prefix-match).

``layout: fixed`` keeps the old, shortcut-prone layout (BOS, then a segment of ``seg_len``
distinct tokens repeated until the sequence is full) for comparisons and for the test that the
circuit summary flags a shortcut.

Evaluators: ``test`` (the training distribution) and ``heldout``: random layouts whose segment
lengths training never drew (every length in ``[2, seq_len // 2]`` outside the training lengths),
so a model that learnt a layout rather than a circuit fails there.

Token id ``vocab_size`` is BOS: the embedding has ``vocab_size + 1`` rows (``task.vocab_size``),
while BOS is never a target, so the readout has ``cfg.vocab_size`` outputs (``task.n_outputs``).

Masks (per sequence): ``repeated`` = positions t in the second copy whose target is also in it (the
current token and its successor appeared together earlier: an induction head predicts the target);
``first`` = the same pairs in the first copy (seen for the first time: no context can predict them).
In the fixed layout ``repeated`` is t >= seg_len + 1 and ``first`` is 1..seg_len, as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from lab.errors import check
from lab.tasks.base import Batch, Task, TaskConfig, build_eval_sets, check_common, vmap_sequences
from lab.tasks.layouts import copy_layout, length_table

LAYOUTS = ("random", "fixed")


@dataclass
class RepeatConfig(TaskConfig):
    name: str = "repeat"
    vocab_size: int = 64  # random tokens 0..vocab_size-1; vocab_size is BOS
    seq_len: int = 32
    layout: str = "random"  # random: a segment copied once, both copies at random offsets | fixed: see module doc
    seg_min: int = 4  # segment lengths drawn per sequence (random layout)
    seg_max: int = 10
    seg_len: int | None = None  # one segment length for every sequence (fixed layout: required)

    def lengths(self) -> list[int]:
        """The segment lengths training draws from."""
        if self.seg_len is not None:
            return [self.seg_len]
        return list(range(self.seg_min, self.seg_max + 1))

    def heldout_lengths(self) -> list[int]:
        """The segment lengths of the ``heldout`` evaluator: every length in [2, seq_len // 2] that
        training never draws."""
        train = set(self.lengths())
        return [n for n in range(2, self.seq_len // 2 + 1) if n not in train]

    def validate(self) -> None:
        check_common(self)
        check(self.layout in LAYOUTS, "task.layout", self.layout, f"one of {', '.join(LAYOUTS)}")
        check(self.vocab_size >= 1, "task.vocab_size", self.vocab_size, "must be a positive integer")
        half = self.seq_len // 2
        if self.layout == "fixed":
            check(self.seg_len is not None, "task.seg_len", self.seg_len, "an integer: the fixed layout's period")
            check(1 <= self.seg_len <= self.vocab_size, "task.seg_len", self.seg_len,
                  f"must be in [1, task.vocab_size={self.vocab_size}] (the segment's tokens are distinct)")
            check(self.seq_len >= self.seg_len + 2, "task.seq_len", self.seq_len,
                  f"must be >= task.seg_len + 2 = {self.seg_len + 2} so that some token is repeated")
        elif self.seg_len is not None:
            check(2 <= self.seg_len <= half, "task.seg_len", self.seg_len,
                  f"must be in [2, task.seq_len // 2 = {half}] (two copies fit in the sequence)")
        else:
            check(2 <= self.seg_min <= half, "task.seg_min", self.seg_min,
                  f"must be in [2, task.seq_len // 2 = {half}] (two copies fit in the sequence)")
            check(self.seg_min <= self.seg_max <= half, "task.seg_max", self.seg_max,
                  f"must be in [task.seg_min={self.seg_min}, task.seq_len // 2 = {half}]")
        # the held-out layouts draw seq_len distinct tokens, and need a length training never saw
        check(self.vocab_size >= self.seq_len, "task.vocab_size", self.vocab_size,
              f"must be >= task.seq_len={self.seq_len} (a sequence's tokens are distinct apart from the copy)")
        check(bool(self.heldout_lengths()), "task.seg_max", self.seg_max,
              f"leave some segment length in [2, {half}] untrained: the heldout evaluator draws those")


class RepeatTask(Task):
    """Olsson's repeated random tokens at random offsets. Evaluators: test, heldout."""

    key_metric = "test/repeated_acc"
    watch_metric = "test/repeated_loss"
    # where the circuit summary measures what ablating a head costs: layouts the run never trained on
    mechanism_metric = "heldout/repeated_loss"
    mechanism_min_effect = 1.0  # an induction head's loss: ~0 intact, ~ln(vocab) without it
    heldout_gap = ("heldout/repeated_loss", "test/repeated_loss")
    # the segment length is a number in the sampler (the sequence keeps its length): batched runs may
    # hold it as data, e.g. `'+task_values.seg_len=[4,8,16]'`
    data_fields = ("seg_len",)

    def __init__(self, cfg: RepeatConfig):
        cfg.validate()
        self.cfg = cfg
        self.bos = cfg.vocab_size
        self.seq_len = cfg.seq_len
        self.vocab_size = cfg.vocab_size + 1
        self.n_outputs = cfg.vocab_size
        self._table_size = cfg.seq_len // 2 + 1
        self._train_table = length_table(cfg.lengths(), self._table_size)

    # ---- one sequence ----------------------------------------------------------------------
    def _fixed(self, u, seg_len):
        """The fixed layout: BOS, then a segment of ``seg_len`` distinct tokens repeated to the end."""
        cfg = self.cfg
        t = jnp.arange(cfg.seq_len)
        # the first seg_len of a ranking of all tokens: a traced length takes the same tokens in the same order
        segment = jax.lax.top_k(u["tokens"][: cfg.vocab_size], cfg.vocab_size)[1].astype(jnp.int32)
        body = segment[t % seg_len]
        x = jnp.concatenate([jnp.full(1, self.bos, jnp.int32), body])
        masks = {"repeated": (t >= seg_len + 1), "first": (t >= 1) & (t <= seg_len)}
        return x, masks

    def _random(self, u, table):
        """A random layout: one segment (length from ``table``) copied once, both copies at random offsets."""
        return copy_layout(u, self.cfg.seq_len, self.cfg.vocab_size, table, self.bos)

    def _sequence(self, u, table, seg_len, fixed):
        x, masks = self._fixed(u, seg_len) if fixed else self._random(u, table)
        return {
            "tokens": x[:-1],
            "targets": x[1:],
            "loss_mask": jnp.ones(self.cfg.seq_len, jnp.float32),
            "masks": {k: v.astype(jnp.float32) for k, v in masks.items()},
        }

    def _draws(self) -> dict:
        n = self.cfg.seq_len
        return {"tokens": (max(self.cfg.vocab_size, n),), "length": (), "bars": (n + 2,)}

    def sample(self, key: jax.Array, batch_size: int, data: dict | None = None) -> Batch:
        """A training batch; ``data``: a batched run's segment length ({"seg_len": traced int})."""
        fixed = self.cfg.layout == "fixed"
        if data:
            seg_len = data["seg_len"]
            table = {"lengths": jnp.full(self._table_size, seg_len, jnp.int32), "count": jnp.int32(1)}
        else:
            seg_len, table = self.cfg.seg_len, self._train_table
        return vmap_sequences(lambda u: self._sequence(u, table, seg_len, fixed), key, batch_size, self._draws())

    def run_data(self, values: dict) -> dict:
        return {"seg_len": jnp.int32(values["seg_len"])}

    def build_evals(self) -> dict[str, Batch]:
        size = self.cfg.eval_size
        held = length_table(self.cfg.heldout_lengths(), self._table_size)
        test_table = self._train_table
        fixed = self.cfg.layout == "fixed"

        def sample(key, which):
            # one traced sampler for both evaluators: which = 0 (test, the training layouts), 1 (heldout)
            table = jax.tree_util.tree_map(lambda a, b: jnp.where(which == 0, a, b), test_table, held)

            def one(u):
                if not fixed:
                    return self._sequence(u, table, None, False)
                f, r = self._sequence(u, table, self.cfg.seg_len, True), self._sequence(u, table, None, False)
                return jax.tree_util.tree_map(lambda a, b: jnp.where(which == 0, a, b), f, r)

            return vmap_sequences(one, key, size, self._draws())

        return build_eval_sets(sample, {"test": np.int32(0), "heldout": np.int32(1)}, self.cfg.eval_seed)
