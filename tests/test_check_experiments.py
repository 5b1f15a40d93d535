"""bench/check_experiments.py reads each run's own summary.json into the experiments' table: seeds with an induction
circuit where the task has a circuit summary, else the seeds that keep the experiment's stated promise."""

import importlib.util
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("check_experiments", ROOT / "bench" / "check_experiments.py")
check_experiments = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_experiments)


def _write(batch: Path, seed: int, **summary) -> None:
    run = batch / f"s{seed}"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"seed": seed, "steps": 1000, **summary}))


def _phase(metric, mid, **extra):
    return {"metric": metric, "transitions": [{"before": 1.0, "after": 0.1, "onset": mid / 2, "mid": mid,
                                               "end": mid * 1.5}], **extra}


def test_circuit_summary_counts_induction_circuits_and_their_transitions(tmp_path):
    for seed, (ok, mid) in enumerate([(True, 400), (False, 30), (True, 600)]):
        _write(tmp_path, seed, phase=_phase("repeat/loss", mid),
               circuit={"is_induction_circuit": ok, "line": "induction circuit" if ok else "NOT an induction circuit"})
    r = check_experiments.read("demo", tmp_path, 5.0)
    assert (r["seeds"], r["circuits"], r["kept"], r["promise"]) == (3, 2, 2, "an induction circuit")
    assert r["median_transition"] == 500  # the seeds with the circuit only: seed 1's early fall is not counted
    assert check_experiments.row(r) == "| demo | 2 of 3 | 500 of 1,000 | 5 s |"


def test_singh_promise_is_leaving_the_plateau(tmp_path):
    below = 0.4 * math.log(2)
    _write(tmp_path, 0, phase=_phase("train/loss", 18000, threshold=below, first_below=21250.0), final={})
    _write(tmp_path, 1, phase=_phase("train/loss", 300, threshold=below, first_below=None), final={})
    r = check_experiments.read("singh_fewshot", tmp_path, 1.0)
    assert [x["kept"] for x in r["runs"]] == [True, False]
    assert (r["kept"], r["median_transition"]) == (1, 18000)
    assert "1 of 2 (train loss below 0.4 ln 2)" in check_experiments.row(r)


def test_reddy_promise_needs_the_jump_and_both_patterns(tmp_path):
    finals = [{"ic/acc": 0.97, "ila/L0H0": 0.8, "tila/L1H0": 0.7},  # jumped, both patterns formed
              {"ic/acc": 0.97, "ila/L0H0": 0.8, "tila/L1H0": 0.06},  # accuracy without the layer-1 pattern
              {"ic/acc": 0.12, "ila/L0H0": 0.17, "tila/L1H0": 0.06}]  # the plateau
    for seed, final in enumerate(finals):
        _write(tmp_path, seed, phase=_phase("ic/acc", 40000 + seed), final=final)
    r = check_experiments.read("reddy_bursty", tmp_path, 1.0)
    assert [x["kept"] for x in r["runs"]] == [True, False, False]
    assert not r["has_circuit_summary"] and r["kept"] == 1 and r["median_transition"] == 40000


def test_an_experiment_without_summary_or_promise_counts_every_transition(tmp_path):
    _write(tmp_path, 0, phase=_phase("loss", 100), final={})
    _write(tmp_path, 1, phase=_phase("loss", 300), final={})
    r = check_experiments.read("unknown", tmp_path, 1.0)
    assert r["promise"] is None and r["median_transition"] == 200
    assert "no summary" in check_experiments.row(r)
    assert "no runs" in check_experiments.row(check_experiments.read("unknown", tmp_path / "empty", 1.0))
