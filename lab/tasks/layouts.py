"""Layouts of a copied segment among random tokens: the repeat task's sequences and the prefix-matching probe
(lab.measures.repeated_probe) share them, so a head scored as an induction head is scored on the layouts the
repeat task trains on."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lab.tasks.base import randint_from


def length_table(lengths: list[int], size: int) -> dict:
    """Lengths as a padded table a traced sampler indexes: {lengths [size], count}."""
    pad = lengths + [lengths[-1]] * (size - len(lengths))
    return {"lengths": jnp.asarray(pad, jnp.int32), "count": jnp.int32(len(lengths))}


def copy_layout(u: dict, n: int, vocab: int, table: dict, bos: int):
    """BOS and n tokens in which one segment (its length drawn from ``table``) is copied once, both
    copies at random offsets, every other token distinct (when vocab >= n; else tokens repeat mod vocab).

    ``u``: U(0, 1) draws {"tokens": [max(vocab, n)], "length": [], "bars": [n + 2]}. Returns x [n + 1]
    and the masks of the positions of x[:-1] (``repeated``: in the second copy with the successor in it
    too; ``first``: the same pairs in the first copy)."""
    length = table["lengths"][randint_from(u["length"], 0, table["count"])]
    free = n - 2 * length  # filler tokens, split uniformly into prefix, gap and suffix (stars and bars:
    # two distinct bar slots among free + 2)
    slots = jnp.where(jnp.arange(n + 2) < free + 2, u["bars"], -1.0)
    bars = jnp.sort(jax.lax.top_k(slots, 2)[1])
    prefix, gap = bars[0], bars[1] - bars[0] - 1
    j = jnp.arange(n)  # body position; x[j + 1]
    second = (j >= prefix + length + gap) & (j < prefix + 2 * length + gap)
    tokens = jax.lax.top_k(u["tokens"], n)[1].astype(jnp.int32) % vocab  # n distinct tokens where vocab allows
    body = tokens[jnp.where(second, j - length - gap, j)]
    x = jnp.concatenate([jnp.full(1, bos, jnp.int32), body])
    t = jnp.arange(n)  # positions of x[:-1]
    s1, s2 = prefix + 1, prefix + length + gap + 1  # where the copies start, in x
    masks = {"repeated": (t >= s2) & (t <= s2 + length - 2), "first": (t >= s1) & (t <= s1 + length - 2)}
    return x, masks
