"""What reaches wandb, read back with wandb's own reader (``wandb leet inspect --json`` on the offline log), not
with the lab's files: the group, the condition as job_type, every logged row in the history (with the
sequences seen), and summary.json's phase and condition in the wandb summary."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from lab.batch import train_batch
from lab.config import load_config
from lab.replay import fork_run, replay_run
from lab.tracking import read_metrics, wandb_id

WANDB = Path(shutil.which("wandb") or Path(__file__).resolve().parents[1] / ".venv" / "bin" / "wandb")


def wandb_records(run_dir: Path, run_id: str | None = None) -> list[dict]:
    """Every record of the run's offline .wandb log (the one of ``run_id``, the run's own by default), as wandb's
    inspector prints them."""
    (log_dir,) = list((run_dir / "wandb").glob(f"offline-run-*-{run_id or wandb_id(run_dir)}"))
    p = subprocess.run([str(WANDB), "leet", "inspect", "--json", str(log_dir)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    from tests.conftest import TINY

    root = tmp_path_factory.mktemp("wb") / "b"
    ov = TINY + ["model.n_heads=4", "trainer.steps=200", "trainer.eval_every=10", "checkpoint.every=100",
                 "conditions=[none,prev_token]", "tracking.wandb.mode=offline", "watch_threshold=3.0",
                 f"run.dir={root}"]
    cfg, node = load_config(ov)
    return train_batch(cfg, node, ov, quiet=True)


def test_wandb_holds_group_condition_history_and_phase_per_run(batch):
    index = json.loads((batch / "batch.json").read_text())
    assert {r["condition"] for r in index["runs"]} == {"none", "prev_token"}
    mids = {}
    for r in index["runs"]:
        run_dir = batch / r["dir"]
        recs = wandb_records(run_dir)
        (run,) = [x["run"] for x in recs if x["type"] == "run"]
        assert run["run_group"] == "demo" and run["job_type"] == r["condition"]
        rows = read_metrics(run_dir / "metrics.jsonl")
        hist = [x["history"]["item"] for x in recs if x["type"] == "history"]
        assert [h["_step"] for h in hist] == [row["step"] for row in rows]  # every row, in order
        assert all(h["sequences_seen"] == h["_step"] * 16 for h in hist)
        for h, row in zip(hist, rows, strict=True):
            assert h["test/loss"] == pytest.approx(row["test/loss"], rel=1e-9)
        # the attention grid of every checkpoint, in the row of its step and as a PNG in the run directory
        (log_dir,) = list((run_dir / "wandb").glob(f"offline-run-*-{wandb_id(run_dir)}"))
        pictured = [h["_step"] for h in hist if h.get("attention._type") == "image-file"]
        assert pictured == [0, 100, 200]
        for h in hist:
            if "attention.path" in h:
                assert (log_dir / "files" / h["attention.path"]).stat().st_size > 1000
                # 2 layers x 4 heads of 96-pixel tiles
                assert (h["attention.height"], h["attention.width"]) == (2 * 96 + 2, 4 * 96 + 3 * 2)
        assert sorted(p.name for p in (run_dir / "attention").glob("*.png")) == [
            "step0000000.png", "step0000100.png", "step0000200.png"]
        assert hist[-1].get("curves._type") == "image-file"
        summary = {}
        for x in recs:
            if x["type"] == "summary":
                summary.update(x["summary"].get("update", {}))
        local = json.loads((run_dir / "summary.json").read_text())
        ph = local["phase"]
        assert summary["condition"] == r["condition"] and summary["seed"] == 0
        assert summary["sequences_seen"] == 200 * 16
        assert summary["phase/metric"] == ph["metric"] and summary["phase/transitions"] == len(ph["transitions"])
        for i, t in enumerate(ph["transitions"]):
            assert summary[f"phase/{i}/mid"] == pytest.approx(t["mid"]) and summary[f"phase/{i}/onset"] == \
                pytest.approx(t["onset"])
        assert summary.get("phase/first_below") == ph.get("first_below")
        mids[r["condition"]] = summary.get("phase/mid")
    # the table a clamping study wants exists: at least the unclamped run has its phase change in wandb
    assert mids["none"] is not None


def test_a_fork_and_a_replay_name_their_parent_run_in_wandb(batch, tmp_path):
    parent = batch / "none-s0"
    (parent_run,) = [x["run"] for x in wandb_records(parent) if x["type"] == "run"]
    fork = fork_run(parent, 100, ["optim.lr=1e-3"], run_dir=str(tmp_path / "fork"), quiet=True)
    (run,) = [x["run"] for x in wandb_records(fork) if x["type"] == "run"]
    lineage = run["config"]["update"]["parent"]
    assert lineage["run_dir"] == str(parent) and lineage["step"] == 100 and lineage["overrides"] == ["optim.lr=1e-3"]
    assert lineage["wandb_id"] == parent_run["run_id"]
    assert run["run_group"] == "demo" and run["run_id"] != parent_run["run_id"]
    replay_run(parent, steps=[100, 200], quiet=True)
    (run,) = [x["run"] for x in wandb_records(parent, wandb_id(parent) + "replay") if x["type"] == "run"]
    of = run["config"]["update"]["replay_of"]
    assert run["job_type"] == "replay" and of["wandb_id"] == parent_run["run_id"] and of["steps"] == [100, 200]


def test_an_attention_grid_tile_is_its_heads_pattern():
    """Tile (layer, head) of the grid shows that head's pattern on the probe: darkness = attention weight."""
    import jax
    import numpy as np

    from lab.pictures import GAP, TILE, AttentionPictures, probe_sequence
    from lab.trainer import Trainer
    from tests.conftest import TINY

    tr = Trainer(load_config(TINY + ["model.n_heads=4"])[0])
    params = tr.model.params()
    pics = AttentionPictures(tr.model, tr.task)
    grid = pics.grid(params).astype(np.float32) / 255.0
    _, cache = tr.model.run_with_cache(params, probe_sequence(tr.task), ["blocks.1.attn.hook_pattern"])
    pat = np.asarray(jax.device_get(cache["blocks.1.attn.hook_pattern"]))[0, 2]  # L1H2, [query, key]
    t = pat.shape[-1]
    y0, x0 = 1 * (TILE + GAP), 2 * (TILE + GAP)
    for q, k in ((0, 0), (t - 1, 0), (t - 1, t - 1), (t // 2, t // 3)):
        py, px = y0 + (q * TILE) // t + 1, x0 + (k * TILE) // t + 1
        assert abs(grid[py, px, 0] - (1.0 - pat[q, k])) < 0.02, (q, k)
    assert np.all(grid[:TILE, TILE:TILE + GAP] == 1.0)  # white gaps between heads
