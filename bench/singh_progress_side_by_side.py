"""Singh's progress measures by clamp (Fig. 10), the lab and the authors' icl-dynamics side by side on one file.

Trains the unclamped single-head run (Fig. 5b's `none`: L1H3 active, the other layer-1 heads ablated) with both
codes on the same feature file, and evaluates it during training with the two clamps of the authors' Fig. 10
switched on at evaluation only, on top of the ablation:

  pt_attn  --opto_prev_token_heads 0:2 (lab: the prev_token preset as a probe, measures.clamps.pt_attn)
  match    --opto_induction_heads 1:3  (lab: the perfect_match preset as a probe, measures.clamps.match)

The authors' side trains with their main.py (ih_paper_runs.sh flags, init seed 5, a checkpoint every
--every steps) and computes the measures at every checkpoint with their own forward functions
(bench/icl_progress_driver.py, run in their environment, following ih_paper_appendix_plots.ipynb) on every
training sequence; the lab logs `train@pt_attn/loss` and `train@match/loss` on its 1,000-sequence train
evaluator every --every steps (seed 0). Prints the three curves of both at every checkpoint and the first
step each falls below 0.4 ln 2; writes progress_side_by_side.png and .md to --out.

Run:  .venv/bin/python bench/singh_progress_side_by_side.py --icl PATH/icl-dynamics --python PATH/venv/bin/python
      (environment as in bench/singh_side_by_side.py; --features FILE.h5 to reuse a feature file)
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from singh_side_by_side import AUTHORS, SHARED, prepare  # noqa: E402

THRESHOLD = 0.4 * math.log(2)
MEASURES = {"orig": "train/loss", "pt_attn": "train@pt_attn/loss", "match": "train@match/loss"}
PROBES = {"pt_attn": "prev_token", "match": "perfect_match"}


def run_authors(icl: Path, python: str, features: Path, steps: int, every: int, out: Path) -> dict[int, dict]:
    run = "progress_none"
    cmd = [python, "main.py", "--data_file", str(features), *SHARED, *AUTHORS["none"], "--train_iters",
           str(32 * steps), "--eval_every", str(32 * steps), "--eval_iters", "32", "--ckpt_every", str(32 * every),
           "--run", run, "--base_folder", str(out)]
    p = subprocess.run(cmd, cwd=icl, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"icl-dynamics failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    driver = Path(__file__).resolve().parent / "icl_progress_driver.py"
    p = subprocess.run([python, str(driver), str(out / run)], cwd=icl, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"the progress driver failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    got = json.loads(p.stdout.strip().splitlines()[-1])
    return {int(it) // 32: m for it, m in got["measures"].items()}


def run_lab(features: Path, steps: int, every: int, out: Path) -> dict[int, dict]:
    from lab.comparison import load, series
    from lab.conditions import SINGH_FIG5B, probe_overrides, run_conditions

    base = ["experiment=singh_fewshot", f"trainer.steps={steps}", f"trainer.eval_every={every}",
            "trainer.eval_log_points=0", "checkpoint.every=0", "checkpoint.log_points=0", "trainer.progress=false",
            "tracking.wandb.mode=disabled", f"task.features_path={features}"]
    probes = probe_overrides(PROBES, base)
    dirs = run_conditions(base, {"none": SINGH_FIG5B["none"] + probes}, [0], out, quiet=True)
    d = load(dirs["none"][0])
    cols = {k: dict(zip(*series(d, m, "step"), strict=True)) for k, m in MEASURES.items()}
    return {int(s): {k: cols[k][s] for k in MEASURES} for s in cols["orig"]}


def first_below(curve: dict[int, dict], k: str):
    from lab.measures.phase import first_crossing

    steps = sorted(curve)
    hit = first_crossing(steps, [curve[s][k] for s in steps], THRESHOLD)
    return None if hit is None else int(hit)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--icl", required=True, type=Path, help="a checkout of aadityasingh/icl-dynamics")
    ap.add_argument("--python", required=True, help="the Python that runs it")
    ap.add_argument("--features", type=Path, help="a feature file in the authors' layout (default: written)")
    ap.add_argument("--steps", type=int, default=18750)
    ap.add_argument("--every", type=int, default=1250, help="checkpoint / evaluation interval in steps")
    ap.add_argument("--out", type=Path, default=Path("runs/singh_progress_side_by_side"))
    args = ap.parse_args()
    features = prepare(ap, args)
    theirs = run_authors(args.icl.absolute(), args.python, features, args.steps, args.every,
                         Path(tempfile.mkdtemp(dir=args.out.absolute())))
    ours = run_lab(features, args.steps, args.every, args.out / "lab")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for k, color in zip(MEASURES, ("0.4", "C1", "C2"), strict=True):
        for curve, ls, who in ((ours, "-", "lab"), (theirs, "--", "authors")):
            s = sorted(curve)
            ax.plot(s, [curve[i][k] for i in s], ls=ls, color=color, label=f"{k} ({who})")
    ax.axhline(THRESHOLD, color="k", ls=":", lw=0.8)
    ax.set(xlabel="step (batch 32)", ylabel="train loss", ylim=(0, 2),
           title="Progress measures by clamp on the unclamped single-head run")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "progress_side_by_side.png", dpi=110)
    plt.close(fig)

    steps = sorted(set(ours) & set(theirs))
    lines = [f"Unclamped single-head run, {args.steps:,} steps; lab seed 0 (1,000 training sequences), authors init "
             "seed 5 (every training sequence); loss as trained (orig) and with each clamp switched on", "",
             "| step | lab orig | authors orig | lab pt_attn | authors pt_attn | lab match | authors match |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {s:,} | " + " | ".join(f"{c[s][k]:.3f}" for k in MEASURES for c in (ours, theirs)) + " |"
              for s in steps]
    fmt = lambda v: "never" if v is None else f"{v:,}"  # noqa: E731
    lines += ["", "| measure | lab: first step < 0.4 ln 2 | authors' code |", "|---|---|---|"]
    lines += [f"| {k} | {fmt(first_below(ours, k))} | {fmt(first_below(theirs, k))} |" for k in MEASURES]
    text = "\n".join(lines) + "\n"
    (args.out / "progress_side_by_side.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
