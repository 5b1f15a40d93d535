"""Local learning coefficient (Lau et al.; Hoogland et al. 2024, as devinterp estimates it), by SGLD chains.

Around parameters w*, a chain samples the tempered, localised posterior
    p(w) ∝ exp(-nβ L(w) - γ/2 ||w - w*||²)
with steps  w <- w + ε/2 (-nβ ∇L_batch(w) - γ (w - w*)) + N(0, ε)  (SGLD), or their RMSProp-preconditioned form,
and the estimate is
    λ̂ = nβ (E_w[L(w)] - L(w*)),
over the draws after a burn-in, both losses on the same fresh batch at each step (paired: the difference has a
far smaller variance than either loss). nβ defaults to devinterp's ``default_nbeta``: b / ln b for a minibatch of
b. Chains are a mapped axis of one program, so many chains (and, in ``lab llc``, many checkpoints) cost one
compilation: vmapped side by side on an accelerator, one after another on the CPU (``map_chains``). Each chain's
loss trace, its fraction of draws whose loss is below the starting loss and a divergence check come with the
estimate; the estimate's error is the standard error over chains.

The SGLD update is blackjax's (``blackjax.sgld``: its overdamped Langevin integrator with step size ε/2 and the
drift of the localised, tempered log-density above is exactly this step). blackjax has no preconditioned SGLD
(its SG-MCMC kernels are sgld, sghmc, sgnht and csgld), so RMSProp-SGLD (Li et al. 2016's pSGLD without its
correction term, as devinterp's ``RMSpropSGLD``) is written here: the drift and the noise's variance scaled by
1 / (δ + sqrt(V̂)), V̂ the bias-corrected running mean of the squared tempered loss gradient. δ bounds the
preconditioner: at w* the gradient vanishes, and an unbounded 1/sqrt(V) would throw the first steps far off.

For a full-rank quadratic in d dimensions λ = d/2; for reduced-rank regression (a two-layer linear network)
Aoyagi and Watanabe's formula gives λ; both are recovered in the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from lab.errors import check

SAMPLERS = ("sgld", "rmsprop_sgld")


def default_nbeta(batch_size: int) -> float:
    """devinterp's default inverse temperature nβ for SGLD minibatches of ``batch_size``: b / ln b (1 for b <= 1)."""
    return batch_size / math.log(batch_size) if batch_size > 1 else 1.0


@dataclass(frozen=True)
class LLCSettings:
    """One LLC estimate's sampler settings (hashable: the estimator is compiled per settings)."""

    nbeta: float
    sampler: str = "sgld"
    eps: float = 1e-4  # ε, the SGLD step size (devinterp's lr)
    gamma: float = 100.0  # γ, the localisation strength
    chains: int = 4
    steps: int = 200  # per chain, burn-in included
    burn_in: int = 50  # steps discarded before the draws
    # rmsprop_sgld: V's decay. 0.999, not RMSProp's 0.99: a V that follows the chain (0.99 averages over ~100 steps,
    # about one mixing time) makes the preconditioner depend on w, which pSGLD without its correction term does not
    # allow for; on a quadratic in 4 dimensions 0.99 gave 2.29 and 0.999 1.94 for lambda = 2 (8 chains, se 0.07)
    rmsprop_alpha: float = 0.999
    rmsprop_delta: float = 0.1  # rmsprop_sgld: δ in 1 / (δ + sqrt(V)), the preconditioner's bound 1/δ

    @property
    def draws(self) -> int:
        return self.steps - self.burn_in

    def validate(self, names: dict[str, str]) -> None:
        """Check every setting; ``names`` says how the one-line error names each (``measures.llc_chains`` in a
        config, ``--chains`` on ``lab llc``'s command line)."""
        check(self.sampler in SAMPLERS, names["sampler"], self.sampler, f"one of {', '.join(SAMPLERS)}")
        check(self.chains >= 1, names["chains"], self.chains, "must be >= 1")
        check(self.steps >= 4, names["steps"], self.steps, "must be >= 4")
        check(0 <= self.burn_in < self.steps, names["burn_in"], self.burn_in,
              f"must be in [0, {names['steps']}={self.steps})")
        check(self.eps > 0, names["eps"], self.eps, "must be > 0")
        check(self.nbeta > 0, names["nbeta"], self.nbeta, "must be > 0")
        check(self.gamma >= 0, names["gamma"], self.gamma, "must be >= 0")


def map_chains(f, xs):
    """``f`` over the leading axis of ``xs`` (a pytree) inside one program: ``jax.lax.map`` vmapping all of them at
    once on an accelerator, one at a time on the CPU. On the CPU a vmapped chain is slower than a looped one and
    holds every chain's activations at once: the demo model's SGLD step took 10.1-11.5 ms per chain vmapped over 16
    checkpoints x 4 chains and 7.6-8.9 ms looped, in 810 and 16 MiB of XLA's temporary memory (2-core CPU,
    interleaved, 3 rounds; a one-off measurement): batched small matmuls run below the speed of single ones. An
    accelerator has the width to spare."""
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]
    return jax.lax.map(f, xs, batch_size=n if jax.default_backend() != "cpu" else 1)


def _normal_like(key, tree):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype)
                                                  for k, x in zip(keys, leaves, strict=True)])


def chain(loss_fn, params, sample_batch, key, s: LLCSettings, trainable=None):
    """One chain from ``params``: (loss [steps], the loss at ``params`` on the same batch [steps]).
    loss_fn(params, batch) -> scalar; sample_batch(key) -> batch; ``trainable``: bools like params (frozen
    parameters stay put)."""
    import blackjax

    mask = trainable if trainable is not None else jax.tree_util.tree_map(lambda _: True, params)
    tm = jax.tree_util.tree_map

    def step(carry, k):
        w, v, t = carry
        kb, kn = jax.random.split(k)
        batch = sample_batch(kb)
        loss, g = jax.value_and_grad(loss_fn)(w, batch)
        ref = loss_fn(params, batch)
        drift = tm(lambda wi, gi, pi: -(s.nbeta * gi + s.gamma * (wi - pi)), w, g, params)  # ∇ log p(w)
        if s.sampler == "sgld":
            # blackjax's overdamped Langevin step: w + (ε/2) drift + sqrt(ε) N(0, 1)
            new = blackjax.sgld(lambda pos, mb: drift).step(kn, w, None, 0.5 * s.eps)
        else:  # RMSProp-SGLD, hand-written (no blackjax kernel): preconditioner from the loss gradient's scale
            v = tm(lambda vi, gi: s.rmsprop_alpha * vi + (1 - s.rmsprop_alpha) * (s.nbeta * gi) ** 2, v, g)
            unbias = 1.0 - s.rmsprop_alpha ** (t + 1.0)
            pre = tm(lambda vi: 1.0 / (s.rmsprop_delta + jnp.sqrt(vi / unbias)), v)
            noise = _normal_like(kn, w)
            new = tm(lambda wi, di, gi, ni: wi + 0.5 * s.eps * gi * di + jnp.sqrt(s.eps * gi) * ni, w, drift, pre,
                     noise)
        w = tm(lambda ni, wi, mi: jnp.where(mi, ni, wi), new, w, mask)
        return (w, v, t + 1), (loss, ref)

    v0 = tm(jnp.zeros_like, params)
    _, (losses, refs) = jax.lax.scan(step, (params, v0, jnp.zeros((), jnp.int32)), jax.random.split(key, s.steps))
    return losses, refs


def estimate(loss_fn, params, sample_batch, key, s: LLCSettings, trainable=None) -> dict[str, jax.Array]:
    """``s.chains`` chains from ``params`` as one program (``map_chains``). Returns arrays (pure, jit- and vmap-able):
    ``llc`` [chains] (each chain's λ̂), ``mean``, ``std_err`` (over chains; 0 for one chain), ``loss`` and ``ref``
    [chains, steps] (the loss traces, and the starting parameters' loss on the same batches), ``below_start``
    [chains] (the fraction of draws whose loss is below the starting loss)."""
    keys = jax.random.split(key, s.chains)
    losses, refs = map_chains(lambda k: chain(loss_fn, params, sample_batch, k, s, trainable), keys)
    dl, dr = losses[:, s.burn_in:], refs[:, s.burn_in:]
    per_chain = s.nbeta * (jnp.mean(dl, axis=1) - jnp.mean(dr, axis=1))
    se = jnp.std(per_chain, ddof=1) / jnp.sqrt(s.chains) if s.chains > 1 else jnp.zeros(())
    return {"llc": per_chain, "mean": jnp.mean(per_chain), "std_err": se, "loss": losses, "ref": refs,
            "below_start": jnp.mean((dl < dr).astype(jnp.float32), axis=1)}


def _trend(rise: np.ndarray, batches: int = 10):
    """(the rise from first to last draw of a line through ``batches`` batch means, its t statistic), or None
    for too few draws. Batch means, not draws: successive draws are correlated, batch means far less."""
    n = len(rise) // batches
    if n < 2:
        return None
    means = rise[: n * batches].reshape(batches, n).mean(1)
    x = np.arange(batches) - (batches - 1) / 2
    slope = float(x @ means / (x @ x))
    resid = means - means.mean() - slope * x
    se = float(np.sqrt(resid @ resid / (batches - 2) / (x @ x)))
    return slope * (batches - 1), slope / max(se, 1e-12)


def diagnose(result: dict, s: LLCSettings, blowup: float = 10.0) -> list[str]:
    """What went wrong in which chain, one line each (an empty list: every chain looks usable):

    - a non-finite loss (the chain left for infinity: ε too large, or γ too small to hold it);
    - a loss that climbed far above the start (its largest draw more than ``blowup`` times the typical rise):
      the chain is escaping, not sampling a local posterior;
    - a trend through the draws (a line through 10 batch means rises by more than a quarter of the estimate
      from first draw to last, at t > 4 against the batch means' scatter about it): the chain has not reached
      its stationary level (too small an ε for the steps given, or too short a burn-in);
    - a negative estimate (the chain found lower loss than w*): w* is not a local minimum of the loss, or the
      chain did not move off it.
    """
    loss, ref = np.asarray(result["loss"]), np.asarray(result["ref"])
    out = []
    for c in range(loss.shape[0]):
        rise = (loss[c] - ref[c])[s.burn_in:] * s.nbeta
        bad = np.flatnonzero(~np.isfinite(loss[c]))
        if bad.size:
            out.append(f"chain {c}: loss not finite from step {bad[0]} (step size eps={s.eps:g} too large, or "
                       f"gamma={s.gamma:g} too small)")
            continue
        typical = max(abs(float(np.median(rise))), 1e-12)
        if rise.max() > blowup * typical and rise.max() > 1.0:
            out.append(f"chain {c}: nβ·(loss - start) reached {rise.max():.3g}, {rise.max() / typical:.0f}x its "
                       f"median {np.median(rise):.3g} (escaping: smaller eps={s.eps:g} or larger gamma={s.gamma:g})")
            continue
        trend = _trend(rise)
        if trend is not None and trend[0] > 0.25 * max(abs(rise.mean()), 1e-12) and trend[1] > 4:
            out.append(f"chain {c}: not stationary, its draws still rise by {trend[0]:.3g} from first to last "
                       f"(t = {trend[1]:.1f}, mean {rise.mean():.3g}): more steps or burn-in, or a larger "
                       f"eps={s.eps:g}")
            continue
        if rise.mean() < 0:
            out.append(f"chain {c}: negative estimate {rise.mean():.3g}: the parameters are not at a local minimum, "
                       "or the chain did not move off them")
    return out
