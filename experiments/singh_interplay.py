"""Singh et al. 2024, Fig. 6: how the subcircuits' learning times scale with the number of classes and labels.

The authors' ih_paper_runs.sh "Figure 6" block (aadityasingh/icl-dynamics; plotted in ih_paper_plots.ipynb):
five data settings, each trained four ways, one active layer-1 head (L1H3) throughout.

  settings   classes 50, 100, 200 with 5 labels (--class_split 50|100|200 ... --fs_relabel 5
             --fs_relabel_split 8 2), and labels 10, 15 with 50 classes (--fs_relabel 10 --fs_relabel_split 36 9,
             --fs_relabel 15 --fs_relabel_split 84 21): here task.n_train_classes, task.n_labels and
             task.n_heldout_label_sets (a fifth of the label pairs held out, as theirs), with 100 held-out
             classes (task.n_classes = classes + 100; --class_split C 1473 100 on Omniglot's 1623)
  normal  no clamp, 2e6 sequences (62,500 steps)  --opto_ablate_heads $REST_HEADS           [single_head]
  B       only the match left to learn (3e5)       perfect_prev_token_input + perfect copy  layer0_copy
  C       only the copy left to learn (3e5)        --opto_induction_heads 1:3 + ablation    [perfect_match,single_head]
  B, C    layer 0 perfect, match and copy left     perfect_prev_token_input + ablation      [layer0,single_head]

(the condition's presets are Fig. 5b's, lab.conditions.SINGH_FIG5B). Runs go to ROOT/<setting>/<condition>-s<seed>/
(a finished run is kept); trailing arguments are Hydra overrides for every run. Writes fig6.png (rows: classes,
labels; columns: the four conditions; train loss against sequences seen, as the authors' figure) and table.md
(first step with train loss below 0.4 ln 2 for every setting and condition) to ROOT.

Run:  .venv/bin/python experiments/singh_interplay.py                                   # ~25 min on 2 CPU cores
      .venv/bin/python experiments/singh_interplay.py --long-steps 20000 --seeds 0 1
"""

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lab.comparison import load, series  # noqa: E402
from lab.conditions import SINGH_FIG5B, run_conditions  # noqa: E402
from lab.measures.phase import first_crossing  # noqa: E402

THRESHOLD = 0.4 * math.log(2)
HELDOUT_CLASSES = 100
# (classes, labels) -> held-out label pairs: the authors' fs_relabel_split (8 2, 36 9, 84 21: a fifth held out)
SETTINGS = {(50, 5): 2, (100, 5): 2, (200, 5): 2, (50, 10): 9, (50, 15): 21}
CONDITIONS = {  # name in the paper's figure -> (lab condition, its presets, long run?)
    "Normal training": ("normal", SINGH_FIG5B["none"], True),
    "Subcircuit B evolution": ("B", SINGH_FIG5B["layer0_copy"], False),
    "Subcircuit C evolution": ("C", SINGH_FIG5B["perfect_match"], False),
    "Subcircuits B, C evolution": ("BC", SINGH_FIG5B["layer0"], False),
}


def setting_name(classes: int, labels: int) -> str:
    return f"c{classes}_l{labels}"


def setting_overrides(classes: int, labels: int) -> list[str]:
    return [f"task.n_train_classes={classes}", f"task.n_classes={classes + HELDOUT_CLASSES}",
            f"task.n_labels={labels}", f"task.n_heldout_label_sets={SETTINGS[(classes, labels)]}"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--long-steps", type=int, default=62500, help="normal training (default 2e6 sequences)")
    ap.add_argument("--clamp-steps", type=int, default=9375, help="clamped runs (default 3e5 sequences)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--root", default="runs/singh_interplay")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. trainer.progress=false")
    args = ap.parse_args()
    root = Path(args.root)
    common = ["experiment=singh_fewshot", "checkpoint.every=0", "checkpoint.log_points=4",
              "trainer.eval_log_points=40"]
    runs: dict[tuple, list[Path]] = {}
    for classes, labels in SETTINGS:
        for cond, presets, long in CONDITIONS.values():
            steps = args.long_steps if long else args.clamp_steps
            base = [*common, f"trainer.steps={steps}", f"trainer.eval_every={500 if long else 250}",
                    *setting_overrides(classes, labels), *args.overrides]
            out = run_conditions(base, {cond: presets}, args.seeds, root / setting_name(classes, labels), batched=True)
            runs[(classes, labels, cond)] = out[cond]

    # the authors' Figure 6: top row the number of classes, bottom row the number of labels
    colors = plt.get_cmap("cool")([1.0, 0.5, 0.1])
    fig, axs = plt.subplots(2, len(CONDITIONS), figsize=(5 * len(CONDITIONS), 8), sharey=True)
    for j, (title, (cond, _, _)) in enumerate(CONDITIONS.items()):
        axs[0, j].set_title(title)
        for row, key in ((0, [(c, 5) for c in (50, 100, 200)]), (1, [(50, n) for n in (5, 10, 15)])):
            for k, (classes, labels) in enumerate(key):
                for i, run_dir in enumerate(runs[(classes, labels, cond)]):
                    x, y = series(load(run_dir), "train/loss", "sequences")
                    label = (f"{classes} classes" if row == 0 else f"{labels} labels") if i == 0 else None
                    axs[row, j].plot(x, y, color=colors[k], lw=2, alpha=1.0 if i == 0 else 0.4, label=label)
            axs[row, j].axhline(THRESHOLD, color="k", ls=":", lw=0.8)
            axs[row, j].set(xlabel="sequences seen", ylim=(0, 1.5))
    axs[0, 0].set_ylabel("train loss")
    axs[1, 0].set_ylabel("train loss")
    axs[0, -1].legend(title="# classes (5 labels)")
    axs[1, -1].legend(title="# labels (50 classes)")
    fig.tight_layout()
    fig.savefig(root / "fig6.png", dpi=100)
    plt.close(fig)

    def cell(classes, labels, cond):
        vals = []
        for run_dir in runs[(classes, labels, cond)]:
            x, y = series(load(run_dir), "train/loss", "step")
            v = first_crossing(x, y, THRESHOLD)
            vals.append("never" if v is None else f"{v:,.0f}")
        return " / ".join(vals)

    header = [f"First step with train loss below 0.4 ln 2 (seeds {' / '.join(map(str, args.seeds))}; normal "
              f"training {args.long_steps:,} steps, clamped runs {args.clamp_steps:,}; batch 32)", "",
              "| classes | labels | " + " | ".join(CONDITIONS) + " |", "|---|---|" + "---|" * len(CONDITIONS)]
    body = [f"| {c} | {n} | " + " | ".join(cell(c, n, cond) for cond, _, _ in CONDITIONS.values()) + " |"
            for c, n in SETTINGS]
    text = "\n".join(header + body) + "\n"
    (root / "table.md").write_text(text)
    print(text)
    print(f"fig6.png and table.md in {root}")


if __name__ == "__main__":
    main()
