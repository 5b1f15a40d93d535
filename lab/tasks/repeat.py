"""Repeated random tokens (Olsson et al. 2022; SCIENCE.md 1.5).

x = BOS, then a segment of ``seg_len`` distinct random tokens repeated until seq_len + 1 tokens
are generated (the last repeat truncated); tokens = x[:-1], targets = x[1:].

Token id ``vocab_size`` is BOS: the embedding has ``vocab_size + 1`` rows (``task.vocab_size``),
while BOS is never a target, so the readout has ``cfg.vocab_size`` outputs (``task.n_outputs``).

Masks: ``repeated`` = positions t whose target already followed the current token earlier in the
sequence (x_s = x_t and x_{s+1} = x_{t+1} for some s < t), which for this layout is exactly
t >= seg_len + 1; ``first`` = the first pass through the segment, positions 1..seg_len (position
0, BOS -> first token, is in neither).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from lab.errors import check
from lab.tasks.base import Batch, Task, TaskConfig, build_eval_sets, check_common, vmap_sequences


@dataclass
class RepeatConfig(TaskConfig):
    name: str = "repeat"
    vocab_size: int = 64  # random tokens 0..vocab_size-1; vocab_size is BOS
    seq_len: int = 32
    seg_len: int = 8  # distinct tokens per segment

    def validate(self) -> None:
        check_common(self)
        check(self.vocab_size >= 1, "task.vocab_size", self.vocab_size, "must be a positive integer")
        check(
            1 <= self.seg_len <= self.vocab_size,
            "task.seg_len",
            self.seg_len,
            f"must be in [1, task.vocab_size={self.vocab_size}] (the segment's tokens are distinct)",
        )
        check(
            self.seq_len >= self.seg_len + 2,
            "task.seq_len",
            self.seq_len,
            f"must be >= task.seg_len + 2 = {self.seg_len + 2} so that some token is repeated",
        )


class RepeatTask(Task):
    """Olsson's repeated random tokens. Evaluator: test."""

    key_metric = "test/repeated_acc"
    watch_metric = "test/repeated_loss"
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
        self.repeated_mask, self.first_mask = self._masks(cfg.seg_len)

    def _masks(self, seg_len):
        t = jnp.arange(self.cfg.seq_len)
        return (t >= seg_len + 1).astype(jnp.float32), ((t >= 1) & (t <= seg_len)).astype(jnp.float32)

    def _sequence(self, u, seg_len=None):
        """One sequence; ``seg_len``: a batched run's segment length (traced), else the config's."""
        cfg = self.cfg
        # seg_len distinct tokens, uniformly at random (the top of i.i.d. uniforms; a traced length takes
        # the first seg_len of the full ranking, the same tokens in the same order)
        if seg_len is None:
            segment = jax.lax.top_k(u["segment"], cfg.seg_len)[1].astype(jnp.int32)
            masks = (self.repeated_mask, self.first_mask)
            seg_len = cfg.seg_len
        else:
            segment = jax.lax.top_k(u["segment"], cfg.vocab_size)[1].astype(jnp.int32)
            masks = self._masks(seg_len)
        body = segment[jnp.arange(cfg.seq_len) % seg_len]
        x = jnp.concatenate([jnp.full(1, self.bos, jnp.int32), body])  # seq_len + 1 tokens
        return {
            "tokens": x[:-1],
            "targets": x[1:],
            "loss_mask": jnp.ones(cfg.seq_len, jnp.float32),
            "masks": {"repeated": masks[0], "first": masks[1]},
        }

    def sample(self, key: jax.Array, batch_size: int, data: dict | None = None) -> Batch:
        seg = None if not data else data["seg_len"]
        return vmap_sequences(self._sequence, key, batch_size, {"segment": (self.cfg.vocab_size,)}, seg)

    def run_data(self, values: dict) -> dict:
        return {"seg_len": jnp.int32(values["seg_len"])}

    def build_evals(self) -> dict[str, Batch]:
        size = self.cfg.eval_size
        return build_eval_sets(lambda k, _: self.sample(k, size), {"test": ()}, self.cfg.eval_seed)
