"""The `lab` command end to end: a real run directory, and bad input refused with exit code 2."""

import json
import subprocess

import numpy as np
import pytest
import yaml

from lab.cli import main
from tests.conftest import ROOT, TINY, lab_cmd


def test_train_end_to_end_with_offline_wandb(tmp_path):
    run_dir = tmp_path / "run"
    args = [a for a in TINY if not a.startswith(("tracking.", "measures."))]
    args += ["tracking.wandb.mode=offline", f"run.dir={run_dir}", "measures.names=[auto]"]
    p = subprocess.run(lab_cmd("train", *args), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "run directory:" in p.stderr and "done: 60 steps" in p.stdout
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "curves.png", "checkpoints", "wandb"):
        assert (run_dir / name).exists(), name
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["trainer"]["steps"] == 60 and cfg["task"]["name"] == "repeat"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 20, 30, 40, 60]  # evaluations every 20, plus the checkpoint at 30
    assert all("test/repeated_loss" in r for r in rows)
    assert "train/grad_norm" in rows[-1] and "train/loss" in rows[-1]
    assert {"prev_token/L0H0", "prefix_matching/L1H1", "copying/L1H0", "train/update_ratio"} <= set(rows[-1])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["checkpoints"] == [0, 30, 60]
    assert summary["phase"]["metric"] == "test/repeated_loss"
    assert {"wall_time_s", "steps_per_sec", "versions", "final"} <= set(summary)
    # a token task's run ends with its circuit summary (60 steps: no circuit yet, and it says so)
    c = summary["circuit"]
    assert c["mechanism_metric"] == "heldout/repeated_loss" and c["is_induction_circuit"] is False
    assert c["line"].startswith("NOT an induction circuit") and c["line"] in p.stdout
    assert set(c["prefix_matching_by_head"]) == {"L0H0", "L0H1", "L1H0", "L1H1"}
    assert any((run_dir / "wandb").glob("offline-run-*"))
    # ...and the wandb run's summary holds it (the offline log carries the summary keys)
    log = b"".join(f.read_bytes() for f in (run_dir / "wandb").glob("offline-run-*/*.wandb"))
    assert b"circuit/is_induction_circuit" in log and b"circuit/ablation_induction_heads" in log
    # the same directory is never overwritten
    p2 = subprocess.run(lab_cmd("train", *args), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p2.returncode == 2 and "run.dir" in p2.stderr and "never overwritten" in p2.stderr


def _bad_features(tmp_path):
    path = tmp_path / "feats.npy"
    np.save(path, np.zeros((3, 4), np.float32))
    return path


BAD = [
    (["task=nope"], "task"),
    (["experiment=nope"], "experiment"),
    (["trainer.nope=1"], "nope"),
    (["trainer.steps=abc"], "trainer.steps"),
    (["trainer.steps=-5"], "trainer.steps"),
    (["experiment=reddy_bursty", "task.K=100"], "task.K"),
    (["experiment=reddy_bursty", "task.B=3"], "task.B"),
    (["experiment=reddy_bursty", "task.p_C=1.5"], "task.p_C"),
    (["model.d_model=30", "model.n_heads=4"], "model.d_model"),
    (["model.positions=alibi"], "model.positions"),
    (["optim.name=lion"], "optim.name"),
    (["optim.lr=0"], "optim.lr"),
    (["tracking.wandb.mode=sometimes"], "tracking.wandb.mode"),
    (["experiment=singh_fewshot", "task.features_path=/nonexistent/feats.npy"], "task.features_path"),
    (["experiment=singh_fewshot", "task.features_path=BAD"], "task.features_path"),
    (["experiment=singh_fewshot", "trainer.eval_sets=[trian]"], "trainer.eval_sets"),
    (["experiment=bietti_bigram", "task.text_path=/nonexistent.txt"], "task.text_path"),
    (["watch_smooth=4"], "watch_smooth"),
]


@pytest.mark.parametrize("overrides,field", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_input_exit_2_one_line_nothing_written(overrides, field, tmp_path, capsys):
    overrides = [o.replace("BAD", str(_bad_features(tmp_path))) for o in overrides]
    root = tmp_path / "runs"
    code = main(["train", f"run.root={root}", "tracking.wandb.mode=disabled", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and field in err, err
    assert "Traceback" not in err
    assert not root.exists()


def test_config_command_prints_resolved_config(capsys):
    assert main(["config", "experiment=reddy_bursty", "seed=7"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["seed"] == 7 and cfg["task"]["name"] == "bursty" and cfg["task"]["K"] % cfg["task"]["L"] == 0
    assert cfg["model"]["use_wo"] is False and cfg["optim"]["name"] == "sgd"


@pytest.mark.parametrize("override, raw, lab_line", [
    ("trainer.nope=1", "Could not override 'trainer.nope'", "trainer.nope: unknown field; fields: steps,"),
    ("trainer.steps=abc", "Error merging override trainer.steps=abc", "trainer.steps=abc: must be an integer"),
    ("trainer.progress=maybe", "Error merging override trainer.progress=maybe",
     "trainer.progress=maybe: must be true or false"),
])
def test_hydra_wording_is_what_hydra_message_reads(override, raw, lab_line):
    """Hydra's own wording (read once, in lab.config.hydra_message): this fails when a Hydra or OmegaConf
    release rewords the errors the lab translates, rather than the lab silently printing the raw text."""
    import hydra
    from hydra.core.global_hydra import GlobalHydra

    from lab.config import config_dir, hydra_message, one_line

    GlobalHydra.instance().clear()
    try:
        with hydra.initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name="lab"):
            with pytest.raises(Exception) as info:
                hydra.compose(config_name="config", overrides=[override])
    finally:
        GlobalHydra.instance().clear()
    one = one_line(info.value)
    assert raw in one
    assert hydra_message(one).startswith(lab_line)
