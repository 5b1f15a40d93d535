"""The benchmark's yardstick: a minimal hand-written JAX training step of the same model and batch.

No framework, no hooks, no logging, no lax.scan: the forward pass written the obvious way (one
einsum per projection and head layout, as in most research code), plain optax, the batch sampled
inside the jitted step by the task's own sampler, one jitted step per Python call. It reads the
lab's parameter pytree so the model is the same one, initialised the same way.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from lab.model import merge_consts, rope


def layer_norm(x, w, b, eps=1e-5):
    mu = jnp.mean(x, -1, keepdims=True)
    xc = x - mu
    return xc * jax.lax.rsqrt(jnp.mean(xc * xc, -1, keepdims=True) + eps) * w + b


def forward(cfg, consts, params, batch):
    p = merge_consts(params, consts)
    tokens = batch["tokens"]
    x = p["embed"]["W_E"][tokens]
    if "features" in batch:
        f = batch["features"]
        fx = f if cfg.input_proj == "identity" else f @ p["embed"]["W_in"] + p["embed"]["b_in"]
        x = jnp.where(batch["is_feature"][..., None], fx, x)
    t = tokens.shape[1]
    if "W_pos" in p.get("pos_embed", {}):
        x = x + p["pos_embed"]["W_pos"][:t]
    causal = jnp.tril(jnp.ones((t, t), bool))
    for layer in range(cfg.n_layers):
        blk = p["blocks"][str(layer)]
        a = blk["attn"]
        h = layer_norm(x, blk["ln1"]["w"], blk["ln1"]["b"]) if cfg.layernorm else x
        q = jnp.einsum("bpd,hde->bphe", h, a["W_Q"])
        k = jnp.einsum("bpd,hde->bphe", h, a["W_K"])
        v = jnp.einsum("bpd,hde->bphe", h, a["W_V"])
        if cfg.bias:
            q, k, v = q + a["b_Q"], k + a["b_K"], v + a["b_V"]
        if cfg.positions == "rope":
            q, k = rope(q, cfg.rope_base), rope(k, cfg.rope_base)
        s = jnp.einsum("bqhe,bkhe->bhqk", q, k)
        if cfg.attn_scale:
            s = s / math.sqrt(q.shape[-1])
        pat = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1)
        z = jnp.einsum("bhqk,bkhe->bqhe", pat, v)
        if cfg.use_wo:
            out = jnp.einsum("bqhe,hed->bqd", z, a["W_O"])
            if cfg.bias:
                out = out + a["b_O"]
        else:
            out = z.reshape(z.shape[0], t, -1)
        x = x + out
    if cfg.layernorm:
        x = layer_norm(x, p["ln_final"]["w"], p["ln_final"]["b"])
    if cfg.mlp_head:
        for i in range(cfg.mlp_layers):
            x = jax.nn.relu(x @ p["mlp"][f"W_{i}"] + p["mlp"][f"b_{i}"])
    return x @ p["unembed"]["W_U"] + p["unembed"]["b_U"]


def make_step(trainer):
    """(init state, jitted step) of the minimal loop for a lab Runs's model, task, batch and optimiser."""
    cfg, model, task = trainer.cfg, trainer.model, trainer.task
    oc = cfg.optim
    opt = optax.adam(oc.lr) if oc.name in ("adam", "adamw") else optax.sgd(oc.lr, momentum=oc.momentum or None)
    bs = cfg.trainer.batch_size

    def loss_fn(params, batch):
        logp = jax.nn.log_softmax(forward(model.cfg, model.consts, params, batch), axis=-1)
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        m = batch["loss_mask"]
        return jnp.sum(nll * m) / jnp.sum(m)

    @jax.jit
    def step(params, opt_state, key, i):
        batch = task.sample(jax.random.fold_in(key, i), bs)
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = model.params()
    return (params, opt.init(params), jax.random.PRNGKey(0)), step
