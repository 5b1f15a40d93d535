"""Training: determinism, a falling loss, checkpoints that restore exactly, the step schedule."""

import jax
import numpy as np
import pytest

from lab.checkpoint import Checkpointer
from lab.config import load_config
from lab.loop import Sink, drive, schedule
from lab.optim import OptimConfig, make_optimizer
from lab.runs import Runs
from lab.state import TrainState
from lab.trainer import masked_nll


def run(overrides, save=None):
    cfg, _ = load_config(overrides)
    tr = Runs(cfg)
    rows = []
    state = drive(tr, tr.init_state(), [Sink(cfg.cadence, log=rows.append, save=save)], tr.plan)
    return tr, state, rows


def strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def test_same_seed_same_metrics_and_loss_falls(tiny):
    _, s1, r1 = run(tiny)
    _, s2, r2 = run(tiny)
    assert strip(r1) == strip(r2)
    for a, b in zip(jax.tree_util.tree_leaves(s1), jax.tree_util.tree_leaves(s2), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [r["step"] for r in r1] == [0, 20, 30, 40, 60]  # evaluations every 20, plus the checkpoint at 30
    assert r1[-1]["test/loss"] < r1[0]["test/loss"] - 0.3
    _, _, r3 = run(tiny + ["seed=1"])
    assert strip(r3) != strip(r1)


def test_scan_chunks_equal_single_steps(tiny):
    """Fusing steps under lax.scan changes nothing but speed, and a logging cadence that cuts chunks short
    compiles nothing more: the stops at 20, 30, 40 and 60 leave remainders of 6 and 3 steps, which run in
    one program whose length is data."""
    _, s1, _ = run(tiny + ["trainer.steps_per_call=1"])
    tr, s2, _ = run(tiny + ["trainer.steps_per_call=7"])
    assert tr.program.scan_fn.cache_size() == 1 and tr.program.run_fn.cache_size() == 1
    # one evaluation program per evaluation set's shapes
    assert 1 <= sum(f.cache_size() for f in tr.program._eval_fns.values()) <= len(tr.task.evals)
    for a, b in zip(jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s2.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_checkpoint_restores_params_and_optimizer_state(tiny, tmp_path):
    saved = {}
    ck = Checkpointer(tmp_path / "ck")

    def save(step, state):
        ck.save(step, state.saved(), {"note": "test"})
        saved[step] = jax.device_get(state.saved())

    tr, state, _ = run(tiny, save=save)
    ck.close()
    assert sorted(saved) == [0, 30, 60]
    ck2 = Checkpointer(tmp_path / "ck", read_only=True)
    assert ck2.steps() == [0, 30, 60]
    like = tr.init_run_state().saved()
    for step in (30, 60):
        got = ck2.restore(step, like)
        a, b = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(saved[step])
        assert len(a) == len(b) > 0
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert ck2.restore_config(60) == {"note": "test"}
    # training on from the step-30 checkpoint reproduces the step-60 state exactly
    resumed = drive(tr, tr.stack([TrainState.from_saved(ck2.restore(30, like))]), [Sink(tr.cfg.cadence)], tr.plan)
    for x, y in zip(jax.tree_util.tree_leaves(tr.run_state(resumed, 0).saved()),
                    jax.tree_util.tree_leaves(saved[60]), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_schedule():
    assert schedule(100, 25, 0) == [0, 25, 50, 75, 100]
    s = schedule(1000, 0, 4)  # 1, 10, 100, 1000
    assert s[0] == 0 and s[-1] == 1000 and 10 in s and 100 in s
    assert schedule(7, 0, 0, include_zero=False) == [7]


def test_sgd_multiplicative_weight_decay():
    """Reddy's decay: w <- w * (1 - wd) each step, whatever the learning rate."""
    import jax.numpy as jnp

    opt = make_optimizer(OptimConfig(name="sgd", lr=0.3, weight_decay=0.01), 10)
    p = {"w": jnp.array([2.0, -4.0])}
    up, _ = opt.update({"w": jnp.zeros(2)}, opt.init(p), p)
    np.testing.assert_allclose(np.asarray(p["w"] + up["w"]), [2.0 * 0.99, -4.0 * 0.99], rtol=1e-6)


@pytest.mark.parametrize("exp", ["reddy_bursty", "singh_fewshot", "bietti_bigram", "edelman_markov", "olsson_repeat",
                                 "olsson_text"])
def test_paper_experiments_compose_and_build(exp):
    """Every named experiment composes, validates, and builds its task and model."""
    # olsson_text's BPE would first train on the whole corpus (half a minute on a fresh machine; tests/test_text.py
    # trains one on a small corpus): its bytes build the same task and model shapes but the vocabulary
    fast = ["task.tokenizer=byte"] if exp == "olsson_text" else []
    cfg, _ = load_config([f"experiment={exp}", "tracking.wandb.mode=disabled", "task.eval_size=20",
                          "measures.names=[none]", *fast])
    tr = Runs(cfg)
    # jitted: op by op, the sampler alone compiles some 200 single-op programs
    logits = jax.jit(lambda p, k: tr.model.apply(p, tr.task.sample(k, 2)))(tr.model.params(), jax.random.PRNGKey(0))
    assert logits.shape == (2, tr.task.seq_len, tr.task.n_outputs)
    assert bool(jax.numpy.isfinite(logits).all())


def test_classification_loss_read_out_at_the_query_equals_the_full_forward():
    """The training loss of a classification task computes the MLP head only at the query; it must
    equal the loss of the full forward pass, gradients included."""
    cfg, _ = load_config(["experiment=reddy_bursty", "tracking.wandb.mode=disabled", "task.K=64", "task.N=4",
                          "model.mlp_head=16", "measures.names=[none]", "task.eval_size=20"])
    tr = Runs(cfg)
    params = tr.model.params()
    batch = jax.jit(tr.program.batch_at)(jax.random.PRNGKey(3), 0)

    def full(p, batch):
        return masked_nll(tr.model.apply(p, batch), batch)

    lq, gq = jax.jit(jax.value_and_grad(tr.program.loss))(params, batch)
    lf, gf = jax.jit(jax.value_and_grad(full))(params, batch)
    np.testing.assert_allclose(lq, lf, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(gq), jax.tree_util.tree_leaves(gf), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    readout = jax.eval_shape(lambda p, b: tr.model.apply(p, b, readout=tr.task.query_positions), params, batch)
    assert readout.shape[1] == 1


def test_frozen_parameters_get_no_gradient_and_the_rest_their_full_one(tiny):
    """model.freeze: the step differentiates the trainable parameters only (frozen ones' weight gradients are
    never computed), so the logged gradient norm is the trainable parameters' and frozen weights stay put."""
    import optax

    cfg, _ = load_config(tiny + ["model.freeze=[blocks.0.attn.W_V,unembed.*]"])
    tr = Runs(cfg)
    state = tr.init_run_state()
    params0 = jax.device_get(state.params)
    batch = jax.jit(tr.program.batch_at)(state.key, 0)
    full = jax.jit(jax.grad(tr.program.loss))(state.params, batch)  # every parameter differentiated
    trainable = jax.tree_util.tree_map(lambda g, f: g * 0 if f else g, full, tr.program.parts.frozen_mask)
    assert float(optax.global_norm(full)) > float(optax.global_norm(trainable)) > 0
    new, out = tr.program.step_fn(tr.stack([state]))
    new = tr.run_state(new, 0)
    np.testing.assert_allclose(float(out["grad_norm"][0]), float(optax.global_norm(trainable)), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(new.params["unembed"]["W_U"]), params0["unembed"]["W_U"])
    np.testing.assert_array_equal(np.asarray(new.params["blocks"]["0"]["attn"]["W_V"]),
                                  params0["blocks"]["0"]["attn"]["W_V"])
    w_k = params0["blocks"]["0"]["attn"]["W_K"]
    assert not np.array_equal(np.asarray(new.params["blocks"]["0"]["attn"]["W_K"]), w_k)
