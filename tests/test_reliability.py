"""Nothing lost: kill -9 and resume, non-finite steps, wandb failures, unwritable directories, a second
writer, no pickle, and a table of bad inputs that each get one line and exit code 2 with nothing written."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lab import cli
from lab.checkpoint import Checkpointer
from lab.config import load_config
from lab.loop import NonFiniteError
from lab.run import train_run
from lab.tracking import read_metrics
from tests.conftest import ROOT, TINY, lab_cmd


def _final_params(run_dir: Path):
    from lab.config import from_yaml
    from lab.rundir import restore_state
    from lab.runs import Runs

    step = Checkpointer(run_dir / "checkpoints", read_only=True).steps()[-1]
    cfg, _ = from_yaml(run_dir / "config.yaml")
    return step, restore_state(Runs(cfg), run_dir, step)


def _lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


@pytest.mark.slow
def test_kill_9_at_ten_random_moments_then_resume_equals_uninterrupted(tmp_path):
    """A real training process is killed with SIGKILL at 10 random moments (during steps, asynchronous
    checkpoint saves and metrics writes); `lab resume` each time; the finished run's parameters are
    bitwise those of an uninterrupted run and metrics.jsonl has every step exactly once."""
    ov = TINY + ["trainer.steps=1200", "trainer.steps_per_call=5", "trainer.eval_every=20", "checkpoint.every=20"]
    ref_ov = ov + [f"run.dir={tmp_path / 'ref'}"]
    cfg, node = load_config(ref_ov)
    ref = train_run(cfg, node, quiet=True, overrides=ref_ov)

    victim = tmp_path / "victim"
    rng = random.Random(0)
    cmd = lab_cmd("train", *ov, f"run.dir={victim}", "--quiet")
    kills, finished = 0, False
    while kills < 10:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        n0, t0 = _lines(victim / "metrics.jsonl"), time.time()
        while p.poll() is None and _lines(victim / "metrics.jsonl") <= n0 and time.time() - t0 < 120:
            time.sleep(0.02)  # wait until this process is training (it has logged a row)
        time.sleep(rng.uniform(0.0, 0.4))
        if p.poll() is not None:
            finished = p.returncode == 0
            assert finished, p.stderr.read().decode()[-2000:]
            break
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
        cmd = lab_cmd("resume", str(victim), "--quiet")
    assert kills == 10, f"the run finished after only {kills} kills: make it longer"
    done = subprocess.run(lab_cmd("resume", str(victim), "--quiet"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

    s_ref, st_ref = _final_params(ref)
    s_vic, st_vic = _final_params(victim)
    assert s_ref == s_vic == 1200
    import jax

    for a, b in zip(jax.tree_util.tree_leaves(st_ref), jax.tree_util.tree_leaves(st_vic), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    rows_ref, rows_vic = read_metrics(ref / "metrics.jsonl"), read_metrics(victim / "metrics.jsonl")
    steps = [r["step"] for r in rows_vic]
    assert steps == sorted(set(steps)) == [r["step"] for r in rows_ref]
    for ra, rb in zip(rows_ref, rows_vic, strict=True):
        assert {k: v for k, v in ra.items() if not k.startswith("perf/")} == \
               {k: v for k, v in rb.items() if not k.startswith("perf/")}
    assert json.loads((victim / "summary.json").read_text())["final"] == \
        json.loads((ref / "summary.json").read_text())["final"]


NAN_AT_5 = "+clamps.bad={site: blocks.0.hook_attn_out, value: constant, constant: nan, windows: [[5, 6]]}"


@pytest.mark.slow  # ~10-20 s: in CI's slow suite, to keep `make test` inside its 10 minutes
def test_non_finite_step_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "r"
    p = subprocess.run(lab_cmd("train", *TINY, NAN_AT_5, "checkpoint.every=4", f"run.dir={out}"),
                       capture_output=True, text=True)
    assert p.returncode == 1
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith("error: non-finite loss=nan at step 5;"), line
    assert "Traceback" not in p.stderr
    ck = Checkpointer(out / "checkpoints", read_only=True).steps()
    assert ck == [0, 4]  # the rows up to step 4 were finite; nothing after the bad step was saved


def test_non_finite_step_skipped_on_request(tiny, tmp_path):
    ov = tiny + [NAN_AT_5, "trainer.on_nonfinite=skip", f"run.dir={tmp_path / 'r'}"]
    cfg, node = load_config(ov)
    run = train_run(cfg, node, quiet=True, overrides=ov)
    rows = read_metrics(run / "metrics.jsonl")
    assert sum(r.get("train/skipped_steps", 0) for r in rows) == 1
    assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
    assert rows[-1]["step"] == 60


def test_wandb_that_cannot_start_online_falls_back_to_offline(tiny, tmp_path, monkeypatch, recwarn):
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)  # a key, but no service reachable
    monkeypatch.delenv("WANDB_MODE", raising=False)
    ov = tiny + ["tracking.wandb.mode=online", "tracking.wandb.init_timeout=2", f"run.dir={tmp_path / 'r'}"]
    cfg, node = load_config(ov)
    t0 = time.time()
    run = train_run(cfg, node, quiet=True, overrides=ov)
    assert time.time() - t0 < 60
    assert (run / "summary.json").exists() and read_metrics(run / "metrics.jsonl")[-1]["step"] == 60
    assert any("logging offline" in str(w.message) for w in recwarn.list)
    assert list((run / "wandb").glob("offline-run-*"))


def test_a_second_writer_is_refused(tiny, tmp_path):
    from lab.rundir import lock as lock_run_dir
    from lab.rundir import unlock as unlock_run_dir

    ov = tiny + [f"run.dir={tmp_path / 'r'}", "trainer.steps=20"]
    cfg, node = load_config(ov)
    run = train_run(cfg, node, quiet=True, overrides=ov)
    (run / "summary.json").unlink()  # as if still running
    lock_run_dir(run)  # this process writes it
    try:
        p = subprocess.run(lab_cmd("resume", str(run)), capture_output=True, text=True)
        assert p.returncode == 2
        assert re.match(rf"error: run_dir={re.escape(str(run))}: another process \(pid {os.getpid()}\) is writing",
                        p.stderr.strip().splitlines()[-1]), p.stderr
    finally:
        unlock_run_dir(run)


def test_no_pickle_in_what_the_lab_reads_back():
    """Configs are YAML/JSON, checkpoints orbax (tensorstore + JSON), metrics JSON: numpy files are read with
    allow_pickle=False; nothing instantiates a config's _target_. The one pickle read, Bietti's meta.pkl
    (lab/tasks/bigram.py), goes through an unpickler that refuses every class (tests/test_bietti.py)."""
    files = {p: p.read_text() for p in (ROOT / "lab").rglob("*.py")}
    src = "\n".join(files.values())
    for bad in ("cloudpickle", "allow_pickle=True", "torch.load", "yaml.load(", "yaml.unsafe_load",
                "instantiate(", "eval(", "exec(", "pickle.load(", "pickle.loads("):
        assert bad not in src, bad
    assert [p.name for p, text in files.items() if "import pickle" in text] == ["bigram.py"]
    bigram = files[ROOT / "lab" / "tasks" / "bigram.py"]
    assert "def find_class(self, module, name):\n        raise pickle.UnpicklingError" in bigram
    assert "allow_pickle=False" in src


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("fin") / "run"
    ov = TINY + [f"run.dir={d}"]
    cfg, node = load_config(ov)
    train_run(cfg, node, quiet=True, overrides=ov)
    return d


def _files(tmp: Path):
    """Feature and text files for the table (malformed, wrong shape, pickled objects)."""
    (tmp / "feat2d.npy").parent.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "feat2d.npy", np.zeros((4, 8), np.float32))
    np.save(tmp / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp / "garbage.npy").write_bytes(b"not a numpy file at all")
    (tmp / "empty.txt").write_text("")
    (tmp / "afile").write_text("x")


QUICK = ["tracking.wandb.mode=disabled", "trainer.progress=false", "trainer.steps=10", "measures.names=[none]"]
B = ["experiment=reddy_bursty"]
S = ["experiment=singh_fewshot"]
# (args, the field or path the error must name); every case: exit 2, one line, no traceback, nothing written
TABLE = [
    (["experiment=nope"], "experiment"),
    (["task=nope"], "task"),
    (["model=nope"], "model"),
    (["optim=nope"], "optim"),
    (["clamp=nope"], "clamp"),
    (["trainer.stepz=5"], "trainer.stepz"),
    (["model.n_layerz=2"], "model.n_layerz"),
    (["trainer.steps=abc"], "trainer.steps"),
    (["trainer.steps=-1"], "trainer.steps"),
    (["trainer.batch_size=0"], "trainer.batch_size"),
    (["model.n_heads=0"], "model.n_heads"),
    (["model.d_model=33"], "model.d_model"),
    (["model.positions=spiral"], "model.positions"),
    (["model.init_std=0"], "model.init_std"),
    (["optim.name=rmsprop"], "optim.name"),
    (["optim.lr=-1"], "optim.lr"),
    (["optim.name=sgd", "optim.momentum=1.5"], "optim.momentum"),
    (["task.vocab_size=0"], "task.vocab_size"),
    (["cadence.dense_every=0"], "cadence.dense_every"),
    (["checkpoint.keep=0"], "checkpoint.keep"),
    (["trainer.seeds=[1,1]"], "trainer.seeds"),
    (["optim.lrs=[1e-3,-1]"], "optim.lrs"),
    (["optim.lrs=[1e-3,1e-3]"], "optim.lrs"),
    (["trainer.memory_limit_gb=0"], "trainer.memory_limit_gb"),
    (["trainer.on_nonfinite=ignore"], "trainer.on_nonfinite"),
    (["tracking.wandb.mode=sometimes"], "tracking.wandb.mode"),
    ([*B, "task.K=100"], "task.K"),
    ([*B, "task.N=7", "task.B=2"], "task.B"),
    ([*S, "task.features_path=/nonexistent/f.npy"], "task.features_path"),
    ([*S, "task.features_path={tmp}/feat2d.npy"], "task.features_path"),
    ([*S, "task.features_path={tmp}/garbage.npy"], "task.features_path"),
    ([*S, "task.features_path={tmp}/obj.npy"], "task.features_path"),
    (["experiment=bietti_bigram", "task.text_path={tmp}/empty.txt"], "task.text_path"),
    (["+clamps.x={site: blocks.5.attn.hook_pattern, value: zero}"], "clamps.x.site"),
    (["+clamps.x={site: blocks.0.hook_resid_post, value: previous_token}"], "clamps.x"),
    (["+clamps.x={site: blocks.0.hook_attn_out, value: banana}"], "clamps.x.value"),
    (["+clamps.x={site: blocks.0.hook_attn_out, value: zero, strength: 2}"], "clamps.x.strength"),
    (["+clamps.x={site: blocks.0.attn.hook_pattern, value: zero, heads: [5]}"], "clamps.x.heads"),
    (["+clamps.x={site: blocks.0.hook_attn_out, value: zero, windows: [[5]]}"], "clamps.x.windows"),
    (["+clamps.x={site: blocks.0.hook_attn_out, value: zero, gradient: sideways}"], "clamps.x.gradient"),
    (["+_target_=os.system"], "_target_"),
    (["+trainer.stepz=10"], "trainer.stepz: unknown field"),  # `+` may add keys to dicts, not to schemas
    (["+foo=1"], "foo: unknown field"),
    (["model.freeze=[blocks.0.atn.*]"], "'blocks.0.atn.*' matches no parameter"),
    (["measures.names=[induction_strength]"], "induction_strength needs a classification task"),
    (["watch=test/los"], "watch='test/los': a metric this run logs: "),
    (["optim.lr=abc"], "optim.lr=abc: must be a number"),
    (["trainer.progress=maybe"], "trainer.progress=maybe: must be true or false"),
    (["run.dir={tmp}/afile/run"], "run.dir"),
]


@pytest.mark.parametrize("args,names", TABLE, ids=[" ".join(a)[-60:] for a, _ in TABLE])
def test_bad_input_table(args, names, tmp_path, capsys):
    _files(tmp_path)
    out = tmp_path / "out"
    base = QUICK if args[0].startswith("experiment=") else TINY  # TINY's task fields are the demo task's
    argv = ["train", *base, *[a.replace("{tmp}", str(tmp_path)) for a in args]]
    if not any(a.startswith("run.dir=") for a in args):
        argv.append(f"run.dir={out}")
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("error: ") and names in err[0], err
    assert "Traceback" not in err[0]
    assert not out.exists()


def _with_truncated_checkpoint(run: Path, to: Path, step: int) -> Path:
    """A copy of ``run`` at ``to`` whose checkpoint ``step`` has every data file cut to a third."""
    shutil.copytree(run, to)
    for f in (to / "checkpoints" / str(step) / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    return to


def test_a_damaged_checkpoint_is_one_warning_line_on_the_terminal(finished_run, tmp_path):
    """orbax's failed read leaves tensorstore reads in flight that later call into its closed event loop, each
    printing a traceback; `lab replay` shows the one warning line and those reports go to the run's run.log."""
    broken = _with_truncated_checkpoint(finished_run, tmp_path / "broken", 60)
    env = {k: v for k, v in os.environ.items() if k != "LAB_DEBUG"}
    p = subprocess.run(lab_cmd("replay", str(broken), "--quiet"), capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: skipping checkpoint 60"), p.stderr
    log = broken / "run.log"
    if log.exists():  # how many reads were still in flight varies; what arrives is only those reports
        text = log.read_text()
        reports = text.count("after a failed checkpoint read")
        assert reports >= 1 and text.count("Traceback") == reports


def test_bad_run_directories_table(finished_run, tmp_path, capsys):
    """A run directory that is not a run, a fork step beyond the run, a truncated checkpoint."""
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = _with_truncated_checkpoint(finished_run, tmp_path / "broken", 60)
    (broken / "summary.json").unlink()
    cases = [
        (["resume", str(empty)], "not a run directory"),
        (["show", str(empty)], "not a run directory"),
        (["fork", str(empty), "--step", "0"], "not a run directory"),
        (["replay", str(empty)], "not a run directory"),
        (["fork", str(finished_run), "--step", "999", "--out", str(tmp_path / "f")], "--step=999"),
        (["fork", str(finished_run), "--step", "-3", "--out", str(tmp_path / "f")], "--step=-3"),
        (["compare", str(tmp_path / "nowhere")], "nowhere"),
        (["resume", str(finished_run)], "already finished"),
        (["fork", str(broken), "--step", "60", "--out", str(tmp_path / "f"), "trainer.steps=80"], "checkpoint 60"),
        (["replay", str(finished_run), "--steps", "abc"], "--steps"),
    ]
    for argv, needle in cases:
        rc = cli.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, (argv, err)
        assert err and err[-1].startswith("error: ") and needle in err[-1], (argv, err)
    assert not (tmp_path / "f").exists()
    # replay skips the damaged checkpoint with a warning and replays the others
    rc = cli.main(["replay", str(broken), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0 and "warning: skipping checkpoint 60" in err, err
    assert [r["step"] for r in read_metrics(broken / "replay.jsonl")] == [0, 30]
    # resume skips the damaged checkpoint with a warning and continues from the one before it
    rc = cli.main(["resume", str(broken), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0 and "warning: skipping checkpoint 60" in err, err
    assert (broken / "checkpoints" / "damaged-60").is_dir()
    assert Checkpointer(broken / "checkpoints", read_only=True).steps() == [0, 30, 60]  # 60 recomputed from 30
    assert [r["step"] for r in read_metrics(broken / "metrics.jsonl")] == \
        [r["step"] for r in read_metrics(finished_run / "metrics.jsonl")]


def test_a_diverging_update_stops_before_anything_reads_its_parameters(tiny, tmp_path):
    # sgd at lr 1e8: step 2's loss and gradient are finite, its update is not, and the log-spaced rows stop right
    # after it. The run must stop there, naming the update, before the measures (the copying scores take
    # eigenvalues) or a checkpoint read the parameters it produced.
    ov = [o for o in tiny if not o.startswith(("measures.names", "trainer.eval_log_points"))]
    ov += ["optim=sgd", "optim.lr=1e8", "trainer.eval_log_points=20", "measures.names=[copying]",
           f"run.dir={tmp_path / 'r'}"]
    cfg, node = load_config(ov)
    with pytest.raises(NonFiniteError, match=r"non-finite update=(inf|nan) at step \d+;"):
        train_run(cfg, node, quiet=True, overrides=ov)


# A full disk, simulated where the run writes: at the row of step 40 the metrics write fails with ENOSPC and no file
# name (as a real file object's write does), after a background thread has died of the same error and a library
# has logged it (as orbax's saving threads do on a full disk).
FULL_DISK = """
import errno, logging, sys, threading
import lab.tracking
from lab import cli

write = lab.tracking.Tracker.log

def log(self, row):
    if row["step"] == 40:
        def saver():
            raise OSError(errno.ENOSPC, "No space left on device")
        t = threading.Thread(target=saver, name="json_ch_save")
        t.start()
        t.join()
        logging.getLogger("absl").error("background save thread raised: [Errno 28] No space left on device")
        raise OSError(errno.ENOSPC, "No space left on device")
    return write(self, row)

lab.tracking.Tracker.log = log
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow  # three short runs in subprocesses: ~40 s
def test_a_disk_that_fills_mid_run_prints_one_line_naming_the_run_and_the_run_resumes_exactly(tmp_path):
    ov = TINY + ["trainer.steps=80", "checkpoint.every=20"]
    ref_ov = ov + [f"run.dir={tmp_path / 'ref'}"]
    cfg, node = load_config(ref_ov)
    ref = train_run(cfg, node, quiet=True, overrides=ref_ov)
    victim = tmp_path / "victim"
    driver = tmp_path / "full_disk.py"
    driver.write_text(FULL_DISK)
    p = subprocess.run([sys.executable, str(driver), "train", *ov, f"run.dir={victim}"], capture_output=True,
                       text=True, cwd=ROOT)
    assert p.returncode == 1
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert errors == [f"error: {victim}: No space left on device (what was saved before is intact; "
                      "`lab resume RUN_DIR` continues from the last complete checkpoint)"], p.stderr
    assert "Traceback" not in p.stderr and "absl" not in p.stderr, p.stderr  # the threads' reports are in run.log
    log = (victim / "run.log").read_text()
    assert "exception in thread json_ch_save" in log and "background save thread raised" in log
    done = subprocess.run(lab_cmd("resume", str(victim), "--quiet"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    import jax

    a, b = _final_params(ref), _final_params(victim)
    assert a[0] == b[0] == 80
    for x, y in zip(jax.tree_util.tree_leaves(a[1]), jax.tree_util.tree_leaves(b[1]), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]  # noqa: E731
    assert strip(read_metrics(victim / "metrics.jsonl")) == strip(read_metrics(ref / "metrics.jsonl"))
