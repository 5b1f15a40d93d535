"""Reddy 2023's mechanism setting: in-context accuracy creeps from 1/L towards 1/N, then jumps when
the induction head forms -- and the attention measures ILA (layer 0: label -> own item) and TILA
(layer 1: query -> matching label) jump at the same time.

Trains experiment=reddy_bursty (K=256, B=1, p_B=1, p_C=0.8, Reddy's model and SGD) and draws
ic/acc, ILA of L0H0 and TILA of L1H0 on one step axis with each curve's detected transition.
Writes reddy_mechanism.png and prints the transition midpoints.

Run:  .venv/bin/python experiments/reddy_mechanism.py --steps 30000
"""

import matplotlib

matplotlib.use("Agg")  # figures to files, whatever the display

import argparse
import json
from pathlib import Path

import matplotlib.pyplot as plt  # noqa: E402  (a script: matplotlib.use("Agg") above)

from lab.config import load_config
from lab.measures.phase import detect_transitions
from lab.run import train_run
from lab.tracking import read_metrics

CURVES = ("ic/acc", "ila/L0H0", "tila/L1H0", "iw/acc")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", default="runs/reddy_mechanism")
    args = ap.parse_args()
    run = Path(args.root) / f"s{args.seed}"
    if not (run / "summary.json").exists():
        overrides = ["experiment=reddy_bursty", f"trainer.steps={args.steps}", "trainer.eval_every=500",
                     "measures.names=[ila,tila,tla,prev_token]", f"seed={args.seed}", f"run.dir={run}"]
        cfg, node = load_config(overrides)
        train_run(cfg, node, overrides=overrides)
    rows = read_metrics(run / "metrics.jsonl")
    fig, ax = plt.subplots(figsize=(9, 5))
    found = {}
    for i, key in enumerate(CURVES):
        pts = [(r["step"], r[key]) for r in rows if key in r and r["step"] > 0]
        if not pts:
            continue
        s, v = zip(*pts, strict=True)
        ax.plot(s, v, color=f"C{i}", label=key)
        ts = detect_transitions(s, v)
        if ts:
            t = max(ts, key=lambda t: abs(t["after"] - t["before"]))
            found[key] = t
            ax.axvline(t["mid"], color=f"C{i}", ls="--", lw=0.8)
    ax.axhline(1 / 32, color="gray", ls=":", lw=1)
    ax.axhline(1 / 8, color="gray", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy / attention mass")
    ax.set_title("Reddy mechanism setting: IC accuracy, ILA and TILA (dashed: detected midpoints)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(args.root) / "reddy_mechanism.png", dpi=110)
    summary = {k: {"onset": t["onset"], "mid": t["mid"], "end": t["end"], "before": t["before"], "after": t["after"]}
               for k, t in found.items()}
    (Path(args.root) / "transitions.json").write_text(json.dumps(summary, indent=2))
    for k, t in summary.items():
        print(f"{k:12s} {t['before']:.3f} -> {t['after']:.3f}  onset {t['onset']:.0f}  mid {t['mid']:.0f}  "
              f"end {t['end']:.0f}")
    print(f"figure: {Path(args.root) / 'reddy_mechanism.png'}")


if __name__ == "__main__":
    main()
