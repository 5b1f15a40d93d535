"""Many runs as one vmapped program (lab.batch): each run equals the same run trained alone."""

import json
import subprocess

import numpy as np
import pytest

from lab.batch import expand, is_batch, train_batch
from lab.config import load_config
from lab.errors import LabError
from lab.run import train_run
from lab.tracking import read_metrics
from tests.conftest import lab_cmd

BATCH = ["trainer.seeds=[0,3]", "conditions=[none,prev_token]"]


def assert_same_metrics(a: list[dict], b: list[dict]) -> None:
    """Two runs' metrics.jsonl rows: the same steps, the same metrics, equal values to float tolerance."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        keys = [k for k in rb if not k.startswith("perf/")]
        assert sorted(keys) == sorted(k for k in ra if not k.startswith("perf/"))
        np.testing.assert_allclose([ra[k] for k in keys], [rb[k] for k in keys], rtol=2e-4, atol=2e-5)


@pytest.mark.slow  # 10-40 s: in CI's slow suite, to keep `make test` inside its 10 minutes
def test_run_i_of_a_batch_equals_the_same_run_alone(tiny, tmp_path):
    # seeds x clamp conditions x segment lengths (repeat's seg_len moves the evaluation set's "repeated" mask,
    # which is then held per run); log-spaced rows make stops between full scan chunks (the remainder loop)
    # 4 heads: the prev_token preset is Singh's L0H2
    short = ["trainer.steps=40", "checkpoint.every=20", "trainer.eval_log_points=3", "model.n_heads=4"]
    ov = tiny + short + BATCH + ["+task_values.seg_len=[4,8]", f"run.dir={tmp_path / 'b'}",
                                "tracking.wandb.mode=offline"]
    cfg, node = load_config(ov)
    root = train_batch(cfg, node, ov, quiet=True)
    index = json.loads((root / "batch.json").read_text())
    assert [(r["condition"], r["seed"]) for r in index["runs"]] == [
        (f"{c}-seg_len{n}", s) for c in ("none", "prev_token") for n in (4, 8) for s in (0, 3)]
    # each run has its own wandb run (several in one process)
    wb = [list((root / r["dir"] / "wandb").glob("offline-run-*")) for r in index["runs"]]
    assert all(len(w) == 1 for w in wb) and len({w[0].name.rsplit("-", 1)[1] for w in wb}) == 8
    # the clamped seed-3 run with segments of 4, trained alone with the same settings
    solo_ov = tiny + short + ["clamp=prev_token", "task.seg_len=4", "seed=3", f"run.dir={tmp_path / 'solo'}"]
    c2, n2 = load_config(solo_ov)
    solo = train_run(c2, n2, quiet=True, overrides=solo_ov)
    a, b = read_metrics(root / "prev_token-seg_len4-s3" / "metrics.jsonl"), read_metrics(solo / "metrics.jsonl")
    assert_same_metrics(a, b)
    assert [r["step"] for r in a][:4] == [0, 1, 6, 20]  # stops at 1 and 6: remainders of a 10-step chunk
    sa = json.loads((root / "prev_token-seg_len4-s3" / "summary.json").read_text())
    sb = json.loads((solo / "summary.json").read_text())
    assert sa["condition"] == "prev_token-seg_len4" and sb["condition"] == "prev_token" and sa["seed"] == 3
    assert sa["checkpoints"] == sb["checkpoints"]
    assert len(sa["phase"]["transitions"]) == len(sb["phase"]["transitions"])
    # the unclamped runs differ from the clamped ones, the seeds from each other, and the segment lengths
    final = {r["dir"]: read_metrics(root / r["dir"] / "metrics.jsonl")[-1] for r in index["runs"]}
    losses = [final[d]["train/loss"] for d in ("none-seg_len4-s0", "none-seg_len4-s3", "prev_token-seg_len4-s3")]
    assert len({round(x, 6) for x in losses}) == 3
    assert abs(final["none-seg_len4-s0"]["test/repeated_loss"] - final["none-seg_len8-s0"]["test/repeated_loss"]) > 1e-3
    # each run directory is a solo run: its config has no batch fields and it can be resumed from
    run_cfg = (root / "none-seg_len8-s3" / "config.yaml").read_text()
    assert "seed: 3" in run_cfg and "num_seeds: 1" in run_cfg and "conditions: []" in run_cfg
    assert "seg_len: 8" in run_cfg


@pytest.mark.slow  # 10-40 s: in CI's slow suite, to keep `make test` inside its 10 minutes
def test_a_batch_that_does_not_fit_is_refused_before_anything_is_written(tiny, tmp_path):
    out = tmp_path / "b"
    p = subprocess.run(lab_cmd("train", *tiny, "trainer.num_seeds=4", "trainer.memory_limit_gb=1e-5",
                               f"run.dir={out}"), capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith("error: trainer.seeds: 4 runs need") and "at most 0 fit" in line, line
    assert "Traceback" not in p.stderr
    assert not out.exists()


def test_batched_runs_must_share_the_optimiser_but_for_its_rate(tiny):
    from lab.errors import LabError
    from lab.runs import Runs

    c0 = load_config(tiny)[0]
    c1 = load_config(tiny + ["optim.b2=0.99"])[0]
    try:
        Runs([c0, c1])
    except LabError as e:
        assert str(e).startswith("optim: batched runs may differ in optim.lr only")
    else:
        raise AssertionError("a batch with two optimisers was accepted")


BURSTY = ["experiment=reddy_bursty", "tracking.wandb.mode=disabled", "trainer.progress=false",
          "trainer.steps=40", "trainer.batch_size=16", "trainer.steps_per_call=10", "trainer.eval_every=20",
          "trainer.eval_log_points=0", "checkpoint.every=20", "checkpoint.log_points=0", "measures.names=[none]",
          "task.K=32", "task.L=8", "task.N=4", "task.B=2", "task.eval_size=32", "model.mlp_head=32",
          "optim.lr=0.05"]


@pytest.mark.slow  # make test's budget; the seeds x conditions x seg_len test above batches task values too
def test_task_values_and_learning_rates_batch_as_data_and_each_run_equals_its_solo_run(tmp_path):
    # p_C sets the training mixture, and so the "train" evaluation set: it is held per run. A warmup +
    # cosine schedule, so the per-run rate has to reach every part of the schedule.
    sched = ["optim.schedule=cosine", "optim.warmup_steps=10", "optim.end_lr_frac=0.1"]
    # alpha and eps (one value each, not the config's) reach the sampler as a law computed per run
    ov = BURSTY + sched + ["+task_values.p_C=[0.0,0.9]", "+task_values.alpha=[1.0]", "+task_values.eps=[0.3]",
                           "optim.lrs=[0.05,0.02]", "trainer.seeds=[1]", f"run.dir={tmp_path / 'b'}"]
    cfg, node = load_config(ov)
    root = train_batch(cfg, node, ov, quiet=True)
    index = json.loads((root / "batch.json").read_text())
    assert index["lrs"] == [0.05, 0.02]
    assert [r["dir"] for r in index["runs"]] == [f"none-p_C{p}-alpha1-eps0.3-lr{lr}-s1"
                                                 for p in ("0", "0.9") for lr in ("0.05", "0.02")]
    solo_ov = BURSTY + sched + ["task.p_C=0.9", "task.alpha=1.0", "task.eps=0.3", "optim.lr=0.02", "seed=1",
                                f"run.dir={tmp_path / 'solo'}"]
    c2, n2 = load_config(solo_ov)
    solo = train_run(c2, n2, quiet=True, overrides=solo_ov)
    a = read_metrics(root / "none-p_C0.9-alpha1-eps0.3-lr0.02-s1" / "metrics.jsonl")
    assert_same_metrics(a, read_metrics(solo / "metrics.jsonl"))
    run_cfg = (root / "none-p_C0.9-alpha1-eps0.3-lr0.02-s1" / "config.yaml").read_text()
    assert "p_C: 0.9" in run_cfg and "eps: 0.3" in run_cfg and "lr: 0.02" in run_cfg and "lrs: null" in run_cfg
    # the other mixture and the other rate train differently (same seed)
    final = {r["dir"]: read_metrics(root / r["dir"] / "metrics.jsonl")[-1]["train/loss"] for r in index["runs"]}
    assert abs(final["none-p_C0-alpha1-eps0.3-lr0.02-s1"] - final["none-p_C0.9-alpha1-eps0.3-lr0.02-s1"]) > 1e-3
    assert abs(final["none-p_C0.9-alpha1-eps0.3-lr0.05-s1"] - final["none-p_C0.9-alpha1-eps0.3-lr0.02-s1"]) > 1e-3


def test_task_values_accept_only_the_tasks_data_fields(capsys, tmp_path):
    from lab import cli

    rc = cli.main(["train", *BURSTY, "+task_values.K=[32,64]", f"run.dir={tmp_path / 'x'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: task_values.K=") and "p_B, p_C" in err[0], err
    assert not (tmp_path / "x").exists()


def test_a_single_listed_seed_is_trained_not_ignored(tiny):
    """`trainer.seeds=[1]` trains seed 1 (a batch of one run); a solo run would silently train `seed` (0)."""
    ov = tiny + ["trainer.seeds=[1]"]
    cfg, node = load_config(ov)
    assert is_batch(cfg)
    assert [r["seed"] for r in expand(cfg, node, ov)] == [1]
    assert not is_batch(load_config(tiny)[0])


@pytest.mark.slow  # 10-40 s: in CI's slow suite, to keep `make test` inside its 10 minutes
def test_conditions_batched_per_condition_write_the_same_directories_as_solo_runs(tiny, tmp_path):
    """lab.conditions.run_conditions(batched=True): each condition's seeds as one program, into
    ROOT/<condition>-s<seed>, each run's directory as a solo run writes it; finished runs are not trained again."""
    from lab.conditions import run_conditions

    base = tiny + ["trainer.steps=20", "checkpoint.every=10"]
    conds = {"plain": [], "clamped": ["clamp=prev_token", "clamps.prev_token.heads=[0]"]}
    dirs = run_conditions(base, conds, seeds=(0, 2), root=tmp_path / "cmp", quiet=True, batched=True)
    for label in conds:
        for seed, d in zip((0, 2), dirs[label], strict=True):
            assert d == tmp_path / "cmp" / f"{label}-s{seed}"
            s = json.loads((d / "summary.json").read_text())
            assert s["seed"] == seed and s["batched_runs"] == 2
            assert f"run.dir={d}" in json.loads((d / "overrides.json").read_text())["overrides"]
        assert (tmp_path / "cmp" / f"batch-{label}.json").exists()
    stamp = (dirs["plain"][0] / "summary.json").stat().st_mtime_ns
    run_conditions(base, conds, seeds=(0, 2), root=tmp_path / "cmp", quiet=True, batched=True)
    assert (dirs["plain"][0] / "summary.json").stat().st_mtime_ns == stamp


def test_singh_fig5b_is_one_batch_of_nested_presets_labelled_by_name():
    """Each Fig. 5b condition is one preset of configs/clamp/fig5b/, so the study is one batch (conditions=[...]):
    a run is labelled by its preset's own name, and its solo config holds exactly the authors' clamps."""
    from lab.conditions import SINGH_FIG5B

    presets = [ov[0].removeprefix("clamp=") for ov in SINGH_FIG5B.values()]
    ov = ["experiment=singh_fewshot", f"conditions=[{','.join(presets)}]", "trainer.seeds=[0,1]"]
    cfg, node = load_config(ov)
    runs = expand(cfg, node, ov)
    assert [r["label"] for r in runs][::2] == list(SINGH_FIG5B) and len(runs) == 12
    clamps = {r["label"]: sorted(r["cfg"].clamps) for r in runs}
    assert clamps["none"] == ["single_head"] and clamps["layer0_copy"] == ["copy", "layer0", "layer0_silent"]
    assert clamps["prev_token"] == ["prev_token", "single_head"]
    with pytest.raises(LabError, match="clamp=fig5b/nope: unknown clamp 'fig5b/nope'"):
        load_config(["experiment=singh_fewshot", "clamp=fig5b/nope"])


def test_eval_sets_evaluates_the_sets_named_and_refuses_others():
    """trainer.eval_sets: the Fig. 5b study evaluates the train set alone (it reads train/loss); the other sets'
    metrics are not computed at all, and a set the task lacks is refused naming the task's sets."""
    from lab.runs import Runs

    base = ["experiment=singh_fewshot", "model.n_heads=2", "model.d_model=16", "measures.names=[none]"]
    all_sets = Runs(load_config(base)[0])
    only = Runs(load_config([*base, "trainer.eval_sets=[train]"])[0])
    assert set(all_sets.evals) == {"train", "relabel", "test_exemplars", "test_classes"}
    assert set(only.evals) == {"train"}
    names = only.program.metric_names()
    assert "train/loss" in names and not any(n.startswith(("relabel/", "test_")) for n in names), names
    refused = r"trainer.eval_sets=\['trian'\]: evaluation sets of task fewshot: train, relabel"
    with pytest.raises(LabError, match=refused):
        Runs(load_config([*base, "trainer.eval_sets=[trian]"])[0])


@pytest.mark.slow  # ~20 s: CI's slow suite
def test_conditions_that_are_one_preset_each_train_as_one_program(tiny, tmp_path):
    """run_conditions(batched=True) with every condition one clamp preset named like it: all (condition, seed)
    runs are one program (one index beside them), each directory a solo run's."""
    from lab.conditions import run_conditions

    base = tiny + ["trainer.steps=20", "checkpoint.every=10", "model.n_heads=4"]
    conds = {"none": ["clamp=none"], "prev_token": ["clamp=prev_token"]}
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / "other-s0").mkdir()  # another run already there: the batch goes beside it
    dirs = run_conditions(base, conds, seeds=(0, 1), root=tmp_path / "cmp", quiet=True, batched=True)
    index = json.loads((tmp_path / "cmp" / "batch-none+prev_token.json").read_text())
    assert [r["dir"] for r in index["runs"]] == ["none-s0", "none-s1", "prev_token-s0", "prev_token-s1"]
    for label in conds:
        for seed, d in zip((0, 1), dirs[label], strict=True):
            s = json.loads((d / "summary.json").read_text())
            assert s["seed"] == seed and s["batched_runs"] == 4
    assert json.loads((dirs["prev_token"][0] / "summary.json").read_text())["condition"] != "none"
