"""An attention-only transformer with TransformerLens-named sites.

Flax NNX defines and initialises the parameters; training works on the functional core:
``params`` is a plain nested dict of arrays (``model.params()``), and
``model.apply(params, batch, hooks)`` is a pure function of it, so it jits, vmaps over runs,
and checkpoints as an ordinary pytree. Weight names and shapes follow TransformerLens:
``blocks.{l}.attn.W_Q`` is [n_heads, d_model, d_head], ``W_O`` is [n_heads, d_head, d_model].

Options cover the papers' models: positions learned | sinusoidal | rope | shortformer | relative | onehot |
frozen_random | none (relative, after Shaw et al. 2018 as Edelman et al.'s code has it: each layer learns a vector
per head and query-key offset, ``blocks.{l}.attn.W_rel`` [n_heads, seq_len, d_head], and a head's score of key j
from query i gains q_i . W_rel[i - j]; shortformer, after Press et al. 2021: learned position embeddings added to every
layer's query and key inputs only, never to values or the residual stream, so no head can pass a
position on to a later layer); LayerNorm on/off; biases on/off; W_O absent (Reddy: heads concatenate);
W_Q = I (Bietti); no 1/sqrt(d_head) scaling (Reddy); an input adapter for continuous items
(linear, or identity when the items are already d_model wide); Reddy's ReLU MLP classifier on the
readout; a feed-forward layer in every block (``d_mlp`` > 0: TransformerLens's ``attn_only=False``,
with its ``mlp.W_in/W_out`` weights, ``ln2`` and ``hook_mlp_out`` sites), sequential or parallel to the
attention (``parallel_attn_mlp``: the MLP reads the block's input, as GPT-J and Bietti's pre-norm full
model do); any parameter frozen by glob (``freeze: [embed.*, blocks.0.attn.W_V]``).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from flax import nnx

from lab.errors import check
from lab.hooks import NO_HOOKS, Hooks
from lab.kernels import dense, layer_norm, matmul_nn, matmul_nt, softmax

# gelu: the exact (erf) one, TransformerLens's "gelu" (jax.nn.gelu's default is the tanh form, its "gelu_new")
ACT_FNS = {"relu": jax.nn.relu, "gelu": lambda x: jax.nn.gelu(x, approximate=False)}
# a layer's sites that hold every position even when the last layer is pruned to the readout (``apply``)
FULL_POSITION_SITES = ("hook_resid_pre", "ln1.hook_normalized", "hook_q_input", "hook_k_input", "hook_v_input",
                       "attn.hook_k", "attn.hook_v", "attn.hook_rot_k")
POSITIONS = ("learned", "sinusoidal", "rope", "shortformer", "relative", "onehot", "frozen_random", "none")


@dataclass
class ModelConfig:
    n_layers: int = 2
    n_heads: int = 8
    d_model: int = 64
    d_head: int | None = None  # default d_model // n_heads
    positions: str = "learned"  # learned | sinusoidal | rope | shortformer (positions in Q and K only) | onehot | ...
    layernorm: bool = True
    bias: bool = True
    use_wo: bool = True  # False: heads' outputs concatenate (needs n_heads * d_head == d_model)
    wq_identity: bool = False  # W_Q fixed to the identity (needs d_head == d_model)
    attn_scale: bool = True  # divide scores by sqrt(d_head)
    input_proj: str = "linear"  # how continuous items enter: linear | identity
    mlp_head: int = 0  # width of Reddy's ReLU MLP classifier on the residual (0: none)
    mlp_layers: int = 3
    # a feed-forward layer in every block, TransformerLens's names: blocks.{l}.mlp.W_in [d_model, d_mlp], W_out
    # [d_mlp, d_model] (and b_in, b_out with bias; ln2 with layernorm). 0: attention-only (TransformerLens's
    # attn_only=True), the lab's default, the papers' models but Bietti's full one.
    d_mlp: int = 0
    act_fn: str = "relu"  # the MLP's nonlinearity: relu | gelu
    # the MLP reads the block's input, not the residual after the attention: resid_post = resid_pre + attn_out +
    # mlp_out (TransformerLens's parallel_attn_mlp; Bietti's full model with pre_norm=True, ihead_full_model.py)
    parallel_attn_mlp: bool = False
    init_std: float = 0.02  # embeddings (init: normal), every weight (init: gpt2)
    # normal: N(0, init_std) embeddings, N(0, 1/fan_in) matrices. torch: PyTorch's nn.Embedding / nn.Linear
    # defaults, as the PyTorch reference code (Bietti's transformer-birth) initialises: N(0, 1) token and
    # position embeddings (frozen random positions too), matrices U(-1/sqrt(fan_in), 1/sqrt(fan_in)); biases
    # stay zero. The scale matters: Bietti's learning rate is tuned to embeddings of norm sqrt(d). gpt2: minGPT's
    # (and Edelman et al.'s code): every weight N(0, init_std), W_O and the MLP's W_out N(0, init_std / sqrt(2
    # n_layers)); small weights everywhere, so attention starts uniform.
    init: str = "normal"
    rope_base: float = 10000.0
    freeze: list[str] = field(default_factory=list)  # globs over parameter names

    @property
    def head_dim(self) -> int:
        return self.d_head if self.d_head is not None else self.d_model // max(self.n_heads, 1)

    def validate(self) -> None:
        check(self.n_layers >= 1, "model.n_layers", self.n_layers, "must be >= 1")
        check(self.n_heads >= 1, "model.n_heads", self.n_heads, "must be >= 1")
        check(self.d_model >= 1, "model.d_model", self.d_model, "must be >= 1")
        if self.d_head is None:
            check(self.d_model % self.n_heads == 0, "model.d_model", self.d_model,
                  f"must be divisible by model.n_heads={self.n_heads} (or set model.d_head)")
        else:
            check(self.d_head >= 1, "model.d_head", self.d_head, "must be >= 1")
        check(self.positions in POSITIONS, "model.positions", self.positions, f"one of {', '.join(POSITIONS)}")
        if self.positions == "rope":
            check(self.head_dim % 2 == 0, "model.d_head", self.head_dim, "must be even for rope positions")
        if not self.use_wo:
            check(self.n_heads * self.head_dim == self.d_model, "model.use_wo", self.use_wo,
                  "false needs n_heads * d_head == d_model")
        if self.wq_identity:
            check(self.head_dim == self.d_model, "model.wq_identity", self.wq_identity,
                  f"true needs d_head == d_model, got d_head={self.head_dim}")
        check(self.input_proj in ("linear", "identity"), "model.input_proj", self.input_proj, "one of linear, identity")
        check(self.mlp_head >= 0, "model.mlp_head", self.mlp_head, "must be >= 0")
        check(self.mlp_layers >= 1, "model.mlp_layers", self.mlp_layers, "must be >= 1")
        check(self.d_mlp >= 0, "model.d_mlp", self.d_mlp, "must be >= 0 (0: attention-only)")
        check(self.act_fn in ACT_FNS, "model.act_fn", self.act_fn, f"one of {', '.join(ACT_FNS)}")
        check(not self.parallel_attn_mlp or self.d_mlp > 0, "model.parallel_attn_mlp", self.parallel_attn_mlp,
              "true needs a feed-forward layer (model.d_mlp > 0)")
        check(self.init_std > 0, "model.init_std", self.init_std, "must be > 0")
        check(self.init in ("normal", "torch", "gpt2"), "model.init", self.init, "one of normal, torch, gpt2")


class Const(nnx.Variable):
    """A fixed array (frozen random embeddings, W_Q = I): part of the model, never trained."""


def _normal(rngs, shape, std):
    return std * jax.random.normal(rngs.params(), shape, jnp.float32)


def _initialisers(cfg: ModelConfig, rngs):
    """(embedding init of a shape, matrix init of a shape and fan-in, the same for the matrices that write into the
    residual stream: W_O and the MLP's W_out), per ``cfg.init``."""
    if cfg.init == "torch":
        def matrix(shape, fan_in):
            bound = 1.0 / math.sqrt(fan_in)
            return jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound)

        return (lambda shape: _normal(rngs, shape, 1.0)), matrix, matrix
    emb = lambda shape: _normal(rngs, shape, cfg.init_std)  # noqa: E731
    if cfg.init == "gpt2":  # minGPT's: every weight N(0, init_std), the residual writers scaled by 1/sqrt(2 n_layers)
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        return emb, (lambda shape, fan_in: _normal(rngs, shape, cfg.init_std)), (
            lambda shape, fan_in: _normal(rngs, shape, out_std))
    fan = lambda shape, fan_in: _normal(rngs, shape, 1 / math.sqrt(fan_in))  # noqa: E731
    return emb, fan, fan


def sinusoidal(n_pos: int, d: int) -> jax.Array:
    pos = jnp.arange(n_pos, dtype=jnp.float32)[:, None]
    i = jnp.arange(d, dtype=jnp.float32)[None, :]
    angle = pos / jnp.power(10000.0, (2 * (i // 2)) / d)
    return jnp.where(i % 2 == 0, jnp.sin(angle), jnp.cos(angle))


def rope(x: jax.Array, base: float, positions: jax.Array | None = None, pos_axis: int = 1) -> jax.Array:
    """Rotary embedding of x [batch, pos, head, d_head] (half-split layout); ``pos_axis``: where the
    position axis is ([batch, head, pos, d_head]: 2); ``positions``: those of x's rows (default 0, 1, ...)."""
    t, dh = x.shape[pos_axis], x.shape[-1]
    pos = jnp.arange(t) if positions is None else positions
    inv = 1.0 / (base ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
    ang = pos.astype(jnp.float32)[:, None] * inv[None, :]  # [pos, dh/2]
    shape = [1] * x.ndim
    shape[pos_axis], shape[-1] = t, dh // 2
    cos, sin = jnp.cos(ang).reshape(shape), jnp.sin(ang).reshape(shape)
    x1, x2 = x[..., : dh // 2], x[..., dh // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def relative_scores(q: jax.Array, w_rel: jax.Array, q_pos: jax.Array | None, t: int) -> jax.Array:
    """The relative-position term of the scores [batch, head, query, key]: q_i . W_rel[i - j] for keys j <= i (above
    the diagonal it holds other offsets' values: the causal mask removes them). ``q`` [batch, head, query, d_head]
    (already scaled as the scores are), ``w_rel`` [head, seq_len, d_head], ``q_pos`` the queries' positions (None:
    0..t-1). One matmul against every offset, then each pair's offset picked: for every query row by the skew of
    Huang et al. 2018's Music Transformer (offsets reversed, one column padded, a reshape: no gather, whose backward
    pass is a scatter; `make bench`'s positions section measures the two); for a pruned layer's rows by a gather."""
    b, h = q.shape[:2]
    if q_pos is None:
        rev = jnp.einsum("bhqe,hoe->bhqo", q, w_rel[:, t - 1::-1])  # rev[i, m] = q_i . W_rel[t - 1 - m]
        padded = jnp.pad(rev, ((0, 0), (0, 0), (0, 0), (1, 0))).reshape(b, h, t + 1, t)
        return padded[:, :, 1:]  # [i, j] = rev[i, t - 1 - i + j] = q_i . W_rel[i - j]
    by_offset = jnp.einsum("bhqe,hoe->bhqo", q, w_rel[:, :t])  # [batch, head, query, offset]
    offset = jnp.clip(q_pos[:, None] - jnp.arange(t)[None, :], 0, t - 1)  # [query, key]
    return jnp.take_along_axis(by_offset, jnp.broadcast_to(offset, by_offset.shape[:2] + offset.shape), axis=-1)


class _Weights(nnx.Module):
    """The parameters (nnx.Param) and fixed arrays (Const) of a Transformer, initialised."""

    def __init__(self, cfg: ModelConfig, seq_len: int, vocab_size: int, n_outputs: int, feature_dim: int, seed: int):
        rngs = nnx.Rngs(params=seed)
        d, h, dh = cfg.d_model, cfg.n_heads, cfg.head_dim
        emb, mat, out_mat = _initialisers(cfg, rngs)
        P = nnx.Param
        self.embed = nnx.Dict(W_E=P(emb((vocab_size, d))))
        if feature_dim and cfg.input_proj == "linear":
            self.embed["W_in"] = P(mat((feature_dim, d), feature_dim))
            self.embed["b_in"] = P(jnp.zeros((d,)))
        frozen_pos = (lambda: emb((seq_len, d))) if cfg.init == "torch" else (
            lambda: _normal(rngs, (seq_len, d), 1.0 / math.sqrt(d)))  # unit-norm rows
        pos = {"learned": lambda: P(emb((seq_len, d))),
               "shortformer": lambda: P(emb((seq_len, d))),
               "frozen_random": lambda: Const(frozen_pos()),
               "sinusoidal": lambda: Const(sinusoidal(seq_len, d)),
               "onehot": lambda: Const(jnp.eye(seq_len, d))}
        self.pos_embed = nnx.Dict(W_pos=pos[cfg.positions]()) if cfg.positions in pos else nnx.Dict()
        blocks = []
        for _ in range(cfg.n_layers):
            attn = nnx.Dict(
                W_Q=Const(jnp.eye(d)[None]) if cfg.wq_identity else P(mat((h, d, dh), d)),
                W_K=P(mat((h, d, dh), d)),
                W_V=P(mat((h, d, dh), d)),
            )
            if cfg.wq_identity and h > 1:
                attn["W_Q"] = Const(jnp.broadcast_to(jnp.eye(d)[None], (h, d, d)))
            if cfg.positions == "relative":  # row r: the offset r = query position - key position
                attn["W_rel"] = P(emb((h, seq_len, dh)))
            if cfg.use_wo:
                attn["W_O"] = P(out_mat((h, dh, d), h * dh))
            if cfg.bias:
                for nm in ("b_Q", "b_K", "b_V"):
                    attn[nm] = P(jnp.zeros((h, dh)))
                if cfg.use_wo:
                    attn["b_O"] = P(jnp.zeros((d,)))
            blk = nnx.Dict(attn=attn)
            if cfg.layernorm:
                blk["ln1"] = nnx.Dict(w=P(jnp.ones((d,))), b=P(jnp.zeros((d,))))
            if cfg.d_mlp:  # drawn after the attention's, so attention-only models keep their initial weights
                m = cfg.d_mlp
                mlp = nnx.Dict(W_in=P(mat((d, m), d)), W_out=P(out_mat((m, d), m)))
                if cfg.bias:
                    mlp["b_in"], mlp["b_out"] = P(jnp.zeros((m,))), P(jnp.zeros((d,)))
                blk["mlp"] = mlp
                if cfg.layernorm:
                    blk["ln2"] = nnx.Dict(w=P(jnp.ones((d,))), b=P(jnp.zeros((d,))))
            blocks.append(blk)
        self.blocks = nnx.List(blocks)
        if cfg.layernorm:
            self.ln_final = nnx.Dict(w=P(jnp.ones((d,))), b=P(jnp.zeros((d,))))
        width = d
        if cfg.mlp_head:
            mlp = nnx.Dict()
            for i in range(cfg.mlp_layers):
                mlp[f"W_{i}"] = P(_normal(rngs, (width, cfg.mlp_head), math.sqrt(2.0 / width)) if cfg.init == "normal"
                                  else mat((width, cfg.mlp_head), width))
                mlp[f"b_{i}"] = P(jnp.zeros((cfg.mlp_head,)))
                width = cfg.mlp_head
            self.mlp = mlp
        self.unembed = nnx.Dict(W_U=P(mat((width, n_outputs), width)),
                                b_U=P(jnp.zeros((n_outputs,))))


class Transformer:
    """Holds the config and initial parameters; ``apply`` is the pure forward pass."""

    def __init__(self, cfg: ModelConfig, *, seq_len: int, vocab_size: int, n_outputs: int,
                 feature_dim: int = 0, seed: int = 0, feature_positions: tuple[int, ...] | None = None):
        cfg.validate()
        if feature_dim and cfg.input_proj == "identity":
            check(feature_dim == cfg.d_model, "model.input_proj", cfg.input_proj,
                  f"identity needs d_model == the task's feature width {feature_dim}, got d_model={cfg.d_model}")
        self.cfg = cfg
        self.seq_len, self.vocab_size, self.n_outputs, self.feature_dim = seq_len, vocab_size, n_outputs, feature_dim
        # the only positions where batches carry features (the task's; None: any): the input projection
        # runs there alone (few-shot items are half the positions and W_in the widest matmul of the step)
        self.feature_positions = tuple(feature_positions) if feature_positions is not None else None
        weights = _Weights(cfg, seq_len, vocab_size, n_outputs, feature_dim, seed)
        _, params, consts = nnx.split(weights, nnx.Param, Const)
        self._init_params = _str_keys(params.to_pure_dict())
        self.consts = _str_keys(consts.to_pure_dict())
        names = self.param_names()
        for pat in cfg.freeze:  # a typo would otherwise freeze nothing, silently
            check(any(fnmatch.fnmatchcase(n, pat) for n in names), "model.freeze", list(cfg.freeze),
                  f"{pat!r} matches no parameter; they are {', '.join(names)}")

    # ---- the functional core -------------------------------------------------------------
    def params(self) -> dict:
        """The trainable parameters at initialisation, as a nested dict of fresh arrays (safe to donate)."""
        return jax.tree_util.tree_map(jnp.copy, self._init_params)

    def param_names(self) -> list[str]:
        return [name for name, _ in flat_params(self._init_params)]

    def frozen_mask(self, params: dict) -> dict:
        """A pytree of bools like ``params``: True where the parameter is frozen by ``cfg.freeze``."""
        pats = list(self.cfg.freeze)
        return unflatten_like(params, [any(fnmatch.fnmatchcase(n, p) for p in pats) for n, _ in flat_params(params)])

    def site_names(self) -> list[str]:
        cfg = self.cfg
        names = ["hook_embed"]
        if cfg.positions in ("learned", "frozen_random", "sinusoidal", "onehot"):
            names.append("hook_pos_embed")
        for layer in range(cfg.n_layers):
            b = f"blocks.{layer}"
            names.append(f"{b}.hook_resid_pre")
            names += [f"{b}.hook_{s}_input" for s in "qkv"]
            if cfg.layernorm:
                names.append(f"{b}.ln1.hook_normalized")
            names += [f"{b}.attn.hook_{s}" for s in ("q", "k", "v")]
            if cfg.positions == "rope":
                names += [f"{b}.attn.hook_rot_q", f"{b}.attn.hook_rot_k"]
            names += [f"{b}.attn.hook_{s}" for s in ("attn_scores", "pattern", "z", "result")]
            names.append(f"{b}.hook_attn_out")
            if cfg.d_mlp:
                if not cfg.parallel_attn_mlp:
                    names.append(f"{b}.hook_resid_mid")
                if cfg.layernorm:
                    names.append(f"{b}.ln2.hook_normalized")
                names += [f"{b}.mlp.hook_pre", f"{b}.mlp.hook_post", f"{b}.hook_mlp_out"]
            names.append(f"{b}.hook_resid_post")
        if cfg.layernorm:
            names.append("ln_final.hook_normalized")
        names.append("logits")
        return names

    def apply(self, params: dict, batch: dict, hooks: Hooks = NO_HOOKS, readout: tuple[int, ...] | None = None
              ) -> jax.Array:
        """Logits [batch, pos, n_outputs]. Sites go through ``hooks`` (read or overwrite).

        ``readout``: compute the final LayerNorm, MLP head and unembedding only at these positions
        (logits [batch, len(readout), n_outputs]); a classification loss needs only its query, and
        Reddy's MLP head is most of the step when run at every position. Unless a hook wants one of the
        last layer's sites but those that hold every position anyway (``FULL_POSITION_SITES``: its input, keys,
        values and split inputs), the last layer too computes queries, attention and output only there (its
        keys and values at every position): nothing else of it reaches the readout.
        """
        cfg = self.cfg
        p = merge_consts(params, self.consts)
        tokens = batch["tokens"]
        x = p["embed"]["W_E"][tokens]
        if self.feature_dim:
            feats, isf, fp = batch["features"], batch["is_feature"], self.feature_positions
            if fp is not None:
                sel = jnp.asarray(fp)
                feats, isf = feats[:, sel], isf[:, sel]
            fx = feats if cfg.input_proj == "identity" else dense(feats, p["embed"]["W_in"]) + p["embed"]["b_in"]
            if fp is None:
                x = jnp.where(isf[..., None], fx, x)
            else:
                x = x.at[:, sel].set(jnp.where(isf[..., None], fx, x[:, sel]))
        x = hooks("hook_embed", x)
        t = tokens.shape[1]
        if "W_pos" in p.get("pos_embed", {}) and cfg.positions != "shortformer":
            pe = hooks("hook_pos_embed", jnp.broadcast_to(p["pos_embed"]["W_pos"][:t], x.shape))
            x = x + pe
        causal = jnp.where(jnp.tril(jnp.ones((t, t), bool)), 0.0, -jnp.inf)  # added to the scores
        last = cfg.n_layers - 1
        # sites a pruned last layer still computes at every position (keys, values and what they are made from):
        # hooks there (Singh's ablated values, his clamped layer-1 input) leave the pruning on
        # sites held at the readout rows alone must allow it (nothing reads them, their clamps take the rows)
        full = {f"blocks.{last}.{n}" for n in FULL_POSITION_SITES}
        prune = readout is not None and all(hooks.allows_rows(n) for n in self.layer_sites(last) if n not in full)
        for layer in range(cfg.n_layers):
            # the pruned last layer: queries, attention and output at the readout positions only
            at = jnp.asarray(readout) if prune and layer == last else None
            rows = tuple(readout) if at is not None else None

            def hq(name, y, rows=rows):  # a site on the query side: the rows the layer computes
                return hooks(name, y, rows)

            b, a = f"blocks.{layer}", p["blocks"][str(layer)]["attn"]
            x = hooks(f"{b}.hook_resid_pre", x)
            xin = x
            if cfg.layernorm:
                ln = p["blocks"][str(layer)]["ln1"]
                xin = hooks(f"{b}.ln1.hook_normalized", layer_norm(x, ln["w"], ln["b"]))
            scale = 1.0 / math.sqrt(cfg.head_dim) if cfg.attn_scale else 1.0
            if any(hooks.wants(f"{b}.hook_{s}_input") for s in "qkv"):
                qh, kh, vh = self._split_qkv(p, layer, x, hooks, at)
            else:
                qh, kh, vh = _qkv(xin, a, cfg.bias, q_at=at, q_identity=cfg.wq_identity)  # [batch, head, pos, d_head]
            if cfg.positions == "shortformer":  # (x + W_pos) W_Q and (x + W_pos) W_K; values see no position
                pos = p["pos_embed"]["W_pos"][:t]
                qh = qh + jnp.einsum("td,hde->hte", pos if at is None else pos[at], a["W_Q"])
                kh = kh + jnp.einsum("td,hde->hte", pos, a["W_K"])
            tl_sites = [f"{b}.attn.hook_{s}" for s in ("q", "k", "v", "rot_q", "rot_k")]
            if cfg.positions == "rope" or any(hooks.wants(n) for n in tl_sites):
                # TransformerLens's layout [batch, pos, head, d_head] at the q/k/v sites
                q = hq(f"{b}.attn.hook_q", qh.transpose(0, 2, 1, 3))
                k, v = (hooks(f"{b}.attn.hook_{s}", y.transpose(0, 2, 1, 3)) for s, y in (("k", kh), ("v", vh)))
                if cfg.positions == "rope":
                    q = hq(f"{b}.attn.hook_rot_q", rope(q, cfg.rope_base, positions=at))
                    k = hooks(f"{b}.attn.hook_rot_k", rope(k, cfg.rope_base))
                qh, kh, vh = (y.transpose(0, 2, 1, 3) for y in (q, k, v))
            if scale != 1.0:
                qh = qh * scale
            mask = causal if at is None else causal[at]
            raw = matmul_nt(qh, kh)
            if cfg.positions == "relative":
                raw = raw + relative_scores(qh, a["W_rel"], None if at is None else jnp.asarray(at), t)
            scores = hq(f"{b}.attn.hook_attn_scores", raw + mask)
            pattern = hq(f"{b}.attn.hook_pattern", softmax(scores))
            zh = matmul_nn(pattern, vh)
            z = hq(f"{b}.attn.hook_z", zh.transpose(0, 2, 1, 3))
            if not cfg.use_wo:
                result = hq(f"{b}.attn.hook_result", z) if hooks.wants(f"{b}.attn.hook_result") else z
                out = result.reshape(*result.shape[:2], -1)
            elif hooks.overwrites(f"{b}.attn.hook_result"):
                result = hq(f"{b}.attn.hook_result", jnp.einsum("bqhe,hed->bqhd", z, a["W_O"]))
                out = result.sum(axis=2)
            else:  # one matmul over all heads; per-head results are computed only to be read
                h, e = z.shape[2], z.shape[3]
                out = dense(z.reshape(*z.shape[:2], h * e), a["W_O"].reshape(h * e, -1))
                if hooks.wants(f"{b}.attn.hook_result"):
                    hq(f"{b}.attn.hook_result", jnp.einsum("bqhe,hed->bqhd", z, a["W_O"]))
            if cfg.use_wo and cfg.bias:
                out = out + a["b_O"]
            out = hq(f"{b}.hook_attn_out", out)
            resid_pre = x if at is None else x[:, at]
            if cfg.d_mlp:
                out = out + self._mlp(p, layer, resid_pre, out, hq)
            x = hq(f"{b}.hook_resid_post", resid_pre + out)
        if readout is not None and not prune:
            x = x[:, jnp.asarray(readout)]
        out_rows = tuple(readout) if readout is not None else None
        if cfg.layernorm:
            x = hooks("ln_final.hook_normalized", layer_norm(x, p["ln_final"]["w"], p["ln_final"]["b"]), out_rows)
        if cfg.mlp_head:
            for i in range(cfg.mlp_layers):
                x = jax.nn.relu(dense(x, p["mlp"][f"W_{i}"]) + p["mlp"][f"b_{i}"])
        logits = dense(x, p["unembed"]["W_U"]) + p["unembed"]["b_U"]
        return hooks("logits", logits, out_rows)

    def _mlp(self, p, layer: int, resid_pre, attn_out, hooks):
        """Block ``layer``'s feed-forward output (``hook_mlp_out``), read from the residual after the attention
        (``hook_resid_mid``) or, parallel, from the block's input. Position-wise, so a pruned last layer runs it at
        the readout positions only (``hooks``: the layer's query-side site function, which passes those rows on)."""
        cfg, b, blk = self.cfg, f"blocks.{layer}", p["blocks"][str(layer)]
        x = resid_pre if cfg.parallel_attn_mlp else hooks(f"{b}.hook_resid_mid", resid_pre + attn_out)
        if cfg.layernorm:
            x = hooks(f"{b}.ln2.hook_normalized", layer_norm(x, blk["ln2"]["w"], blk["ln2"]["b"]))
        m = blk["mlp"]
        pre = dense(x, m["W_in"]) + m["b_in"] if cfg.bias else dense(x, m["W_in"])
        post = hooks(f"{b}.mlp.hook_post", ACT_FNS[cfg.act_fn](hooks(f"{b}.mlp.hook_pre", pre)))
        out = dense(post, m["W_out"]) + m["b_out"] if cfg.bias else dense(post, m["W_out"])
        return hooks(f"{b}.hook_mlp_out", out)

    def _split_qkv(self, p, layer: int, x, hooks: Hooks, at):
        """TransformerLens's split inputs: each head's queries, keys and values read their own copy of the
        residual stream (sites ``blocks.{l}.hook_q_input|hook_k_input|hook_v_input`` [batch, pos, head,
        d_model], before the layer's LayerNorm, which normalises each copy), so an intervention can give a
        head's queries and keys one stream and its values another. Only traced when a hook asks for one of
        these sites; ``ln1.hook_normalized`` is then the residual's, for reading.

        What is computed is what the hooks need: an input no hook asks for is the residual's, normalised (the same
        LayerNorm the layer's own ``ln1`` computes, which XLA computes once), through the ordinary all-heads
        projection; an input whose interventions treat every head
        alike (``hooks.narrow``) is one copy [batch, pos, 1, d_model], then the same projection; only an input
        read, or overwritten head by head, is the n_heads-wide copy with a projection per head."""
        cfg, b = self.cfg, f"blocks.{layer}"
        blk = p["blocks"][str(layer)]
        a = blk["attn"]
        out = []
        for s in "qkv":
            name, w = f"{b}.hook_{s}_input", a[f"W_{s.upper()}"]
            if hooks.wants(name) and not hooks.narrow(name):
                y = self._wide_input(blk, name, x, hooks, w, at if s == "q" else None, s == "q" and cfg.wq_identity)
            else:
                xs = hooks(name, x[:, :, None, :])[:, :, 0] if hooks.wants(name) else x  # alike on every head: one copy
                if cfg.layernorm:
                    xs = layer_norm(xs, blk["ln1"]["w"], blk["ln1"]["b"])
                if s == "q" and at is not None:
                    xs = xs[:, at]
                h, d, e = w.shape
                if s == "q" and cfg.wq_identity:
                    y = jnp.broadcast_to(xs[:, None], (xs.shape[0], h, *xs.shape[1:]))
                else:
                    y = jnp.moveaxis(dense(xs, w.transpose(1, 0, 2).reshape(d, h * e)).reshape(*xs.shape[:2], h, e),
                                     -2, -3)
            if cfg.bias:
                y = y + a[f"b_{s.upper()}"][None, :, None, :]
            out.append(y)
        return tuple(out)

    def _wide_input(self, blk, name: str, x, hooks: Hooks, w, at, identity: bool):
        """One split input as n_heads copies of the residual [batch, pos, head, d_model] through its hook, each
        normalised and projected by its own head: [batch, head, pos, d_head]."""
        wide = jnp.broadcast_to(x[:, :, None, :], (*x.shape[:2], self.cfg.n_heads, x.shape[-1]))
        xs = hooks(name, wide)
        if self.cfg.layernorm:
            xs = layer_norm(xs, blk["ln1"]["w"], blk["ln1"]["b"])
        if at is not None:
            xs = xs[:, at]
        return xs.transpose(0, 2, 1, 3) if identity else jnp.einsum("bthd,hde->bhte", xs, w)

    def layer_sites(self, layer: int) -> list[str]:
        return [n for n in self.site_names() if n.startswith(f"blocks.{layer}.")]

    def run_with_cache(self, params: dict, batch: dict, names=None) -> tuple[jax.Array, dict]:
        """Logits and a cache of the named sites (all sites when ``names`` is None)."""
        hooks = Hooks(capture=self.site_names() if names is None else names)
        logits = self.apply(params, batch, hooks)
        return logits, hooks.cache


def _qkv(x, a, bias: bool, q_at=None, q_identity: bool = False):
    """Q, K and V of every head, [batch, head, pos, d_head] each, from one matmul (XLA on the CPU is slow
    on many small per-head matmuls; one wide one keeps it near its matmul peak). The head-major layout
    is the one the attention's batched matmuls read; lax.split's backward pass is one concatenation.
    ``q_at``: compute queries only at these positions (K and V still everywhere). ``q_identity``: W_Q is
    the identity (Bietti), so every head's query is its input, exactly, with no matmul."""
    names = ("Q", "K", "V") if q_at is None and not q_identity else ("K", "V")
    w = jnp.concatenate([a[f"W_{n}"] for n in names], axis=0)  # [3h, d, e]
    hn, d, e = w.shape
    y = dense(x, w.transpose(1, 0, 2).reshape(d, hn * e)).reshape(*x.shape[:-1], hn, e)
    if bias:
        y = y + jnp.concatenate([a[f"b_{n}"] for n in names], axis=0)
    y = jnp.moveaxis(y, -2, -3)  # [batch, n*h, pos, d_head]
    heads = jax.lax.split(y, (hn // len(names),) * len(names), axis=-3)
    if len(names) == 3:
        return heads
    xq = x if q_at is None else x[:, q_at]
    h = heads[0].shape[-3]
    if q_identity:
        q = jnp.broadcast_to(xq[..., None, :], (*xq.shape[:-1], h, e))
    else:
        q = dense(xq, a["W_Q"].transpose(1, 0, 2).reshape(d, -1)).reshape(*xq.shape[:-1], h, e)
    if bias:
        q = q + a["b_Q"]
    return (jnp.moveaxis(q, -2, -3), *heads)


def build_model(cfg: ModelConfig, task, seed: int) -> Transformer:
    return Transformer(cfg, seq_len=task.seq_len, vocab_size=task.vocab_size, n_outputs=task.n_outputs,
                       feature_dim=task.feature_dim, seed=seed,
                       feature_positions=getattr(task, "feature_positions", None))


# ---- small pytree helpers --------------------------------------------------------------------
def flat_params(tree, prefix: str = ""):
    """(dotted name, leaf) pairs of a nested dict/list, in a stable order."""
    if isinstance(tree, dict):
        items = sorted(tree.items(), key=lambda kv: str(kv[0]))
    elif isinstance(tree, (list, tuple)):
        items = list(enumerate(tree))
    else:
        return [(prefix, tree)]
    out = []
    for k, v in items:
        out += flat_params(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def unflatten_like(tree, leaves: list):
    it = iter(leaves)

    def rebuild(t):
        if isinstance(t, dict):
            return {k: rebuild(t[k]) for k in sorted(t, key=str)}
        if isinstance(t, (list, tuple)):
            return type(t)(rebuild(v) for v in t)
        return next(it)

    return rebuild(tree)


def _str_keys(tree):
    """Nested dicts with string keys only (nnx.List gives int keys; checkpoints want strings)."""
    if isinstance(tree, dict):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


def merge_consts(params, consts):
    """Params and constants as one nested structure (constants fill in what params lack)."""
    if isinstance(params, dict) or isinstance(consts, dict):
        params = params if isinstance(params, dict) else {}
        consts = consts if isinstance(consts, dict) else {}
        keys = set(params) | set(consts)
        return {k: merge_consts(params.get(k), consts.get(k)) for k in keys}
    return params if params is not None else consts
