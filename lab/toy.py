"""Singh et al.'s toy model of the plateau (docs/science.md §3): fit a rank-1 tensor a ⊗ b ⊗ c by gradient descent.

The target is T = a* ⊗ b* ⊗ c* with unit vectors in ``dim`` dimensions; the model starts from
small random a, b, c. The gradient for each factor is scaled by the overlap of the other two
with their targets, so all three start slowly and must grow together: a plateau, then an
abrupt drop. Clamping b and c to their true values after every step (the toy's "clamp")
removes the plateau, as clamping subcircuits removes it in the transformer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rank1_run(seed: int = 0, dim: int = 20, steps: int = 3000, lr: float = 0.05, init_scale: float = 0.05,
              clamp: tuple[str, ...] = ()) -> jax.Array:
    """Loss per step of gradient descent on ||a⊗b⊗c - T||² / 2; ``clamp`` names factors reset to
    their true values after every step (e.g. ("b", "c"))."""
    ka, kb, kc, ki = jax.random.split(jax.random.PRNGKey(seed), 4)

    def unit(k):
        v = jax.random.normal(k, (dim,))
        return v / jnp.linalg.norm(v)

    true = {"a": unit(ka), "b": unit(kb), "c": unit(kc)}
    target = jnp.einsum("i,j,k->ijk", true["a"], true["b"], true["c"])
    init = dict(zip("abc", init_scale * jax.random.normal(ki, (3, dim)) / jnp.sqrt(dim), strict=True))

    def loss(f):
        return 0.5 * jnp.sum((jnp.einsum("i,j,k->ijk", f["a"], f["b"], f["c"]) - target) ** 2)

    def fix(f):
        return {k: (true[k] if k in clamp else v) for k, v in f.items()}

    def step(f, _):
        f = fix(f)
        val, g = jax.value_and_grad(loss)(f)
        return {k: f[k] - lr * g[k] for k in f}, val

    _, losses = jax.jit(lambda f: jax.lax.scan(step, f, None, length=steps))(init)
    return losses
