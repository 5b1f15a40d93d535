"""Local learning coefficient (Lau et al.; Hoogland et al. 2024, as in devinterp), estimated by SGLD.

Around parameters w*, SGLD samples the tempered, localised posterior
    p(w) ∝ exp(-n β L(w) - γ/2 ||w - w*||²),   β = 1 / log n,
with steps  w <- w - ε/2 (n β ∇L_batch(w) + γ (w - w*)) + N(0, ε),  and the estimate is
    λ̂ = n β (E_w[L(w)] - L(w*)),
both losses on the same fresh batches, draws after a burn-in. For a full-rank quadratic loss in d
dimensions λ = d/2 (tested); stage boundaries of training show as bends in λ̂ over checkpoints.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def estimate_llc(loss_fn, params, sample_batch, key, steps: int = 200, eps: float = 1e-4, gamma: float = 100.0,
                 n: int = 10000, burn_in: float = 0.25, trainable=None) -> jax.Array:
    """λ̂ at ``params``. loss_fn(params, batch) -> scalar; sample_batch(key) -> batch; ``trainable``:
    a pytree of bools like params (frozen parameters stay put)."""
    beta = 1.0 / math.log(n)
    mask = trainable if trainable is not None else jax.tree_util.tree_map(lambda _: True, params)
    leaves, treedef = jax.tree_util.tree_flatten(params)

    def step(w, k):
        kb, kn = jax.random.split(k)
        batch = sample_batch(kb)
        loss, g = jax.value_and_grad(loss_fn)(w, batch)
        ref = loss_fn(params, batch)
        nk = jax.random.split(kn, len(leaves))
        noise = jax.tree_util.tree_unflatten(
            treedef, [jax.random.normal(q, x.shape, x.dtype) for q, x in zip(nk, leaves, strict=True)])

        def move(wi, gi, pi, ni, mi):
            new = wi - 0.5 * eps * (n * beta * gi + gamma * (wi - pi)) + jnp.sqrt(eps) * ni
            return jnp.where(mi, new, wi)

        w = jax.tree_util.tree_map(move, w, g, params, noise, mask)
        return w, (loss, ref)

    _, (losses, refs) = jax.lax.scan(step, params, jax.random.split(key, steps))
    start = int(burn_in * steps)
    return n * beta * (jnp.mean(losses[start:]) - jnp.mean(refs[start:]))
