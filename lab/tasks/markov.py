"""In-context Markov chains (Edelman et al. 2024; docs/science.md §1.4).

Each sequence gets its own transition matrix P over k states:
- ``standard``: each row ~ Dirichlet(1);
- ``doubly_stochastic``: a Dirichlet(1)-weighted convex combination of all k! permutation matrices
  (k <= 5), so rows and columns sum to 1 and the stationary law is uniform;
- ``unigram``: every row equal to one Dirichlet(1) draw (the next state ignores the current one).
The first state comes from the stationary law pi of P (solving pi (I - P + J) = 1); then
x_{t+1} ~ P[x_t]. tokens = x[:-1], targets = x[1:], target_probs[t] = P[x_t].
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from lab.errors import check
from lab.tasks.base import (
    Batch,
    Task,
    TaskConfig,
    build_eval_sets,
    categorical_from,
    check_common,
    standard_metrics,
    vmap_sequences,
)

VARIANTS = ("standard", "doubly_stochastic", "unigram")
MAX_DOUBLY_STATES = 5


def dirichlet1_from(u: jax.Array) -> jax.Array:
    """Dirichlet(1, ..., 1) draws over the last axis from U(0, 1) numbers: normalised exponentials."""
    e = -jnp.log(u)
    return e / jnp.sum(e, axis=-1, keepdims=True)


def stationary_jax(P: jax.Array) -> jax.Array:
    """Stationary law pi of a row-stochastic [k, k] matrix: solves pi (I - P + J) = 1."""
    k = P.shape[-1]
    A = jnp.eye(k, dtype=P.dtype) - P + jnp.ones((k, k), P.dtype)
    pi = jnp.linalg.solve(A.T, jnp.ones(k, P.dtype))
    pi = jnp.clip(pi, 0.0, None)
    return pi / jnp.sum(pi)


@dataclass
class MarkovConfig(TaskConfig):
    name: str = "markov"
    n_states: int = 2
    seq_len: int = 100
    variant: str = "standard"  # standard | doubly_stochastic | unigram

    def validate(self) -> None:
        check_common(self)
        check(self.n_states >= 2, "task.n_states", self.n_states, "must be >= 2")
        check(self.seq_len >= 1, "task.seq_len", self.seq_len, "must be a positive integer")
        check(self.variant in VARIANTS, "task.variant", self.variant, "one of " + ", ".join(VARIANTS))
        if self.variant == "doubly_stochastic":
            check(
                self.n_states <= MAX_DOUBLY_STATES,
                "task.n_states",
                self.n_states,
                f"must be <= {MAX_DOUBLY_STATES} with variant=doubly_stochastic"
                " (a mix of all k! permutations)",
            )


class MarkovTask(Task):
    """Edelman's in-context Markov chains. Evaluator: test."""

    key_metric = "test/acc"
    watch_metric = "test/loss"
    # the circuit summary: the bigram (statistical induction) strategy beats the in-context unigram one by
    # a few hundredths of a nat per token at k = 2 (Edelman's plateau to final), which ablating the head undoes
    mechanism_metric = "test/loss"
    mechanism_min_effect = 0.02

    def __init__(self, cfg: MarkovConfig):
        cfg.validate()
        self.cfg = cfg
        k = cfg.n_states
        self.seq_len = cfg.seq_len
        self.vocab_size = k
        self.n_outputs = k
        if cfg.variant == "doubly_stochastic":
            perms = list(itertools.permutations(range(k)))
            self.perm_matrices = jnp.asarray(np.eye(k, dtype=np.float32)[np.array(perms)])  # [k!, k, k]

    def _matrix_draws(self) -> tuple[int, ...]:
        k = self.cfg.n_states
        if self.cfg.variant == "standard":
            return (k, k)
        if self.cfg.variant == "unigram":
            return (k,)
        return (self.perm_matrices.shape[0],)

    def _draws(self) -> dict[str, tuple[int, ...]]:
        k = self.cfg.n_states
        return {"P": self._matrix_draws(), "x0": (k,), "steps": (self.cfg.seq_len, k)}

    def transition_matrix(self, u: jax.Array) -> jax.Array:
        """One sequence's transition matrix [k, k] (rows sum to 1) from U(0, 1) numbers of shape
        ``self._matrix_draws()``."""
        k = self.cfg.n_states
        if self.cfg.variant == "standard":
            return dirichlet1_from(u)
        if self.cfg.variant == "unigram":
            return jnp.broadcast_to(dirichlet1_from(u), (k, k))
        return jnp.einsum("p,pij->ij", dirichlet1_from(u), self.perm_matrices)

    def _sequence(self, u):
        """One sequence from its uniform draws ``u`` (shapes ``self._draws()``)."""
        T = self.cfg.seq_len
        P = self.transition_matrix(u["P"])
        pi = stationary_jax(P)
        logP = jnp.log(P)
        x0 = categorical_from(u["x0"], jnp.log(pi))

        def step(x, u_t):
            nxt = categorical_from(u_t, logP[x])
            return nxt, (x, nxt)

        _, (xs, nxts) = jax.lax.scan(step, x0, u["steps"])
        batch = {
            "tokens": xs,
            "targets": nxts,
            "loss_mask": jnp.ones(T, jnp.float32),
            "masks": {},
            "target_probs": P[xs],
        }
        return batch, {"P": P, "pi": pi}

    def sample_with_matrices(self, key: jax.Array, batch_size: int):
        """A batch and ``info``: transition matrices ``P`` [B, k, k] and stationary laws ``pi`` [B, k]."""
        return vmap_sequences(self._sequence, key, batch_size, self._draws())

    def sample(self, key: jax.Array, batch_size: int) -> Batch:
        return self.sample_with_matrices(key, batch_size)[0]

    def metrics(self, logits, batch):
        """The standard metrics plus Edelman's strategy distances: ``kl_uniform``, ``kl_unigram``,
        ``kl_bigram`` = mean over positions of KL(strategy || model)."""
        out = standard_metrics(logits, batch)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        for name, p in strategies(batch["tokens"], self.cfg.n_states).items():
            kl = jnp.sum(p * (jnp.log(p) - logp), axis=-1)
            out[f"kl_{name}"] = jnp.mean(kl)
        return out


    def build_evals(self) -> dict[str, Batch]:
        size = self.cfg.eval_size
        return build_eval_sets(lambda k, _: self.sample(k, size), {"test": ()}, self.cfg.eval_seed)


def strategies(tokens: jax.Array, k: int) -> dict[str, jax.Array]:
    """Edelman's reference predictors of x_{t+1} from x_0..x_t, each [B, T, k]: uniform 1/k;
    in-context unigram (count + 1)/(t + 1 + k); in-context bigram (n(x_t -> j) + 1)/(n(x_t) + k),
    the Bayes-optimal predictor under the Dirichlet(1) prior."""
    x = jax.nn.one_hot(tokens, k)  # [B, T, k]
    b, t = tokens.shape
    uniform = jnp.full((b, t, k), 1.0 / k)
    counts = jnp.cumsum(x, axis=1)
    unigram = (counts + 1.0) / (jnp.arange(1, t + 1, dtype=jnp.float32)[None, :, None] + k)
    pairs = jnp.einsum("bti,btj->btij", x[:, :-1], x[:, 1:])  # transitions s -> s+1
    seen = jnp.concatenate([jnp.zeros((b, 1, k, k)), jnp.cumsum(pairs, axis=1)], axis=1)  # before position t
    row = jnp.einsum("bti,btij->btj", x, seen)  # counts of transitions out of x_t seen so far
    bigram = (row + 1.0) / (jnp.sum(row, -1, keepdims=True) + k)
    return {"uniform": uniform, "unigram": unigram, "bigram": bigram}
