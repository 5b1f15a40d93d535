"""Edelman et al. 2024's three phases on in-context Markov chains: the model's KL to the uniform,
in-context unigram and in-context bigram strategies, with the detected transitions of the loss.

Run:  .venv/bin/python experiments/edelman_markov.py
"""

import matplotlib

matplotlib.use("Agg")  # figures to files, whatever the display

import argparse
from pathlib import Path

import matplotlib.pyplot as plt  # noqa: E402  (a script: matplotlib.use("Agg") above)

from lab.config import load_config
from lab.measures.phase import detect_transitions
from lab.run import train_run
from lab.tracking import read_metrics


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--root", default="runs/edelman_markov")
    args = ap.parse_args()
    run = Path(args.root) / "s0"
    if not (run / "summary.json").exists():
        overrides = ["experiment=edelman_markov", f"trainer.steps={args.steps}", "trainer.eval_every=25",
                     f"run.dir={run}"]
        cfg, node = load_config(overrides)
        train_run(cfg, node, overrides=overrides)
    rows = [r for r in read_metrics(run / "metrics.jsonl") if r["step"] > 0]
    fig, ax = plt.subplots(figsize=(9, 5))
    for key in ("test/kl_uniform", "test/kl_unigram", "test/kl_bigram", "test/kl"):
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=key)
    ts = detect_transitions([r["step"] for r in rows], [r["test/loss"] for r in rows])
    for t in ts:
        ax.axvspan(t["onset"], t["end"], color="tab:red", alpha=0.08)
        print(f"test/loss transition: {t['before']:.4f} -> {t['after']:.4f}, mid step {t['mid']:.0f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("KL(strategy || model), KL(true || model)")
    ax.legend()
    ax.set_title("Edelman: uniform -> unigram -> bigram")
    fig.tight_layout()
    fig.savefig(Path(args.root) / "edelman_markov.png", dpi=110)
    print(f"figure: {Path(args.root) / 'edelman_markov.png'}")


if __name__ == "__main__":
    main()
