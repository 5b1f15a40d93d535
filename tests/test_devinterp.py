"""Developmental interpretability over a run's checkpoints: restricted LLC masks, the LLC at every checkpoint as
one program (files, figure, wandb), essential dynamics and its turning points. The tests that train a run and read
its checkpoints back (about 50 s together) are in the slow suite, which CI runs too: `make test` stays within its
10 minutes."""

import json
import subprocess

import jax
import numpy as np
import pytest

from lab.config import load_config
from lab.devinterp import essential_dynamics, llc_over_checkpoints, restriction_mask, turning_points
from lab.errors import LabError
from lab.measures.llc import LLCSettings
from lab.run import train_run
from tests.conftest import TINY


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("di") / "r"
    ov = TINY + ["checkpoint.every=15", "tracking.wandb.mode=offline", f"run.dir={root}"]
    return train_run(*load_config(ov), quiet=True)


def test_a_heads_restriction_moves_its_slices_only():
    from lab.model import ModelConfig, Transformer

    m = Transformer(ModelConfig(n_layers=2, n_heads=3, d_model=12, freeze=["blocks.1.attn.W_V"]), seq_len=8,
                    vocab_size=11, n_outputs=11)
    p = m.params()
    trainable = jax.tree_util.tree_map(lambda f: not f, m.frozen_mask(p))
    mask = restriction_mask(p, "L1H2", trainable)
    a = mask["blocks"]["1"]["attn"]
    for w in ("W_Q", "W_K", "W_O"):
        assert np.asarray(a[w][2]).all() and not np.asarray(a[w][:2]).any()
    assert not np.asarray(a["W_V"]).any()  # frozen stays frozen
    assert not any(np.asarray(x).any() for x in jax.tree_util.tree_leaves(mask["blocks"]["0"]))
    assert not np.asarray(mask["embed"]["W_E"]).any() and not np.asarray(a["b_O"]).any()
    layer = restriction_mask(p, "L0", trainable)
    assert all(np.asarray(x).all() for x in jax.tree_util.tree_leaves(layer["blocks"]["0"]))
    assert not np.asarray(layer["unembed"]["W_U"]).any()
    for bad in ("L2", "L1H3", "head1", "L1H"):
        with pytest.raises(LabError, match=f"--restrict={bad}"):
            restriction_mask(p, bad, trainable)


@pytest.mark.slow
def test_llc_at_every_checkpoint_as_one_program(run):
    s = LLCSettings(nbeta=20.0, eps=1e-4, gamma=100.0, chains=2, steps=24, burn_in=8)
    out = llc_over_checkpoints(run, s, restrict=["all", "L1H1"], quiet=True)
    doc = json.loads((out / "llc.json").read_text())
    assert doc["steps"] == [0, 15, 30, 45, 60] and doc["settings"]["chains"] == 2
    for r in ("all", "L1H1"):
        rows = doc["restrictions"][r]
        assert [row["step"] for row in rows] == doc["steps"]
        assert all(len(row["chains"]) == 2 and np.isfinite(row["llc"]) for row in rows)
        assert all(row["chains"][0] != row["chains"][1] for row in rows)  # independent chains, not one twice
    # a head is a small part of the model: its chains rise less than the whole model's
    whole = np.mean([row["llc"] for row in doc["restrictions"]["all"][1:]])
    head = np.mean([row["llc"] for row in doc["restrictions"]["L1H1"][1:]])
    assert head < whole
    traces = np.load(out / "traces.npz")
    assert traces["all"].shape == (5, 2, 24)
    # the traces are nβ (loss - start): their mean over the draws is each chain's estimate
    first = doc["restrictions"]["all"][1]["chains"][0]
    assert float(traces["all"][1, 0, 8:].mean()) == pytest.approx(first, rel=1e-4)
    assert (out / "llc.png").stat().st_size > 10_000
    # the wandb run of job_type llc, in the run's group
    (log_dir,) = [d for d in (run / "wandb").glob("offline-run-*") if "llc" in d.name.rsplit("-", 1)[-1]]
    p = subprocess.run([str(__import__("tests.test_wandb", fromlist=["WANDB"]).WANDB), "leet", "inspect", "--json",
                        str(log_dir)], capture_output=True, text=True, timeout=120)
    recs = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    (wrun,) = [x["run"] for x in recs if x["type"] == "run"]
    assert wrun["job_type"] == "llc" and wrun["run_group"] == "demo"
    hist = [x["history"]["item"] for x in recs if x["type"] == "history"]
    assert [h["_step"] for h in hist if "llc/mean" in h] == doc["steps"]
    assert hist[0]["llc/mean"] == pytest.approx(doc["restrictions"]["all"][0]["llc"])


def test_turning_points_of_a_trajectory():
    t = np.linspace(0, 1, 21)
    # down, a flat plateau with wiggles, then up: one turn, spanning the plateau
    x = np.concatenate([np.linspace(5, 0, 7), 0.02 * np.sin(np.arange(7) * 2.0), np.linspace(0.5, 6, 7)])
    turns = turning_points(np.stack([x, t], 1))
    assert len(turns) == 1 and turns[0][0] >= 6 and turns[0][2] <= 14 and 7 <= turns[0][1] <= 13
    assert turning_points(np.stack([t, 2 * t], 1)) == []  # straight on: none
    wiggle = np.stack([t + 0.01 * np.sin(np.arange(21) * 3), t], 1)
    assert turning_points(wiggle) == []  # noise turns back by far less than the range


@pytest.mark.slow
def test_essential_dynamics_files_and_cli(run, capsys):
    from lab.devinterp import load_checkpoints

    out = essential_dynamics(run, components=4, probe=8)
    doc = json.loads((out / "dynamics.json").read_text())
    assert doc["steps"] == [0, 15, 30, 45, 60] and np.asarray(doc["coords"]).shape == (5, 4)
    # with all 4 components the coordinates keep every distance between checkpoints' log-probabilities
    trainer, _, stacked = load_checkpoints(run, [0, 60])
    batch = jax.tree_util.tree_map(lambda a: a[:8], next(iter(trainer.task.evals.values())))
    where = np.asarray(batch["loss_mask"]) > 0
    lp = [np.asarray(jax.nn.log_softmax(trainer.model.apply(jax.tree_util.tree_map(lambda x, i=i: x[i], stacked),
                                                              batch)))[where] for i in (0, 1)]
    coords = np.asarray(doc["coords"])
    assert np.linalg.norm(coords[0] - coords[4]) == pytest.approx(float(np.linalg.norm(lp[0] - lp[1])), rel=1e-3)
    assert (out / "dynamics.png").stat().st_size > 10_000
    def written():  # what the run's llc folder holds (the LLC test may or may not have run first)
        return {f.name: f.stat().st_mtime_ns for f in (run / "llc").glob("*")}

    before = written()
    from lab.cli import main

    for argv, text in ((["dynamics", str(run), "--components", "0"], "--components"),
                       (["llc", str(run), "--restrict", "L9"], "--restrict=L9"),
                       (["llc", str(run), "--restrict", ","], "--restrict="),
                       (["llc", str(run), "--calibrate", "--eps-grid", ""], "--eps-grid"),
                       (["llc", str(run), "--calibrate", "--gamma-grid=-1,100"], "--gamma-grid='-1,100'"),
                       (["llc", str(run), "--calibrate", "--eps-grid", "inf"], "--eps-grid='inf'"),
                       (["llc", str(run), "--gamma", "-1"], "--gamma=-1")):
        code = main(argv)  # in-process, as the CLI runs it (one subprocess each would cost a JAX import)
        err = capsys.readouterr().err.strip()
        assert code == 2 and text in err and len(err.splitlines()) == 1, (argv, err)
    assert written() == before  # nothing written or rewritten


@pytest.mark.slow
def test_calibration_sweeps_step_size_nbeta_and_gamma_and_recommends_a_stable_cell(run):
    from lab.devinterp import calibrate

    s = LLCSettings(nbeta=20.0, eps=1e-4, gamma=100.0, chains=2, steps=300, burn_in=100)
    out = calibrate(run, step=60, eps=[1e-6, 3e-4, 1e-3, 1.0], nbeta=[10.0, 30.0], gamma=[100.0, 1000.0], settings=s)
    doc = json.loads((out / "calibration.json").read_text())
    cells = {(c["eps"], c["nbeta"], c["gamma"]): c for c in doc["cells"]}
    assert len(cells) == 16 and doc["step"] == 60 and doc["gamma"] == [100.0, 1000.0]
    # a step size of 1 throws every chain off, and the diagnostics say so
    assert all("not finite" in cells[(1.0, nb, g)]["diagnostics"][0] for nb in (10.0, 30.0) for g in (100.0, 1000.0))
    # one of 1e-6 has hardly left the start: far below the rest, and never recommended
    assert all(cells[(1e-6, nb, 100.0)]["llc"] < 0.2 * cells[(3e-4, nb, 100.0)]["llc"] for nb in (10.0, 30.0))
    assert doc["recommended"], doc["cells"]
    for r in doc["recommended"]:
        c = cells[(r["eps"], r["nbeta"], r["gamma"])]
        assert not c["diagnostics"] and r["eps"] in (3e-4, 1e-3)
    # this barely trained model's loss is flat: a ten times stronger localisation, not the loss, holds its chains,
    # and shrinks every estimate; so no recommendation is stable in gamma
    for e in (3e-4, 1e-3):
        for nb in (10.0, 30.0):
            assert cells[(e, nb, 1000.0)]["llc"] < 0.5 * cells[(e, nb, 100.0)]["llc"]
    assert all(r["gamma_stable"] is False for r in doc["recommended"])
    assert (out / "calibration.png").stat().st_size > 10_000


@pytest.mark.slow
def test_devinterp_estimates_the_same_llc_from_the_same_checkpoints(run, tmp_path):
    """devinterp's own estimator (torch, in the optional environment `make test-slow` builds: `make bench-tl-env`)
    on the run's checkpoints loaded into TransformerLens, against the lab's, at matched settings on one sampling
    set (bench/devinterp_side_by_side.py). Agreement: within the chains' spread (|z| < 3), at two checkpoints whose
    estimates differ in sign."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    python = root / ".venv-tl" / "bin" / "python"
    assert python.exists(), "no .venv-tl: `make bench-tl-env` builds devinterp's environment (make test-slow does)"
    sys.path.insert(0, str(root / "bench"))
    from devinterp_side_by_side import side_by_side

    doc = side_by_side(run, [0, 60], chains=8, llc_steps=150, eps=3e-4, gamma=100.0, nbeta=20.0, python=str(python),
                       out=tmp_path)
    rows = doc["checkpoints"]
    assert [r["step"] for r in rows] == [0, 60]
    for r in rows:
        assert r["max_logit_diff"] < 1e-4, r  # the same function in both frameworks
        assert r["max_grad_diff"] < 1e-4, r  # and the same gradient, relative to its largest entry
        assert abs(r["z"]) < 3, r
        assert r["devinterp"] == pytest.approx(r["devinterp_own"], rel=1e-5)  # no burn-in: devinterp's own number
    # and what they agree on differs between the checkpoints: the untrained model is no local minimum (the chains
    # find lower loss around it, a negative estimate, in both tools), the trained one is
    first, last = rows
    assert first["lab"] < 0 and first["devinterp"] < 0 and last["lab"] > 0 and last["devinterp"] > 0, rows
    assert json.loads((tmp_path / "side_by_side.json").read_text())["speedup"] > 0
    assert (tmp_path / "llc_side_by_side.png").stat().st_size > 10_000


def test_transformerlens_export_names_shapes_and_refusals():
    from lab.model import ModelConfig, Transformer
    from lab.transformerlens import tl_config, tl_state_dict

    m = Transformer(ModelConfig(n_layers=2, n_heads=2, d_model=8, positions="shortformer"), seq_len=6, vocab_size=9,
                    n_outputs=8)
    sd = tl_state_dict(m, m.params())
    # HookedTransformer(attn_only=True, normalization_type="LN")'s parameters, by its names and shapes
    want = {"embed.W_E": (9, 8), "pos_embed.W_pos": (6, 8), "ln_final.w": (8,), "ln_final.b": (8,),
            "unembed.W_U": (8, 8), "unembed.b_U": (8,)}
    for layer in (0, 1):
        b = f"blocks.{layer}"
        want |= {f"{b}.ln1.w": (8,), f"{b}.ln1.b": (8,), f"{b}.attn.W_O": (2, 4, 8), f"{b}.attn.b_O": (8,)}
        want |= {f"{b}.attn.W_{s}": (2, 8, 4) for s in "QKV"} | {f"{b}.attn.b_{s}": (2, 4) for s in "QKV"}
    assert {k: v.shape for k, v in sd.items()} == want
    cfg = tl_config(m)
    assert cfg["positional_embedding_type"] == "shortformer" and cfg["attn_only"] and cfg["d_vocab_out"] == 8
    assert cfg["n_ctx"] == 6 and cfg["d_vocab"] == 9 and cfg["d_head"] == 4 and cfg["normalization_type"] == "LN"
    for field, value in (("positions", "sinusoidal"), ("bias", False)):
        other = Transformer(ModelConfig(n_layers=1, n_heads=1, d_model=8, **{field: value}), seq_len=6, vocab_size=9,
                            n_outputs=8)
        with pytest.raises(LabError, match=f"^model.{field}={value}: TransformerLens export needs"):
            tl_config(other)


def test_the_text_stages_read_head_births_and_the_llcs_turns_from_a_runs_files():
    """experiments/text_stages.py: a head is born at the first logged step its best score exceeds 0.3 (layer 0
    for previous-token heads, later layers for prefix matching); the LLC's turns are its prominent extrema."""
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("text_stages", ROOT / "experiments" / "text_stages.py")
    stages = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stages)
    log = [{"step": 0, "prev_token/L0H0": 0.1, "prev_token/L0H1": 0.0, "prefix_matching/L1H0": 0.0},
           {"step": 100, "prev_token/L0H0": 0.2, "prev_token/L0H1": 0.31, "prefix_matching/L1H0": 0.1,
            "prev_token/L1H0": 0.9},  # a later layer's previous-token score is no layer-0 head's
           {"step": 200, "prev_token/L0H0": 0.2, "prev_token/L0H1": 0.4, "prefix_matching/L1H0": 0.2},
           {"step": 200, "prefix_matching/L1H0": 0.5},  # a step logged twice (a fork): the later row wins
           {"step": 300, "prev_token/L0H0": 0.2, "prev_token/L0H1": 0.4, "prefix_matching/L1H0": 0.6}]
    rows = stages.per_step(log)
    assert list(rows) == [0, 100, 200, 300] and rows[200]["prefix_matching/L1H0"] == 0.5
    prev = stages.head_births(rows, "prev_token", [0])
    assert prev["birth"] == 100 and prev["top_head"] == "L0H1" and "prev_token/L1H0" not in prev["heads"]
    assert stages.head_births(rows, "prefix_matching", [1])["birth"] == 200
    assert stages.head_births(rows, "copying", [1])["birth"] is None
    llc = {"restrictions": {"all": [{"step": s, "llc": v, "std_err": 0.1} for s, v in
                                    zip([0, 10, 100, 1000, 2000, 4000, 8000], [2, 3, 8, 5, 5.1, 9, 10], strict=True)]}}
    found = stages.llc_stages(llc, prominence=0.1)
    assert [(t["step"], t["kind"]) for t in found["turns"]] == [(100, "maximum"), (1000, "minimum")]
    assert found["turns"][1]["to_step"] == 2000  # the minimum is a flat stretch: 5.0 and 5.1
    assert found["loglog_slopes"][0] == {"from": 10.0, "to": 100.0, "slope": pytest.approx(np.log(8 / 3) / np.log(10))}
