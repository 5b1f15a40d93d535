"""The circuit summary: a shortcut is flagged, a real induction circuit is recognised (short real runs)."""

import json

import numpy as np
import pytest

from lab.config import load_config
from lab.measures import mechanism
from lab.run import train_run

QUIET = ["tracking.wandb.mode=disabled", "trainer.progress=false", "checkpoint.every=0", "checkpoint.log_points=2",
         "trainer.eval_log_points=0", "measures.names=[none]"]


def _train(overrides, tmp_path, name):
    given = [*overrides, *QUIET, f"run.dir={tmp_path / name}"]
    cfg, node = load_config(given)
    run = train_run(cfg, node, quiet=True, overrides=given)  # recorded, as the CLI does: replay re-composes them
    return json.loads((run / "summary.json").read_text())


def test_k_composition_reads_what_the_previous_head_writes():
    d, e = 8, 4
    rng = np.random.default_rng(0)
    wv, wo = rng.standard_normal((1, d, e)), rng.standard_normal((1, e, d))
    ov = wv[0] @ wo[0]
    _, _, vh = np.linalg.svd(ov)  # the head writes x @ ov: into the span of vh's first e rows
    aligned = vh[:e].T[None]  # keys that read exactly the subspace the head writes
    orthogonal = vh[e:2 * e].T[None]  # keys that read none of it
    params = {"blocks": {"0": {"attn": {"W_V": wv, "W_O": wo}}, "1": {"attn": {"W_K": aligned}}}}
    high = mechanism.k_composition(params, {}, (0, 0), (1, 0))
    params["blocks"]["1"]["attn"]["W_K"] = orthogonal
    low = mechanism.k_composition(params, {}, (0, 0), (1, 0))
    assert low < 1e-6 < 0.3 < high
    assert 0.05 < mechanism.random_k_composition(d, e) < high


@pytest.mark.slow  # ~10-20 s: in CI's slow suite, to keep `make test` inside its 10 minutes
def test_the_old_fixed_offset_layout_is_flagged_as_a_shortcut(tmp_path):
    """The old demo: BOS + a 16-token segment repeated at a fixed offset, learned positions. Its repeated-token
    loss falls, but by a layer-0 head that looks 15 back: the summary must say it is no induction circuit."""
    s = _train(["experiment=demo", "task.layout=fixed", "task.seg_len=16", "model.positions=learned",
                "trainer.steps=600", "optim.lr=1e-3", "optim.warmup_steps=0", "trainer.eval_every=200"],
               tmp_path, "fixed")
    c = s["circuit"]
    assert s["final"]["test/repeated_loss"] < 2.0  # the curve says "learnt"...
    assert c["is_induction_circuit"] is False and c["line"].startswith("NOT an induction circuit")
    # ...the held-out layouts and the heads say "shortcut"
    assert c["heldout_loss"] > c["trained_loss"] + 2.0
    failed = [k for k, ok in c["checks"].items() if not ok]
    assert any(k.startswith("heldout/repeated_loss within") for k in failed)
    assert any(f.startswith("heldout/repeated_loss is ") for f in c["failed"])  # worded as what was found


def test_the_demo_grows_a_previous_token_head_and_an_induction_head_that_generalise(tmp_path):
    """The default demo (seed 0), cut after its transition: the circuit is the one Olsson describes, it works
    on layouts never trained on, and it is causal."""
    s = _train(["experiment=demo", "trainer.steps=2700", "trainer.eval_every=900"], tmp_path, "demo")
    c = s["circuit"]
    assert c["induction_head"].startswith("L1") and c["prefix_matching"] > 0.8  # the top prefix-matching head
    assert c["prev_token_head"].startswith("L0") and c["prev_token"] > 0.3  # a layer-0 previous-token head
    assert c["heldout_loss"] < c["trained_loss"] + 0.5 and c["heldout_loss"] < 1.0  # held-out layouts too
    assert c["ablation"][c["induction_head"]] > 3.0 and c["ablation_induction_heads"] > 3.0  # several nats without it
    assert c["induction_heads"] == ["L1H0"] and c["prev_token_heads"] == ["L0H0"]
    assert c["is_induction_circuit"] and c["line"].startswith("induction circuit: L0H0")


def test_a_clamped_run_is_summarised_as_trained_and_without_its_clamps(tmp_path):
    """A short run with a perfect previous-token pattern clamped on L0H1: as trained, that head is a
    previous-token head (score ~1) and is named as clamped; without the clamps its own pattern is summarised
    (a 40-step model has no previous-token head of its own). A failed check reads as what was found."""
    from tests.conftest import TINY

    clamp = "+clamps.pt={site: blocks.0.attn.hook_pattern, heads: [1], value: previous_token}"
    s = _train([*[o for o in TINY if not o.startswith(("measures.", "checkpoint."))], clamp, "trainer.steps=40",
                "measures.circuit=true"], tmp_path, "clamped")
    free, trained = s["circuit"], s["circuit_as_trained"]
    assert trained["clamped"] == ["L0H1 (hook_pattern: previous_token)"] and "clamped" not in free
    assert trained["prev_token_by_head"]["L0H1"] > 0.95  # the clamp's pattern, as the run trained with it
    assert free["prev_token_by_head"]["L0H1"] < 0.5  # the head's own pattern
    assert trained["line"].startswith("as trained (clamped: L0H1 (hook_pattern: previous_token)): ")
    assert not free["line"].startswith("as trained")
    for view in (free, trained):  # every failed check is a finding, not the criterion it failed
        assert view["failed"] and all("(it is" not in f and ">= 0.3 (best" not in f for f in view["failed"])
        assert view["line"].endswith("; ".join(view["failed"])) or view["is_induction_circuit"]
    # lab show prints both
    from lab.comparison import show

    text = show(tmp_path / "clamped")
    assert "without clamps: " + free["line"] in text and trained["line"] in text
    # lab replay gives both views at every checkpoint it reads, the same as the final summary's at the last step
    from lab.replay import replay_run
    from lab.tracking import read_metrics

    rows = read_metrics(replay_run(tmp_path / "clamped", steps=[40], quiet=True, wandb_mode="disabled"))
    assert rows[-1]["circuit_as_trained/prev_token"] == pytest.approx(trained["prev_token"], abs=1e-5)
    assert rows[-1]["circuit/prev_token"] == pytest.approx(free["prev_token"], abs=1e-5)
    assert rows[-1]["circuit_as_trained/prev_token"] > 0.95 > 0.5 > rows[-1]["circuit/prev_token"]


def test_a_previous_token_role_shared_by_several_heads_counts_only_if_ablating_them_together_matters():
    """Several layer-0 heads with previous-token scores of 0.15-0.3 each (no one head at 0.3) share the role when
    their scores add up to 0.3 and ablating them together raises the mechanism loss by the task's margin; the
    attention scores are set here (the measures have their own tests), the ablations are the model's own."""
    from lab.runs import Runs

    cfg, _ = load_config(["experiment=demo", "model.n_heads=4", "task.eval_size=64", *QUIET])
    trainer = Runs(cfg)
    cs = mechanism.CircuitSummary(trainer.model, trainer.task)
    params = trainer.model.params()
    pm = np.zeros((2, 4), np.float32)
    pm[1, 0] = 0.9

    def summary(prev_layer0, ablation_effects=None):
        prev = np.zeros((2, 4), np.float32)
        prev[0] = prev_layer0
        cs._scores = lambda p: (prev, pm)
        if ablation_effects is not None:  # the loss each set of ablated heads gives (a trained model's effects)
            cs.ablated = lambda p, heads: ablation_effects(heads)
        return mechanism.summarise(cs, params)

    alone = summary([0.28, 0.05, 0.0, 0.0])  # one head below the threshold, no one to share with
    assert not alone["prev_token_shared"] and alone["prev_token_heads"] == ["L0H0"]
    assert any("attends to the previous token (best L0H0: 0.28" in f for f in alone["failed"])
    untrained = summary([0.28, 0.24, 0.22, 0.05])  # shared by L0H0-L0H2, but ablating them does nothing here
    assert untrained["prev_token_shared"] and untrained["prev_token_heads"] == ["L0H0", "L0H1", "L0H2"]
    assert untrained["prev_token_together"] == pytest.approx(0.74, abs=1e-5)
    assert any("share previous-token attention (together 0.74) but ablating them together adds only" in f
               for f in untrained["failed"])
    effects = lambda heads: 6.0 if {(0, 0), (0, 1), (0, 2)} <= set(heads) or (1, 0) in heads else 0.1  # noqa: E731
    shared = summary([0.28, 0.24, 0.22, 0.05], effects)
    assert shared["ablation_prev_token_heads"] == pytest.approx(5.9)
    assert shared["is_induction_circuit"], shared["failed"]
    assert shared["line"].startswith("induction circuit: L0H0 (+2 more) previous-token (0.28; together 0.74) -> L1H0")
    enough = summary([0.31, 0.24, 0.22, 0.05], effects)  # one head at the threshold: no sharing needed
    assert not enough["prev_token_shared"] and enough["prev_token_heads"] == ["L0H0"]
