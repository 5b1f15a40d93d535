"""The hand-written backward passes of lab.kernels equal autodiff of the plain jax.numpy forms,
on the shapes the models use, under vmap (batched runs) and with masked (-inf) entries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lab import kernels


def plain_ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + eps) * w + b


def plain_nll(logits, targets, mask):
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def arrays(*shapes, seed=0):
    return [jax.random.normal(jax.random.PRNGKey(seed + i), s) for i, s in enumerate(shapes)]


CAUSAL = jnp.where(jnp.tril(jnp.ones((6, 6), bool)), 0.0, -jnp.inf)
CASES = {
    "matmul_nt": (kernels.matmul_nt, lambda a, b: jnp.einsum("...mk,...nk->...mn", a, b), [(2, 3, 6, 4), (2, 3, 5, 4)]),
    "matmul_nn": (kernels.matmul_nn, lambda a, b: a @ b, [(2, 3, 6, 5), (2, 3, 5, 4)]),
    "softmax (causal -inf)": (lambda x: kernels.softmax(x + CAUSAL), lambda x: jax.nn.softmax(x + CAUSAL, -1),
                              [(2, 3, 6, 6)]),
    "layer_norm": (kernels.layer_norm, plain_ln, [(4, 6, 8), (8,), (8,)]),
    "dense": (kernels.dense, lambda x, w: x @ w, [(4, 6, 8), (8, 5)]),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("vmapped", [False, True])
def test_kernel_values_and_gradients(name, vmapped):
    fast, plain, shapes = CASES[name]
    xs = arrays(*shapes)
    if vmapped:  # three runs' worth of every argument, as the trainer's vmap over runs sees them
        xs = [jnp.stack([x, 2 * x + 1, -x]) for x in xs]
        fast, plain = jax.vmap(fast), jax.vmap(plain)
    cot = jax.random.normal(jax.random.PRNGKey(9), plain(*xs).shape)
    np.testing.assert_allclose(fast(*xs), plain(*xs), rtol=1e-5, atol=1e-6)
    g_fast = jax.grad(lambda *a: jnp.sum(fast(*a) * cot), argnums=tuple(range(len(xs))))(*xs)
    g_plain = jax.grad(lambda *a: jnp.sum(plain(*a) * cot), argnums=tuple(range(len(xs))))(*xs)
    for gf, gp in zip(g_fast, g_plain, strict=True):
        assert np.all(np.isfinite(gf))
        np.testing.assert_allclose(gf, gp, rtol=1e-4, atol=1e-5)


def test_softmax_masked_entries_get_zero_probability_and_gradient():
    x = arrays((2, 6, 6))[0] + CAUSAL
    p = kernels.softmax(x)
    assert np.all(np.asarray(p)[:, np.triu_indices(6, 1)[0], np.triu_indices(6, 1)[1]] == 0)
    g = jax.grad(lambda s: jnp.sum(kernels.softmax(s + CAUSAL) ** 2))(arrays((2, 6, 6))[0])
    assert np.all(np.asarray(g)[:, np.triu_indices(6, 1)[0], np.triu_indices(6, 1)[1]] == 0)


@pytest.mark.parametrize("mask_kind", ["all", "some", "none"])
def test_masked_nll_value_and_gradient(mask_kind):
    logits = 3 * arrays((4, 7, 11))[0]
    targets = jax.random.randint(jax.random.PRNGKey(3), (4, 7), 0, 11)
    mask = {"all": jnp.ones((4, 7)), "some": (jnp.arange(7) % 3 == 0) * jnp.ones((4, 7)),
            "none": jnp.zeros((4, 7))}[mask_kind]
    np.testing.assert_allclose(kernels.masked_nll(logits, targets, mask), plain_nll(logits, targets, mask),
                               rtol=1e-6)
    gf = jax.grad(kernels.masked_nll)(logits, targets, mask)
    gp = jax.grad(plain_nll)(logits, targets, mask)
    np.testing.assert_allclose(gf, gp, rtol=1e-5, atol=1e-7)
    if mask_kind == "none":
        assert not np.any(np.asarray(gf))
    # a gradient step lowers the loss: the sign is right, not only the size
    if mask_kind != "none":
        before = float(kernels.masked_nll(logits, targets, mask))
        assert float(kernels.masked_nll(logits - 0.1 * gf, targets, mask)) < before
