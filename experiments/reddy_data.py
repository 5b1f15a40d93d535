"""Reddy 2023's data dependence at small scale: burstiness B in {0, 1, 2, 4} at two class counts K;
in-context (ic) vs in-weights (iw) accuracy at the end of training, as a table and a plot.

Run:  .venv/bin/python experiments/reddy_data.py --steps 6000
"""

import matplotlib

matplotlib.use("Agg")  # figures to files, whatever the display

import argparse
import json
from pathlib import Path

import matplotlib.pyplot as plt  # noqa: E402  (a script: matplotlib.use("Agg") above)

from lab.conditions import run_conditions


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--K", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--B", type=int, nargs="+", default=[0, 1, 2, 4])
    ap.add_argument("--root", default="runs/reddy_data")
    args = ap.parse_args()
    base = ["experiment=reddy_bursty", f"trainer.steps={args.steps}", "trainer.eval_every=1000",
            "trainer.eval_log_points=0", "task.p_C=0.0", "task.p_B=0.9", "measures.names=[none]",
            "checkpoint.every=0", "checkpoint.log_points=0"]
    conds = {f"K{k}-B{b}": [f"task.K={k}", f"task.B={b}"] for k in args.K for b in args.B}
    runs = run_conditions(base, conds, seeds=(0,), root=args.root)
    table = []
    for label, dirs in runs.items():
        fin = json.loads((dirs[0] / "summary.json").read_text())["final"]
        k, b = label[1:].split("-B")
        table.append({"K": int(k), "B": int(b), "ic_acc": fin["ic/acc"], "iw_acc": fin["iw/acc"]})
    lines = ["| K | B | ic acc | iw acc |", "|---|---|---|---|"]
    lines += [f"| {r['K']} | {r['B']} | {r['ic_acc']:.3f} | {r['iw_acc']:.3f} |" for r in table]
    (Path(args.root) / "table.md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key in zip(axes, ("ic_acc", "iw_acc"), strict=True):
        for k in args.K:
            rs = [r for r in table if r["K"] == k]
            ax.plot([r["B"] for r in rs], [r[key] for r in rs], marker="o", label=f"K={k}")
        ax.set_xlabel("burstiness B")
        ax.set_title(key.replace("_", " "))
        ax.legend()
    axes[0].set_ylabel("accuracy at the end")
    fig.tight_layout()
    fig.savefig(Path(args.root) / "reddy_data.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
