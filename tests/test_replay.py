"""Resume, fork, replay, compare and show, on real run directories."""

import json
import shutil

import jax
import numpy as np
import pytest
import yaml

from lab.checkpoint import Checkpointer
from lab.cli import main
from lab.comparison import aligned, compare, group_runs, show
from lab.config import load_config
from lab.replay import fork_run, replay_run, resume_run
from lab.run import train_run
from lab.tracking import read_metrics
from tests.conftest import TINY

RUN = TINY + ["checkpoint.every=15", "measures.names=[prev_token]"]  # checkpoints off the eval grid (every 20)


def strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def params_at(run_dir, step, like):
    return jax.device_get(Checkpointer(run_dir / "checkpoints", read_only=True).restore(step, like)["params"])


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs") / "parent"
    overrides = RUN + [f"run.dir={d}"]
    cfg, node = load_config(overrides)
    train_run(cfg, node, quiet=True, overrides=overrides)
    from lab.runs import Runs

    return d, Runs(cfg).init_run_state().saved()


@pytest.mark.parametrize("last", [15, 0])
def test_resume_is_identical_to_uninterrupted(parent, tmp_path, last):
    src, like = parent
    run = tmp_path / "interrupted"
    shutil.copytree(src, run)
    # what a run killed after its step-`last` checkpoint leaves: later checkpoints gone, rows logged
    # after the checkpoint present, no summary (last=0: only the step-0 checkpoint, which resuming
    # must not try to write again)
    for s in (15, 30, 45, 60):
        if s > last:
            shutil.rmtree(run / "checkpoints" / str(s))
    (run / "summary.json").unlink()
    assert Checkpointer(run / "checkpoints", read_only=True).steps() == [s for s in (0, 15) if s <= last]
    resume_run(run, quiet=True)
    a, b = strip(read_metrics(src / "metrics.jsonl")), strip(read_metrics(run / "metrics.jsonl"))
    assert [r["step"] for r in b] == [0, 15, 20, 30, 40, 45, 60]  # each step exactly once
    assert a == b
    for x, y in zip(jax.tree_util.tree_leaves(params_at(src, 60, like)),
                    jax.tree_util.tree_leaves(params_at(run, 60, like)), strict=True):
        np.testing.assert_array_equal(x, y)
    assert json.loads((run / "summary.json").read_text())["checkpoints"] == [0, 15, 30, 45, 60]


def test_fork_without_changes_continues_like_parent(parent, tmp_path):
    src, like = parent
    fork = fork_run(src, 15, [], run_dir=str(tmp_path / "fork"), quiet=True)
    rows_p = {r["step"]: r for r in strip(read_metrics(src / "metrics.jsonl"))}
    rows_f = strip(read_metrics(fork / "metrics.jsonl"))
    assert [r["step"] for r in rows_f] == [15, 20, 30, 40, 45, 60]
    for r in rows_f:
        want = {k: v for k, v in rows_p[r["step"]].items() if not k.startswith("train/")}
        assert {k: v for k, v in r.items() if not k.startswith("train/")} == want
    for x, y in zip(jax.tree_util.tree_leaves(params_at(src, 60, like)),
                    jax.tree_util.tree_leaves(params_at(fork, 60, like)), strict=True):
        np.testing.assert_array_equal(x, y)
    summary = json.loads((fork / "summary.json").read_text())
    assert summary["parent"] == {"run_dir": str(src), "step": 15, "overrides": []}
    assert yaml.safe_load((fork / "config.yaml").read_text())["run"]["dir"] == str(fork)


def test_fork_with_clamp_changes_the_continuation(parent, tmp_path):
    src, _ = parent
    # the fork's directory given as an override, as on the command line (`lab fork RUN --step 15 run.dir=...`)
    # the prev_token preset is Singh's L0H2; a plain override moves it to this 2-head model's L0H0
    fork = fork_run(src, 15, ["clamp=prev_token", "clamps.prev_token.heads=[0]", f"run.dir={tmp_path / 'fork_clamp'}"],
                    quiet=True)
    assert fork == tmp_path / "fork_clamp"
    assert yaml.safe_load((fork / "config.yaml").read_text())["run"]["dir"] == str(fork)
    s = json.loads((fork / "summary.json").read_text())
    assert s["condition"] == "prev_token" and s["steps_this_session"] == s["steps"] - 15
    rows = {r["step"]: r for r in read_metrics(fork / "metrics.jsonl")}
    parent_rows = {r["step"]: r for r in read_metrics(src / "metrics.jsonl")}
    # the clamp acts from the fork's first row on (evaluation is clamped too) ...
    assert rows[15]["test/loss"] != parent_rows[15]["test/loss"]
    # ... while the measures describe the learned weights, unclamped: identical at the fork point
    assert rows[15]["prev_token/L0H0"] == parent_rows[15]["prev_token/L0H0"]
    assert rows[60]["prev_token/L0H0"] != parent_rows[60]["prev_token/L0H0"]


def test_replay_matches_logged_values_and_adds_probe_clamps(parent):
    src, _ = parent
    out = replay_run(src, steps=[15, 60], quiet=True, wandb_mode="disabled",
                     overrides=["+measures.clamps.pm={site:blocks.1.attn.hook_pattern,value:induction}"])
    logged = {r["step"]: r for r in read_metrics(src / "metrics.jsonl")}
    replayed = read_metrics(out)
    assert [r["step"] for r in replayed] == [15, 60]
    for r in replayed:
        for k in ("test/loss", "test/repeated_acc", "prev_token/L0H0", "prev_token/L1H1"):
            assert r[k] == pytest.approx(logged[r["step"]][k], rel=1e-6, abs=1e-7), k
        assert "test@pm/loss" in r


def test_replay_on_another_layout_with_the_circuit_summary_at_each_checkpoint(parent):
    """`lab replay RUN task.seg_len=N` probes the trained model on one other segment length; with the circuit
    summary on, every replayed row carries it (at 60 tiny steps: no circuit)."""
    src, _ = parent
    out = replay_run(src, steps=[0, 60], quiet=True, wandb_mode="disabled", out_name="replay_layout.jsonl",
                     overrides=["task.seg_len=4", "measures.circuit=true"])
    logged = {r["step"]: r for r in read_metrics(src / "metrics.jsonl")}
    for r in read_metrics(out):
        assert r["test/repeated_loss"] != pytest.approx(logged[r["step"]]["test/repeated_loss"], rel=1e-4)
        assert r["circuit/is_induction_circuit"] == 0.0 and r["circuit/prefix_matching"] < 0.3
        assert {"circuit/ablation_induction_heads", "circuit/prev_token", "circuit/mechanism_loss"} <= set(r)


def _fake_run(d, every, task="repeat", condition="none", mid=1000.0, seed=0):
    d.mkdir(parents=True)
    steps = sorted(set(np.unique(np.geomspace(1, 10000, 60).astype(int)).tolist()) | set(range(0, 10001, every)))
    rows = [{"step": s, "test/loss": float(4 - 3 / (1 + np.exp(-(np.log10(max(s, 1)) - np.log10(mid)) / 0.15)))}
            for s in steps]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "summary.json").write_text(json.dumps({"experiment": "x", "condition": condition, "task": task, "seed": seed,
                                                "batch_size": 8, "phase": {"metric": "test/loss"}}))
    (d / "config.yaml").write_text("seed: 0\n")
    return d


def test_compare_aligns_cadences_and_writes_selfcontained_report(tmp_path):
    a = _fake_run(tmp_path / "runs" / "a", every=50)
    b = _fake_run(tmp_path / "runs" / "b", every=500, seed=1)
    c = _fake_run(tmp_path / "runs" / "c", every=100, condition="clamped", mid=300.0)
    groups = group_runs([a, b, c])
    assert set(groups) == {"x/none", "x/clamped"} and len(groups["x/none"]) == 2
    grid, mean, lo, hi = aligned(groups["x/none"], "test/loss", "step")
    assert np.max(hi - lo) < 0.05  # same curve logged at different cadences lines up
    out = compare([tmp_path / "runs"], metrics=["test/loss"], baseline=str(a), out=tmp_path / "cmp")
    table = (out / "table.md").read_text()
    assert "x/none" in table and "x/clamped" in table
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "http" not in html and "<script" not in html
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| x/")}
    delta = float(rows["x/clamped"].split("|")[-2])
    assert delta == pytest.approx(300 - 1000, rel=0.05)


def test_show_prints_one_screen(parent):
    src, _ = parent
    text = show(src)
    assert "experiment demo" in text and "checkpoints: [0, 15, 30, 45, 60]" in text and len(text.splitlines()) < 25


def test_bad_input(parent, tmp_path, capsys):
    src, _ = parent
    other = _fake_run(tmp_path / "other", every=100, task="bursty")
    cases = [
        (["resume", str(tmp_path)], "not a run directory"),
        (["fork", str(src), "--step", "7"], "--step=7"),
        (["replay", str(src), "--steps", "5"], "--steps=[5]"),
        (["replay", str(src), "--steps", "5000:"], "selects no checkpoint"),
        (["replay", str(src), "--name", "metrics.jsonl"], "--name=metrics.jsonl"),
        (["train", "+measures.clamps.f={site:blocks.0.hook_attn_out,value:frozen}"], "measures.clamps.f.value"),
        (["compare", str(src), str(other), "--out", str(tmp_path / "c")], "incompatible"),
        (["compare", str(src), "--metric", "nope/loss", "--out", str(tmp_path / "c")], "--metric=nope/loss"),
        (["compare", str(src), "--wandb", "sometimes", "--out", str(tmp_path / "c")], "--wandb=sometimes"),
        (["show", str(tmp_path / "nope")], "not a run directory"),
    ]
    for argv, text in cases:
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and text in err, (argv, err)
    assert not (tmp_path / "c").exists()
