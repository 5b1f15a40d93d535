"""Clamping: what must hold for an intervention to mean what it says."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lab.checkpoint import Checkpointer
from lab.clamp import ClampConfig, ideal_pattern
from lab.cli import main
from lab.config import load_config
from lab.hooks import Hooks
from lab.runs import Runs
from lab.trainer import masked_nll
from tests.conftest import TINY

ONE_HEAD = TINY + ["model.n_heads=1", "model.d_model=16"]


def setup(overrides=TINY, clamps=None):
    cfg, _ = load_config(overrides)
    cfg.clamps = clamps or {}
    return Runs(cfg)


def loss_and_grads(tr, params, batch, step, frozen=None):
    return jax.value_and_grad(tr.program.clamped_loss)(params, batch, jnp.int32(step), frozen)


def leaves_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb, strict=True))


@pytest.fixture(scope="module")
def base():
    tr = setup()
    batch = tr.program.batch_at(jax.random.PRNGKey(3), 0)
    return tr, tr.model.params(), batch


def test_strength_zero_and_closed_window_change_nothing(base):
    tr0, params, batch = base
    ref = loss_and_grads(tr0, params, batch, 5)
    for clamp in (ClampConfig(site="blocks.*.attn.hook_pattern", value="previous_token", strength=0.0),
                  ClampConfig(site="blocks.0.hook_attn_out", value="zero", windows=[[10, 20]]),
                  ClampConfig(site="blocks.0.hook_attn_out", value="zero", windows=[[0, 3]])):
        tr = setup(clamps={"c": clamp})
        got = loss_and_grads(tr, params, batch, 5)
        assert float(got[0]) == float(ref[0])
        assert leaves_equal(got[1], ref[1])


def test_open_window_changes_loss(base):
    tr0, params, batch = base
    tr = setup(clamps={"c": ClampConfig(site="blocks.0.hook_attn_out", value="zero", windows=[[0, 3], [10, 20]])})
    ref = float(tr0.program.clamped_loss(params, batch, 5))
    assert float(tr.program.clamped_loss(params, batch, 12)) != ref
    assert float(tr.program.clamped_loss(params, batch, 1)) != ref
    assert float(tr.program.clamped_loss(params, batch, 20)) == ref  # stop is exclusive


def test_reference_to_same_parameters_leaves_logits(base, tmp_path):
    tr0, params, batch = base
    ck = Checkpointer(tmp_path / "ref" / "checkpoints")
    ck.save(0, tr0.init_run_state().saved())
    ck.close()
    tr = setup(clamps={"r": ClampConfig(site="blocks.*.attn.hook_pattern", value="reference",
                                        reference_dir=str(tmp_path / "ref"), reference_step=0)})
    clean = tr0.model.apply(params, batch)
    clamped = tr.model.apply(params, batch, tr.clamps.hooks(params, batch, 0))
    np.testing.assert_allclose(np.asarray(clamped), np.asarray(clean), rtol=1e-6, atol=1e-6)


def test_stop_gradient_zeroes_what_feeds_only_the_clamped_site():
    tr = setup(ONE_HEAD, clamps={"p": ClampConfig(site="blocks.1.attn.hook_pattern", value="uniform")})
    params = tr.model.params()
    batch = tr.program.batch_at(jax.random.PRNGKey(0), 0)
    _, g = loss_and_grads(tr, params, batch, 0)
    for name in ("W_Q", "W_K", "b_Q", "b_K"):
        assert np.all(np.asarray(g["blocks"]["1"]["attn"][name]) == 0.0), name
    assert np.any(np.asarray(g["blocks"]["1"]["attn"]["W_V"]) != 0.0)
    assert np.any(np.asarray(g["blocks"]["0"]["attn"]["W_Q"]) != 0.0)
    # with gradient: through and strength < 1 the un-replaced share still learns
    tr2 = setup(ONE_HEAD, clamps={"p": ClampConfig(site="blocks.1.attn.hook_pattern", value="uniform", strength=0.5,
                                                   gradient="through")})
    _, g2 = loss_and_grads(tr2, params, batch, 0)
    assert np.any(np.asarray(g2["blocks"]["1"]["attn"]["W_Q"]) != 0.0)


@pytest.mark.slow  # 10-40 s: in CI's slow suite, to keep `make test` inside its 10 minutes
def test_training_steps_outside_window_equal_unclamped_and_no_recompilation():
    clamp = ClampConfig(site="blocks.0.attn.hook_pattern", heads=[0], value="previous_token", windows=[[20, 40]])
    free = setup()
    tr = setup(clamps={"w": clamp})
    s_free, s_cl = free.init_state(), tr.init_state()
    s_free, _ = free.program.advance(s_free, 20)
    s_cl, _ = tr.program.advance(s_cl, 20)
    assert leaves_equal(s_free.params, s_cl.params)  # before the window: identical
    s_free, _ = free.program.advance(s_free, 20)
    s_cl, _ = tr.program.advance(s_cl, 20)
    assert not leaves_equal(s_free.params, s_cl.params)  # inside: different
    # after the window closes, a step from the same state equals the unclamped step
    a, _ = free.program.step_fn(jax.tree_util.tree_map(jnp.copy, s_cl))
    b, _ = tr.program.step_fn(jax.tree_util.tree_map(jnp.copy, s_cl))
    assert leaves_equal(a.params, b.params)
    assert tr.program.scan_fn.cache_size() == 1 and tr.program.step_fn.cache_size() == 1  # windows are data


def test_frozen_equals_reference_to_checkpoint_of_same_run(tmp_path):
    frozen = ClampConfig(site="blocks.0.attn.hook_pattern", value="frozen", windows=[[20, -1]])
    tr = setup(clamps={"f": frozen})
    ck = Checkpointer(tmp_path / "run" / "checkpoints")
    state = tr.init_state()
    state, _ = tr.program.advance(state, 20)
    ck.save(20, tr.run_state(state, 0).saved())
    ck.close()
    # evaluated at the step its window opens, a frozen clamp replaces the site by its own value
    free = setup()
    ev_frozen, ev_free = tr.evaluate(state), free.evaluate(tr.run_state(state, 0).replace(frozen=None))
    assert ev_frozen["test/loss"] == pytest.approx(ev_free["test/loss"], rel=1e-6)
    state, _ = tr.program.advance(state, 15)
    state = tr.run_state(state, 0)
    saved = Checkpointer(tmp_path / "run" / "checkpoints", read_only=True).restore(20, state.saved())
    assert leaves_equal(state.frozen["f"], jax.device_get(saved["params"]))
    ref = setup(clamps={"r": ClampConfig(site="blocks.0.attn.hook_pattern", value="reference",
                                         reference_dir=str(tmp_path / "run"), reference_step=20)})
    batch = tr.program.batch_at(jax.random.PRNGKey(9), 0)
    p = state.params
    lf = tr.model.apply(p, batch, tr.clamps.hooks(p, batch, 35, state.frozen))
    lr = ref.model.apply(p, batch, ref.clamps.hooks(p, batch, 35))
    np.testing.assert_array_equal(np.asarray(lf), np.asarray(lr))
    assert not np.allclose(np.asarray(lf), np.asarray(tr.model.apply(p, batch)))


def test_ideal_patterns_on_token_task():
    tokens = jnp.array([[7, 1, 2, 3, 1, 2, 3]])
    batch = {"tokens": tokens}
    w, ok = ideal_pattern("previous_token", batch, None, 7)
    assert np.allclose(np.asarray(w[0, 0]).sum(-1), 1) and float(w[0, 0, 4, 3]) == 1.0
    w, ok = ideal_pattern("induction", batch, None, 7)
    # position 4 holds token 1, which appeared at position 1: attend to position 2 (the token after it)
    assert float(w[0, 0, 4, 2]) == 1.0 and float(w[0, 0, 6, 4]) == 1.0
    assert not bool(ok[0, 0, 2, 0]) and bool(ok[0, 0, 5, 0])  # no earlier occurrence: undefined row
    w, _ = ideal_pattern("uniform", batch, None, 7)
    np.testing.assert_allclose(np.asarray(w[0, 0, 3, :4]), 0.25)


def _singh_pass(preset: list[str], sites: list[str]):
    """One clamped (and one clean) forward pass of the Singh model under clamp presets, with caches."""
    cfg, _ = load_config(["experiment=singh_fewshot", f"clamp=[{','.join(preset)}]", "tracking.wandb.mode=disabled",
                          "task.eval_size=20", "measures.names=[none]"])
    tr = Runs(cfg)
    params = tr.model.params()
    names = sites + ["hook_embed"]

    @jax.jit  # op by op, the sampler and the clamped forward pass compile hundreds of one-op programs
    def forward(params, key):
        batch = tr.task.sample(key, 8)
        hooks = tr.clamps.hooks(params, batch, 0, capture=names)
        clean = Hooks(capture=names)
        logits = tr.model.apply(params, batch, hooks)
        tr.model.apply(params, batch, clean)
        return batch, logits, hooks.cache, clean.cache

    batch, logits, cache, clean = forward(params, jax.random.PRNGKey(0))
    return tr, batch, logits, {k: np.asarray(v) for k, v in cache.items()}, {k: np.asarray(v) for k, v in clean.items()}


def test_singh_match_and_single_head_presets_are_the_authors():
    """--opto_induction_heads 1:3 --opto_ablate_heads 1:0 1:1 1:2 1:4 1:5 1:6 1:7: L1H3's query row is the
    perfect match, nothing else of the pattern changes, the other layer-1 heads' values are zero."""
    tr, batch, logits, cache, clean = _singh_pass(["perfect_match", "single_head"],
                                                   ["blocks.1.attn.hook_pattern", "blocks.1.attn.hook_v"])
    pat, q = cache["blocks.1.attn.hook_pattern"], tr.task.query_positions[0]
    match = np.asarray(batch["query_match"])
    np.testing.assert_allclose(pat[:, 3, q, :], match, atol=1e-6)
    others = [h for h in range(8) if h != 3]
    np.testing.assert_allclose(pat[:, others], clean["blocks.1.attn.hook_pattern"][:, others], atol=1e-6)
    np.testing.assert_allclose(pat[:, 3, :q], clean["blocks.1.attn.hook_pattern"][:, 3, :q], atol=1e-6)
    v = cache["blocks.1.attn.hook_v"]
    assert np.all(v[:, :, others] == 0) and np.any(v[:, :, 3] != 0)
    assert np.isfinite(float(masked_nll(logits, batch)))
    assert tr.clamps.condition == "match+single_head"


def test_singh_prev_token_preset_is_the_authors():
    """--opto_prev_token_heads 0:2: L0H2 attends to the previous position (position 0 to itself), every row."""
    _, _, _, cache, clean = _singh_pass(["prev_token"], ["blocks.0.attn.hook_pattern"])
    pat = cache["blocks.0.attn.hook_pattern"]
    t = pat.shape[-1]
    want = np.eye(t, k=-1)
    want[0, 0] = 1
    np.testing.assert_allclose(pat[:, 2], np.broadcast_to(want, pat[:, 2].shape), atol=1e-6)
    others = [h for h in range(8) if h != 2]
    np.testing.assert_allclose(pat[:, others], clean["blocks.0.attn.hook_pattern"][:, others], atol=1e-6)


def test_singh_layer0_preset_feeds_patterns_and_values_different_streams():
    """--opto_specific_fn perfect_prev_token_input: layer 1's queries and keys read the previous position's
    embedding (the first and last positions their own), its values and the residual the plain embeddings."""
    sites = ["blocks.0.hook_attn_out", "blocks.1.hook_q_input", "blocks.1.hook_k_input", "blocks.1.hook_v_input",
             "blocks.1.hook_resid_pre"]
    _, batch, logits, cache, _ = _singh_pass(["layer0"], sites)
    e = cache["hook_embed"]  # [b, t, d]
    t = e.shape[1]
    assert np.all(cache["blocks.0.hook_attn_out"] == 0)
    np.testing.assert_allclose(cache["blocks.1.hook_resid_pre"], e, atol=1e-6)  # layer 0 adds nothing
    shifted = e.copy()
    shifted[:, 1:t - 1] = e[:, 0:t - 2]
    for s in ("q", "k"):
        np.testing.assert_allclose(cache[f"blocks.1.hook_{s}_input"], np.broadcast_to(shifted[:, :, None], (
            *e.shape[:2], 8, e.shape[2])), atol=1e-6)
    np.testing.assert_allclose(cache["blocks.1.hook_v_input"], np.broadcast_to(e[:, :, None], (*e.shape[:2], 8,
                                                                                               e.shape[2])), atol=1e-6)
    assert np.isfinite(float(masked_nll(logits, batch)))


BAD = [
    (["+clamps.c={site:blocks.9.attn.hook_pattern}"], "clamps.c.site"),
    (["+clamps.c={site:blocks.0.attn.hook_pattern,heads:[5]}"], "clamps.c.heads"),
    (["+clamps.c={site:blocks.0.hook_resid_post,value:induction}"], "clamps.c.site"),
    (["+clamps.c={site:blocks.0.attn.hook_pattern,value:glow}"], "clamps.c.value"),
    (["+clamps.c={site:blocks.0.attn.hook_pattern,value:reference,reference_dir:/nonexistent}"], "reference_dir"),
    (["+clamps.c={site:blocks.0.attn.hook_pattern,query:labels}"], "clamps.c.query"),
    (["+clamps.c={site:blocks.0.attn.hook_pattern,windows:[[5,2]]}"], "clamps.c.windows"),
    (["+clamps.c={site:blocks.0.attn.hook_pattern,query:'3:3'}"], "clamps.c.query"),
    (["+clamps.c={site:blocks.0.attn.hook_pattern,query:'a:b'}"], "clamps.c.query"),
]


@pytest.mark.parametrize("overrides,field", BAD, ids=[o[0] for o, _ in BAD])
def test_bad_clamp_exit_2(overrides, field, tmp_path, capsys):
    code = main(["train", f"run.root={tmp_path / 'runs'}", "tracking.wandb.mode=disabled", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and field in err, err
    assert not (tmp_path / "runs").exists()


def test_perfect_copy_turns_attention_into_the_output(base):
    _, params, batch = base
    tr = setup(clamps={"c": ClampConfig(site="blocks.1.attn.hook_pattern", heads=[0], query="last",
                                        value="perfect_copy")})
    hooks = tr.clamps.hooks(params, batch, 0, capture=["blocks.1.attn.hook_pattern"])
    logits = np.asarray(tr.model.apply(params, batch, hooks))
    pat = np.asarray(hooks.cache["blocks.1.attn.hook_pattern"])[:, 0, -1, :]  # [b, k] at the last query
    tokens = np.asarray(batch["tokens"])
    n_out = logits.shape[-1]
    mass = np.zeros((len(tokens), n_out))
    for b in range(len(tokens)):
        for k, tok in enumerate(tokens[b]):
            if tok < n_out:  # BOS is not an output
                mass[b, tok] += pat[b, k]
    np.testing.assert_allclose(logits[:, -1], np.log(mass + 1e-6), rtol=1e-5, atol=1e-5)
    clean = np.asarray(tr.model.apply(params, batch))
    np.testing.assert_array_equal(logits[:, :-1], clean[:, :-1])  # other positions untouched


def test_a_presets_fields_take_plain_overrides_and_a_typo_gets_one_line(tmp_path, capsys):
    cfg, _ = load_config(["experiment=singh_fewshot", "clamp=[layer0,single_head]", "clamps.layer0.gradient=stop",
                          "clamps.single_head.windows=[[0,100]]", "+clamps.extra={site:blocks.0.hook_attn_out}"])
    assert cfg.clamps["layer0"].gradient == "stop" and cfg.clamps["layer0"].value == "previous_embed"
    assert cfg.clamps["single_head"].windows == [[0, 100]] and cfg.clamps["extra"].value == "zero"
    for bad, msg in (("clamps.layer0.gradiant=stop", "clamps.layer0.gradiant: unknown field"),
                     ("clamps.layer0.strength=abc", "clamps.layer0.strength=abc: must be a number")):
        code = main(["train", f"run.root={tmp_path / 'runs'}", "experiment=singh_fewshot", "clamp=layer0", bad])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and msg in err, err
    assert not (tmp_path / "runs").exists()


def test_probe_overrides_switch_on_exactly_the_presets_clamp():
    """experiments/singh_progress.py's probes are the presets themselves, not a copy that could drift."""
    from lab.conditions import probe_overrides
    from lab.errors import LabError

    base = ["experiment=singh_fewshot"]
    probes = probe_overrides({"pt": "prev_token", "m": "perfect_match"}, base)
    cfg, _ = load_config([*base, *probes])
    assert cfg.clamps == {}  # the run itself is not clamped
    for name, preset in (("pt", "prev_token"), ("m", "perfect_match")):
        want, _ = load_config([*base, f"clamp={preset}"])
        assert cfg.measures.clamps[name] == next(iter(want.clamps.values()))
    with pytest.raises(LabError, match="layer0"):
        probe_overrides({"l0": "layer0"}, base)  # two clamps: not one probe


def test_a_watch_typo_is_caught_even_with_a_frozen_clamp():
    """metric_names traces a frozen clamp's view with a snapshot; it used to give up (and skip the check)."""
    from lab.errors import ConfigError

    frozen = ["+clamps.f={site:blocks.0.hook_attn_out,value:frozen,windows:[[10,30]]}", "trainer.log_unclamped=true"]
    cfg, _ = load_config(TINY + frozen + ["watch=test@unclamped/loss"])
    assert "test@unclamped/loss" in Runs(cfg).program.metric_names()
    cfg, _ = load_config(TINY + frozen + ["watch=test/los"])
    with pytest.raises(ConfigError, match="watch"):
        Runs(cfg)


@pytest.mark.parametrize("preset", [["layer0", "single_head"], ["layer0_copy"], ["perfect_match", "single_head"]],
                         ids=["layer0", "layer0_copy", "perfect_match"])
def test_a_clamped_step_computes_only_what_the_clamps_need_and_the_same_loss(preset):
    """The shortcuts of a clamped step -- a split input clamped alike on every head as one copy, not n_heads; the
    last layer's queries, and the logits, at the readout alone under the clamps (which take the rows) -- change
    neither the loss nor its gradient: the same step with every shortcut off (split inputs read, so n_heads wide;
    logits read, so every position) gives both to float rounding."""
    cfg, _ = load_config(["experiment=singh_fewshot", f"clamp=[{','.join(preset)}]", "tracking.wandb.mode=disabled",
                          "task.eval_size=20", "measures.names=[none]"])
    tr = Runs(cfg)
    params, program = tr.model.params(), tr.program
    wide = [f"blocks.1.hook_{s}_input" for s in "qkv"] + ["logits"]

    @jax.jit
    def both(params, key):
        batch = program.batch_at(key, 0)
        fast = jax.value_and_grad(lambda p: program.clamped_loss(p, batch, 0))(params)
        slow = jax.value_and_grad(lambda p: program.loss(p, batch, tr.clamps.hooks(p, batch, 0, capture=wide)))(params)
        return fast, slow

    (fl, fg), (sl, sg) = both(params, jax.random.PRNGKey(1))
    assert abs(float(fl) - float(sl)) <= 1e-5 * abs(float(sl)) and np.isfinite(float(fl))
    for a, b in zip(jax.tree_util.tree_leaves(fg), jax.tree_util.tree_leaves(sg), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
    hooks = tr.clamps.hooks(params, program.batch_at(jax.random.PRNGKey(1), 0), 0)
    if preset[0].startswith("layer0"):  # the clamped layer-1 input is one copy for every head
        assert hooks.narrow("blocks.1.hook_q_input") and hooks.narrow("blocks.1.hook_k_input")
    # every clamp on the last layer (ablated values, pattern clamps at the query) and on the logits (the copy) takes
    # the readout rows: the layer computes its queries at the query position alone
    assert all(hooks.allows_rows(n) for n in [*tr.model.layer_sites(1), "logits"])
