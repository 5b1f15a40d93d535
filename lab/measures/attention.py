"""Per-head attention measures: pure functions of (patterns, batch, task).

Each takes ``pattern`` [batch, head, query, key] of one layer and returns a [head] array.
The registry in ``lab.measures`` names them ``<measure>/L{l}H{h}``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def _mean(x, w):
    return jnp.sum(x * w, axis=(0, -1)) / jnp.maximum(jnp.sum(w, axis=(0, -1)), 1e-9)


def previous_token_score(pattern, batch=None, task=None, where=None):
    """Mean attention from position i to i - 1 (i >= 1); ``where`` [b, t]: only at these query positions."""
    diag = jnp.diagonal(pattern, offset=-1, axis1=-2, axis2=-1)  # [b, h, t-1]: (i, i-1)
    if where is None:
        return jnp.mean(diag, axis=(0, 2))
    w = jnp.asarray(where, jnp.float32)[:, None, 1:]  # [b, 1, t-1]
    return jnp.sum(diag * w, axis=(0, 2)) / jnp.maximum(jnp.sum(w, axis=(0, 2)), 1e-9)


def induction_targets(tokens) -> jnp.ndarray:
    """[b, q, k] 1 where key k is the token right after an earlier occurrence of the query's token."""
    b, t = tokens.shape
    prev = jnp.concatenate([jnp.full((b, 1), -1, tokens.dtype), tokens[:, :-1]], axis=1)
    qi, ki = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    return ((prev[:, None, :] == tokens[:, :, None]) & (ki >= 1) & (ki <= qi)).astype(jnp.float32)


def prefix_matching_score(pattern, batch, task=None, where=None):
    """Olsson: mean attention from each token to the token after its earlier occurrences (summed
    over those occurrences), over the positions that have an earlier occurrence (and are in ``where``
    [b, t], where given)."""
    tgt = induction_targets(batch["tokens"])
    mass = jnp.sum(pattern * tgt[:, None], axis=-1)  # [b, h, q]
    has = (jnp.sum(tgt, -1) > 0).astype(jnp.float32)[:, None, :]  # [b, 1, q]
    if where is not None:
        has = has * jnp.asarray(where, jnp.float32)[:, None, :]
    return jnp.sum(mass * has, axis=(0, 2)) / jnp.maximum(jnp.sum(has, axis=(0, 2)), 1e-9)


def _query_rows(pattern, task):
    q = np.asarray(task.query_positions)
    return pattern[:, :, q, :]  # [b, h, nq, k]


def _labels(task, t):
    lab = np.zeros(t, np.float32)
    lab[list(task.label_positions)] = 1.0
    return jnp.asarray(lab)


def induction_strength(pattern, batch, task):
    """Singh: at the query, attention to the correct label(s) minus to the incorrect ones, in [-1, 1]."""
    rows = _query_rows(pattern, task)
    match = batch["query_match"][:, None, None, :]
    other = (1.0 - batch["query_match"])[:, None, None, :] * _labels(task, pattern.shape[-1])
    return jnp.mean(jnp.sum(rows * match, -1) - jnp.sum(rows * other, -1), axis=(0, 2))


def tila(pattern, batch, task):
    """Reddy's TILA: attention from the query to the labels of items matching its class."""
    rows = _query_rows(pattern, task)
    return jnp.mean(jnp.sum(rows * batch["query_match"][:, None, None, :], -1), axis=(0, 2))


def tla(pattern, batch, task):
    """Reddy's TLA: attention from the query to all labels."""
    rows = _query_rows(pattern, task)
    return jnp.mean(jnp.sum(rows * _labels(task, pattern.shape[-1]), -1), axis=(0, 2))


def ila(pattern, batch, task):
    """Reddy's ILA: attention from each label to its own item (the position before it)."""
    lp = np.asarray(task.label_positions)
    return jnp.mean(pattern[:, :, lp, lp - 1], axis=(0, 2))


def entropy(pattern, batch=None, task=None):
    """Mean entropy (nats) of each head's attention rows."""
    p = jnp.clip(pattern, 1e-12, 1.0)
    return jnp.mean(-jnp.sum(jnp.where(pattern > 0, pattern * jnp.log(p), 0.0), -1), axis=(0, 2))
