"""Bietti et al. 2023, Figure 3: the birth of an induction head, memory by memory.

Trains `experiment=bietti_bigram` (the authors' README setting; configs/experiment/bietti_bigram.yaml says which
flag each field follows) unless ROOT already holds the finished run, then plots, against the step: the
in-context accuracy (output tokens from their second occurrence, `test/icl_acc`), the three memory-recall
probes as the authors' code computes them (`memory_recall/wo1`: layer 1's output copies the attended token;
`wk1`: layer 1's key matches "previous token = the query's token"; `wk0`: layer 0's positional key finds the
previous position, over all 256 positions and over the first 64), and the attention scores of the
mechanism (L0H0's previous-token score over all positions, L1H0's prefix matching on random tokens: the
general probes; the circuit summary measures where the task needs the circuit, after and at triggers).
Prints the step at which each first reaches 0.5 and 0.9, the order, and the run's circuit summary. Writes
bietti_birth.png to ROOT.

Run:  .venv/bin/python experiments/bietti_birth.py                 # ~80 min on 2 CPU cores (1,000 steps)
      .venv/bin/python experiments/bietti_birth.py task.stats_path=CHECKOUT/data/meta.pkl   # Shakespeare's laws
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import lab  # noqa: E402

CURVES = {  # metric -> (label, colour, line style)
    "test/icl_acc": ("in-context accuracy", "k", "-"),
    "memory_recall/wo1": ("wo1 (layer-1 output memory)", "C0", "-"),
    "memory_recall/wk1": ("wk1 (layer-1 key: the match)", "C1", "-"),
    "memory_recall/wk0": ("wk0 (layer-0 key: previous position)", "C2", "-"),
    "memory_recall/wk0_64": ("wk0, first 64 positions", "C2", ":"),
    "prev_token/L0H0": ("L0H0 previous-token score, all positions", "C3", "--"),
    "prefix_matching/L1H0": ("L1H0 prefix matching, random tokens", "C4", "--"),
}


def first_at(m, metric: str, level: float):
    hit = m[m[metric] >= level]
    return None if hit.empty else int(hit["step"].iloc[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="runs/bietti_birth")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. task.stats_path=.../meta.pkl seed=1")
    args = ap.parse_args()
    root = Path(args.root)
    run = lab.load(root) if (root / "summary.json").is_file() else lab.train(
        "experiment=bietti_bigram", f"run.dir={root}", *args.overrides, quiet=False)
    m = run.metrics
    fig, ax = plt.subplots(figsize=(9, 5))
    for metric, (label, color, ls) in CURVES.items():
        if metric in m:
            ax.plot(m["step"], m[metric], color=color, ls=ls, lw=2 if metric == "test/icl_acc" else 1.5, label=label)
    ax.set(xlabel="step (batch 512 x 256)", ylabel="accuracy / recall / score", ylim=(-0.02, 1.02),
           title="Birth of an induction head (Bietti et al.'s simplified model, their README setting)")
    ax.legend(fontsize=8, loc="center right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(root / "bietti_birth.png", dpi=110)
    plt.close(fig)
    fmt = lambda v: "never" if v is None else f"{v:,}"  # noqa: E731
    print("| curve | first step >= 0.5 | >= 0.9 | final |\n|---|---|---|---|")
    for metric, (label, _, _) in CURVES.items():
        if metric in m:
            print(f"| {label} | {fmt(first_at(m, metric, 0.5))} | {fmt(first_at(m, metric, 0.9))} | "
                  f"{m[metric].iloc[-1]:.3f} |")
    probes = [k for k in ("memory_recall/wo1", "memory_recall/wk1", "memory_recall/wk0") if k in m]
    reached = sorted((first_at(m, k, 0.5), k.split("/")[1]) for k in probes if first_at(m, k, 0.5) is not None)
    print("memories reaching 0.5, in order:", " < ".join(f"{k} ({s:,})" for s, k in reached) or "none")
    print(run.summary.get("circuit", {}).get("line", "(no circuit summary)"))
    print(f"figure: {root / 'bietti_birth.png'}")


if __name__ == "__main__":
    main()
