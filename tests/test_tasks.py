"""Exact properties of the task samplers (lab/tasks). Tiny sizes: every jit compiles in about a second."""

from __future__ import annotations

import dataclasses
import itertools

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lab import plugins
from lab.errors import ConfigError
from lab.tasks import (
    BigramConfig,
    BigramTask,
    BurstyConfig,
    BurstyTask,
    FewshotConfig,
    FewshotTask,
    MarkovConfig,
    MarkovTask,
    RepeatConfig,
    RepeatTask,
    make_task,
)

KEY = jax.random.PRNGKey(0)


def np_tree(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


def differ(a, b):
    leaves = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    return any(not np.array_equal(x, y) for x, y in leaves)


def run_jointly(fns: dict, key=KEY):
    """``{name: fn(key_i)}`` for several samplers, compiled as one jitted function (one compilation
    costs about a second here, however many samplers it holds)."""
    keys = {name: jax.random.fold_in(key, i) for i, name in enumerate(fns)}
    return np_tree(jax.jit(lambda ks: {name: fn(ks[name]) for name, fn in fns.items()})(keys))


# ----------------------------------------------------------------------------- bursty
SMALL_BURSTY = dict(K=32, L=8, N=8, D=5, eval_size=16)


@pytest.fixture(scope="module")
def bursty():
    """Bursty tasks and their samples: the settings of one task share one compilation."""
    tasks = {"mix": BurstyTask(BurstyConfig(**SMALL_BURSTY, B=2, p_B=0.5, p_C=0.5))}
    for B in (0, 1, 2, 4):
        tasks[f"B{B}"] = BurstyTask(BurstyConfig(**SMALL_BURSTY, B=B, p_B=1.0, p_C=0.0))
    # each B's training setting (its p_B forced to 0 when B=0) runs on the "mix" task's sampler
    settings = {**tasks["mix"].settings, **{f"B{B}": tasks[f"B{B}"].settings["train"] for B in (0, 1, 2, 4)}}
    return tasks, np_tree(jax.jit(lambda k: tasks["mix"].sample_settings(k, 300, settings))(KEY))


@pytest.mark.parametrize("B", [1, 2, 4])
def test_bursty_query_class_appears_B_times(bursty, B):
    tasks, samples = bursty
    task, (batch, info) = tasks[f"B{B}"], samples[f"B{B}"]
    N, K, L = task.cfg.N, task.cfg.K, task.cfg.L
    cls = info["classes"]
    assert info["bursty"].all() and not info["novel"].any()
    assert (cls < K).all()
    for c in cls:
        ctx, q = c[:N], c[N]
        assert (ctx == q).sum() == B
        values, counts = np.unique(ctx, return_counts=True)
        assert len(values) == N // B and (counts == B).all()
    # query_match marks the labels of the query's class; labels are class mod L
    np.testing.assert_array_equal(
        batch["query_match"][:, 1::2], (cls[:, :N] == cls[:, N:]).astype(np.float32)
    )
    np.testing.assert_array_equal(batch["tokens"][:, 1::2], cls[:, :N] % L)
    np.testing.assert_array_equal(batch["targets"][:, 2 * N], cls[:, N] % L)


def test_bursty_labels_and_evaluators(bursty):
    tasks, out = bursty
    task = tasks["mix"]
    N, K, L, T = task.cfg.N, task.cfg.K, task.cfg.L, task.seq_len
    batch, info = out["train"]
    cls = info["classes"]
    known = cls < K
    assert info["novel"].any() and info["bursty"].any() and (~info["novel"] & ~info["bursty"]).any()
    # every item of a known class carries label class mod L; novel sequences use only novel classes
    np.testing.assert_array_equal(info["labels"][known], cls[known] % L)
    np.testing.assert_array_equal(known.all(axis=1), ~info["novel"])
    np.testing.assert_array_equal((~known).all(axis=1), info["novel"])
    np.testing.assert_array_equal(batch["tokens"][:, 1::2], info["labels"][:, :N])
    assert (batch["tokens"][:, 0::2] == 0).all()
    np.testing.assert_array_equal(batch["targets"][:, 2 * N], info["labels"][:, N])
    assert (batch["targets"][:, : 2 * N] == 0).all()
    expected_mask = np.zeros(T, np.float32)
    expected_mask[2 * N] = 1
    assert (batch["loss_mask"] == expected_mask).all()
    multi_hot = np.zeros((len(cls), L), np.float32)
    for i, lab in enumerate(info["labels"][:, :N]):
        multi_hot[i, lab] = 1
    np.testing.assert_array_equal(batch["context_labels"], multi_hot)
    # bursty and novel sequences: the query class appears B times in context
    bursty = info["bursty"] | info["novel"]
    assert ((cls[:, :N] == cls[:, N:]).sum(1)[bursty] == 2).all()
    # features: items at even positions, zeros at label positions (embed encoding); a known-class
    # item is (mean + eps * eta) / sqrt(1 + eps^2) with |eta| ~ 1
    items = batch["features"][:, 0::2]
    means = np.asarray(task.means)[cls[known]]
    dist = np.linalg.norm(items[known] * np.sqrt(1 + 0.1**2) - means, axis=-1)
    assert dist.max() < 0.1 * 3 and dist.mean() > 0.1 * 0.5
    assert (batch["features"][:, 1::2] == 0).all()
    assert (np.abs(batch["features"][:, 0::2]).sum(-1) > 0).all()
    np.testing.assert_array_equal(batch["is_feature"][0], np.arange(T) % 2 == 0)

    # ic: novel classes only, bursty
    _, info = out["ic"]
    assert info["novel"].all() and (info["classes"] >= K).all()
    assert ((info["classes"][:, :N] == info["classes"][:, N:]).sum(1) == 2).all()

    # ic_flip: known classes, every context label and the target shifted by one
    batch, info = out["ic_flip"]
    cls = info["classes"]
    assert (cls < K).all() and info["bursty"].all()
    np.testing.assert_array_equal(batch["tokens"][:, 1::2], (cls[:, :N] % L + 1) % L)
    np.testing.assert_array_equal(batch["targets"][:, 2 * N], (cls[:, N] % L + 1) % L)

    # iw: known classes, never bursty
    _, info = out["iw"]
    assert (info["classes"] < K).all() and not info["bursty"].any() and not info["novel"].any()


def test_bursty_B0_forces_pB_zero(bursty):
    tasks, samples = bursty
    tasks["B0"].cfg.validate()  # allowed
    assert tasks["B0"].p_B == 0.0 and tasks["B0"].settings["train"][0] == 0.0
    _, info = samples["B0"]
    assert not info["bursty"].any() and not info["novel"].any()
    # i.i.d. uniform classes over K=32: the query's class is in the context with P = 1 - (31/32)^8
    in_ctx = (info["classes"][:, :8] == info["classes"][:, 8:]).any(1)
    assert abs(in_ctx.mean() - (1 - (31 / 32) ** 8)) < 0.08


def test_bursty_reddy_encoding(vmapped):
    task, batch = vmapped[0]["bursty"], vmapped[1]["bursty"]  # encoding="reddy"
    batch = jax.tree_util.tree_map(lambda x: x.reshape(-1, *x.shape[2:]), batch)  # 12 sequences
    N, D, L, T = 4, 3, 4, 9
    assert task.feature_dim == 65 + D and task.vocab_size == L and task.n_outputs == L and task.seq_len == T
    assert batch["features"].shape == (12, T, 65 + D) and batch["is_feature"].all()
    assert task.query_positions == (2 * N,)
    assert task.label_positions == tuple(range(1, 2 * N, 2))
    assert task.item_positions == tuple(range(0, 2 * N + 1, 2))
    pos, content = batch["features"][..., :65], batch["features"][..., 65:]
    assert set(np.unique(pos)) <= {0.0, 1.0} and (pos.sum(-1) == 1).all()
    slot = pos.argmax(-1)
    offset = slot[:, 0]
    np.testing.assert_array_equal(slot, offset[:, None] + np.arange(T))  # consecutive positions
    assert (offset >= 0).all() and (offset <= 65 - T).all() and len(np.unique(offset)) > 1
    # label positions carry the label's vector; item positions an item
    np.testing.assert_allclose(content[:, 1::2], np.asarray(task.label_vecs)[batch["tokens"][:, 1::2]])
    assert (np.abs(content[:, 0::2]).sum(-1) > 0).all()


# ----------------------------------------------------------------------------- fewshot
SMALL_FEWSHOT = dict(n_classes=12, n_train_classes=6, n_exemplars=3, feature_dim=4, eval_size=16)


@pytest.fixture(scope="module")
def fewshot():
    tasks = {
        "main": FewshotTask(FewshotConfig(**SMALL_FEWSHOT)),
        "shots": FewshotTask(
            FewshotConfig(**SMALL_FEWSHOT, n_distractors=2, shots=2, n_heldout_label_sets=0)
        ),
    }
    out = run_jointly(
        {
            "evaluators": lambda k: tasks["main"].sample_settings(k, 3000),
            "shots": lambda k: tasks["shots"].sample_with_info(k, 100),
        }
    )
    return tasks, {**out, **out.pop("evaluators")}


def test_fewshot_evaluators(fewshot):
    tasks, out = fewshot
    task = tasks["main"]
    n_train, E, T = 6, 3, 5
    sets = np.asarray(task.label_sets)
    assert sets.shape == (10, 2)
    heldout = {tuple(sorted(s)) for s in sets[-2:]}
    train_sets = {tuple(sorted(s)) for s in sets[:-2]}
    feats = np.asarray(task.features)

    def context_sets(batch):
        return {tuple(np.flatnonzero(row)) for row in batch["context_labels"]}

    def check_common(batch, info):
        cls, labels = info["classes"], info["labels"]
        # two distinct classes, the query's class once in context, with distinct labels
        assert (cls[:, 0] != cls[:, 1]).all() and ((cls[:, :2] == cls[:, 2:]).sum(1) == 1).all()
        assert (labels[:, 0] != labels[:, 1]).all()
        np.testing.assert_array_equal(batch["tokens"][:, 1::2], labels[:, :2])
        np.testing.assert_array_equal(batch["targets"][:, T - 1], labels[:, 2])
        np.testing.assert_array_equal(
            batch["query_match"][:, 1::2], (cls[:, :2] == cls[:, 2:]).astype(np.float32)
        )
        # the item features are the drawn (class, exemplar) rows
        np.testing.assert_array_equal(batch["features"][:, 0::2], feats[cls, info["exemplars"]])
        assert (batch["features"][:, 1::2] == 0).all()

    batch, info = out["train"]
    check_common(batch, info)
    assert context_sets(batch) == train_sets  # all training sets, never a held-out one
    assert not context_sets(batch) & heldout
    assert (info["classes"] < n_train).all() and (info["exemplars"] == 0).all()
    assert len(np.unique(info["classes"])) == n_train

    batch, info = out["relabel"]
    check_common(batch, info)
    assert context_sets(batch) == heldout
    assert (info["classes"] < n_train).all() and (info["exemplars"] == 0).all()

    batch, info = out["test_exemplars"]
    check_common(batch, info)
    assert context_sets(batch) == train_sets
    assert (info["classes"] < n_train).all()
    assert set(np.unique(info["exemplars"])) == set(range(1, E))

    batch, info = out["test_classes"]
    check_common(batch, info)
    assert context_sets(batch) == train_sets
    assert (info["classes"] >= n_train).all() and (info["classes"] < 12).all()
    assert set(np.unique(info["exemplars"])) == set(range(E))


def test_fewshot_shots_and_distractors(fewshot):
    tasks, samples = fewshot
    task, (_, info) = tasks["shots"], samples["shots"]
    assert task.seq_len == 2 * 2 * 3 + 1 and task.evaluators == ["train", "test_exemplars", "test_classes"]
    for c, lab in zip(info["classes"], info["labels"], strict=True):
        values, counts = np.unique(c[:-1], return_counts=True)
        assert len(values) == 3 and (counts == 2).all() and (c[:-1] == c[-1]).sum() == 2
        # one label per class
        assert len({(a, b) for a, b in zip(c, lab, strict=True)}) == 3 and len(set(lab)) == 3


def test_fewshot_features_file(tmp_path):
    base = dict(n_train_classes=6, eval_size=16)
    good = np.random.default_rng(0).normal(size=(9, 2, 3)).astype(np.float32)
    np.save(tmp_path / "good.npy", good)
    task = FewshotTask(FewshotConfig(**base, features_path=str(tmp_path / "good.npy")))
    assert task.feature_dim == 3 and task.n_classes == 9 and task.n_exemplars == 2
    np.testing.assert_array_equal(np.asarray(task.features), good)

    with h5py.File(tmp_path / "good.h5", "w") as f:
        f.create_dataset("features", data=good)
    task = FewshotTask(FewshotConfig(**base, features_path=str(tmp_path / "good.h5")))
    np.testing.assert_array_equal(np.asarray(task.features), good)

    np.save(tmp_path / "flat.npy", good.reshape(9, 6))
    with h5py.File(tmp_path / "few.hdf5", "w") as f:
        f.create_dataset("x", data=good[:7])  # needs 6 + 2 classes
    (tmp_path / "bad.txt").write_text("hello")
    for name in ["missing.npy", "flat.npy", "few.hdf5", "bad.txt"]:
        with pytest.raises(ConfigError) as e:
            FewshotTask(FewshotConfig(**base, features_path=str(tmp_path / name)))
        assert e.value.field == "task.features_path" and "task.features_path" in str(e.value)


# ----------------------------------------------------------------------------- bigram
def test_bigram_triggers_and_icl_mask():
    modes = [("frequent", "all"), ("sampled", "triggers")]
    tasks = {
        m: BigramTask(
            BigramConfig(
                vocab_size=10, seq_len=64, n_triggers=3, trigger_mode=m[0], loss_on=m[1], eval_size=16
            )
        )
        for m in modes
    }
    samples = run_jointly({m: (lambda k, t=t: t.sample_with_info(k, 40)) for m, t in tasks.items()})
    for mode, loss_on in modes:
        task, (batch, info) = tasks[mode, loss_on], samples[mode, loss_on]
        if mode == "frequent":
            pi_u = np.asarray(task.pi_u)
            assert set(info["triggers"][0]) == set(np.argsort(-pi_u)[:3])
        n_icl = 0
        for tok, tgt, icl, glob, trig, outs in zip(
            batch["tokens"],
            batch["targets"],
            batch["masks"]["icl"],
            batch["masks"]["global"],
            info["triggers"],
            info["outputs"],
            strict=True,
        ):
            assert len(set(trig)) == 3
            np.testing.assert_array_equal(tok[1:], tgt[:-1])  # targets are the next tokens
            for t, x in enumerate(tok):
                if x in trig:
                    assert tgt[t] == outs[list(trig).index(x)]
                assert icl[t] == float(x in trig and x in tok[:t])
                assert glob[t] == float(x not in trig)
            n_icl += icl.sum()
        assert n_icl > 0
        expected = batch["masks"]["icl"] if loss_on == "triggers" else np.ones_like(batch["loss_mask"])
        np.testing.assert_array_equal(batch["loss_mask"], expected)


def test_bigram_text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("abab")
    task = BigramTask(BigramConfig(text_path=str(path), n_triggers=1, seq_len=16, eval_size=16))
    assert task.vocab_size == 2 and task.n_outputs == 2 and task.alphabet == "ab"
    # add-one bigram counts: a->b twice, b->a once
    np.testing.assert_allclose(np.asarray(task.pi_b), [[1 / 4, 3 / 4], [2 / 3, 1 / 3]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(task.pi_u), [0.5, 0.5])

    text = "the quick brown fox jumps over the lazy dog. " * 5
    path.write_text(text)
    task = BigramTask(BigramConfig(text_path=str(path), n_triggers=2, seq_len=16, eval_size=16))
    assert task.vocab_size == len(set(text)) and task.alphabet == "".join(sorted(set(text)))
    batch = np_tree(jax.jit(task.sample, static_argnums=1)(KEY, 8))
    assert batch["tokens"].max() < task.vocab_size and batch["targets"].max() < task.vocab_size

    path.write_text("aaaa")  # one distinct character: too short for 2 triggers
    for p in [path, tmp_path / "missing.txt"]:
        with pytest.raises(ConfigError) as e:
            BigramTask(BigramConfig(text_path=str(p), n_triggers=2))
        assert e.value.field == "task.text_path"


# ----------------------------------------------------------------------------- markov
MARKOV = [("standard", 3), ("doubly_stochastic", 3), ("unigram", 2)]


@pytest.fixture(scope="module")
def markov():
    tasks = {
        vk: MarkovTask(MarkovConfig(n_states=vk[1], seq_len=8, variant=vk[0], eval_size=16)) for vk in MARKOV
    }
    return tasks, run_jointly(
        {vk: (lambda k, t=t: t.sample_with_matrices(k, 3000)) for vk, t in tasks.items()}
    )


@pytest.mark.parametrize("variant,k", MARKOV)
def test_markov(markov, variant, k):
    n = 3000
    batch, info = markov[1][variant, k]
    P, pi = info["P"].astype(np.float64), info["pi"].astype(np.float64)
    np.testing.assert_allclose(P.sum(-1), 1.0, atol=1e-5)
    assert (P >= 0).all()
    # the first state's law is stationary: pi P = pi
    np.testing.assert_allclose(pi.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.einsum("bi,bij->bj", pi, P), pi, atol=1e-4)
    first = np.eye(k)[batch["tokens"][:, 0]].mean(0)
    np.testing.assert_allclose(first, pi.mean(0), atol=4 * 0.5 / np.sqrt(n))
    # target_probs are the rows of the sequence's matrix at the current state
    np.testing.assert_array_equal(
        batch["target_probs"],
        np.take_along_axis(info["P"][:, None], batch["tokens"][:, :, None, None], axis=2)[:, :, 0],
    )
    np.testing.assert_array_equal(batch["tokens"][:, 1:], batch["targets"][:, :-1])
    assert (batch["loss_mask"] == 1).all()
    if variant == "doubly_stochastic":
        np.testing.assert_allclose(P.sum(-2), 1.0, atol=1e-5)
        np.testing.assert_allclose(pi, 1.0 / k, atol=1e-4)
    else:
        if variant == "unigram":
            np.testing.assert_array_equal(P, np.broadcast_to(P[:, :1], P.shape))
            rows = P[:, 0]
        else:
            rows = P.reshape(-1, k)
        # Dirichlet(1) over k: mean 1/k, variance (k-1) / (k^2 (k+1))
        assert abs(rows.mean() - 1 / k) < 1e-6
        assert abs(rows.var() - (k - 1) / (k**2 * (k + 1))) < 0.004
        assert abs(rows[:, 0].mean() - 1 / k) < 0.02


# ----------------------------------------------------------------------------- repeat
def test_repeat_fixed_layout():
    task = RepeatTask(RepeatConfig(vocab_size=24, seq_len=20, layout="fixed", seg_len=6, eval_size=16))
    assert task.vocab_size == 25 and task.n_outputs == 24 and task.bos == 24
    batch = np_tree(jax.jit(task.sample, static_argnums=1)(KEY, 50))
    L, T = 6, 20
    x = np.concatenate([batch["tokens"], batch["targets"][:, -1:]], axis=1)  # the seq_len + 1 tokens
    np.testing.assert_array_equal(batch["tokens"][:, 1:], batch["targets"][:, :-1])
    assert (x[:, 0] == 24).all() and (x[:, 1:] < 24).all()
    for i, row in enumerate(x):
        assert len(set(row[1 : L + 1])) == L  # distinct within the segment
        np.testing.assert_array_equal(row[L + 1 :], row[1 : T + 1 - L])  # the segment repeats exactly
        # repeated: the target already followed the current token earlier
        rep = [any(row[s] == row[t] and row[s + 1] == row[t + 1] for s in range(t)) for t in range(T)]
        np.testing.assert_array_equal(batch["masks"]["repeated"][i], np.array(rep, np.float32))
    first = np.zeros(T, np.float32)
    first[1 : L + 1] = 1
    assert (batch["masks"]["first"] == first).all() and (batch["loss_mask"] == 1).all()
    assert len({tuple(r) for r in x}) > 1


def _copies(row):
    """(start of the first copy, start of the second, length) of the one repeated segment in x."""
    seen = {}
    for t, tok in enumerate(row):
        if tok in seen:
            s1, s2 = seen[tok], t
            n = 0
            while s2 + n < len(row) and row[s1 + n] == row[s2 + n]:
                n += 1
            return s1, s2, n
        seen[tok] = t
    raise AssertionError("no repeated token")


def test_repeat_random_layout_varies_offsets_and_lengths_and_only_the_copy_repeats():
    cfg = RepeatConfig(vocab_size=40, seq_len=24, seg_min=3, seg_max=7, eval_size=200)
    task = RepeatTask(cfg)
    batch = np_tree(jax.jit(task.sample, static_argnums=1)(KEY, 300))
    x = np.concatenate([batch["tokens"], batch["targets"][:, -1:]], axis=1)
    lengths, distances = set(), set()
    for i, row in enumerate(x):
        assert row[0] == 40 and (row[1:] < 40).all()
        s1, s2, n = _copies(row)
        # the copy may run on by chance into equal tokens? no: every other token is distinct, so exactly n
        assert 3 <= n <= 7 and len(set(row.tolist())) == len(row) - n
        lengths.add(n)
        distances.add(s2 - s1)
        rep = [any(row[s] == row[t] and row[s + 1] == row[t + 1] for s in range(t)) for t in range(24)]
        np.testing.assert_array_equal(batch["masks"]["repeated"][i], np.array(rep, np.float32))
        first = np.zeros(24, np.float32)
        first[s1 : s1 + n - 1] = 1
        np.testing.assert_array_equal(batch["masks"]["first"][i], first)
    assert lengths == set(range(3, 8)) and len(distances) > 10  # no fixed offset predicts the copy
    # the held-out evaluator: only lengths training never drew, all in [2, seq_len // 2]
    assert cfg.heldout_lengths() == [2, 8, 9, 10, 11, 12]
    held = np_tree(task.evals["heldout"])
    hx = np.concatenate([held["tokens"], held["targets"][:, -1:]], axis=1)
    assert {_copies(r)[2] for r in hx} == set(cfg.heldout_lengths())
    test = np_tree(task.evals["test"])
    assert {_copies(r)[2] for r in np.concatenate([test["tokens"], test["targets"][:, -1:]], axis=1)} == lengths
    # a fixed segment length (what `lab replay RUN task.seg_len=N` probes): every sequence has it, offsets vary
    one = np_tree(RepeatTask(dataclasses.replace(cfg, seg_len=5)).sample(KEY, 50))
    ox = np.concatenate([one["tokens"], one["targets"][:, -1:]], axis=1)
    assert {_copies(r)[2] for r in ox} == {5} and len({_copies(r)[0] for r in ox}) > 3


# ----------------------------------------------------------------------------- all tasks
ALL = {
    "bursty": BurstyConfig(K=16, L=4, N=4, D=3, eval_size=8, encoding="reddy"),
    "fewshot": FewshotConfig(n_classes=8, n_train_classes=4, n_exemplars=2, feature_dim=3, eval_size=8),
    "bigram": BigramConfig(vocab_size=8, seq_len=16, n_triggers=2, trigger_mode="sampled", eval_size=8),
    "markov": MarkovConfig(n_states=3, seq_len=12, eval_size=8),
    "repeat": RepeatConfig(vocab_size=12, seq_len=12, seg_len=4, eval_size=8),
}


def check_batch(task, batch, batch_shape):
    T = task.seq_len
    assert batch["tokens"].shape == (*batch_shape, T) and batch["tokens"].dtype == np.int32
    assert batch["targets"].shape == (*batch_shape, T) and batch["targets"].dtype == np.int32
    assert batch["loss_mask"].shape == (*batch_shape, T) and batch["loss_mask"].dtype == np.float32
    for m in batch.get("masks", {}).values():
        assert m.shape == (*batch_shape, T) and m.dtype == np.float32
    assert (batch["tokens"] >= 0).all() and (batch["tokens"] < task.vocab_size).all()
    assert (batch["targets"] >= 0).all() and (batch["targets"] < task.n_outputs).all()
    scored = batch["loss_mask"] + sum(batch.get("masks", {}).values(), np.zeros_like(batch["loss_mask"]))
    assert (batch["targets"][scored == 0] == 0).all()
    if task.feature_dim:
        assert batch["features"].shape == (*batch_shape, T, task.feature_dim)
        assert batch["features"].dtype == np.float32 and batch["is_feature"].dtype == np.bool_
    else:
        assert "features" not in batch
    if task.classification:
        assert batch["context_labels"].shape == (*batch_shape, task.n_outputs)
        assert batch["query_match"].dtype == np.float32 and batch["context_labels"].dtype == np.float32
        assert set(np.flatnonzero(batch["loss_mask"].reshape(-1, T).max(0))) == set(task.query_positions)
    if "target_probs" in batch:
        assert batch["target_probs"].shape == (*batch_shape, T, task.n_outputs)


@pytest.fixture(scope="module")
def vmapped():
    """Every task's ``sample`` under jit and vmap over keys [k1, k2, k1] (one compilation)."""
    tasks = {name: make_task(cfg) for name, cfg in ALL.items()}
    k1, k2 = jax.random.split(KEY)
    keys = jnp.stack([k1, k2, k1])
    out = jax.jit(
        lambda ks: {name: jax.vmap(lambda k, t=t: t.sample(k, 4))(ks) for name, t in tasks.items()}
    )(keys)
    return tasks, np_tree(out)


@pytest.mark.parametrize("name", list(ALL))
def test_sample_jit_vmap_and_keys(vmapped, name):
    task, v = vmapped[0][name], vmapped[1][name]
    check_batch(task, v, (3, 4))
    b1, b2, b3 = (jax.tree_util.tree_map(lambda x, i=i: x[i], v) for i in range(3))
    check_batch(task, b1, (4,))
    np.testing.assert_equal(b1, b3)  # same key, same batch
    # different keys, different batches; sequences within a batch differ too
    assert differ(b1, b2)
    assert differ(jax.tree_util.tree_map(lambda x: x[0], b1), jax.tree_util.tree_map(lambda x: x[1], b1))


@pytest.mark.parametrize("name", list(ALL))
def test_evals_fixed(name):
    cfg = ALL[name]
    t1, t2 = make_task(cfg), make_task(dataclasses.replace(cfg))
    e1, e2 = np_tree(t1.evals), np_tree(t2.build_evals())
    assert t1.evals is t1.evals
    np.testing.assert_equal(e1, e2)
    first = next(iter(e1.values()))
    for batch in e1.values():  # one jitted eval function serves all evaluators
        assert jax.tree_util.tree_structure(batch) == jax.tree_util.tree_structure(first)
        assert jax.tree_util.tree_map(np.shape, batch) == jax.tree_util.tree_map(np.shape, first)
        check_batch(task=t1, batch=batch, batch_shape=(cfg.eval_size,))
    assert t1.key_metric.split("/")[0] in e1 and t1.watch_metric.split("/")[0] in e1


def test_eval_seed_changes_eval_sets():
    cfg = ALL["repeat"]
    e1 = np_tree(make_task(cfg).evals)
    e2 = np_tree(make_task(dataclasses.replace(cfg, eval_seed=cfg.eval_seed + 1)).evals)
    assert not np.array_equal(e1["test"]["tokens"], e2["test"]["tokens"])


def test_evaluator_names():
    assert list(BurstyTask(BurstyConfig(**SMALL_BURSTY)).settings) == ["train", "ic", "ic_flip", "iw"]
    assert FewshotTask(FewshotConfig(**SMALL_FEWSHOT)).evaluators == [
        "train",
        "relabel",
        "test_exemplars",
        "test_classes",
    ]


INVALID = [
    (BurstyConfig, "K", 0),
    (BurstyConfig, "K", 33),
    (BurstyConfig, "L", 0),
    (BurstyConfig, "N", 0),
    (BurstyConfig, "D", 0),
    (BurstyConfig, "eps", -0.1),
    (BurstyConfig, "B", 3),
    (BurstyConfig, "B", 16),
    (BurstyConfig, "B", -1),
    (BurstyConfig, "p_B", 1.5),
    (BurstyConfig, "p_C", -0.1),
    (BurstyConfig, "alpha", -1.0),
    (BurstyConfig, "encoding", "onehot"),
    (BurstyConfig, "eval_size", 0),
    (FewshotConfig, "n_labels", 1),
    (FewshotConfig, "n_distractors", -1),
    (FewshotConfig, "shots", 0),
    (FewshotConfig, "n_heldout_label_sets", 10),
    (FewshotConfig, "n_heldout_label_sets", -1),
    (FewshotConfig, "n_train_classes", 1),
    (FewshotConfig, "n_classes", 51),
    (FewshotConfig, "n_exemplars", 1),
    (FewshotConfig, "feature_dim", 0),
    (FewshotConfig, "noise", -1.0),
    (FewshotConfig, "alpha", -0.5),
    (FewshotConfig, "features_path", "/nonexistent/features.npy"),
    (FewshotConfig, "n_labels", 2000),
    (BigramConfig, "vocab_size", 1),
    (BigramConfig, "seq_len", 0),
    (BigramConfig, "n_triggers", 0),
    (BigramConfig, "n_triggers", 65),
    (BigramConfig, "trigger_mode", "random"),
    (BigramConfig, "loss_on", "x"),
    (BigramConfig, "dirichlet", 0.0),
    (BigramConfig, "text_path", "/nonexistent/text.txt"),
    (MarkovConfig, "n_states", 1),
    (MarkovConfig, "seq_len", 0),
    (MarkovConfig, "variant", "ngram"),
    (RepeatConfig, "vocab_size", 0),
    (RepeatConfig, "seg_len", 1),
    (RepeatConfig, "seg_len", 17),  # two copies of 17 do not fit in 32 tokens
    (RepeatConfig, "seg_max", 3),  # below seg_min=4
    (RepeatConfig, "seg_min", 20),
    (RepeatConfig, "layout", "periodic"),
    (RepeatConfig, "vocab_size", 20),  # fewer tokens than positions: the fillers cannot be distinct

]


@pytest.mark.parametrize("cls,field,value", INVALID, ids=[f"{c.__name__}.{f}={v}" for c, f, v in INVALID])
def test_validate_rejects(cls, field, value):
    cfg = dataclasses.replace(cls(), **{field: value})
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert e.value.field == f"task.{field}" and f"task.{field}" in str(e.value)
    task_cls = plugins.tasks[cfg.name].task
    with pytest.raises(ConfigError):
        task_cls(cfg)


def test_validate_rejects_combinations():
    for cfg, field in [
        (BurstyConfig(N=40, encoding="reddy"), "task.N"),
        (MarkovConfig(n_states=6, variant="doubly_stochastic"), "task.n_states"),
        (FewshotConfig(n_labels=3, n_distractors=3), "task.n_labels"),
        (RepeatConfig(seg_min=2, seg_max=16), "task.seg_max"),  # no length left for the held-out layouts
        (RepeatConfig(layout="fixed"), "task.seg_len"),  # the fixed layout needs its period
    ]:
        with pytest.raises(ConfigError) as e:
            cfg.validate()
        assert e.value.field == field
    for entry in plugins.tasks.values():
        entry.config().validate()  # defaults are valid


def test_make_task():
    assert isinstance(make_task(RepeatConfig()), RepeatTask)
    assert isinstance(make_task({"name": "markov", "n_states": 3}), MarkovTask)
    from omegaconf import OmegaConf

    task = make_task(OmegaConf.structured(BurstyConfig(K=64)))
    assert isinstance(task, BurstyTask) and task.cfg.K == 64
    with pytest.raises(ConfigError) as e:
        make_task({"name": "nope"})
    assert e.value.field == "task.name" and "bursty" in str(e.value)
    with pytest.raises(ConfigError) as e:
        make_task({"name": "repeat", "colour": 3})
    assert e.value.field == "task.colour"
    for name, entry in plugins.tasks.items():
        assert entry.config().name == name


def test_every_task_class_of_the_lab_is_registered():
    """A task written in lab/tasks/ is a task of the registry (with its config), found by walking the package,
    not by a list in this test."""
    import importlib
    import inspect
    import pkgutil

    import lab.tasks
    from lab.tasks.base import Task

    defined = set()
    for mod in pkgutil.iter_modules(lab.tasks.__path__):
        m = importlib.import_module(f"lab.tasks.{mod.name}")
        defined |= {c for _, c in inspect.getmembers(m, inspect.isclass)
                    if issubclass(c, Task) and c is not Task and c.__module__ == m.__name__}
    registered = {e.task for e in plugins.tasks.values() if e.package == "lab"}
    assert defined and defined == registered


def test_label_sets_permuted_once():
    t1 = FewshotTask(FewshotConfig(**SMALL_FEWSHOT))
    t2 = FewshotTask(FewshotConfig(**SMALL_FEWSHOT))
    np.testing.assert_array_equal(np.asarray(t1.label_sets), np.asarray(t2.label_sets))
    assert sorted(map(tuple, np.asarray(t1.label_sets).tolist())) == list(itertools.combinations(range(5), 2))


def test_markov_strategies_exact():
    from lab.tasks.markov import strategies

    tokens = jnp.array([[0, 1, 1, 0, 1]])
    s = strategies(tokens, 2)
    np.testing.assert_allclose(np.asarray(s["uniform"][0, 3]), [0.5, 0.5])
    # unigram at t=3: counts of x_0..x_3 = (2 zeros, 2 ones) -> (2+1)/(4+2) each
    np.testing.assert_allclose(np.asarray(s["unigram"][0, 3]), [0.5, 0.5])
    np.testing.assert_allclose(np.asarray(s["unigram"][0, 2]), [2 / 5, 3 / 5])
    # bigram at t=4 (x_4 = 1): transitions out of 1 seen before: 1->1, 1->0 -> (1+1)/(2+2) each
    np.testing.assert_allclose(np.asarray(s["bigram"][0, 4]), [0.5, 0.5])
    # bigram at t=3 (x_3 = 0): out of 0 seen: 0->1 -> [(0+1)/3, (1+1)/3]
    np.testing.assert_allclose(np.asarray(s["bigram"][0, 3]), [1 / 3, 2 / 3], rtol=1e-6)
    for p in s.values():
        np.testing.assert_allclose(np.asarray(p.sum(-1)), 1.0, rtol=1e-6)


# ----------------------------------------------------------------------------- data fields
DATA_POINTS = {  # a task, and values of its data fields that differ from its config's
    "bursty": (BurstyConfig(**SMALL_BURSTY, B=2, p_B=0.5, p_C=0.5),
               [dict(p_B=0.2, p_C=0.1, alpha=1.2, eps=0.4), dict(p_B=1.0, p_C=0.0, alpha=0.0, eps=0.0)]),
    "fewshot": (FewshotConfig(n_classes=30, n_train_classes=12, feature_dim=6, eval_size=8, alpha=0.5),
                [dict(alpha=1.5), dict(alpha=0.0)]),
    "repeat": (RepeatConfig(vocab_size=24, seq_len=18, layout="fixed", seg_len=4), [dict(seg_len=9), dict(seg_len=16)]),
    "repeat_random": (RepeatConfig(vocab_size=24, seq_len=18, seg_len=4), [dict(seg_len=9), dict(seg_len=6)]),
}


def test_data_fields_as_batched_data_sample_what_a_solo_task_samples():
    """A batched run's data fields (``run_data``, vmapped and traced) give the batch a task built with those
    values samples alone: the same classes, labels and tokens; items to float rounding."""
    lab_tasks = {n for n, e in plugins.tasks.items() if e.task.data_fields and e.package == "lab"}
    assert lab_tasks == set(DATA_POINTS) - {"repeat_random"}
    fns, solos = {}, {}
    for name, (cfg, points) in DATA_POINTS.items():
        base = make_task(cfg)
        assert all(set(p) <= set(base.data_fields) for p in points)
        data = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *[base.run_data(p) for p in points])
        fns[name] = lambda k, t=base, d=data: jax.vmap(lambda di: t.sample(k, 64, data=di))(d)
        solos[f"{name}_config"] = lambda k, t=base: t.sample(k, 64)
        for i, p in enumerate(points):
            t = make_task(dataclasses.replace(cfg, **p))
            solos[f"{name}{i}"] = lambda k, t=t: t.sample(k, 64)
    keys = {n: KEY for n in list(fns) + list(solos)}
    out = np_tree(jax.jit(lambda ks: {n: f(ks[n]) for n, f in {**fns, **solos}.items()})(keys))
    for name, (_, points) in DATA_POINTS.items():
        for i in range(len(points)):
            got = jax.tree_util.tree_map(lambda x, i=i: x[i], out[name])
            want = out[f"{name}{i}"]
            assert differ(want, out[f"{name}_config"])  # the values change the batch (same key)...
            feats = (got.pop("features", None), want.pop("features", None))
            np.testing.assert_equal(got, want)  # ...and the data path draws exactly what a solo task draws
            if feats[0] is not None:
                np.testing.assert_allclose(feats[0], feats[1], rtol=0, atol=1e-6)
    # repeat: the masks follow the run's segment length
    r = out["repeat"]
    assert r["masks"]["repeated"][0, 0].tolist() == [0.0] * 10 + [1.0] * 8
    assert r["masks"]["first"][1, 0].tolist() == [0.0] + [1.0] * 16 + [0.0]
