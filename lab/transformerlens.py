"""A lab model as TransformerLens's ``HookedTransformer``: its config and a state dict of the same weights.

The lab's weight names and shapes are TransformerLens's (``blocks.{l}.attn.W_Q`` [n_heads, d_model, d_head], ...),
so the state dict is the lab's parameters flattened; the config is what makes TransformerLens compute the same
function: pre-LayerNorm (eps 1e-5) or none, attention scaled by 1/sqrt(d_head), learned positions added to the
residual or Shortformer positions (TransformerLens's ``positional_embedding_type="shortformer"``: added after
``ln1`` to the query and key inputs only, as the lab does), an untied unembedding with ``d_vocab_out`` outputs
(the lab's readout never predicts BOS). With it a lab checkpoint loads into tools written for TransformerLens
models, devinterp's LLC estimator among them (bench/devinterp_side_by_side.py).

Only what has been checked against TransformerLens is exported (the demo's and the papers' attention-only models,
the sequential MLP); any other option is refused naming the field, whether TransformerLens lacks it (sinusoidal and
other fixed positions, W_Q = I, concatenated heads, Reddy's classifier head, continuous inputs) or has it
unchecked here (no attention scale, a parallel MLP). Biases must be on: TransformerLens always has them, and zero
biases that a sampler may move are not the lab's model.
"""

from __future__ import annotations

import numpy as np

from lab.errors import LabError
from lab.model import Transformer, flat_params

POSITION_TYPES = {"learned": "standard", "shortformer": "shortformer"}


def check_exportable(model: Transformer) -> None:
    """Raise LabError naming the first field TransformerLens cannot reproduce."""
    cfg = model.cfg
    refuse = [("model.positions", cfg.positions, cfg.positions not in POSITION_TYPES, "learned or shortformer"),
              ("model.bias", cfg.bias, not cfg.bias, "true (TransformerLens always has biases)"),
              ("model.use_wo", cfg.use_wo, not cfg.use_wo, "true"),
              ("model.wq_identity", cfg.wq_identity, cfg.wq_identity, "false"),
              ("model.attn_scale", cfg.attn_scale, not cfg.attn_scale, "true (false is not checked yet)"),
              ("model.mlp_head", cfg.mlp_head, cfg.mlp_head != 0, "0"),
              ("model.parallel_attn_mlp", cfg.parallel_attn_mlp, cfg.parallel_attn_mlp,
               "false (true is not checked yet)"),
              ("the task's feature inputs (feature_dim)", model.feature_dim, model.feature_dim != 0,
               "a token-only task")]
    for field, value, bad, allowed in refuse:
        if bad:
            raise LabError(f"{field}={value}: TransformerLens export needs {allowed}")


def tl_config(model: Transformer) -> dict:
    """Keyword arguments of ``HookedTransformerConfig`` for the same model (JSON-ready)."""
    check_exportable(model)
    cfg = model.cfg
    out = {"n_layers": cfg.n_layers, "d_model": cfg.d_model, "n_heads": cfg.n_heads, "d_head": cfg.head_dim,
           "n_ctx": model.seq_len, "d_vocab": model.vocab_size, "d_vocab_out": model.n_outputs,
           "attn_only": cfg.d_mlp == 0, "normalization_type": "LN" if cfg.layernorm else None, "eps": 1e-5,
           "positional_embedding_type": POSITION_TYPES[cfg.positions], "use_attn_scale": True,
           "original_architecture": "induction-lab"}
    if cfg.d_mlp:
        out |= {"d_mlp": cfg.d_mlp, "act_fn": cfg.act_fn}
    return out


def tl_state_dict(model: Transformer, params: dict) -> dict[str, np.ndarray]:
    """The parameters by TransformerLens's names (float32 numpy; load with ``strict=False``: TransformerLens's
    buffers, the causal mask and IGNORE, are not parameters)."""
    check_exportable(model)
    return {name: np.asarray(x, np.float32) for name, x in flat_params(params)}
