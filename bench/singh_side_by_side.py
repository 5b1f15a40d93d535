"""Singh's Fig. 5b, the lab and the authors' icl-dynamics side by side on one feature file.

Given a checkout of aadityasingh/icl-dynamics and a Python environment that runs it (their setup.md; on
the CPU: ``python -m venv ENV && ENV/bin/pip install "jax[cpu]==0.4.26" jaxlib==0.4.26 "equinox<0.11.5"
nptyping h5py optax==0.2.2 "numpy<2" tqdm scipy matplotlib``; the checkout's omniglot .h5 is not needed), this
trains every Fig. 5b condition with both codes on the same feature file in the authors' HDF5 layout
(dataset ``resnet18/224/feat``, [1623 classes, 5 exemplars, 512]) and prints, per condition, the first
training step at which the train loss falls below 0.4 ln 2 (Singh's phase-change time). The authors'
runs use the flags of their ih_paper_runs.sh (init seed 5, 1:3 the active head, 0:2 the previous-token
head) with fewer iterations and a lighter evaluation; their per-step losses (log.h5) are smoothed over
250 steps, the lab's are its `train` evaluator every 250 steps.

Without --features it writes one: the lab's synthetic few-shot features (class prototypes plus exemplar
noise), so both codes read the same numbers.

Run:  .venv/bin/python bench/singh_side_by_side.py --icl PATH/icl-dynamics --python PATH/venv/bin/python
      .venv/bin/python bench/singh_side_by_side.py --icl ... --python ... --steps 6000 --conditions none layer0
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
THRESHOLD = 0.4 * math.log(2)
REST = ["1:0", "1:1", "1:2", "1:4", "1:5", "1:6", "1:7"]
# ih_paper_runs.sh, "Figure 5b, clamping experiments": the flags of each condition
AUTHORS = {
    "none": ["--opto_ablate_heads", *REST],
    "prev_token": ["--opto_prev_token_heads", "0:2", "--opto_ablate_heads", *REST],
    "layer0": ["--opto_specific_fn", "perfect_prev_token_input", "--opto_ablate_heads", *REST],
    "perfect_match": ["--opto_induction_heads", "1:3", "--opto_ablate_heads", *REST],
    "perfect_copy": ["--opto_perfect_copy_from_head_pattern", "1:3"],
    "layer0_copy": ["--opto_specific_fn", "perfect_prev_token_input", "--opto_perfect_copy_from_head_pattern", "1:3"],
}
SHARED = ("--mixing_coeffs 1.0 --pt_burstiness 1 --train_context_len 2 --fs_relabel 5 --fs_relabel_split 8 2 0 "
          "--exemplar_split 1 4 0 --pe_names fsl_train --pe_classes train --pe_exemplars train "
          "--pe_fs_relabel_scheme train --pe_burstiness 1 --train_bs 32 --lr 0.00001 --d_model 64 "
          "--class_split 50 1473 100 --init_seed 5 --raw_name").split()


def write_features(path: Path) -> None:
    """The lab's synthetic few-shot features, in the authors' layout."""
    import h5py

    from lab.tasks.fewshot import FewshotConfig, FewshotTask

    task = FewshotTask(FewshotConfig(n_classes=1623, n_exemplars=5, feature_dim=512))
    with h5py.File(path, "w") as f:
        f.create_dataset("resnet18/224/feat", data=np.asarray(task.features))


def prepare(ap: argparse.ArgumentParser, args) -> Path:
    """Check --icl is a checkout, make --out, and return the feature file (written there unless --features)."""
    if not (args.icl / "opto.py").is_file():
        ap.error(f"--icl={args.icl}: not an icl-dynamics checkout (no opto.py)")
    args.out.mkdir(parents=True, exist_ok=True)
    features = (args.features or args.out / "features.h5").absolute()
    if not features.exists():
        write_features(features)
    return features


def first_below(steps, losses, window: int = 1) -> int | None:
    loss = np.asarray(losses, np.float64)
    if window > 1:
        loss = np.convolve(loss, np.ones(window) / window, mode="valid")
        steps = np.asarray(steps)[window - 1:]
    hit = np.nonzero(loss < THRESHOLD)[0]
    return int(steps[hit[0]]) if len(hit) else None


def run_authors(icl: Path, python: str, features: Path, cond: str, steps: int, out: Path) -> int | None:
    import h5py

    run = f"fig5b_{cond}"
    cmd = [python, "main.py", "--data_file", str(features), *SHARED, *AUTHORS[cond], "--train_iters", str(32 * steps),
           "--eval_every", str(32 * steps), "--eval_iters", "32", "--ckpt_every", str(32 * steps), "--run", run,
           "--base_folder", str(out)]
    p = subprocess.run(cmd, cwd=icl, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"icl-dynamics failed on {cond}: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    log = next(out.rglob(f"{run}*/log.h5"))
    with h5py.File(log, "r") as f:
        iters, loss = np.asarray(f["train_iter"]), np.asarray(f["train_loss"])
    return first_below(iters // 32, loss, window=250)


def run_lab(features: Path, cond: str, steps: int, out: Path) -> int | None:
    import json

    from lab.conditions import SINGH_FIG5B, run_conditions

    base = ["experiment=singh_fewshot", f"trainer.steps={steps}", "trainer.eval_every=250", "trainer.eval_log_points=0",
            "checkpoint.every=0", "checkpoint.log_points=0", "trainer.progress=false", "tracking.wandb.mode=disabled",
            f"task.features_path={features}"]
    dirs = run_conditions(base, {cond: SINGH_FIG5B[cond]}, [0], out, quiet=True)
    summary = json.loads((dirs[cond][0] / "summary.json").read_text())
    fb = summary["phase"].get("first_below")
    return None if fb is None else int(fb)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--icl", required=True, type=Path, help="a checkout of aadityasingh/icl-dynamics")
    ap.add_argument("--python", required=True, help="the Python that runs it")
    ap.add_argument("--features", type=Path, help="a feature file in the authors' layout (default: written)")
    ap.add_argument("--steps", type=int, default=18750)
    ap.add_argument("--conditions", nargs="+", default=list(AUTHORS), choices=list(AUTHORS))
    ap.add_argument("--out", type=Path, default=Path("runs/singh_side_by_side"))
    args = ap.parse_args()
    features = prepare(ap, args)
    rows = []
    for cond in args.conditions:
        theirs = run_authors(args.icl.absolute(), args.python, features.absolute(), cond, args.steps,
                             Path(tempfile.mkdtemp(dir=args.out.absolute())))
        ours = run_lab(features.absolute(), cond, args.steps, args.out / "lab")
        rows.append((cond, ours, theirs))
        print(f"{cond}: lab {ours}, authors {theirs}", file=sys.stderr)
    fmt = lambda v: "never" if v is None else f"{v:,}"  # noqa: E731
    print(f"| condition | lab: first step < 0.4 ln 2 | authors' code | lab / authors |  ({args.steps} steps, seed 0 / "
          "init seed 5)\n|---|---|---|---|")
    for cond, ours, theirs in rows:
        ratio = f"{ours / theirs:.2f}" if ours and theirs else "—"
        print(f"| {cond} | {fmt(ours)} | {fmt(theirs)} | {ratio} |")


if __name__ == "__main__":
    main()
