"""Edelman et al.'s in-context Markov chains, the lab and the authors' code side by side on the same test sequences.

Given a checkout (working tree) of EzraEdelman/Evolution-of-Statistical-Induction-Heads and a Python with torch and
numpy, this trains their default model (training_pipeline.py's ``train`` with ``get_default_config()``: the 2-layer
attention-only Relative_Transformer, 1 head, embedding 16, k = 2 states, T = 100, batch 64, AdamW lr 5e-4, their
Trainer's defaults) for --steps steps per seed with their code, and `lab train experiment=edelman_markov` over the
same seeds as one batch. Both are scored on the same sequences: the lab's `test` batch (its fixed evaluation set),
written to a file their side reads. For each seed and code it prints the loss on those sequences at the end, the
phase detector's transitions of that loss (the uniform -> unigram fall, then the unigram -> bigram one), and layer
0's previous-token score (mean attention from each position to the one before) at the end. Their model is scored in
eval mode (no dropout); their 200 snapshots give the curve, the lab's evaluation rows give its own (--every).
``--authors-dropout 0`` trains theirs without dropout, as the lab's model is (the lab's runs, once in --out, are
reused).

Run:  .venv/bin/python bench/edelman_side_by_side.py --ed PATH/Evolution-of-Statistical-Induction-Heads \\
          --python PATH/venv/bin/python --seeds 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LAB = str(Path(sys.executable).parent / "lab")

# runs under the authors' Python, in their checkout: their train(), then their snapshots scored on our sequences
AUTHORS = r'''
import json, math, sys
import numpy as np, torch
import torch.nn.functional as F
sys.path.insert(0, ".")
import training_pipeline as tp

seed, steps, data, out, dropout = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
cfg = tp.get_default_config()
cfg.seed, cfg.max_iters, cfg.num_workers = seed, steps, 0
if dropout != "default":  # their three dropout rates (0.1 each by default)
    cfg.embd_pdrop = cfg.resid_pdrop = cfg.attn_pdrop = float(dropout)
history, _ = tp.train(cfg)
d = np.load(data)
x, y = torch.tensor(d["tokens"], dtype=torch.long), torch.tensor(d["targets"], dtype=torch.long)


@torch.no_grad()
def score(model):
    model.eval()
    logits, loss = model(x, y)
    a = model.layers[0]  # layer 0's pattern, as its forward computes it
    B, T = x.shape
    h = a.ln(model.wte(x))
    C = h.shape[-1]
    q, k = (m(h).view(B, T, a.n_head, C // a.n_head).transpose(1, 2) for m in (a.Q, a.K))
    rel = a.wpe(a.pos[:T, :T]).view(T, T, a.n_head, C // a.n_head)
    s = (q @ k.transpose(-2, -1) + torch.einsum("Tthe,BhTe->BhTt", rel, q)) / math.sqrt(k.size(-1))
    p = F.softmax(s.masked_fill(a.bias[:, :, :T, :T] == 0, float("-inf")), dim=-1)
    prev = torch.diagonal(p, offset=-1, dim1=-2, dim2=-1).mean().item()
    return float(loss), prev


every = max(steps // 200, 1)  # their callback keeps a snapshot every max_iters // 200 updates (after the update)
with open(out, "w") as f:
    for i, m in enumerate(history):
        loss, prev = score(m)
        f.write(json.dumps({"step": 0 if i == 0 else (i - 1) * every + 1, "loss": loss, "prev0": prev}) + "\n")
'''


def lab_side(seeds: list[int], steps: int, every: int, out: Path) -> None:
    cmd = [LAB, "train", "experiment=edelman_markov", f"trainer.seeds=[{','.join(map(str, seeds))}]",
           f"trainer.steps={steps}", f"trainer.eval_every={every}", f"run.dir={out}", "tracking.wandb.mode=disabled",
           "--quiet"]
    subprocess.run(cmd, cwd=ROOT, check=True)


def lab_scores(run_dir: Path) -> tuple[list[dict], float]:
    import lab
    from lab.measures.attention import previous_token_score
    from lab.tracking import read_metrics

    run = lab.load(run_dir)
    rows = [{"step": r["step"], "loss": r["test/loss"]} for r in read_metrics(run_dir / "metrics.jsonl")
            if "test/loss" in r]
    _, cache = run.cache(names=["blocks.0.attn.hook_pattern"], batch=run.batch("test"))
    return rows, float(previous_token_score(cache["blocks.0.attn.hook_pattern"])[0])


def transitions(rows: list[dict]) -> list[dict]:
    from lab.measures.phase import detect_transitions

    rows = [r for r in rows if r["step"] > 0]
    return detect_transitions([r["step"] for r in rows], [r["loss"] for r in rows])


def describe(rows: list[dict], prev: float) -> str:
    ts = transitions(rows)
    falls = ", ".join(f"{t['before']:.3f} -> {t['after']:.3f} at {t['mid']:.0f}" for t in ts) or "none"
    return f"final loss {rows[-1]['loss']:.4f}, previous-token (L0) {prev:.2f}, transitions: {falls}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ed", type=Path, required=True, help="a checkout of Evolution-of-Statistical-Induction-Heads")
    ap.add_argument("--python", required=True, help="a Python with torch and numpy")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=20, help="the lab's evaluation interval")
    ap.add_argument("--out", type=Path, default=None, help="keep runs and curves here (default: a temporary folder)")
    ap.add_argument("--authors-dropout", default="default", help="their dropout rates (default: theirs, 0.1; the "
                    "lab has none)")
    a = ap.parse_args(argv)
    out = a.out or Path(tempfile.mkdtemp(prefix="edelman-side-"))
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(a.seeds))
    if not (out / "lab").exists():
        lab_side(seeds, a.steps, a.every, out / "lab")
    import lab

    batch = lab.load(next((out / "lab").glob("*-s0"))).batch("test")
    np.savez(out / "test.npz", tokens=np.asarray(batch["tokens"]), targets=np.asarray(batch["targets"]))
    result = {}
    tag = "" if a.authors_dropout == "default" else f"-dropout{a.authors_dropout}"
    for s in seeds:
        curve = out / f"authors{tag}-s{s}.jsonl"
        if not curve.exists():
            subprocess.run([a.python, "-c", AUTHORS, str(s), str(a.steps), str(out / "test.npz"), str(curve),
                            a.authors_dropout],
                           cwd=a.ed, check=True, capture_output=True)
        theirs = [json.loads(line) for line in open(curve)]
        ours, prev = lab_scores(next((out / "lab").glob(f"*-s{s}")))
        result[s] = {"lab": describe(ours, prev), "authors": describe(theirs, theirs[-1]["prev0"])}
        print(f"seed {s}\n  lab:     {result[s]['lab']}\n  authors: {result[s]['authors']}", flush=True)
    (out / f"side_by_side{tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"written: {out / f'side_by_side{tag}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
