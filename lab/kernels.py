"""The few operations that dominate a training step, with hand-written backward passes.

Each function computes exactly what its plain jax.numpy form computes; only the backward pass is
written out. Autodiff's version of these small, many-times-batched operations costs XLA on the CPU
several extra passes over memory (softmax and LayerNorm re-derive what the forward pass already
had; cross-entropy builds a one-hot scatter) or a matmul whose operand it must read transposed,
which its CPU dot handles several times more slowly than a plain layout. At the papers' sizes these
operations are most of a step; `make bench` ("models") measures the lab against a minimal step
written with autodiff throughout (bench/minimal.py).

None of them supports forward-mode differentiation (jax.jvp); nothing in the lab uses it.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def _swap_last(x):
    """x with its last two axes swapped, materialised (so the following dot reads a plain layout)."""
    return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


# ---- the attention's batched matmuls, [..., m, k] arrays ------------------------------------------
@jax.custom_vjp
def matmul_nt(a, b):
    """a @ b^T: [..., m, k] x [..., n, k] -> [..., m, n] (attention scores from queries and keys). As a
    differentiated function a and b share their leading axes (the backward pass does not sum broadcasts)."""
    return jnp.einsum("...mk,...nk->...mn", a, b)


def _nt_bwd(res, g):
    a, b = res
    return jnp.einsum("...mn,...nk->...mk", g, b), jnp.einsum("...nm,...mk->...nk", _swap_last(g), a)


matmul_nt.defvjp(lambda a, b: (matmul_nt(a, b), (a, b)), _nt_bwd)


@jax.custom_vjp
def matmul_nn(a, b):
    """a @ b: [..., m, k] x [..., k, n] -> [..., m, n] (attention pattern times values); a and b share their
    leading axes."""
    return jnp.einsum("...mk,...kn->...mn", a, b)


def _nn_bwd(res, g):
    a, b = res
    return matmul_nt(g, b), jnp.einsum("...km,...mn->...kn", _swap_last(a), g)


matmul_nn.defvjp(lambda a, b: (matmul_nn(a, b), (a, b)), _nn_bwd)


# ---- softmax over the last axis -----------------------------------------------------------------
@jax.custom_vjp
def softmax(x):
    """softmax over the last axis; -inf entries get probability 0. The backward pass reuses the
    probabilities: dx = p * (g - sum(g * p))."""
    e = jnp.exp(x - jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True)))
    return e / jnp.sum(e, axis=-1, keepdims=True)


def _softmax_fwd(x):
    p = softmax(x)
    return p, p


def _softmax_bwd(p, g):
    return (p * (g - jnp.sum(g * p, axis=-1, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


# ---- LayerNorm over the last axis ---------------------------------------------------------------
def _ln_parts(x, eps):
    mu = jnp.mean(x, -1, keepdims=True)
    xc = x - mu
    rstd = jax.lax.rsqrt(jnp.mean(xc * xc, -1, keepdims=True) + eps)
    return xc * rstd, rstd


def layer_norm(x, w, b, eps: float = 1e-5):
    """(x - mean) / sqrt(var + eps) * w + b over the last axis (w, b: [d])."""
    return _layer_norm(x, w, b, eps)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x, w, b, eps):
    return _ln_parts(x, eps)[0] * w + b


def _ln_fwd(x, w, b, eps):
    xhat, rstd = _ln_parts(x, eps)
    return xhat * w + b, (xhat, rstd, w)


def _ln_bwd(eps, res, g):
    xhat, rstd, w = res
    gw = g * w
    dx = rstd * (gw - jnp.mean(gw, -1, keepdims=True) - xhat * jnp.mean(gw * xhat, -1, keepdims=True))
    lead = tuple(range(g.ndim - 1))
    return dx, jnp.sum(g * xhat, axis=lead), jnp.sum(g, axis=lead)


_layer_norm.defvjp(_ln_fwd, _ln_bwd)


# ---- cross-entropy ------------------------------------------------------------------------------
@jax.custom_vjp
def masked_nll(logits, targets, mask):
    """Mean over ``mask`` of -log softmax(logits)[target]: logits [..., n] (float32), targets (int) and
    mask [...]. The backward pass is (softmax - onehot(target)) * mask / sum(mask), one pass over the
    logits; targets and mask get no gradient (they are data)."""
    return _nll_fwd(logits, targets, mask)[0]


def _nll_fwd(logits, targets, mask):
    m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    e = jnp.exp(logits - m)
    s = jnp.sum(e, axis=-1, keepdims=True)
    lse = (m + jnp.log(s))[..., 0]
    nll = lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    den = jnp.maximum(jnp.sum(mask), 1.0)
    return jnp.sum(nll * mask) / den, (e / s, targets, mask, den)


def _nll_bwd(res, g):
    p, targets, mask, den = res
    onehot = targets[..., None] == jnp.arange(p.shape[-1], dtype=targets.dtype)
    return (p - onehot) * (g * mask / den)[..., None], None, None


masked_nll.defvjp(_nll_fwd, _nll_bwd)


# ---- dense projections: [..., k] x [k, n] ---------------------------------------------------------
@jax.custom_vjp
def dense(x, w):
    """x @ w for x [..., k], w [k, n]. Its backward pass keeps XLA from fusing the output gradient's
    producer (the cross-entropy's softmax - onehot) into a transposed copy of it for the weight
    gradient, which on the CPU cost more than the matmul itself."""
    return x @ w


def _dense_bwd(res, g):
    x, w = res
    k, n = w.shape
    x2, g2 = x.reshape(-1, k), g.reshape(-1, n)
    return matmul_nt(g, w), jnp.einsum("mk,mn->kn", x2, g2)


dense.defvjp(lambda x, w: (dense(x, w), (x, w)), _dense_bwd)
