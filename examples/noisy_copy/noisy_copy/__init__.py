"""Your own experiment in one file: an induction-lab plug-in.

Everything here is the lab's public protocol (lab/plugins.py), used from outside the lab:

- a **task**, ``noisy_copy``: random distinct tokens in which one segment is copied once at random offsets
  (the repeat task's layouts), but each token of the second copy is replaced by a random token with
  probability ``noise``. An induction head still predicts the next token of the copy wherever the current
  token and its successor survived; ``noise`` is a data field, so runs that differ only in it train as one
  program (``'+task_values.noise=[0,0.2,0.4]'``);
- a **progress measure**, ``icl_gain``: nats the context saves on a copy, the test loss on the first copy's
  pairs minus that on the second copy's clean pairs (Olsson's in-context score, on this task's layouts);
- a **clamp value**, ``resample``: a site's activation replaced by another sequence's (the batch rolled by
  ``args.shift``, default 1): resample ablation, which keeps the activation's distribution and removes its
  information about this sequence;
- an **evaluator**, ``repeated_tokens``: Olsson's probe for any token task, random tokens whose second half
  repeats the first, logged as ``repeated_tokens/icl_score`` (second-half loss minus first-half loss).

``register()`` is the entry point (pyproject.toml): installed, ``lab train task=noisy_copy`` or
``lab train experiment=noisy_copy`` finds all four and this package's config groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp

import lab
from lab.errors import LabError, check
from lab.tasks.base import (
    Batch,
    Task,
    TaskConfig,
    build_eval_sets,
    check_common,
    eval_key,
    randint_from,
    standard_metrics,
    vmap_sequences,
)
from lab.tasks.layouts import copy_layout, length_table

CONFIGS = Path(__file__).parent / "configs"


# ---- the task ---------------------------------------------------------------------------------------
@dataclass
class NoisyCopyConfig(TaskConfig):
    name: str = "noisy_copy"
    vocab_size: int = 64  # random tokens 0..vocab_size-1; vocab_size is BOS
    seq_len: int = 32
    seg_min: int = 4  # segment lengths drawn per sequence
    seg_max: int = 10
    noise: float = 0.2  # probability that a token of the second copy is replaced by a random token

    def validate(self) -> None:
        check_common(self)
        half = self.seq_len // 2
        check(self.vocab_size >= self.seq_len, "task.vocab_size", self.vocab_size,
              f"must be >= task.seq_len={self.seq_len} (a sequence's tokens are distinct apart from the copy)")
        check(2 <= self.seg_min <= half, "task.seg_min", self.seg_min, f"must be in [2, task.seq_len // 2 = {half}]")
        check(self.seg_min <= self.seg_max <= half, "task.seg_max", self.seg_max,
              f"must be in [task.seg_min={self.seg_min}, {half}]")
        check(0.0 <= self.noise <= 1.0, "task.noise", self.noise, "a probability in [0, 1]")


class NoisyCopyTask(Task):
    """Repeated random tokens, the second copy corrupted token by token. Evaluator: test."""

    key_metric = "test/repeated_acc"
    watch_metric = "test/repeated_loss"
    mechanism_metric = "test/repeated_loss"  # what ablating the induction head should raise (circuit summary)
    mechanism_min_effect = 1.0
    data_fields = ("noise",)

    def __init__(self, cfg: NoisyCopyConfig):
        cfg.validate()
        self.cfg = cfg
        self.bos = cfg.vocab_size
        self.seq_len = cfg.seq_len
        self.vocab_size = cfg.vocab_size + 1  # embedding rows: the tokens and BOS
        self.n_outputs = cfg.vocab_size  # BOS is never a target
        self._table = length_table(list(range(cfg.seg_min, cfg.seg_max + 1)), cfg.seq_len // 2 + 1)

    def _draws(self) -> dict:
        n = self.cfg.seq_len
        return {"tokens": (max(self.cfg.vocab_size, n),), "length": (), "bars": (n + 2,), "flip": (n + 1,),
                "swap": (n + 1,)}

    def _sequence(self, u, noise):
        x, masks = copy_layout(u, self.cfg.seq_len, self.cfg.vocab_size, self._table, self.bos)
        pairs = masks["repeated"]  # positions t of the second copy whose successor t + 1 is in it too
        off = jnp.zeros(1, bool)
        second = jnp.concatenate([pairs, off]) | jnp.concatenate([off, pairs])  # positions of x in the copy
        corrupt = second & (u["flip"] < noise)
        x = jnp.where(corrupt, randint_from(u["swap"], 0, self.cfg.vocab_size), x)
        clean = pairs & ~corrupt[:-1] & ~corrupt[1:]  # both the token and its successor survived
        return {
            "tokens": x[:-1],
            "targets": x[1:],
            "loss_mask": jnp.ones(self.cfg.seq_len, jnp.float32),
            "masks": {"repeated": clean.astype(jnp.float32), "first": masks["first"].astype(jnp.float32)},
        }

    def sample(self, key: jax.Array, batch_size: int, data: dict | None = None) -> Batch:
        noise = data["noise"] if data else self.cfg.noise
        return vmap_sequences(lambda u: self._sequence(u, noise), key, batch_size, self._draws())

    def build_evals(self) -> dict[str, Batch]:
        def sample(key, noise):
            return vmap_sequences(lambda u: self._sequence(u, noise), key, self.cfg.eval_size, self._draws())

        return build_eval_sets(sample, {"test": jnp.float32(self.cfg.noise)}, self.cfg.eval_seed)


# ---- a progress measure --------------------------------------------------------------------------------
def icl_gain(params, model, task) -> jax.Array:
    """Nats the context saves on the copy: the loss on the first copy's pairs minus that on the second's."""
    batch = jax.tree_util.tree_map(lambda a: a[:128], task.evals["test"])
    m = task.metrics(model.apply(params, batch), batch)
    if "first_loss" not in m or "repeated_loss" not in m:
        raise LabError(f"measure icl_gain: needs a task with 'first' and 'repeated' masks; {task.cfg.name} has "
                       f"{sorted(batch.get('masks', {}))}")
    return m["first_loss"] - m["repeated_loss"]


# ---- a clamp value ----------------------------------------------------------------------------------
def resample(x, inputs) -> jax.Array:
    """Another sequence's activation: the batch rolled by ``args.shift`` (default 1)."""
    return jnp.roll(x, int(inputs.spec.args.get("shift", 1)), axis=0)


# ---- an evaluator -----------------------------------------------------------------------------------
def repeated_tokens(task) -> Batch:
    """Random tokens whose second half repeats the first (256 sequences, fixed by the task's eval_seed)."""
    if task.classification or task.feature_dim:
        raise LabError(f"evaluators: repeated_tokens needs a token task; {task.cfg.name} is not one")
    t, vocab = task.seq_len, task.n_outputs
    half = (t + 2) // 2  # two copies of half tokens cover the t + 1 of tokens and targets
    first = jax.random.randint(eval_key(task.cfg.eval_seed, "repeated_tokens"), (256, half), 0, vocab, jnp.int32)
    x = jnp.concatenate([first, first], axis=1)[:, : t + 1]
    pos = jnp.arange(t)
    return {"tokens": x[:, :-1], "targets": x[:, 1:], "loss_mask": jnp.ones((256, t), jnp.float32),
            "masks": {"first_half": jnp.broadcast_to((pos < half - 1).astype(jnp.float32), (256, t)),
                      "second_half": jnp.broadcast_to((pos >= half).astype(jnp.float32), (256, t))}}


def repeated_tokens_metrics(logits, batch) -> dict:
    m = standard_metrics(logits, batch)
    return {"loss": m["loss"], "icl_score": m["second_half_loss"] - m["first_half_loss"],
            "second_half_acc": m["second_half_acc"]}


def register() -> None:
    """The entry point: register the task (with this package's config groups), the measure, the clamp value
    and the evaluator."""
    lab.register_task("noisy_copy", NoisyCopyConfig, NoisyCopyTask, configs=CONFIGS)
    lab.register_measure("icl_gain", icl_gain)
    lab.register_clamp_value("resample", resample)
    lab.register_evaluator("repeated_tokens", repeated_tokens, metrics=repeated_tokens_metrics)
