"""Bietti's birth of an induction head, the lab and the authors' transformer-birth side by side on the same data.

Given a checkout (working tree) of albietz/transformer-birth, with its data/meta.pkl (tiny Shakespeare's character
counts), and a Python with torch, numpy and omegaconf, this trains the simplified model of their README command

    ihead_basic_main.py loss_head_only=True data_args.k=5 data_args.fixed_special_toks=True optim_args.use_sgd=True
      optim_args.learning_rate=0.03 optim_args.weight_decay=1e-4 optim_args.batch_size=512 model_args.final_ffn=False
      model_args.freeze_embeddings=True model_args.freeze_output=True model_args.dim=256

with their code (on the CPU through bench/bietti_cpu_runner.py; with --fast-data their per-token Python sampler is
replaced by a vectorised one drawing the same distribution) and `lab train experiment=bietti_bigram
task.stats_path=CHECKOUT/data/meta.pkl` (the same unigram / bigram laws), for --steps steps each, and prints,
for both: the in-context accuracy on the output tokens from their second occurrence (theirs: `acc_end_test`
on 512 fixed sequences; the lab's `test/icl_acc` on 512) and the memory-recall probes wo1, wk1, wk0 (theirs:
`test_wo1`, `test_wk1`, `test_wk0`; the lab's `memory_recall/*`), the first step each reaches 0.5 and 0.9,
and the order in which the memories form. Writes bietti_side_by_side.png and .md to --out.

Their step i is logged after i + 1 updates; the table counts updates for both.

``--model full`` does the same for their full Transformer (ihead_full_main.py, every argument its default but the
README's data arguments data_args.k=5 data_args.fixed_special_toks=True; seeded with --torch-seed, as the script
has no seed argument) against `lab train experiment=bietti_full`: the accuracy is then their ``acc_end_test`` on
every output token, first occurrences included (the lab's ``test/outputs_acc``), and the feed-forward probe ff1
(their ``test_ff1``, the lab's ``memory_recall/ff1_kl``: a KL, lower is better) is compared too.

Run:  .venv/bin/python bench/bietti_side_by_side.py --tb PATH/transformer-birth --python PATH/venv/bin/python
      .venv/bin/python bench/bietti_side_by_side.py --tb ... --python ... --steps 300 --every 10
      .venv/bin/python bench/bietti_side_by_side.py --tb ... --python ... --reuse   # compare what --out holds

``--reuse`` trains nothing: it reads --out/authors/res.jsonl and --out/lab/metrics.jsonl as far as each got (an
interrupted run included; the lab's run can be `lab train ... run.dir=OUT/lab`) and compares their common prefix.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

README_FLAGS = ["loss_head_only=True", "data_args.k=5", "data_args.fixed_special_toks=True",
                "optim_args.use_sgd=True", "optim_args.learning_rate=0.03", "optim_args.weight_decay=1e-4",
                "optim_args.batch_size=512", "model_args.final_ffn=False", "model_args.freeze_embeddings=True",
                "model_args.freeze_output=True", "model_args.dim=256"]
FULL_FLAGS = ["data_args.k=5", "data_args.fixed_special_toks=True"]
MEMORIES = ("wo1_acc", "wk1_acc", "wk0_acc")
# per model: their script and flags, the lab's experiment, their res.jsonl field -> the lab's metric, batch size
MODELS = {
    "basic": {"script": "ihead_basic_main.py", "flags": README_FLAGS, "experiment": "bietti_bigram", "batch": 512,
              "pairs": {"acc_end_test": "test/icl_acc", "wo1_acc": "memory_recall/wo1",
                        "wk1_acc": "memory_recall/wk1", "wk0_acc": "memory_recall/wk0"}},
    "full": {"script": "ihead_full_main.py", "flags": FULL_FLAGS, "experiment": "bietti_full", "batch": 64,
             "pairs": {"acc_end_test": "test/outputs_acc", "wo1_acc": "memory_recall/wo1",
                       "wk1_acc": "memory_recall/wk1", "wk0_acc": "memory_recall/wk0",
                       "ff1_loss": "memory_recall/ff1_kl"}},
}
NAMES = {"acc_end_test": "in-context accuracy", "wo1_acc": "wo1", "wk1_acc": "wk1", "wk0_acc": "wk0",
         "ff1_loss": "ff1 (KL, right axis)"}


def run_authors(tb: Path, python: str, steps: int, every: int, seed: int, out: Path, fast: bool,
                model: str = "basic") -> dict[int, dict]:
    runner = Path(__file__).resolve().parent / "bietti_cpu_runner.py"
    m = MODELS[model]
    seeding = [f"seed={seed}"] if model == "basic" else []  # the full script has none: --torch-seed
    cmd = [python, str(runner), *(["--fast-data"] if fast else []), "--torch-seed", str(seed), m["script"],
           f"max_iters={steps}", f"eval_delta={every}", "log_probes=True", *m["flags"], "num_data_workers=1",
           *seeding, "save_dir=authors", f"root_dir={out}"]
    (out / "authors").mkdir(parents=True, exist_ok=True)
    with open(out / "authors" / "log.txt", "w") as log:  # their logging: the full script's acc_end_test is there only
        p = subprocess.run(cmd, cwd=tb, stdout=log, stderr=subprocess.STDOUT, text=True)
    res = out / "authors" / "res.jsonl"
    if not res.is_file():
        tail = ((out / "authors" / "log.txt").read_text().strip().splitlines() or ["?"])[-1]
        raise SystemExit(f"transformer-birth failed (exit {p.returncode}): {tail}")
    return read_authors(out, model)


# their evaluation line: "{i} (dt_data, dt, elapsed): loss (bigram / head), acc_tot (start / end / end_test, outs)"
LOG_LINE = re.compile(r"INFO:root:(\d+) \([^)]*\): \S+ \([^)]*\), \S+ \(\S+ / \S+ / (\S+), ")


def read_authors(out: Path, model: str = "basic") -> dict[int, dict]:
    """Their res.jsonl, by update count. ihead_full_main.py leaves acc_end_test out of res.jsonl and logs it only:
    it is read from their log (log.txt) then."""
    pairs = MODELS[model]["pairs"]
    rows = [json.loads(line) for line in (out / "authors" / "res.jsonl").read_text().splitlines() if line.strip()]
    logged = {}
    if (out / "authors" / "log.txt").is_file():
        logged = {int(m[1]): float(m[2]) for m in LOG_LINE.finditer((out / "authors" / "log.txt").read_text())}
    return {r["iter"] + 1: {k: r.get(k, logged.get(r["iter"]) if k == "acc_end_test" else None) for k in pairs}
            for r in rows if "iter" in r}


def read_lab(out: Path, model: str = "basic") -> dict[int, dict]:
    from lab.tracking import read_metrics

    pairs = MODELS[model]["pairs"]
    rows = read_metrics(out / "lab" / "metrics.jsonl")
    return {int(r["step"]): {k: r.get(m) for k, m in pairs.items()} for r in rows if pairs["acc_end_test"] in r}


def run_lab(tb: Path, steps: int, every: int, seed: int, out: Path, model: str = "basic") -> dict[int, dict]:
    from lab.comparison import load, series
    from lab.conditions import run_conditions

    pairs = MODELS[model]["pairs"]
    base = [f"experiment={MODELS[model]['experiment']}", f"task.stats_path={tb / 'data' / 'meta.pkl'}",
            f"trainer.steps={steps}",
            f"trainer.eval_every={every}", "trainer.eval_log_points=0", "checkpoint.every=0",
            "checkpoint.log_points=0", "tracking.wandb.mode=disabled", "trainer.progress=false"]
    dirs = run_conditions(base, {"lab": []}, [seed], out, quiet=True)
    d = load(dirs["lab"][0])
    cols = {k: dict(zip(*series(d, m, "step"), strict=True)) for k, m in pairs.items()}
    return {int(s): {k: cols[k].get(s) for k in pairs} for s in cols["acc_end_test"]}


def first_at(curve: dict[int, dict], k: str, level: float):
    hit = [s for s in sorted(curve) if curve[s][k] is not None and curve[s][k] >= level]
    return hit[0] if hit else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tb", required=True, type=Path, help="a working tree of albietz/transformer-birth")
    ap.add_argument("--python", required=True, help="a Python with torch, numpy, omegaconf")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--their-sampler", action="store_true", help="keep their per-token sampler (slow)")
    ap.add_argument("--reuse", action="store_true", help="train nothing: compare the runs --out already holds")
    ap.add_argument("--model", choices=tuple(MODELS), default="basic",
                    help="basic: the README's simplified model; full: ihead_full_main.py vs experiment=bietti_full")
    ap.add_argument("--out", type=Path, default=None, help="default runs/bietti_side_by_side[_full]")
    args = ap.parse_args()
    if args.out is None:
        args.out = Path("runs/bietti_side_by_side" + ("" if args.model == "basic" else f"_{args.model}"))
    spec = MODELS[args.model]
    pairs = spec["pairs"]
    names = NAMES if args.model == "basic" else {**NAMES, "acc_end_test": "output-token accuracy"}
    if not (args.tb / "ihead_basic_main.py").is_file() or not (args.tb / "data" / "meta.pkl").is_file():
        ap.error(f"--tb={args.tb}: not a transformer-birth working tree (ihead_basic_main.py, data/meta.pkl)")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.reuse:
        theirs, ours = read_authors(args.out, args.model), read_lab(args.out, args.model)
        common = min(max(theirs), max(ours))
        theirs = {s: v for s, v in theirs.items() if s <= common}
        ours = {s: v for s, v in ours.items() if s <= common}
        args.steps, t_theirs, t_ours = common, float("nan"), float("nan")
    else:
        t0 = time.time()
        theirs = run_authors(args.tb.absolute(), args.python, args.steps, args.every, args.seed, args.out.absolute(),
                             fast=not args.their_sampler, model=args.model)
        t_theirs = time.time() - t0
        ours = run_lab(args.tb.absolute(), args.steps, args.every, args.seed, args.out, args.model)
        t_ours = time.time() - t0 - t_theirs
        print(f"authors' code {t_theirs:.0f} s, lab {t_ours:.0f} s ({args.steps} steps each)", file=sys.stderr)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    for ax, (who, curve) in zip(axs, (("lab", ours), ("authors' code", theirs)), strict=True):
        handles = []
        for k, color in zip(pairs, ("k", "C0", "C1", "C2", "C3"), strict=False):
            s = [i for i in sorted(curve) if curve[i][k] is not None and curve[i][k] >= 0]
            on = ax.twinx() if k == "ff1_loss" else ax
            handles += on.plot(s, [curve[i][k] for i in s], color=color, lw=2 if k == "acc_end_test" else 1.5,
                               ls="--" if k == "ff1_loss" else "-", label=names[k])
            if k == "ff1_loss":
                on.set(yscale="log", ylabel="ff1: KL(bigram || layer-1 MLP alone)")
        acc = "in-context" if args.model == "basic" else "output-token"
        ax.set(xlabel=f"step (batch {spec['batch']})", title=f"{who}: {acc} accuracy and memory recall",
               ylim=(-0.02, 1.02))
        ax.legend(handles=handles, fontsize=8, loc="center right")
    axs[0].set_ylabel("accuracy / recall")
    fig.tight_layout()
    fig.savefig(args.out / "bietti_side_by_side.png", dpi=110)
    plt.close(fig)

    fmt = lambda v: "never" if v is None else f"{v:,}"  # noqa: E731
    last = lambda c, k: c[max(c)][k]  # noqa: E731
    took = ("" if args.reuse else f"; authors' code {t_theirs:.0f} s, lab {t_ours:.0f} s on this machine")
    setting = "the README setting" if args.model == "basic" else "the full model, README data arguments"
    lines = [f"{args.steps:,} steps of batch {spec['batch']} x 256, {setting}, tiny Shakespeare's laws; seed "
             f"{args.seed} each{took}", "",
             "| measure | lab: first step >= 0.5 | authors | lab: >= 0.9 | authors | lab: final | authors: final |",
             "|---|---|---|---|---|---|---|"]
    for k in pairs:
        if k == "ff1_loss":
            lo = lambda c: min(v["ff1_loss"] for v in c.values() if v["ff1_loss"] is not None)  # noqa: E731
            lines.append(f"| ff1 (KL, lower is better): lowest | {lo(ours):.3f} | {lo(theirs):.3f} | | | "
                         f"{last(ours, k):.3f} | {last(theirs, k):.3f} |")
            continue
        lines.append(f"| {names[k]} | {fmt(first_at(ours, k, 0.5))} | {fmt(first_at(theirs, k, 0.5))} | "
                     f"{fmt(first_at(ours, k, 0.9))} | {fmt(first_at(theirs, k, 0.9))} | {last(ours, k):.3f} | "
                     f"{last(theirs, k):.3f} |")
    for who, curve in (("lab", ours), ("authors", theirs)):
        reached = sorted((first_at(curve, k, 0.5), names[k]) for k in MEMORIES if first_at(curve, k, 0.5) is not None)
        never = [names[k] for k in MEMORIES if first_at(curve, k, 0.5) is None]
        order = " < ".join(f"{name} ({step:,})" for step, name in reached) or "none"
        lines.append(f"\nMemories reaching 0.5 ({who}), in order: {order}" + (f"; not: {', '.join(never)}" if never
                                                                               else ""))
    text = "\n".join(lines) + "\n"
    (args.out / "bietti_side_by_side.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
