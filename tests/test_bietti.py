"""Bietti et al.'s setting as the authors' code (albietz/transformer-birth) defines it: their data file, their
output law, their initialisation and their optimiser's weight decay."""

import math
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lab.errors import ConfigError
from lab.tasks.bigram import BigramConfig, BigramTask


def _write_meta(path, text="abracadabra cab bad"):
    """A data/meta.pkl in the authors' layout: itos / stoi and character unigram and bigram counts."""
    chars = sorted(set(text))
    uni, bi = {}, {}
    for c in text:
        uni[c] = uni.get(c, 0) + 1
    for a, b in zip(text, text[1:], strict=False):
        bi[(a, b)] = bi.get((a, b), 0) + 1
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)},
            "unigrams": uni, "bigrams": bi}
    path.write_bytes(pickle.dumps(meta))
    return chars, uni, bi


def test_the_authors_meta_pkl_gives_their_unsmoothed_laws(tmp_path):
    p = tmp_path / "meta.pkl"
    chars, uni, bi = _write_meta(p)
    task = BigramTask(BigramConfig(stats_path=str(p), n_triggers=2, seq_len=16))
    assert task.alphabet == "".join(chars)
    n = sum(uni.values())
    np.testing.assert_allclose(np.asarray(task.pi_u), [uni[c] / n for c in chars], rtol=1e-6)
    a = chars.index("a")
    row = {b: bi.get(("a", b), 0) for b in chars}
    np.testing.assert_allclose(np.asarray(task.pi_b)[a], np.array([row[b] for b in chars]) / sum(row.values()),
                               rtol=1e-6)
    # unsmoothed: a bigram never seen in the counts never happens
    assert float(task.pi_b[a, chars.index("a")]) == 0.0
    # the fixed triggers are the most frequent characters
    assert {chars[i] for i in np.asarray(task.frequent_triggers)} == {"a", "b"}


def test_a_pickle_that_names_a_class_is_refused(tmp_path):
    p = tmp_path / "meta.pkl"
    p.write_bytes(pickle.dumps({"itos": {0: "a"}, "unigrams": {"a": 1}, "bigrams": {}, "x": math.floor}))
    with pytest.raises(ConfigError, match="task.stats_path"):
        BigramConfig(stats_path=str(p)).validate()


def test_outputs_are_uniform_over_the_vocabulary_as_the_authors_draw_them():
    def outputs(law):
        task = BigramTask(BigramConfig(vocab_size=20, n_triggers=3, seq_len=8, output_law=law, dirichlet=0.2))
        _, info = task.sample_with_info(jax.random.PRNGKey(0), 4000)
        return np.bincount(np.asarray(info["outputs"]).ravel(), minlength=20) / 12000, np.asarray(task.pi_u)

    freq, _ = outputs("uniform")
    assert np.max(np.abs(freq - 1 / 20)) < 0.012  # 12,000 draws: 4 standard errors
    freq, pi_u = outputs("unigram")
    assert np.max(np.abs(freq - pi_u)) < 0.02 and np.max(pi_u) > 2 / 20  # the unigram law is not uniform


def test_torch_init_has_pytorchs_scales():
    from lab.model import ModelConfig, Transformer

    m = Transformer(ModelConfig(n_layers=2, n_heads=1, d_model=256, d_head=256, positions="frozen_random",
                                layernorm=False, bias=False, wq_identity=True, init="torch"),
                    seq_len=256, vocab_size=65, n_outputs=65)
    p, c = m.params(), m.consts
    assert float(jnp.std(p["embed"]["W_E"])) == pytest.approx(1.0, rel=0.05)
    assert float(jnp.std(c["pos_embed"]["W_pos"])) == pytest.approx(1.0, rel=0.05)
    wk = p["blocks"]["0"]["attn"]["W_K"]
    assert float(jnp.max(jnp.abs(wk))) <= 1 / 16
    assert float(jnp.std(wk)) == pytest.approx(1 / math.sqrt(3 * 256), rel=0.05)
    normal = Transformer(ModelConfig(n_layers=2, n_heads=1, d_model=256, d_head=256, init_std=0.0625),
                         seq_len=256, vocab_size=65, n_outputs=65)
    assert float(jnp.std(normal.params()["embed"]["W_E"])) == pytest.approx(0.0625, rel=0.05)


def test_sgd_l2_decay_is_torchs_coupled_weight_decay():
    """torch.optim.SGD(lr, momentum, weight_decay): b <- mu b + (g + wd w); w <- w - lr b."""
    from lab.optim import OptimConfig, make_optimizer

    lr, mu, wd = 0.03, 0.9, 0.1
    opt = make_optimizer(OptimConfig(name="sgd", lr=lr, momentum=mu, weight_decay=wd, sgd_decay="l2"), 10)
    w = {"w": jnp.array([1.0, -2.0])}
    state = opt.init(w)
    b, wt = np.zeros(2), np.array([1.0, -2.0])
    for g in ([0.5, 0.5], [-1.0, 0.25], [0.0, 0.0]):
        upd, state = opt.update({"w": jnp.array(g)}, state, w)
        w = optax.apply_updates(w, upd)
        b = mu * b + (np.array(g) + wd * wt)
        wt = wt - lr * b
        np.testing.assert_allclose(np.asarray(w["w"]), wt, rtol=1e-6)


def test_the_circuit_summary_looks_where_bietti_needs_the_circuit():
    """Previous-token attention right after a trigger, induction attention at repeated triggers; the scores
    count only those positions."""
    from lab.measures.attention import induction_targets, prefix_matching_score, previous_token_score

    task = BigramTask(BigramConfig(vocab_size=12, n_triggers=2, seq_len=24))
    batch, info = task.sample_with_info(jax.random.PRNGKey(1), 16)
    after, ind = (np.asarray(a) for a in task.circuit_positions(batch))
    tok, trig = np.asarray(batch["tokens"]), np.asarray(info["triggers"])
    for b in range(16):
        for t in range(1, 24):
            assert after[b, t] == float(tok[b, t - 1] in trig[b])
    np.testing.assert_array_equal(ind, np.asarray(batch["masks"]["icl"]))
    # a head attending to i-1 only where `after` holds scores 1 there, less over every position
    t = 24
    pat = np.tile(np.eye(t)[None, None], (16, 1, 1, 1)) * 0.0
    pat[:, 0] = np.eye(t)  # self-attention everywhere ...
    for b, i in zip(*np.nonzero(after), strict=True):
        pat[b, 0, i] = np.eye(t)[i - 1]  # ... except right after a trigger
    assert float(previous_token_score(jnp.asarray(pat), where=after)[0]) == pytest.approx(1.0)
    assert float(previous_token_score(jnp.asarray(pat))[0]) < 0.5
    # an ideal induction head at the repeated triggers: all its attention on the earlier output(s)
    ideal = np.zeros((16, 1, t, t))
    targets = np.asarray(induction_targets(batch["tokens"]))
    for b, i in zip(*np.nonzero(ind), strict=True):
        ideal[b, 0, i] = targets[b, i] / targets[b, i].sum()
    assert float(prefix_matching_score(jnp.asarray(ideal), batch, where=ind)[0]) == pytest.approx(1.0, rel=1e-5)
    assert float(prefix_matching_score(jnp.asarray(ideal), batch)[0]) < 0.9  # other repeats are not its job


def test_zipf_laws_make_the_frequent_triggers_as_common_as_a_texts_commonest_characters():
    """task.zipf draws the bigram rows around a Zipf law: the 5 most frequent of 65 tokens then take ~40 % of
    positions (tiny Shakespeare's 5 commonest characters: 41 %), against ~10 % on the symmetric laws, which
    task.zipf=0 still draws exactly as before."""
    from lab.tasks.bigram import stationary

    top5 = lambda task: float(jnp.sort(task.pi_u)[::-1][:5].sum())  # noqa: E731
    symmetric = BigramTask(BigramConfig(vocab_size=65, dirichlet=0.5))
    rows = np.random.default_rng(0).dirichlet(np.full(65, 0.5), size=65)
    np.testing.assert_allclose(np.asarray(symmetric.pi_b), rows / rows.sum(1, keepdims=True), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(symmetric.pi_u), stationary(rows), rtol=1e-4, atol=1e-7)
    zipf = BigramTask(BigramConfig(vocab_size=65, zipf=0.85, dirichlet=0.2))
    assert top5(symmetric) < 0.15 and 0.3 < top5(zipf) < 0.5
    # and the sequences follow the law: the triggers' share of positions in sampled sequences
    toks = np.asarray(zipf.sample(jax.random.PRNGKey(0), 64)["tokens"])
    assert 0.3 < np.isin(toks, np.asarray(zipf.frequent_triggers)).mean() < 0.55
    with pytest.raises(ConfigError, match="task.zipf"):
        BigramConfig(zipf=-1.0).validate()
