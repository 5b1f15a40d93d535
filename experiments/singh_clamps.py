"""Singh et al. 2024, Fig. 5b, in the lab's synthetic few-shot task: which clamps remove the plateau?

Trains singh_fewshot under six conditions -- no clamp, a previous-token clamp on L0H0, the
ideal layer 0 (subcircuit A), A + a perfect induction match (B), a perfect copy (C), and A + C --
and plots the train loss against sequences seen, with ln 2 (the plateau) and 0.4 ln 2 (Singh's
phase-change threshold) marked. Writes fig5b.png and table.md next to the runs.

Run:  .venv/bin/python experiments/singh_clamps.py                  # the paper's 1e6 sequences
      .venv/bin/python experiments/singh_clamps.py --steps 8000     # shorter
"""

import argparse
import math
from pathlib import Path

from lab.compare import compare
from lab.conditions import run_conditions

CONDITIONS = {
    "none": ["clamp=none"],
    "prev_token": ["clamp=prev_token"],
    "layer0": ["clamp=layer0"],
    "perfect_match": ["clamp=perfect_match"],
    "perfect_copy": ["clamp=perfect_copy"],
    "layer0_copy": ["clamp=layer0_copy"],
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=31250)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--root", default="runs/singh_clamps")
    ap.add_argument("--conditions", nargs="+", default=list(CONDITIONS))
    args = ap.parse_args()
    base = ["experiment=singh_fewshot", f"trainer.steps={args.steps}", "trainer.eval_every=250",
            "trainer.eval_log_points=40", "checkpoint.every=0", "checkpoint.log_points=6"]
    run_conditions(base, {c: CONDITIONS[c] for c in args.conditions}, args.seeds, args.root)
    out = compare([args.root], metrics=["train/loss"], baseline=str(Path(args.root) / f"none-s{args.seeds[0]}"),
                  out=args.root, threshold=0.4 * math.log(2))
    print((out / "table.md").read_text())
    print(f"figures and report.html in {out}")


if __name__ == "__main__":
    main()
