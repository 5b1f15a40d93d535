"""Singh et al.'s toy model of the plateau: a rank-1 tensor a⊗b⊗c (dim 20) fit by gradient descent,
unclamped and with b and c (or b alone) reset to their true values after every step.

Run:  .venv/bin/python experiments/toy_rank1.py     (writes runs/toy_rank1/toy_rank1.png)
"""

import argparse
from pathlib import Path

import numpy as np

from lab.plots import plot_conditions
from lab.toy import rank1_run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--seeds", type=int, default=5, help="seeds averaged per condition")
    ap.add_argument("--root", default="runs/toy_rank1")
    args = ap.parse_args()
    if args.steps < 1 or args.seeds < 1:
        ap.error(f"--steps={args.steps} --seeds={args.seeds}: both must be >= 1")
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    curves, lines = {}, []
    for label, clamp in (("no clamp", ()), ("clamp b", ("b",)), ("clamp b, c", ("b", "c"))):
        runs = [np.asarray(rank1_run(seed=s, steps=args.steps, clamp=clamp)) for s in range(args.seeds)]
        losses = np.mean(runs, axis=0)
        curves[label] = [(i + 1, float(v)) for i, v in enumerate(losses)]
        first = int(np.argmax(losses < 0.05)) if (losses < 0.05).any() else None
        lines.append(f"{label:12s} loss < 0.05 first at step {first}")
    plot_conditions(curves, root / "toy_rank1.png", ylabel="loss",
                    title=f"rank-1 tensor toy model (mean of {args.seeds} seeds)")
    print("\n".join(lines))
    print(f"figure: {root / 'toy_rank1.png'}")


if __name__ == "__main__":
    main()
