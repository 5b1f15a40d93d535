"""The model: site shapes, causality, caches that change nothing, frozen parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lab.errors import ConfigError
from lab.hooks import Hooks
from lab.model import ModelConfig, Transformer
from lab.optim import OptimConfig, make_optimizer

B, T, V = 3, 10, 13


def tokens(seed=0):
    return {"tokens": jax.random.randint(jax.random.PRNGKey(seed), (B, T), 0, V)}


def test_shortformer_positions_reach_queries_and_keys_only():
    """On a sequence of one repeated token, Shortformer positions make the queries and keys differ by position
    while values and the residual stream stay the same at every position (learned positions: all differ)."""
    same = {"tokens": jnp.full((1, T), 3, jnp.int32)}
    for positions, differ in (("shortformer", {"q", "k"}), ("learned", {"q", "k", "v"})):
        m = Transformer(ModelConfig(n_layers=1, n_heads=2, d_model=8, positions=positions), seq_len=T, vocab_size=V,
                        n_outputs=V, seed=0)
        _, cache = m.run_with_cache(m.params(), same)
        for s in ("q", "k", "v"):
            x = np.asarray(cache[f"blocks.0.attn.hook_{s}"])[0]
            assert (np.abs(x - x[:1]).max() > 1e-4) == (s in differ), (positions, s)
        resid = np.asarray(cache["blocks.0.hook_resid_pre"])[0]
        assert (np.abs(resid - resid[:1]).max() > 1e-4) == (positions == "learned")


def test_relative_positions_add_the_query_times_the_offsets_vector():
    """Shaw-style relative positions (Edelman et al.'s model): with the keys' weights zeroed, a head's score of key
    j from query i is exactly q_i . W_rel[i - j] / sqrt(d_head), whatever the tokens; with them, that term plus
    q_i . k_j / sqrt(d_head)."""
    m = Transformer(ModelConfig(n_layers=1, n_heads=2, d_model=8, positions="relative"), seq_len=T, vocab_size=V,
                    n_outputs=V, seed=0)
    p = m.params()
    assert p["blocks"]["0"]["attn"]["W_rel"].shape == (2, T, 4)
    p["blocks"]["0"]["attn"]["W_rel"] = jax.random.normal(jax.random.PRNGKey(1), (2, T, 4))  # not at init scale
    for zero_keys in (True, False):
        q_ = dict(p, blocks={"0": dict(p["blocks"]["0"], attn=dict(p["blocks"]["0"]["attn"]))})
        if zero_keys:
            q_["blocks"]["0"]["attn"]["W_K"] = jnp.zeros_like(p["blocks"]["0"]["attn"]["W_K"])
            q_["blocks"]["0"]["attn"]["b_K"] = jnp.zeros_like(p["blocks"]["0"]["attn"]["b_K"])
        _, cache = m.run_with_cache(q_, tokens())
        q, k = np.asarray(cache["blocks.0.attn.hook_q"]), np.asarray(cache["blocks.0.attn.hook_k"])  # [b, t, h, e]
        w_rel = np.asarray(q_["blocks"]["0"]["attn"]["W_rel"])
        scores = np.asarray(cache["blocks.0.attn.hook_attn_scores"])
        for i in range(T):
            for j in range(i + 1):
                want = (np.einsum("bhe,bhe->bh", q[:, i], k[:, j]) + np.einsum("bhe,he->bh", q[:, i], w_rel[:, i - j]))
                np.testing.assert_allclose(scores[:, :, i, j], want / 2.0, rtol=1e-4, atol=1e-5)
        if zero_keys:  # zeroed keys would give flat scores without the offsets' term
            assert np.abs(np.diff(scores[0, 0, -1, :])).max() > 1e-2


@pytest.mark.parametrize("positions", ["learned", "sinusoidal", "rope", "shortformer", "relative", "onehot",
                                       "frozen_random", "none"])
def test_site_shapes_and_causality(positions):
    cfg = ModelConfig(n_layers=2, n_heads=4, d_model=16, positions=positions)
    m = Transformer(cfg, seq_len=T, vocab_size=V, n_outputs=V, seed=0)
    p = m.params()
    logits, cache = m.run_with_cache(p, tokens())
    assert set(cache) == set(m.site_names())
    h, dh, d = 4, 4, 16
    for layer in range(2):
        b = f"blocks.{layer}"
        for s in ("q", "k", "v", "z"):
            assert cache[f"{b}.attn.hook_{s}"].shape == (B, T, h, dh)
        assert cache[f"{b}.attn.hook_pattern"].shape == (B, h, T, T)
        assert cache[f"{b}.attn.hook_attn_scores"].shape == (B, h, T, T)
        assert cache[f"{b}.attn.hook_result"].shape == (B, T, h, d)
        assert cache[f"{b}.hook_resid_post"].shape == (B, T, d)
        pat = np.asarray(cache[f"{b}.attn.hook_pattern"])
        np.testing.assert_allclose(pat.sum(-1), 1.0, rtol=1e-5)
        assert np.all(np.triu(pat[0, 0], 1) == 0)  # causal
    assert logits.shape == (B, T, V)
    # changing a later token never changes earlier logits
    b2 = {"tokens": tokens()["tokens"].at[:, 6].set((tokens()["tokens"][:, 6] + 1) % V)}
    l1, l2 = m.apply(p, tokens()), m.apply(p, b2)
    np.testing.assert_array_equal(np.asarray(l1[:, :6]), np.asarray(l2[:, :6]))
    assert not np.allclose(np.asarray(l1[:, 6:]), np.asarray(l2[:, 6:]))


def test_cache_does_not_change_logits():
    m = Transformer(ModelConfig(n_heads=2, d_model=16), seq_len=T, vocab_size=V, n_outputs=V, seed=1)
    p = m.params()
    plain = jax.jit(lambda p, b: m.apply(p, b))(p, tokens())
    cached, cache = jax.jit(lambda p, b: m.run_with_cache(p, b))(p, tokens())
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(cached))
    np.testing.assert_array_equal(np.asarray(cache["logits"]), np.asarray(plain))
    # the sum of per-head results (+ b_O) is the attention output
    r = cache["blocks.1.attn.hook_result"].sum(2) + p["blocks"]["1"]["attn"]["b_O"]
    np.testing.assert_allclose(np.asarray(r), np.asarray(cache["blocks.1.hook_attn_out"]), rtol=1e-5, atol=1e-6)


def test_intervention_overwrites_site():
    m = Transformer(ModelConfig(n_heads=2, d_model=16), seq_len=T, vocab_size=V, n_outputs=V, seed=1)
    p = m.params()
    hooks = Hooks(capture=["blocks.1.attn.hook_pattern"],
                  interventions={"blocks.1.attn.hook_pattern": lambda x: jnp.zeros_like(x)})
    logits = m.apply(p, tokens(), hooks)
    assert float(jnp.abs(hooks.cache["blocks.1.attn.hook_pattern"]).max()) == 0.0
    assert not np.allclose(np.asarray(logits), np.asarray(m.apply(p, tokens())))


def test_feature_inputs_and_mlp_head():
    cfg = ModelConfig(n_layers=2, n_heads=1, d_model=12, d_head=12, positions="none", layernorm=False, bias=False,
                      use_wo=False, attn_scale=False, input_proj="identity", mlp_head=8)
    m = Transformer(cfg, seq_len=5, vocab_size=4, n_outputs=4, feature_dim=12, seed=0)
    batch = {"tokens": jnp.zeros((2, 5), jnp.int32), "features": jnp.ones((2, 5, 12)),
             "is_feature": jnp.ones((2, 5), bool)}
    logits, cache = m.run_with_cache(m.params(), batch)
    assert logits.shape == (2, 5, 4)
    np.testing.assert_array_equal(np.asarray(cache["hook_embed"]), np.ones((2, 5, 12)))
    with pytest.raises(ConfigError, match="model.input_proj"):
        Transformer(cfg, seq_len=5, vocab_size=4, n_outputs=4, feature_dim=7)


def test_frozen_parameters_receive_no_update():
    cfg = ModelConfig(n_layers=2, n_heads=1, d_model=16, d_head=16, positions="frozen_random", layernorm=False,
                      bias=False, wq_identity=True, freeze=["embed.*", "blocks.*.attn.W_V", "blocks.0.attn.W_O"])
    m = Transformer(cfg, seq_len=T, vocab_size=V, n_outputs=V, seed=0)
    p = m.params()
    assert "blocks.0.attn.W_Q" not in m.param_names()  # W_Q = I is a constant, not a parameter
    opt = make_optimizer(OptimConfig(name="sgd", lr=0.5, momentum=0.9), 10, m.frozen_mask(p))
    st = opt.init(p)

    def loss(p):
        return jnp.mean(jax.nn.log_softmax(m.apply(p, tokens()))[..., 0])

    p2 = p
    for _ in range(3):
        g = jax.grad(loss)(p2)
        up, st = opt.update(g, st, p2)
        p2 = jax.tree_util.tree_map(lambda a, u: a + u, p2, up)
    for name in ("embed.W_E", "blocks.0.attn.W_V", "blocks.1.attn.W_V", "blocks.0.attn.W_O"):
        a, b = _get(p, name), _get(p2, name)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for name in ("blocks.0.attn.W_K", "blocks.1.attn.W_O", "unembed.W_U"):
        assert not np.array_equal(np.asarray(_get(p, name)), np.asarray(_get(p2, name)))


def _get(tree, dotted):
    for k in dotted.split("."):
        tree = tree[k]
    return tree


@pytest.mark.parametrize("field,value", [("d_model", 30), ("n_heads", 0), ("positions", "alibi")])
def test_bad_model_config(field, value):
    cfg = ModelConfig(n_heads=4, d_model=16)
    setattr(cfg, field, value)
    with pytest.raises(ConfigError, match=f"model.{field}"):
        cfg.validate()


def _reference_forward(p, toks, parallel: bool):
    """A numpy transcription of a pre-LayerNorm block with a ReLU feed-forward layer, after TransformerLens
    (sequential) and Bietti's ihead_full_model.py (parallel: ``h + ff(ff_norm(x))`` with x the block's input)."""
    def ln(x, w, b):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * w + b

    g = lambda t: np.asarray(t, np.float64)  # noqa: E731
    x = g(p["embed"]["W_E"])[toks] + g(p["pos_embed"]["W_pos"])[: toks.shape[1]]
    t = toks.shape[1]
    for layer in sorted(p["blocks"], key=int):
        blk = p["blocks"][layer]
        a = {k: g(v) for k, v in blk["attn"].items()}
        xin = ln(x, g(blk["ln1"]["w"]), g(blk["ln1"]["b"]))
        q, k, v = (np.einsum("btd,hde->bhte", xin, a[f"W_{n}"]) + a[f"b_{n}"][None, :, None] for n in "QKV")
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]) + np.where(np.tril(np.ones((t, t))), 0, -np.inf)
        pat = np.exp(s - s.max(-1, keepdims=True))
        pat /= pat.sum(-1, keepdims=True)
        attn_out = np.einsum("bhte,hed->btd", pat @ v, a["W_O"]) + a["b_O"]
        mlp_in = x if parallel else x + attn_out
        m = {k: g(v) for k, v in blk["mlp"].items()}
        h = np.maximum(ln(mlp_in, g(blk["ln2"]["w"]), g(blk["ln2"]["b"])) @ m["W_in"] + m["b_in"], 0)
        x = x + attn_out + h @ m["W_out"] + m["b_out"]
    x = ln(x, g(p["ln_final"]["w"]), g(p["ln_final"]["b"]))
    return x @ g(p["unembed"]["W_U"]) + g(p["unembed"]["b_U"])


@pytest.mark.parametrize("parallel", [False, True])
def test_feed_forward_blocks_follow_transformerlens_and_bietti(parallel):
    cfg = ModelConfig(n_layers=2, n_heads=2, d_model=8, d_mlp=32, parallel_attn_mlp=parallel)
    m = Transformer(cfg, seq_len=T, vocab_size=V, n_outputs=V, seed=1)
    p = m.params()
    p = jax.tree_util.tree_map(lambda w: w + 0.1 * jax.random.normal(jax.random.PRNGKey(w.size), w.shape), p)
    assert p["blocks"]["1"]["mlp"]["W_in"].shape == (8, 32) and p["blocks"]["1"]["mlp"]["W_out"].shape == (32, 8)
    logits, cache = m.run_with_cache(p, tokens())
    assert set(cache) == set(m.site_names())
    assert ("blocks.0.hook_resid_mid" in cache) == (not parallel)  # TransformerLens has none when parallel
    assert cache["blocks.1.mlp.hook_post"].shape == (B, T, 32) and cache["blocks.1.hook_mlp_out"].shape == (B, T, 8)
    np.testing.assert_allclose(np.asarray(logits), _reference_forward(p, np.asarray(tokens()["tokens"]), parallel),
                               rtol=1e-4, atol=1e-4)
    # the other order is a different function: the test can tell them apart
    assert np.abs(np.asarray(logits) - _reference_forward(p, np.asarray(tokens()["tokens"]), not parallel)).max() > 1e-2
    # zeroing the MLP's output (hook_mlp_out) leaves what an attention-only model with these weights computes
    zero = Hooks(interventions={f"blocks.{i}.hook_mlp_out": jnp.zeros_like for i in range(2)})
    attn_only = Transformer(ModelConfig(n_layers=2, n_heads=2, d_model=8), seq_len=T, vocab_size=V, n_outputs=V)
    drop = {k: v for k, v in p.items()}
    drop["blocks"] = {i: {k: v for k, v in b.items() if k not in ("mlp", "ln2")} for i, b in p["blocks"].items()}
    np.testing.assert_allclose(np.asarray(m.apply(p, tokens(), zero)), np.asarray(attn_only.apply(drop, tokens())),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["singh", "reddy", "bietti_full", "relative"])
def test_readout_shortcuts_give_the_full_models_logits_and_gradients(kind):
    # A classification loss reads one query: the last layer then computes queries, attention and W_O there only,
    # and features are projected only at the positions that carry them. Both must be exact shortcuts.
    T, V, F, B = 7, 5, 9, 6
    if kind == "singh":
        cfg, fdim, fpos = ModelConfig(n_heads=2, d_model=8, positions="rope"), F, (0, 2, 4, 6)
    elif kind == "relative":  # the pruned layer's queries pick their own offsets' vectors
        cfg, fdim, fpos = ModelConfig(n_heads=2, d_model=8, positions="relative"), F, (0, 2, 4, 6)
    elif kind == "bietti_full":  # a feed-forward layer in every block, parallel to the attention
        cfg, fdim, fpos = ModelConfig(n_heads=2, d_model=8, d_mlp=16, parallel_attn_mlp=True), F, (0, 2, 4, 6)
    else:
        cfg = ModelConfig(n_heads=1, d_model=F, d_head=F, positions="none", layernorm=False, bias=False, use_wo=False,
                          attn_scale=False, input_proj="identity", mlp_head=8)
        fdim, fpos = F, None
    k1, k2 = jax.random.split(jax.random.PRNGKey(2))
    is_feature = jnp.broadcast_to(jnp.arange(T) % 2 == 0 if fpos else jnp.ones(T, bool), (B, T))
    batch = {"tokens": jax.random.randint(k1, (B, T), 0, V), "features": jax.random.normal(k2, (B, T, fdim)),
             "is_feature": is_feature, "targets": jnp.arange(B)[:, None] % V}
    short = Transformer(cfg, seq_len=T, vocab_size=V, n_outputs=V, feature_dim=fdim, seed=3, feature_positions=fpos)
    full = Transformer(cfg, seq_len=T, vocab_size=V, n_outputs=V, feature_dim=fdim, seed=3)
    p = short.params()
    keep_last = Hooks(capture=[f"blocks.{cfg.n_layers - 1}.hook_resid_pre"])  # a wanted site: no pruning

    def loss(m, hooks):
        def f(params):
            logits = m.apply(params, batch, hooks, readout=(T - 1,))[:, 0]
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"], axis=-1))
        return jax.jit(jax.value_and_grad(f))(p)

    (l1, g1), (l2, g2) = loss(short, Hooks()), loss(full, keep_last)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(g1["blocks"]["0"]["attn"]["W_K"]).max()) > 0  # gradient reaches the first layer
    np.testing.assert_allclose(np.asarray(jax.jit(short.apply)(p, batch)), np.asarray(jax.jit(full.apply)(p, batch)),
                               rtol=1e-5, atol=1e-6)


def test_identity_queries_equal_a_query_matrix_that_is_the_identity(heads=2, bias=True):
    # W_Q = I (Bietti) skips the query matmul: logits and gradients must be those of a model whose W_Q is an
    # ordinary parameter set to the identity, in the full forward pass and read out at one position
    d = 8
    kw = dict(n_layers=2, n_heads=heads, d_model=d, d_head=d, bias=bias, use_wo=True)
    ident = Transformer(ModelConfig(wq_identity=True, **kw), seq_len=T, vocab_size=V, n_outputs=V, seed=1)
    plain = Transformer(ModelConfig(**kw), seq_len=T, vocab_size=V, n_outputs=V, seed=1)
    p_ident = ident.params()
    p_plain = jax.tree_util.tree_map(lambda x: x, p_ident)
    for layer in ("0", "1"):
        p_plain["blocks"][layer]["attn"]["W_Q"] = jnp.broadcast_to(jnp.eye(d), (heads, d, d))
    batch = tokens()

    def run(m, readout):
        def f(p):
            out = m.apply(p, batch, readout=readout)
            return jnp.mean(jax.nn.log_softmax(out)[..., 1]), out
        return jax.jit(jax.value_and_grad(f, has_aux=True))

    (l1, o1), g1 = run(ident, None)(p_ident)
    (l2, o2), g2 = run(plain, None)(p_plain)
    np.testing.assert_allclose(np.asarray(o1), np.asarray(o2), rtol=1e-6, atol=1e-7)
    for name in ident.param_names():
        # the input's gradient sums the same terms in another order (no query matmul): float rounding
        np.testing.assert_allclose(np.asarray(_get(g1, name)), np.asarray(_get(g2, name)), rtol=1e-4, atol=1e-6)
    # queries at the readout position only (forward pass; the classification shortcut)
    r1, r2 = (jax.jit(lambda p, m=m: m.apply(p, batch, readout=(T - 1,)))(p) for m, p in ((ident, p_ident),
                                                                                         (plain, p_plain)))
    np.testing.assert_allclose(np.asarray(r1), np.asarray(r2), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(r1[:, 0]), np.asarray(o1[:, T - 1]), rtol=1e-5, atol=1e-6)


def test_split_inputs_change_nothing_until_one_is_overwritten_and_then_only_what_reads_it():
    """blocks.L.hook_q_input|hook_k_input|hook_v_input (TransformerLens's split inputs): reading them leaves the
    logits as they were; overwriting the key input changes layer 1's pattern but not its values."""
    m = Transformer(ModelConfig(n_layers=2, n_heads=2, d_model=8, positions="rope"), seq_len=T, vocab_size=V,
                    n_outputs=V, seed=0)
    p, b = m.params(), tokens()
    sites = ["blocks.1.hook_q_input", "blocks.1.hook_k_input", "blocks.1.hook_v_input", "blocks.1.attn.hook_pattern",
             "blocks.1.attn.hook_v"]
    logits, cache = m.run_with_cache(p, b, sites)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(m.apply(p, b)), rtol=1e-5, atol=1e-6)
    assert cache["blocks.1.hook_k_input"].shape == (B, T, 2, 8)
    hooks = Hooks(capture=sites, interventions={"blocks.1.hook_k_input": lambda x: x.at[:, :, 1].set(0.0)})
    m.apply(p, b, hooks)
    pat, v = np.asarray(hooks.cache["blocks.1.attn.hook_pattern"]), np.asarray(hooks.cache["blocks.1.attn.hook_v"])
    ref_pat = np.asarray(cache["blocks.1.attn.hook_pattern"])
    np.testing.assert_allclose(pat[:, 0], ref_pat[:, 0], atol=1e-6)  # head 0 untouched
    assert np.abs(pat[:, 1] - ref_pat[:, 1]).max() > 1e-3  # head 1's keys read the zeroed stream
    np.testing.assert_allclose(v, np.asarray(cache["blocks.1.attn.hook_v"]), atol=1e-6)  # values as before


def test_gpt2_init_draws_every_weight_at_init_std_and_the_residual_writers_smaller():
    """init=gpt2 (minGPT's, Edelman et al.'s code): N(0, init_std) for embeddings and matrices alike (the default
    init draws matrices at 1/sqrt(fan_in)), W_O and the MLP's W_out at init_std / sqrt(2 n_layers)."""
    cfg = dict(n_layers=2, n_heads=2, d_model=64, d_mlp=128, positions="relative")
    p = Transformer(ModelConfig(**cfg, init="gpt2", init_std=0.02), seq_len=32, vocab_size=50, n_outputs=50).params()
    std = lambda x: float(np.std(np.asarray(x)))  # noqa: E731
    for w in (p["embed"]["W_E"], p["blocks"]["0"]["attn"]["W_Q"], p["blocks"]["1"]["attn"]["W_rel"],
              p["blocks"]["1"]["mlp"]["W_in"], p["unembed"]["W_U"]):
        assert std(w) == pytest.approx(0.02, rel=0.1)
    for w in (p["blocks"]["0"]["attn"]["W_O"], p["blocks"]["1"]["mlp"]["W_out"]):
        assert std(w) == pytest.approx(0.01, rel=0.1)
    default = Transformer(ModelConfig(**cfg), seq_len=32, vocab_size=50, n_outputs=50).params()
    assert std(default["blocks"]["0"]["attn"]["W_Q"]) == pytest.approx(1 / 8, rel=0.1)
    with pytest.raises(ConfigError, match="model.init"):
        ModelConfig(init="xavier").validate()
