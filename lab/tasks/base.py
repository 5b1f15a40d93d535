"""What every task provides, and the metrics shared by all of them.

A *batch* is a dict of arrays with a leading batch axis B and sequence axis T:

- ``tokens``        int32   [B, T]   ids into the model's token embedding (``task.vocab_size`` rows).
- ``features``      float32 [B, T, F] continuous inputs (only when ``task.feature_dim > 0``).
- ``is_feature``    bool    [B, T]   where ``features`` (not ``tokens``) feed the model.
- ``targets``       int32   [B, T]   class to predict at each position, in [0, task.n_outputs).
- ``loss_mask``     float32 [B, T]   1 where the training loss counts.
- ``masks``         dict name -> float32 [B, T]: extra position sets scored by the evaluators
                    (e.g. the bigram task's ``icl`` and ``global``).
- ``context_labels`` float32 [B, n_outputs]  (classification tasks) multi-hot of the labels
                    present in the context.
- ``query_match``   float32 [B, T]   (classification tasks) 1 at the context label positions
                    whose item has the query's class: where a perfect induction head attends.
- ``target_probs``  float32 [B, T, n_outputs] (markov) the true next-token distribution.

Samplers are pure JAX: ``sample(key, batch_size)`` runs under ``jit`` and ``vmap`` with no
Python loop per sequence. Evaluation sets are fixed: built once from ``eval_seed``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lab.errors import check

Batch = dict


@dataclass
class TaskConfig:
    """Fields every task config has."""

    name: str = "?"
    eval_size: int = 1000  # sequences per evaluation set
    eval_seed: int = 12345  # evaluation sets are a pure function of this

    def validate(self) -> None:
        """Check every value (a task's config extends this with its own fields)."""
        check_common(self)


class Task:
    """Base class. Subclasses set the attributes below and implement ``sample``/``build_evals``."""

    cfg: TaskConfig
    seq_len: int
    vocab_size: int  # rows of the token embedding
    feature_dim: int = 0  # width of continuous inputs, 0 if none
    n_outputs: int  # width of the readout
    # Static positions (classification tasks); empty for token tasks.
    query_positions: tuple[int, ...] = ()
    label_positions: tuple[int, ...] = ()
    item_positions: tuple[int, ...] = ()
    # The only positions where ``is_feature`` can be True (None: any); the model projects features there alone.
    feature_positions: tuple[int, ...] | None = None
    # Metric shown in the progress bar, and the curve the phase detector watches.
    key_metric: str = "train/acc"
    watch_metric: str = "train/loss"
    # The circuit summary (lab.measures.mechanism), for token tasks: the loss that ablating the induction
    # head should raise (None: no summary), by at least this many nats; and, where the task has held-out
    # layouts, (held-out metric, trained metric) that an induction circuit keeps close.
    mechanism_metric: str | None = None
    mechanism_min_effect: float = 1.0
    heldout_gap: tuple[str, str] | None = None

    def circuit_positions(self, batch: Batch):
        """Where the circuit summary looks, on this task's own sequences: (previous-token query positions,
        induction query positions), each [b, t]; None (the default) measures on random tokens with a copied
        segment instead (lab.measures.repeated_probe), where every repeat is an induction target."""
        return None
    def token_probe(self, key: jax.Array, n: int) -> Batch:
        """``n`` sequences of random tokens with one copied segment, where prefix matching is measured
        (lab.measures.repeated_probe over every output id); a task may draw from fewer ids (a corpus: its
        frequent tokens, whose embeddings training has shaped)."""
        from lab.measures import repeated_probe  # lab.measures imports the tasks' layouts

        return repeated_probe(key, n, self.seq_len, self.n_outputs, getattr(self, "bos", None))

    def picture_probe(self) -> Batch:
        """The one sequence the attention pictures show at every checkpoint (lab.pictures), as a batch of one: the
        first sequence of the first evaluation set."""
        first = next(iter(self.evals.values()))
        return jax.tree_util.tree_map(lambda a: a[:1], first)

    # Whether `loss_mask` selects a handful of query positions (classification) or many tokens.
    classification: bool = False
    # What the task's data came from (a corpus's files, tokens and content key), recorded in summary.json as ``data``.
    info: dict = {}
    # Measures that ``measures.names=[auto]`` adds for this task (e.g. the bigram task's memory_recall).
    auto_measures: tuple[str, ...] = ()

    def memory_tables(self) -> dict:
        """What Bietti's associative-memory probes (the ``memory_recall`` measure) read from the task: the fixed
        ``triggers`` (ids) where the task has them, and the ``bigram_law`` [V, V] that ff1 stores; {} if none."""
        return {}

    # Config fields the training sampler can take as traced numbers (``sample(..., data={field: x})``),
    # so batched runs that differ only in them train as one program (``task_values``, lab.batch).
    data_fields: tuple[str, ...] = ()

    def sample(self, key: jax.Array, batch_size: int) -> Batch:  # pragma: no cover - abstract
        """A training batch. Tasks with ``data_fields`` also take ``data``: those fields' values, possibly
        traced, in place of the config's."""
        raise NotImplementedError

    def run_data(self, values: dict) -> dict:
        """What ``sample`` reads as ``data`` for a batched run whose data fields have these ``values``
        (numbers by default; a task may precompute arrays from them, e.g. a class law)."""
        return {k: jnp.float32(v) for k, v in values.items()}

    def build_evals(self) -> dict[str, Batch]:  # pragma: no cover - abstract
        """Fixed evaluation sets by evaluator name, built from ``cfg.eval_seed``."""
        raise NotImplementedError

    @cached_property
    def evals(self) -> dict[str, Batch]:
        return self.build_evals()

    def metrics(self, logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
        return standard_metrics(logits, batch)


def _masked_mean(x, mask):
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def standard_metrics(logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    """loss/acc on ``loss_mask``; the same on each extra mask; classification and KL extras."""
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    targets = batch["targets"]
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    pred = jnp.argmax(logits, axis=-1)
    correct = (pred == targets).astype(jnp.float32)
    out = {}
    m = batch["loss_mask"]
    out["loss"] = _masked_mean(nll, m)
    out["acc"] = _masked_mean(correct, m)
    for name, mk in batch.get("masks", {}).items():
        out[f"{name}_loss"] = _masked_mean(nll, mk)
        out[f"{name}_acc"] = _masked_mean(correct, mk)
    if "context_labels" in batch:
        ctx = batch["context_labels"][:, None, :]  # [B, 1, n_out]
        # in-context accuracy: argmax restricted to labels present in the context
        ic_pred = jnp.argmax(jnp.where(ctx > 0, logits, -jnp.inf), axis=-1)
        out["ic_acc"] = _masked_mean((ic_pred == targets).astype(jnp.float32), m)
        # context-label accuracy: the prediction is one of the context labels
        in_ctx = jnp.take_along_axis(jnp.broadcast_to(ctx, logits.shape), pred[..., None], -1)[..., 0]
        out["cla"] = _masked_mean(in_ctx, m)
        out["ctx_prob"] = _masked_mean(jnp.sum(jnp.exp(logp) * ctx, axis=-1), m)
    if "target_probs" in batch:
        p = batch["target_probs"]
        kl = jnp.sum(jnp.where(p > 0, p * (jnp.log(jnp.where(p > 0, p, 1.0)) - logp), 0.0), axis=-1)
        out["kl"] = _masked_mean(kl, m)
    return out


def zipf_logits(n: int, alpha: float) -> jax.Array:
    """Log-probabilities of a Zipf law P(k) ∝ (k+1)^-alpha over n classes (alpha=0: uniform)."""
    ranks = jnp.arange(1, n + 1, dtype=jnp.float32)
    return -alpha * jnp.log(ranks)


LN2 = math.log(2.0)


def eval_key(seed: int, name: str) -> jax.Array:
    """The fixed PRNG key of evaluator ``name``: a pure function of ``seed`` and the name."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def sample_evaluators(
    sample: Callable[[jax.Array, Any], Any], keys: dict[str, jax.Array], settings: dict[str, Any]
) -> dict[str, Any]:
    """``{name: sample(keys[name], settings[name])}`` as one ``lax.map`` over the evaluators.

    ``settings[name]`` are pytrees of numbers or arrays with the same structure and shapes for every
    evaluator (e.g. probabilities, flags, padded index tables), so all evaluators share one traced
    sampler: one compilation however many evaluators a task has."""
    names = list(settings)
    stacked_keys = jnp.stack([keys[n] for n in names])
    stacked = jax.tree_util.tree_map(
        lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *[settings[n] for n in names]
    )
    out = jax.lax.map(lambda ks: sample(*ks), (stacked_keys, stacked))
    return {n: jax.tree_util.tree_map(lambda x, i=i: x[i], out) for i, n in enumerate(names)}


def build_eval_sets(
    sample: Callable[[jax.Array, Any], Batch], settings: dict[str, Any], seed: int
) -> dict[str, Batch]:
    """Fixed evaluation sets ``{name: sample(eval_key(seed, name), settings[name])}`` in one jitted
    call, in the order of ``settings``."""
    keys = {name: eval_key(seed, name) for name in settings}
    out = jax.jit(lambda ks: sample_evaluators(sample, ks, settings))(keys)
    return {name: out[name] for name in settings}


def check_common(cfg: TaskConfig) -> None:
    """Validate the fields every task config has (``eval_size``)."""
    check(cfg.eval_size >= 1, "task.eval_size", cfg.eval_size, "must be a positive integer")


# --- Random draws from one PRNG call ------------------------------------------------------------
# Every jax.random call compiles its own copy of the threefry hash (tenths of a second of XLA CPU
# compile time each, more under a vmap of keys), so the samplers draw one block of U(0, 1) numbers
# per batch and derive every random quantity of a sequence from slices of its row.


def _unpack(u: jax.Array, shapes: dict[str, tuple[int, ...]]) -> dict[str, jax.Array]:
    out, i = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        out[name] = u[i : i + n].reshape(shape)
        i += n
    return out


def vmap_sequences(
    fn: Callable[..., Any], key: jax.Array, batch_size: int, shapes: dict[str, tuple[int, ...]], *args
) -> Any:
    """``fn(draws, *args)`` for ``batch_size`` sequences, vmapped; each sequence's ``draws`` are
    independent U(0, 1) arrays of the given shapes, all from one PRNG call for the whole batch
    (a vmap of per-sequence keys would compile the PRNG hash several times more slowly)."""
    total = sum(math.prod(s) for s in shapes.values())
    u = jax.random.uniform(
        key, (batch_size, total), jnp.float32, minval=jnp.finfo(jnp.float32).tiny, maxval=1.0
    )
    return jax.vmap(lambda row: fn(_unpack(row, shapes), *args))(u)


def gumbel_from(u: jax.Array) -> jax.Array:
    """Standard Gumbel noise from U(0, 1) numbers."""
    return -jnp.log(-jnp.log(u))


def normal_from(u: jax.Array) -> jax.Array:
    """Standard normal numbers from U(0, 1) numbers (inverse CDF)."""
    lo = jnp.nextafter(jnp.float32(-1.0), jnp.float32(0.0))
    return jnp.float32(math.sqrt(2.0)) * jax.lax.erf_inv(jnp.clip(2.0 * u - 1.0, lo, -lo))


def randint_from(u: jax.Array, low, high) -> jax.Array:
    """Integers uniform in [low, high) from U(0, 1) numbers (int32)."""
    n = high - low
    return (low + jnp.minimum(jnp.floor(u * n), n - 1)).astype(jnp.int32)


def permutation_from(u: jax.Array) -> jax.Array:
    """A uniformly random permutation of range(len(u)) (int32)."""
    return jnp.argsort(u).astype(jnp.int32)


def categorical_from(u: jax.Array, logits: jax.Array) -> jax.Array:
    """Samples of softmax(logits) over the last axis, one per row of ``u`` (same shape as logits)."""
    return jnp.argmax(logits + gumbel_from(u), axis=-1).astype(jnp.int32)


def cdf_table(probs) -> jax.Array:
    """Cumulative sums over the last axis of (unnormalised) probabilities, normalised, last entry 1."""
    p = np.asarray(probs, np.float64)
    c = np.cumsum(p, axis=-1) / p.sum(axis=-1, keepdims=True)
    c[..., -1] = 1.0
    return jnp.asarray(c, jnp.float32)


def inverse_cdf_from(u: jax.Array, cdf: jax.Array) -> jax.Array:
    """Samples of the law with cumulative table ``cdf`` [n] (see ``cdf_table``), one per entry of ``u``."""
    return jnp.minimum(jnp.sum(u[..., None] >= cdf, axis=-1), cdf.shape[-1] - 1).astype(jnp.int32)


def choice_from(u: jax.Array, logits: jax.Array, k: int) -> jax.Array:
    """k distinct indices drawn without replacement from softmax(logits) (Gumbel top-k); u like logits."""
    return jax.lax.top_k(logits + gumbel_from(u), k)[1].astype(jnp.int32)
