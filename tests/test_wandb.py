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
from lab.pictures import layout
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
                 "tracking.attention_images=true",
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
        assert sorted(p.name for p in (run_dir / "attention").glob("*.png")) == [
            "step0000000.png", "step0000100.png", "step0000200.png"]
        for h in hist:  # wandb holds the PNG the run directory holds: the labelled grid, 2 layers x 4 heads
            if "attention.path" in h:
                png = run_dir / "attention" / f"step{h['_step']:07d}.png"
                assert (log_dir / "files" / h["attention.path"]).read_bytes() == png.read_bytes()
                assert len(layout(png)["tiles"]) == 8
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


@pytest.mark.slow  # ~10-20 s: in CI's slow suite, to keep `make test` inside its 10 minutes
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


def test_an_attention_picture_labels_every_head_marks_the_repeat_and_each_tile_is_its_heads_pattern(tmp_path):
    """The PNG carries its layout; each titled tile shows that head's pattern (Greys: white 0, black 1), the
    causal half is blank, the colour bar runs white to black, and the repeated segment is marked beside the axes."""
    import jax
    import matplotlib
    import numpy as np
    from PIL import Image

    from lab.pictures import KEY_MARK, QUERY_MARK, AttentionPictures, layout, probe_sequence
    from lab.runs import Runs
    from tests.conftest import TINY

    tr = Runs(load_config(TINY + ["model.n_heads=4"])[0])
    params = tr.model.params()
    path = AttentionPictures(tr.model, tr.task).save(params, tmp_path / "step.png")
    lay = layout(path)
    img = np.asarray(Image.open(path).convert("RGB")).astype(np.int64)
    assert sorted(lay["tiles"]) == [f"L{la}H{h}" for la in range(2) for h in range(4)]
    probe = probe_sequence(tr.task)
    names = [f"blocks.{la}.attn.hook_pattern" for la in range(2)]
    _, cache = tr.model.run_with_cache(params, probe, names)
    lut = (matplotlib.colormaps["Greys"](np.linspace(0, 1, 256))[:, :3] * 255).round()
    t = lay["positions"]
    assert t == probe["tokens"].shape[-1]
    for name, (x0, y0, x1, y1) in lay["tiles"].items():
        la, h = int(name[1]), int(name[3])
        pat = np.asarray(jax.device_get(cache[names[la]]))[0, h]  # [query, key]
        for q in range(t):
            for k in range(t):
                py = y0 + int((q + 0.5) * (y1 - y0) / t)  # the middle pixel of cell (q, k)
                px = x0 + int((k + 0.5) * (x1 - x0) / t)
                want = lut[int(round(min(max(pat[q, k], 0.0), 1.0) * 255))]
                assert np.abs(img[py, px] - want).max() <= 2, (name, q, k)
                if k > q:
                    assert img[py, px].min() >= 250, (name, q, k)  # causal: nothing attended ahead
        title = img[max(0, y0 - 22):y0 - 3, x0:x1]
        assert title.min() < 100, name  # the head's name is written above its tile
    cx0, cy0, cx1, cy1 = lay["colorbar"]
    mid = (cx0 + cx1) // 2
    assert img[cy0 + 2, mid].max() < 40 and img[cy1 - 3, mid].min() > 215  # black at 1 (top), white at 0
    # the probe's repeat: the copy's queries (orange, left of the rows) and their induction targets (blue, below)
    assert lay["marks"]["queries"] and len(lay["marks"]["queries"]) == len(lay["marks"]["keys"])
    orange = np.array(matplotlib.colors.to_rgb(QUERY_MARK)) * 255
    blue = np.array(matplotlib.colors.to_rgb(KEY_MARK)) * 255
    x0, y0, x1, y1 = lay["tiles"]["L1H0"]

    def row_px(q):
        return y0 + int((q + 0.5) * (y1 - y0) / t)

    def col_px(k):
        return x0 + int((k + 0.5) * (x1 - x0) / t)

    def near(pixels, colour):
        return bool((np.abs(pixels - colour).max(-1) < 40).any())

    for q in range(t):
        assert near(img[row_px(q), x0 - 9:x0], orange) == (q in lay["marks"]["queries"]), q
    for k in range(t):
        assert near(img[y1:y1 + 9, col_px(k)], blue) == (k in lay["marks"]["keys"]), k


def test_compare_logs_the_phase_table_figures_and_attention_as_a_compare_run(batch, tmp_path):
    from lab.comparison import compare

    out = compare([batch], out=tmp_path / "cmp", wandb_mode="offline")
    (log_dir,) = list((out / "wandb").glob("offline-run-*"))
    p = subprocess.run([str(WANDB), "leet", "inspect", "--json", str(log_dir)], capture_output=True, text=True,
                       timeout=120)
    recs = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    (run,) = [x["run"] for x in recs if x["type"] == "run"]
    assert run["job_type"] == "compare" and run["run_group"] == "demo" and run["project"] == "induction-lab"
    assert sorted(run["config"]["update"]["runs"]) == sorted(str((batch / d).absolute())
                                                            for d in ("none-s0", "prev_token-s0"))
    (item,) = [x["history"]["item"] for x in recs if x["type"] == "history"]
    metric = run["config"]["update"]["metrics"][0]
    assert item[f"phase_table/{metric}._type"] == "table-file"
    table = json.loads((log_dir / "files" / item[f"phase_table/{metric}.path"]).read_text())
    # the wandb table holds, per condition, the transition each run's summary.json found
    by_condition = {row[0]: dict(zip(table["columns"], row, strict=True)) for row in table["data"]}
    assert set(by_condition) == {"demo/none", "demo/prev_token"}
    for cond in ("none", "prev_token"):
        ph = json.loads((batch / f"{cond}-s0" / "summary.json").read_text())["phase"]
        assert ph["metric"] == metric
        mids = [t["mid"] for t in ph["transitions"]]
        got = by_condition[f"demo/{cond}"]["transition_mid (step)"]
        assert (got is None and not mids) or any(got == pytest.approx(m, rel=0.05) for m in mids)
        assert item[f"attention/demo/{cond}.count"] == 3  # the checkpoints' grids, 0, 100 and 200
        assert item[f"attention/demo/{cond}.captions"] == ["step 0", "step 100", "step 200"]
    assert item[f"figure/{metric}._type"] == "image-file"
    assert (log_dir / "files" / item[f"figure/{metric}.path"]).stat().st_size > 10_000
    runs = json.loads((log_dir / "files" / item["runs.path"]).read_text())
    assert sorted(r[-1] for r in runs["data"]) == sorted(str(batch / d) for d in ("none-s0", "prev_token-s0"))


@pytest.mark.slow
def test_report_html_renders_in_headless_chromium_with_every_image_and_no_error(batch, tmp_path):
    """The comparison's report.html opens in a real browser (Debian's chromium, driven by playwright), offline:
    every image decodes, nothing is fetched from anywhere, the console stays free of errors."""
    from playwright.sync_api import sync_playwright

    from lab.comparison import compare

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "the slow tests need Debian's chromium (`apt-get install chromium`; .ci/run installs it)"
    out = compare([batch], out=tmp_path / "cmp")
    report = out / "report.html"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors, fetched = [], []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: fetched.append(r.url) if not r.url.startswith(("data:", "file:")) else None)
        page.goto(report.as_uri(), wait_until="load")
        images = page.evaluate("[...document.images].map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])")
        text = page.inner_text("body")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert errors == [] and fetched == []
    # one curve per metric, and each condition's attention grid at its 3 checkpoints
    assert len(images) == 1 + 2 * 3
    assert all(ok and w > 100 and h > 100 for _, ok, w, h in images), images
    assert {alt for alt, *_ in images} >= {"demo/none step 200", "demo/prev_token step 0"}
    assert "Attention over training" in text and "demo/prev_token" in text
    assert (tmp_path / "report.png").stat().st_size > 20_000


def test_attention_pictures_on_request_at_steps_that_are_no_checkpoint(tmp_path):
    """tracking.attention_at draws the grid at the asked steps too: each is a logged row, a PNG and a wandb image;
    the checkpoints are where they were."""
    from lab.errors import ConfigError
    from lab.run import train_run
    from tests.conftest import TINY

    ov = TINY + ["tracking.attention_images=true", "tracking.attention_at=[5,25]", "tracking.wandb.mode=offline",
                 f"run.dir={tmp_path / 'r'}"]
    run_dir = train_run(*load_config(ov), quiet=True)
    assert sorted(p.name for p in (run_dir / "attention").glob("*.png")) == [
        "step0000000.png", "step0000005.png", "step0000025.png", "step0000030.png", "step0000060.png"]
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert 5 in steps and 25 in steps and json.loads((run_dir / "summary.json").read_text())["checkpoints"] == [
        0, 30, 60]
    hist = [x["history"]["item"] for x in wandb_records(run_dir) if x["type"] == "history"]
    assert [h["_step"] for h in hist if h.get("attention._type") == "image-file"] == [0, 5, 25, 30, 60]
    with pytest.raises(ConfigError, match=r"tracking.attention_at.*trainer.steps=60"):
        load_config(TINY + ["tracking.attention_images=true", "tracking.attention_at=[90]"])
