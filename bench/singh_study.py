"""`make bench`'s study section: Singh's Fig. 5b study (6 conditions x seeds) by the lab's one command and by the
authors' icl-dynamics run by run, on one feature file, and each preset's training step against the unclamped one.

- The lab: `experiments/singh_clamps.py --steps N --seeds ...` as a user runs it (a child process, wall time from
  start to its comparison table: compilation, evaluation every 250 steps plus 40 log-spaced points, checkpoints,
  wandb offline and the report included), on the feature file below. Its table (first step with train loss below
  0.4 ln 2, per condition and seed) comes back with the times.
- The authors' code: ih_paper_runs.sh launches one `main.py` process per condition and seed. Each condition is
  timed at two lengths (`--lengths`, steps) and its wall time extrapolated linearly (start-up + steps x per-step
  cost) to N steps, times the number of seeds, in two settings:
  `as_launched`: their script's evaluation and checkpoint flags for Fig. 5b (every 1,000 sequences, four
  evaluation sets of 1,000 sequences, a checkpoint each time);
  `training_only`: one evaluation set of 32 sequences and one checkpoint, at the end: their training loop alone,
  the lower bound of what a run of theirs costs.
- The presets' steps: steady-state steps/s of one run under each condition's clamps and with none, interleaved
  (lab/bench's `interleaved`), as the ratio of the clamped step's time to the unclamped one's.

The authors' side needs a checkout of aadityasingh/icl-dynamics and a Python that runs it (bench/singh_side_by_side.py
says how to build one): `--icl PATH --icl-python PATH`, or the environment variables ICL_DYNAMICS and ICL_PYTHON.
Without them the section measures the lab alone and says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from singh_side_by_side import AUTHORS, SHARED, write_features  # noqa: E402

LIGHT_EVAL = ["--eval_iters", "32"]  # with --eval_every and --ckpt_every at the run's end: SHARED's one set
# ih_paper_runs.sh, Figure 5b: the evaluation sets and cadence of its clamped runs
SCRIPT_SETS = ("--pe_names fsl_train fsl_val_rl fsl_train_valex fsl_test_class --pe_classes train train train test "
               "--pe_exemplars train train val train --pe_fs_relabel_scheme train val train train "
               "--pe_burstiness 1 1 1 1").split()
SCRIPT_CADENCE = ["--eval_every", "1000", "--eval_iters", "1000", "--ckpt_every", "1000"]


def _shared_without_sets() -> list[str]:
    """SHARED with its one evaluation set's flags taken out (the script's four replace them)."""
    out, skip = [], False
    for a in SHARED:
        if a.startswith("--"):
            skip = a.startswith("--pe_")
        if not skip:
            out.append(a)
    return out


def authors_run_seconds(icl: Path, python: str, features: Path, cond: str, steps: int, setting: str) -> float:
    """Wall time of one of the authors' runs of ``steps`` steps (batch 32) under ``cond``, one process."""
    iters = 32 * steps
    if setting == "as_launched":
        flags = [*_shared_without_sets(), *SCRIPT_SETS, *SCRIPT_CADENCE]
    else:
        flags = [*SHARED, *LIGHT_EVAL, "--eval_every", str(iters), "--ckpt_every", str(iters)]
    out = Path(tempfile.mkdtemp(prefix="icl-"))
    cmd = [python, "main.py", "--data_file", str(features), *flags, *AUTHORS[cond], "--train_iters", str(iters),
           "--run", f"study_{cond}", "--base_folder", str(out)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=icl, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"icl-dynamics failed on {cond}: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    return wall


def bench_authors(icl: Path, python: str, features: Path, steps: int, n_seeds: int, lengths=(300, 1500)) -> dict:
    """Per condition and setting: the two timed lengths, the fitted start-up and per-step cost, one run of
    ``steps`` steps, and the study (x ``n_seeds``); the totals over conditions."""
    res: dict = {"lengths": list(lengths), "conditions": {}}
    for setting in ("as_launched", "training_only"):
        total = 0.0
        for cond in AUTHORS:
            walls = [authors_run_seconds(icl, python, features, cond, n, setting) for n in lengths]
            per_step = (walls[1] - walls[0]) / (lengths[1] - lengths[0])
            start = walls[0] - per_step * lengths[0]
            run = start + per_step * steps
            res["conditions"].setdefault(cond, {})[setting] = {
                "walls": walls, "startup_s": start, "per_step_ms": 1e3 * per_step, "run_s": run}
            total += run * n_seeds
            print(f"  authors {setting:13s} {cond:13s} {walls[0]:6.1f} s / {walls[1]:6.1f} s at {lengths[0]} / "
                  f"{lengths[1]} steps: {1e3 * per_step:5.2f} ms a step, a {steps}-step run {run:6.0f} s",
                  file=sys.stderr)
        res[f"study_{setting}_s"] = total
    return res


def bench_lab(features: Path, steps: int, seeds: list[int], root: Path) -> dict:
    """The lab's one command for the study, as a child process: wall time and its table."""
    cmd = [sys.executable, str(ROOT / "experiments" / "singh_clamps.py"), "--steps", str(steps),
           "--seeds", *map(str, seeds), "--root", str(root), f"task.features_path={features}"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"experiments/singh_clamps.py failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    first = {}
    for d in sorted(root.glob("*-s*")):
        if (d / "summary.json").exists():
            fb = json.loads((d / "summary.json").read_text())["phase"].get("first_below")
            first[d.name] = None if fb is None else int(fb)
    print(f"  lab: {len(first)} runs x {steps} steps in {wall:.0f} s (one command)", file=sys.stderr)
    return {"wall_s": wall, "runs": len(first), "first_below": first, "root": str(root)}


def bench_presets(seconds: float) -> dict:
    """Each Fig. 5b condition's training step (one run) against the unclamped one's, interleaved."""
    from run import interleaved

    from lab.conditions import SINGH_FIG5B
    from lab.config import load_config
    from lab.runs import Runs

    base = ["experiment=singh_fewshot", "tracking.wandb.mode=disabled", "trainer.progress=false",
            "trainer.steps_per_call=250"]
    trainers = {c: Runs(load_config([*base, *ov])[0]) for c, ov in {"unclamped": ["clamp=none"], **SINGH_FIG5B}.items()}
    # at least 12 s a condition: the VM's speed drifts by 10-40 % between minutes, and 5 rounds of a few
    # hundred milliseconds let one slow moment decide a ratio
    sps = interleaved(trainers, max(seconds, 12.0), rounds=8)
    out = {}
    for c, v in sps.items():
        out[c] = {"steps_per_sec": v, "time_ratio": sps["unclamped"] / v}
        print(f"  step {c:13s} {v:7.1f} steps/s  x{sps['unclamped'] / v:.2f} the unclamped step's time",
              file=sys.stderr)
    return out


def bench_study(seconds: float, steps: int = 18750, seeds=(0, 1, 2, 3, 4), icl: str | None = None,
                icl_python: str | None = None) -> dict:
    icl = icl or os.environ.get("ICL_DYNAMICS")
    icl_python = icl_python or os.environ.get("ICL_PYTHON")
    work = Path(tempfile.mkdtemp(prefix="singh-study-"))
    features = work / "features.h5"
    write_features(features)
    res: dict = {"steps": steps, "seeds": list(seeds), "conditions": len(AUTHORS)}
    res["presets"] = bench_presets(seconds)
    res["lab"] = bench_lab(features, steps, list(seeds), work / "lab")
    if icl and icl_python and (Path(icl) / "main.py").is_file():
        res["authors"] = bench_authors(Path(icl).absolute(), icl_python, features, steps, len(seeds))
        for setting in ("as_launched", "training_only"):
            theirs = res["authors"][f"study_{setting}_s"]
            ratio = res[f"speedup_{setting}"] = theirs / res["lab"]["wall_s"]
            print(f"  study: the authors' code {setting.replace('_', ' ')} {theirs:.0f} s (run by run), the lab "
                  f"{res['lab']['wall_s']:.0f} s: {ratio:.1f}x", file=sys.stderr)
    else:
        res["authors"] = None
        print("  authors' code not measured: give --icl and --icl-python (or ICL_DYNAMICS and ICL_PYTHON)",
              file=sys.stderr)
    worst = max(v["time_ratio"] for c, v in res["presets"].items() if c != "unclamped")
    res["worst_preset_ratio"] = float(np.round(worst, 3))
    return res
