"""Singh et al. 2024, Fig. 5b, as the authors ran it: which clamps remove the plateau?

Trains singh_fewshot under the six conditions of ih_paper_runs.sh (aadityasingh/icl-dynamics), each with
the authors' flags written next to it, their head choices (active layer-1 head L1H3, previous-token head
L0H2) and, where they use it, one active layer-1 head (the others' values ablated):

  none           --opto_ablate_heads $REST_HEADS                                    clamp=single_head
  prev_token     --opto_prev_token_heads 0:2 --opto_ablate_heads $REST_HEADS        clamp=[prev_token,single_head]
  layer0         --opto_specific_fn perfect_prev_token_input --opto_ablate_heads .. clamp=[layer0,single_head]
  perfect_match  --opto_induction_heads 1:3 --opto_ablate_heads $REST_HEADS         clamp=[perfect_match,single_head]
  perfect_copy   --opto_perfect_copy_from_head_pattern 1:3                          clamp=perfect_copy
  layer0_copy    --opto_specific_fn perfect_prev_token_input
                 --opto_perfect_copy_from_head_pattern 1:3                          clamp=layer0_copy

(REST_HEADS = 1:0 1:1 1:2 1:4 1:5 1:6 1:7; each preset's header in configs/clamp/ says which function of
opto.py it follows.) Runs go to ROOT/<condition>-s<seed>/; trailing arguments are Hydra overrides passed to
every run (e.g. task.features_path=FILE.h5 for a feature file in the authors' layout); each condition's seeds
train as one vmapped program (lab.batch), each run written as if alone. The study reads the train loss, so only
the train set is evaluated (the trailing override trainer.eval_sets=null evaluates all four). Writes train_loss.png,
table.md (first step with train loss below 0.4 ln 2, Singh's phase-change time) and report.html to ROOT.

Run:  .venv/bin/python experiments/singh_clamps.py                          # 6e5 sequences (18,750 steps)
      .venv/bin/python experiments/singh_clamps.py --steps 5000 --seeds 0 1 -- task.features_path=feats.h5
"""

import argparse
import math
from pathlib import Path

from lab.comparison import compare
from lab.conditions import SINGH_FIG5B, run_conditions

CONDITIONS = SINGH_FIG5B  # the presets of each condition (lab/conditions.py)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=18750, help="training steps (batch 32; default 6e5 sequences)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--root", default="runs/singh_clamps")
    ap.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=list(CONDITIONS))
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. task.features_path=FILE")
    args = ap.parse_args()
    # the study reads train/loss alone: only the train set is evaluated (trainer.eval_sets=null evaluates all four)
    base = ["experiment=singh_fewshot", f"trainer.steps={args.steps}", "trainer.eval_every=250",
            "trainer.eval_log_points=40", "trainer.eval_sets=[train]", "checkpoint.every=0",
            "checkpoint.log_points=6", *args.overrides]
    # each condition's seeds as one vmapped program
    run_conditions(base, {c: CONDITIONS[c] for c in args.conditions}, args.seeds, args.root, batched=True)
    out = compare([args.root], metrics=["train/loss"], baseline=str(Path(args.root) / f"none-s{args.seeds[0]}"),
                  out=args.root, threshold=0.4 * math.log(2))
    print((out / "table.md").read_text())
    print(f"figures and report.html in {out}")


if __name__ == "__main__":
    main()
