"""A researcher's own task, measure, clamp value and evaluator, without editing lab/: the installed example
package (examples/noisy_copy, found through its entry point) and plug-ins registered from Python."""

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lab
from lab import plugins
from lab.clamp import ClampConfig, ClampSet
from lab.config import load_config
from lab.errors import LabError
from lab.model import build_model
from lab.replay import fork_run, resume_run
from lab.run import train_run
from lab.tasks import make_task
from lab.tasks.base import Task, TaskConfig
from lab.tracking import read_metrics
from tests.conftest import TINY, kill_once_checkpointed, lab_cmd

# a tiny run of the example's experiment: its task, its measure (with the lab's prev_token), its evaluator
NC = [o for o in TINY if not o.startswith(("experiment=", "task.", "measures.names", "trainer.steps=",
                                            "checkpoint.every"))] + [
    "experiment=noisy_copy", "trainer.steps=40", "checkpoint.every=20", "task.vocab_size=32", "task.seq_len=16",
    "task.seg_min=4", "task.seg_max=6", "task.eval_size=40", "measures.names=[prev_token,icl_gain]"]
RESAMPLE = "+clamps.rs={site: blocks.0.attn.hook_z, value: resample, windows: [[10, 20]], args: {shift: 2}}"


def test_the_example_package_is_found_through_its_entry_point():
    assert plugins.tasks["noisy_copy"].package == "lab-noisy-copy"
    assert {"icl_gain", "resample", "repeated_tokens"} <= {
        *plugins.measures.names(), *plugins.clamp_values.names(), *plugins.evaluators.names()}
    assert plugins.tasks["repeat"].package == "lab"  # the lab's own go through the same registry
    cfg, _ = load_config(["task=noisy_copy", "task.noise=0.5"])  # no experiment: the lab's defaults
    assert cfg.experiment == "noisy_copy" and cfg.task.noise == 0.5  # runs/noisy_copy/...
    assert (cfg.model.d_model, cfg.model.n_heads) == (64, 8)  # the lab's default model, not the demo's (32, 1)
    import noisy_copy

    noisy_copy.register()  # the same package registered again from Python: the same plug-ins, no clash
    assert plugins.tasks["noisy_copy"].package == "lab-noisy-copy"


def test_the_example_task_corrupts_only_the_second_copy_and_masks_clean_pairs():
    task = make_task({"name": "noisy_copy", "vocab_size": 32, "seq_len": 16, "seg_min": 4, "seg_max": 6})
    clean = jax.device_get(task.sample(jax.random.PRNGKey(0), 512, data={"noise": jnp.float32(0.0)}))
    noisy = jax.device_get(task.sample(jax.random.PRNGKey(0), 512, data={"noise": jnp.float32(1.0)}))
    first = clean["masks"]["first"] > 0
    np.testing.assert_array_equal(clean["tokens"][first], noisy["tokens"][first])  # the first copy untouched
    rep = clean["masks"]["repeated"] > 0
    assert rep.sum() > 0 and noisy["masks"]["repeated"].sum() < 0.1 * rep.sum()  # noise 1: few clean pairs
    # with no noise a repeated pair's target is the successor of the current token's earlier occurrence
    b, t = np.nonzero(rep)
    for i, j in zip(b[:50], t[:50], strict=True):
        earlier = [k for k in range(j) if clean["tokens"][i, k] == clean["tokens"][i, j]]
        assert earlier and clean["tokens"][i, earlier[0] + 1] == clean["targets"][i, j]


def test_a_registered_clamp_value_acts_in_its_window_with_strength_and_heads():
    task = make_task({"name": "repeat", "vocab_size": 32, "seq_len": 16, "seg_len": 4, "eval_size": 8})
    model = build_model(load_config(["model.d_model=16", "model.n_heads=2"])[0].model, task, seed=0)
    params, batch = model.params(), task.evals["test"]
    site = "blocks.0.attn.hook_z"
    spec = ClampConfig(site=site, value="resample", heads=[1], windows=[[10, 20]], strength=0.5, args={"shift": 2})
    clamps = ClampSet({"rs": spec}, model, task)
    plain = model.run_with_cache(params, batch, [site])[1][site]
    for step, on in ((5, False), (10, True), (19, True), (20, False)):
        hooks = clamps.hooks(params, batch, step, training=True, capture=[site])
        model.apply(params, batch, hooks)
        got = hooks.cache[site]
        want = plain.at[:, :, 1].set(0.5 * plain[:, :, 1] + 0.5 * jnp.roll(plain, 2, axis=0)[:, :, 1]) if on else plain
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # five processes, ~40 s: in CI's slow suite; the API test below covers the same in process
def test_the_example_trains_replays_forks_and_compares_through_the_cli(tmp_path):
    run = tmp_path / "nc"
    p = subprocess.run(lab_cmd("train", *NC, RESAMPLE, f"run.dir={run}", "--quiet"), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = read_metrics(run / "metrics.jsonl")
    last = rows[-1]
    assert {"icl_gain", "repeated_tokens/icl_score", "test/repeated_loss", "prev_token/L0H1"} <= set(last)
    assert all(np.isfinite(r["icl_gain"]) for r in rows)
    recorded = json.loads((run / "overrides.json").read_text())["plugins"]
    assert recorded == {"task": {"noisy_copy": "lab-noisy-copy"}, "clamp_value": {"resample": "lab-noisy-copy"},
                        "measure": {"icl_gain": "lab-noisy-copy"}, "evaluator": {"repeated_tokens": "lab-noisy-copy"}}
    p = subprocess.run(lab_cmd("replay", str(run), "--steps", "0,40", "--quiet"), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    replayed = {r["step"]: r for r in read_metrics(run / "replay.jsonl")}
    logged = {r["step"]: r for r in rows}
    for s in (0, 40):  # the plug-in measure and evaluator, recomputed from the checkpoints, as logged live
        for k in ("icl_gain", "repeated_tokens/icl_score"):
            assert replayed[s][k] == pytest.approx(logged[s][k], rel=1e-5, abs=1e-6)
    child = tmp_path / "child"
    p = subprocess.run(lab_cmd("fork", str(run), "--step", "20", "--out", str(child), "task.noise=0.5", "--quiet"),
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((child / "summary.json").read_text())["parent"]["step"] == 20
    assert read_metrics(child / "metrics.jsonl")[0]["step"] == 20
    p = subprocess.run(lab_cmd("compare", str(run), str(child), "--out", str(tmp_path / "cmp")),
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "cmp" / "report.html").is_file()


@pytest.mark.slow  # ~14 s: in CI's slow suite (make test trains a Python-registered plug-in task below)
def test_the_example_trains_from_python_with_its_circuit_summary(tmp_path):
    run = lab.train(*NC, "measures.circuit=true", "trainer.steps=20", f"run.dir={tmp_path / 'api'}")
    assert run.summary["task"] == "noisy_copy"
    circuit = run.summary["circuit"]  # the summary runs on the plug-in's mechanism metric
    assert circuit["mechanism_metric"] == "test/repeated_loss" and circuit["is_induction_circuit"] is False
    assert "icl_gain" in run.metrics and run.steps == [0, 20]
    assert run.batch("repeated_tokens")["tokens"].shape[1] == 16  # the plug-in evaluator's set


# ---- plug-ins registered from Python ------------------------------------------------------------------
@dataclass
class FlipConfig(TaskConfig):
    name: str = "flip_test"
    vocab: int = 8
    seq_len: int = 8


class FlipTask(Task):
    """Predict the previous token (a previous-token head solves it)."""

    key_metric = "test/acc"
    watch_metric = "test/loss"

    def __init__(self, cfg):
        self.cfg, self.seq_len, self.vocab_size, self.n_outputs = cfg, cfg.seq_len, cfg.vocab, cfg.vocab

    def sample(self, key, batch_size):
        x = jax.random.randint(key, (batch_size, self.seq_len), 0, self.cfg.vocab, jnp.int32)
        return {"tokens": x, "targets": jnp.roll(x, 1, axis=1), "loss_mask": jnp.ones(x.shape, jnp.float32)}

    def build_evals(self):
        return {"test": self.sample(jax.random.PRNGKey(self.cfg.eval_seed), 32)}


def head_sum(params, model, task):
    """A per-head measure: the sum of each head's W_Q entries."""
    return jnp.stack([params["blocks"][str(l)]["attn"]["W_Q"].sum(axis=(1, 2)) for l in range(model.cfg.n_layers)])


def test_a_task_and_a_per_head_measure_registered_from_python_train_by_name(tmp_path):
    lab.register_task("flip_test", FlipConfig, FlipTask)  # no YAML: `task=flip_test` is its dataclass
    lab.register_measure("head_sum", head_sum, per_head=True)
    run = lab.train("task=flip_test", "task.vocab=6", "measures.names=[head_sum]", "trainer.steps=10",
                    "trainer.eval_every=5", "checkpoint.every=10", "checkpoint.log_points=0", "model.d_model=16",
                    "model.n_heads=2", "tracking.wandb.mode=disabled", "trainer.progress=false",
                    f"run.dir={tmp_path / 'flip'}")
    assert run.config.task.vocab == 6 and run.config.experiment == "flip_test"
    row = run.metrics.iloc[-1]
    params = run.params(10)
    for l in range(2):
        for h in range(2):
            want = float(np.asarray(params["blocks"][str(l)]["attn"]["W_Q"][h]).sum())
            assert row[f"head_sum/L{l}H{h}"] == pytest.approx(want, rel=1e-4)
    here = __name__.split(".")[0]  # the top-level module that registered them: this test's
    assert json.loads((run.dir / "overrides.json").read_text())["plugins"] == {
        "task": {"flip_test": here}, "measure": {"head_sum": here}}


@pytest.mark.slow  # three processes, ~15 s: in CI's slow suite, to keep `make test` inside its 10 minutes
def test_a_run_whose_plugin_is_missing_names_the_package(tmp_path):
    """A task registered by a script is not there for a later `lab replay` in a fresh process: one line
    naming the package that registered it, exit 2."""
    (tmp_path / "myexp.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass
        import lab
        from tests.test_plugins import FlipConfig, FlipTask

        @dataclass
        class Cfg(FlipConfig):
            name: str = "only_here"

        class OnlyHere(FlipTask):
            pass

        lab.register_task("only_here", Cfg, OnlyHere)
    '''))
    run = tmp_path / "r"
    script = ("import sys, myexp, lab; lab.train('task=only_here', 'trainer.steps=5', 'checkpoint.every=5', "
              "'checkpoint.log_points=0', 'measures.names=[none]', 'tracking.wandb.mode=disabled', "
              f"'trainer.progress=false', 'model.d_model=16', 'run.dir={run}')")
    env_path = f"{tmp_path}:{plugins.config_dir().parent}"
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": env_path})
    assert p.returncode == 0, p.stderr[-2000:]
    p = subprocess.run(lab_cmd("replay", str(run)), capture_output=True, text=True)
    assert p.returncode == 2, p.stderr[-2000:]
    line = p.stderr.strip()
    assert "\n" not in line and "package myexp (task only_here)" in line, line
    for read in (resume_run, lambda d: fork_run(d, 5, []), lab.load):  # this process never imported myexp
        with pytest.raises(LabError, match=r"plug-ins this environment lacks: package myexp \(task only_here\)"):
            read(run)


class NoSample(Task):
    def build_evals(self):
        return {}


class BadMetric(FlipTask):
    key_metric = "acc"


@dataclass
class WrongName(TaskConfig):
    name: str = "other"


@dataclass
class MyRepeat(TaskConfig):
    name: str = "repeat"


def _register(kind, *args, **kw):
    return getattr(lab, f"register_{kind}")(*args, **kw)


BAD = [  # (what, args, words the one line must hold)
    ("task", ("t1", dict, FlipTask), "must be a dataclass subclassing lab.tasks.TaskConfig"),
    ("task", ("t2", WrongName, FlipTask), "WrongName.name must default to 't2'"),
    ("task", ("flip_test", FlipConfig, NoSample), "does not implement sample"),
    ("task", ("flip_test", FlipConfig, BadMetric), "BadMetric.key_metric must name a metric"),
    ("task", ("1bad", FlipConfig, FlipTask), "a name must be a Python identifier"),
    ("task", ("repeat", MyRepeat, FlipTask), "the name is taken by package lab"),
    ("measure", ("m1", lambda params: 0.0), "fn must take 3 positional arguments"),
    ("measure", ("m2", 3.0), "fn must be a function"),
    ("clamp_value", ("c1", lambda x, i: x), None),  # fine
    ("clamp_value", ("c3", lambda x: x), "fn must take 2 positional arguments"),
    ("clamp_value", ("ablate", lambda x, i: x), "the name is the lab's own"),  # built into lab/clamp.py
    ("measure", ("prev_token", lambda p, m, t: 0.0), "the name is the lab's own"),  # built into lab/measures
    ("measure", ("auto", lambda p, m, t: 0.0), "the name is the lab's own"),
    ("task", ("café", FlipConfig, FlipTask), "a name must be a Python identifier in ASCII"),
    ("evaluator", ("e1", lambda task: {}, ), None),
    ("evaluator", ("e2", lambda: {}), "build must take 1 positional arguments"),
]


@pytest.mark.parametrize("kind,args,words", BAD, ids=[f"{k}-{a[0]}" for k, a, _ in BAD])
def test_bad_plugins_are_refused_in_one_line_naming_the_plugin(kind, args, words):
    registry = {"task": plugins.tasks, "measure": plugins.measures, "clamp_value": plugins.clamp_values,
                "evaluator": plugins.evaluators}[kind]
    if words is None:
        _register(kind, *args)
        assert registry[args[0]].package == __name__.split(".")[0]
        return
    before = registry.get(args[0])
    with pytest.raises(LabError) as e:
        _register(kind, *args)
    msg = str(e.value)
    assert "\n" not in msg and repr(args[0]) in msg and words in msg, msg
    assert registry.get(args[0]) is before  # nothing registered, nothing replaced


def test_a_clamp_value_outside_its_sites_and_a_wrong_shape_are_refused(tmp_path):
    lab.register_clamp_value("pattern_only", lambda x, i: x, sites=["hook_pattern"])
    lab.register_clamp_value("bad_shape", lambda x, i: x[:1])
    cfg, _ = load_config(["+clamps.p={site: blocks.0.hook_attn_out, value: pattern_only}"])
    with pytest.raises(LabError, match=r"clamps.p.site=.*acts on hook_pattern sites only"):
        ClampSet(cfg.clamps, build_model(cfg.model, make_task(cfg.task), seed=0), make_task(cfg.task))
    cfg, node = load_config(["trainer.steps=2", "measures.names=[none]", "tracking.wandb.mode=disabled",
                             "+clamps.b={site: blocks.0.hook_attn_out, value: bad_shape}", "trainer.progress=false",
                             f"run.dir={tmp_path / 'run'}"])
    with pytest.raises(LabError, match=r"clamps.b.value=bad_shape: the value .* returned shape"):
        train_run(cfg, node, quiet=True)
    assert not (tmp_path / "run").exists()  # found by tracing the step, before the run directory is written
    # a fork that adds the clamp: refused the same way, before its directory is written
    parent = tmp_path / "parent"
    given = [*TINY, "trainer.steps=20", f"run.dir={parent}"]
    train_run(*load_config(given), quiet=True, overrides=given)
    with pytest.raises(LabError, match=r"clamps.b.value=bad_shape: the value .* returned shape"):
        fork_run(parent, 20, ["trainer.steps=30", "+clamps.b={site: blocks.0.hook_attn_out, value: bad_shape}"],
                 run_dir=str(tmp_path / "fork"), quiet=True)
    assert not (tmp_path / "fork").exists()


def test_a_broken_installed_plugin_is_named_in_one_line(tmp_path):
    """A package whose entry point fails to import: every `lab` command that looks a name up says which
    plug-in and why, in one line, exit 2, and writes nothing."""
    dist = tmp_path / "broken_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[induction_lab]\nbroken = broken_mod:register\n")
    (tmp_path / "broken_mod.py").write_text("import not_a_module_anywhere\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{plugins.config_dir().parent}"}
    p = subprocess.run(lab_cmd("train", "trainer.steps=1", f"run.dir={tmp_path / 'r'}"), capture_output=True,
                       text=True, env=env)
    assert p.returncode == 2
    line = p.stderr.strip()
    assert line == ("error: plug-in broken (broken_mod:register, package broken-plugin) failed to load: "
                    "ModuleNotFoundError: No module named 'not_a_module_anywhere'"), line
    assert not (tmp_path / "r").exists()


@pytest.mark.slow  # a training process killed with SIGKILL, then resumed: ~30 s
def test_a_plugin_run_killed_with_sigkill_resumes_to_the_uninterrupted_run(tmp_path):
    ov = [*NC, RESAMPLE, "trainer.steps=400", "trainer.steps_per_call=5", "checkpoint.every=20"]
    ref = tmp_path / "ref"
    cfg, node = load_config([*ov, f"run.dir={ref}"])
    train_run(cfg, node, quiet=True, overrides=[*ov, f"run.dir={ref}"])
    victim = tmp_path / "victim"
    kill_once_checkpointed(["train", *ov, f"run.dir={victim}", "--quiet"], victim, 60)
    done = subprocess.run(lab_cmd("resume", str(victim), "--quiet"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    strip = [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in read_metrics(ref / "metrics.jsonl")]
    got = [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in read_metrics(victim / "metrics.jsonl")]
    assert got == strip  # every row, the plug-in's measure and evaluator included, bitwise
    a, b = lab.load(ref), lab.load(victim)
    for x, y in zip(jax.tree_util.tree_leaves(a.params(400)), jax.tree_util.tree_leaves(b.params(400)), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_what_a_run_records_of_its_plugins():
    """Only plug-ins from outside the lab are recorded, including the measures `auto` adds."""
    zero = "+clamps.z={site: blocks.0.attn.hook_z, value: zero}"
    assert plugins.used_by(load_config([zero])[0]) == {}  # the lab's own clamp value: nothing to install
    lab.register_measure("auto_probe", lambda p, m, t: 0.0, auto=True)
    try:
        got = plugins.used_by(load_config(["+clamps.r={site: blocks.0.attn.hook_z, value: resample}"])[0])
        here = __name__.split(".")[0]
        assert got == {"clamp_value": {"resample": "lab-noisy-copy"}, "measure": {"auto_probe": here}}
    finally:
        plugins.measures._entries.pop("auto_probe")  # an auto measure would join every later test's runs


def test_a_run_recorded_before_experiment_none_recomposes_as_it_was(tmp_path):
    """`task=repeat` without an experiment meant the demo's settings before experiment=none existed; a run
    recorded then names no experiment, and re-composes with the demo's; a run recorded now names its own."""
    from lab.rundir import run_overrides

    (tmp_path / "overrides.json").write_text(json.dumps({"overrides": ["task=repeat", "seed=3"]}))
    assert run_overrides(tmp_path) == ["experiment=demo", "task=repeat", "seed=3"]
    cfg, node = load_config(["task=repeat", "trainer.steps=2"])
    from lab.rundir import create, unlock

    create(tmp_path / "new", node, ["task=repeat", "trainer.steps=2"])
    unlock(tmp_path / "new")
    assert run_overrides(tmp_path / "new")[0] == "experiment=none"


def test_plugin_config_folders_with_any_characters_are_found(tmp_path):
    folder = tmp_path / "my plug, o'clock (é) [1]=#"
    (folder / "experiment").mkdir(parents=True)
    (folder / "experiment" / "odd_place.yaml").write_text("# @package _global_\nexperiment: odd_place\nseed: 7\n")
    lab.register_configs(folder)
    cfg, _ = load_config(["experiment=odd_place", f"hydra.searchpath=[file://{tmp_path}]"])
    assert cfg.experiment == "odd_place" and cfg.seed == 7


def test_an_evaluator_of_the_wrong_length_or_twice_is_refused():
    from lab.runs import Runs

    lab.register_evaluator("too_short", lambda task: {"tokens": jnp.zeros((4, 3), jnp.int32),
                                                      "targets": jnp.zeros((4, 3), jnp.int32),
                                                      "loss_mask": jnp.ones((4, 3))})
    with pytest.raises(LabError, match=r"evaluators: too_short \(package .*\) must build a batch with tokens "
                                       r"\[n, 16\].*its tokens are \[4, 3\]"):
        Runs(load_config([*TINY, "evaluators=[too_short]"])[0])
    with pytest.raises(LabError, match=r"evaluators=\['repeated_tokens', 'repeated_tokens'\]: each evaluator once"):
        load_config([*TINY, "evaluators=[repeated_tokens,repeated_tokens]"])


def test_importing_a_plugin_package_first_in_a_fresh_process_works():
    """A plug-in's module imported before anything else (as a launcher's worker unpickling a job does) imports
    the lab in the middle of its own import; the lab must not load entry points then (the module would be
    half-initialised, without its register())."""
    code = "import noisy_copy, lab.plugins as p; print(p.tasks['noisy_copy'].package)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "lab-noisy-copy", out.stderr[-2000:]
