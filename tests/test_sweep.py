"""Sweeps through hydra's launchers (lab.sweep) and batched runs sharded over several devices."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lab.batch import train_batch
from lab.config import load_config
from lab.tracking import read_metrics
from tests.conftest import TINY, lab_cmd

QUICK_SINGH = ["experiment=singh_fewshot", "tracking.wandb.mode=disabled", "trainer.progress=false",
               "trainer.steps=20", "trainer.steps_per_call=10", "trainer.eval_every=10", "trainer.eval_log_points=0",
               "checkpoint.every=10", "checkpoint.log_points=0", "task.eval_size=40", "measures.names=[none]",
               "model.n_heads=2", "model.d_model=16"]


@pytest.mark.parametrize("swept,names", [(["trainer.stepz=1,2"], "trainer.stepz: unknown field"),
                                          (["experiment=nope,demo"], "unknown experiment 'nope'"),
                                          (["seed=0,1", "trainer.steps=10,ten"], "trainer.steps=ten")])
def test_a_bad_sweep_is_refused_in_one_line_before_hydra_writes_anything(swept, names, tmp_path, capsys):
    from lab import cli

    sweep = tmp_path / "sw"
    rc = cli.main(["train", "-m", *TINY, *swept, f"hydra.sweep.dir={sweep}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and names in err[0], err
    assert not sweep.exists()


def _index(sweep):
    return {int(k): v for k, v in json.loads((sweep / "sweep.json").read_text())["jobs"].items()}


@pytest.mark.slow
def test_submitit_local_sweep_of_four_jobs(tmp_path):
    sweep = tmp_path / "sw"
    p = subprocess.run(lab_cmd("train", "-m", *TINY, "trainer.steps=20", "seed=0,1", "optim.lr=1e-3,3e-3",
                               "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}"),
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    idx = _index(sweep)
    assert sorted(idx) == [0, 1, 2, 3] and all(j["status"] == "done" for j in idx.values())
    seen = set()
    for j in idx.values():
        s = json.loads((sweep / str(j["job"]) / "summary.json").read_text())
        cfg = (sweep / str(j["job"]) / "config.yaml").read_text()
        ov = dict(o.split("=", 1) for o in j["overrides"])
        assert s["seed"] == int(ov["seed"]) and f"lr: {float(ov['optim.lr'])}" in cfg
        seen.add((ov["seed"], ov["optim.lr"]))
    assert len(seen) == 4


@pytest.mark.slow
def test_joblib_sweep_with_a_failing_job_then_rerun_finishes_only_what_is_missing(tmp_path):
    good, late = tmp_path / "good.npy", tmp_path / "late.npy"
    feats = np.random.default_rng(0).normal(size=(60, 2, 8)).astype(np.float32)
    np.save(good, feats)
    sweep = tmp_path / "sw"
    cmd = lab_cmd("train", "-m", *QUICK_SINGH, f"task.features_path={good},{late}", "seed=0,1",
                  "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}")
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 1, p.stderr[-3000:]  # some job failed; the others finished
    idx = _index(sweep)
    failed = {k for k, j in idx.items() if j["status"] == "failed"}
    done = {k for k, j in idx.items() if j["status"] == "done"}
    assert len(failed) == 2 and len(done) == 2
    for k in failed:
        assert any(str(late) in o for o in idx[k]["overrides"])
        assert idx[k]["reason"].startswith("task.features_path=") and "\n" not in idx[k]["reason"]
    # the missing input appears; one finished job is made unfinished (as if killed after its last checkpoint)
    np.save(late, feats)
    resumed = min(done)
    (sweep / str(resumed) / "summary.json").unlink()
    untouched = max(done)
    mtime = (sweep / str(untouched) / "summary.json").stat().st_mtime_ns
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    idx = _index(sweep)
    assert all(j["status"] == "done" for j in idx.values())
    assert (sweep / str(untouched) / "summary.json").stat().st_mtime_ns == mtime  # skipped, not retrained
    assert (sweep / str(resumed) / "summary.json").exists()
    steps = [r["step"] for r in read_metrics(sweep / str(resumed) / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 20
    p = subprocess.run(lab_cmd("compare", str(sweep), "--out", str(tmp_path / "cmp")), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]


@pytest.mark.slow  # a whole second process (two forced host devices)
def test_batched_runs_sharded_over_two_devices_equal_one_device(tiny, tmp_path):
    ov = tiny + ["trainer.seeds=[0,1]"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    code = ("import jax, sys; from lab import cli; assert len(jax.devices()) == 2; "
            "sys.exit(cli.main(sys.argv[1:]))")
    p = subprocess.run([sys.executable, "-c", code, "train", *ov, f"run.dir={tmp_path / 'two'}", "--quiet"],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    one_ov = ov + [f"run.dir={tmp_path / 'one'}"]
    cfg, node = load_config(one_ov)
    train_batch(cfg, node, one_ov, quiet=True)
    for run in ("none-s0", "none-s1"):
        a = read_metrics(tmp_path / "two" / run / "metrics.jsonl")
        b = read_metrics(tmp_path / "one" / run / "metrics.jsonl")
        assert [r["step"] for r in a] == [r["step"] for r in b]
        for ra, rb in zip(a, b, strict=True):
            keys = [k for k in rb if not k.startswith("perf/")]
            np.testing.assert_allclose([ra[k] for k in keys], [rb[k] for k in keys], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_sweep_over_a_plugin_task_finds_its_config_groups(tmp_path):
    """The example plug-in's experiment (a config group of its package, on the search path) swept by seed."""
    from tests.test_plugins import NC

    sweep = tmp_path / "sw"
    p = subprocess.run(lab_cmd("train", "-m", *NC, "seed=0,1", f"hydra.sweep.dir={sweep}"), capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    idx = _index(sweep)
    assert sorted(idx) == [0, 1] and all(j["status"] == "done" for j in idx.values())
    for j in idx.values():
        s = json.loads((sweep / str(j["job"]) / "summary.json").read_text())
        assert s["task"] == "noisy_copy" and "icl_gain" in s["final"]
