"""Singh et al. 2024: how far along is each subcircuit? Fig. 3b and the progress measures by clamp (Fig. 10).

Two of the paper's ways to watch an induction head form, each as the authors computed it
(aadityasingh/icl-dynamics: ih_paper_plots.ipynb "Figure 3b", ih_paper_appendix_plots.ipynb "Figure 10"):

- Fig. 3b, induction strength per layer-1 head over the main run (experiment=singh_fewshot: 8 + 8 heads,
  no clamp, 1e6 sequences): at the query, attention to the correct label minus attention to the incorrect
  one. The authors compute it on every training (class pair, label pair) sequence; the lab on its fixed
  probe batch (`induction_strength/L1H{h}`, measures.probe_size sequences), at every evaluation.
- Fig. 10, the progress measures by clamp: the unclamped single-head run (`none`: L1H3 active, the other
  layer-1 heads ablated, as in Fig. 5b) evaluated at every evaluation with a clamp it is not trained with,
  on top of its own ablation (the authors' progress_fns add the clamp to --opto_ablate_heads):
    pt_attn  the previous-token pattern on L0H2 (`--opto_prev_token_heads 0:2`; preset prev_token): the
             loss that remains once subcircuit A's attention is perfect, i.e. the progress of the rest
             (the paper's "composite sub-circuit");
    match    the perfect match on L1H3 (`--opto_induction_heads 1:3`; preset perfect_match): the progress
             of the copy subcircuit C.
  Next to them, the loss of runs *trained* with those clamps (Fig. 5b's prev_token and perfect_match), the
  left panel of the authors' figure.

Runs go to ROOT/main-s<seed>/, ROOT/none-s<seed>/, ROOT/prev_token-s<seed>/, ROOT/perfect_match-s<seed>/ (a
finished run is kept); trailing arguments are Hydra overrides for every run (e.g. task.features_path=FILE).
Writes fig3b_induction_strength.png, fig10_progress_by_clamp.png and table.md (first step below 0.4 ln 2 of
every curve) to ROOT.

Run:  .venv/bin/python experiments/singh_progress.py                  # ~5 min on 2 CPU cores
      .venv/bin/python experiments/singh_progress.py --steps 6000 --main-steps 12000 --seeds 0 1
"""

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lab.comparison import load, series  # noqa: E402
from lab.conditions import SINGH_FIG5B, probe_overrides, run_conditions  # noqa: E402
from lab.measures.phase import first_crossing  # noqa: E402

THRESHOLD = 0.4 * math.log(2)  # Singh's phase-change level
PROBES = {"pt_attn": "prev_token", "match": "perfect_match"}  # probe name -> the preset it switches on
N_HEADS = 8


def first_below(d: dict, metric: str):
    s, v = series(d, metric, "step")
    return first_crossing(s, v, THRESHOLD)


def fmt(x) -> str:
    return "never" if x is None else f"{x:,.0f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=18750, help="Fig. 10 runs (batch 32; default 6e5 sequences)")
    ap.add_argument("--main-steps", type=int, default=31250, help="Fig. 3b main run (default 1e6 sequences)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--root", default="runs/singh_progress")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. task.features_path=FILE")
    args = ap.parse_args()
    root = Path(args.root)
    common = ["experiment=singh_fewshot", "trainer.eval_every=250", "trainer.eval_log_points=40",
              "checkpoint.every=0", "checkpoint.log_points=6", *args.overrides]
    base = [*common, f"trainer.steps={args.steps}"]
    probes = probe_overrides(PROBES, base)
    runs = run_conditions([*common, f"trainer.steps={args.main_steps}"], {"main": []}, args.seeds, root,
                          batched=True)
    runs |= run_conditions(base, {"none": SINGH_FIG5B["none"] + probes}, args.seeds, root, batched=True)
    runs |= run_conditions(base, {c: SINGH_FIG5B[c] for c in ("prev_token", "perfect_match")}, args.seeds, root,
                           batched=True)
    d = {c: [load(r) for r in dirs] for c, dirs in runs.items()}

    # Fig. 3b: induction strength of every layer-1 head in the main run (first seed), next to its loss
    main_run = d["main"][0]
    fig, (ax_loss, ax_ih) = plt.subplots(1, 2, figsize=(13, 4.5), sharex=True)
    for m, label in (("train/loss", "train"), ("relabel/loss", "test (relabel)"),
                     ("test_exemplars/loss", "test (exemplars)")):
        x, y = series(main_run, m, "sequences")
        ax_loss.plot(x, y, label=label)
    ax_loss.axhline(math.log(2), color="k", ls="--", lw=0.8, label="ln 2")
    ax_loss.set(xlabel="sequences seen", ylabel="loss", title="Fig. 3a: the main run (8 + 8 heads)")
    ax_loss.legend(fontsize=8)
    colors = plt.get_cmap("Dark2")(np.arange(N_HEADS))
    for h in range(N_HEADS):
        x, y = series(main_run, f"induction_strength/L1H{h}", "sequences")
        ax_ih.plot(x, y, color=colors[h], label=f"L1H{h}")
    ax_ih.set(xlabel="sequences seen", ylabel="induction strength", ylim=(-0.05, 1),
              title="Fig. 3b: induction strength per layer-1 head")
    ax_ih.legend(fontsize=7, ncol=2, title="head")
    fig.tight_layout()
    fig.savefig(root / "fig3b_induction_strength.png", dpi=110)
    plt.close(fig)

    # Fig. 10: training with a clamp (left) against the unclamped run evaluated with it (right)
    fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(13, 4.5), sharex=True, sharey=True)
    curves_l = {"prev_token (trained with the L0H2 pattern)": ("prev_token", "train/loss", "C1"),
                "perfect_match (trained with the L1H3 match)": ("perfect_match", "train/loss", "C2"),
                "none (single head)": ("none", "train/loss", "0.5")}
    curves_r = {"pt_attn: none's checkpoint + L0H2 pattern": ("none", "train@pt_attn/loss", "C1"),
                "match: none's checkpoint + L1H3 match": ("none", "train@match/loss", "C2"),
                "none, as trained": ("none", "train/loss", "0.5")}
    for ax, curves in ((ax_l, curves_l), (ax_r, curves_r)):
        for label, (cond, metric, color) in curves.items():
            for i, run in enumerate(d[cond]):
                x, y = series(run, metric, "sequences")
                ax.plot(x, y, color=color, lw=1.5, alpha=0.9 if i == 0 else 0.4, label=label if i == 0 else None)
        ax.axhline(THRESHOLD, color="k", ls=":", lw=0.8)
        ax.set(xlabel="sequences seen", ylim=(0, 2))
        ax.legend(fontsize=8)
    ax_l.set(ylabel="train loss", title="Loss when trained with a clamp")
    ax_r.set(title="Progress measures: the unclamped run evaluated with the clamp")
    fig.tight_layout()
    fig.savefig(root / "fig10_progress_by_clamp.png", dpi=110)
    plt.close(fig)

    seeds = " / ".join(map(str, args.seeds))
    rows = [
        ("main run, train loss (Fig. 3a)", [first_below(r, "train/loss") for r in d["main"]]),
        ("none, train loss", [first_below(r, "train/loss") for r in d["none"]]),
        ("none evaluated with pt_attn (progress of the rest: the paper's composite subcircuit)",
         [first_below(r, "train@pt_attn/loss") for r in d["none"]]),
        ("none evaluated with match (progress of the copy subcircuit)",
         [first_below(r, "train@match/loss") for r in d["none"]]),
        ("trained with prev_token", [first_below(r, "train/loss") for r in d["prev_token"]]),
        ("trained with perfect_match", [first_below(r, "train/loss") for r in d["perfect_match"]]),
    ]
    strongest = []
    for r in d["main"]:
        last = [series(r, f"induction_strength/L1H{h}", "step")[1][-1] for h in range(N_HEADS)]
        strongest.append(f"L1H{int(np.argmax(last))} ({max(last):.2f})")
    lines = [f"First step with train loss below 0.4 ln 2 (seeds {seeds}; Fig. 10 runs {args.steps:,} steps, "
             f"main run {args.main_steps:,}; batch 32)", "",
             "| curve | first step below 0.4 ln 2 |", "|---|---|"]
    lines += [f"| {name} | {' / '.join(fmt(v) for v in vals)} |" for name, vals in rows]
    lines += ["", f"Strongest layer-1 head at the end of the main run (induction strength): {', '.join(strongest)}"]
    (root / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"figures in {root}")


if __name__ == "__main__":
    main()
