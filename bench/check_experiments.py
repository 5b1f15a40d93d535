"""Does every experiment's default keep its promise for most seeds? (`make check-experiments`)

Runs each experiment in ``configs/experiment/`` with its defaults over seeds 0..n-1 (--first-seed: k..k+n-1) as one
batch (one ``lab train experiment=X trainer.seeds=[...]`` process: the seeds train as one vmapped program) and reads
each run's own summary.json: whether its circuit summary calls it an induction circuit (where the task has one), the
phase detector's last transition of the watched metric (the circuit's phase change follows the plateau; the
median over the seeds with the circuit, where the task has a summary), and the time of the whole batch.
Prints the table and writes it to ``bench/experiments.json``. Not a test: a whole default run per experiment takes
from a minute (the demo) to an hour (the real-text model, several seeds) on 2 cores.

    python bench/check_experiments.py                              # every experiment, 5 seeds
    python bench/check_experiments.py --experiments demo --seeds 20
    python bench/check_experiments.py --experiments bietti_full --one-by-one   # a process per seed
    python bench/check_experiments.py --experiments olsson_text --one-by-one --first-seed 1 --seeds 4   # seeds 1-4
    python bench/check_experiments.py --experiments edelman_markov -- model.positions=rope   # overrides for each
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAB = str(Path(sys.executable).parent / "lab")


def experiments() -> list[str]:
    return sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml") if p.stem != "none")


def check(experiment: str, seeds: int, overrides: list[str], root: Path, one_by_one: bool = False,
          first_seed: int = 0) -> dict:
    out = root / experiment
    numbers = range(first_seed, first_seed + seeds)
    common = ["tracking.wandb.mode=disabled", *overrides]
    if one_by_one:  # a process per seed, one after another
        cmds = [[LAB, "train", f"experiment={experiment}", f"seed={s}", f"run.dir={out / f's{s}'}", *common]
                for s in numbers]
    else:
        cmds = [[LAB, "train", f"experiment={experiment}", f"trainer.seeds=[{','.join(map(str, numbers))}]",
                 f"run.dir={out}", *common]]
    t0 = time.perf_counter()
    for cmd in cmds:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
            return {"experiment": experiment, "error": tail[0], "seconds": time.perf_counter() - t0}
    return read(experiment, out, time.perf_counter() - t0)


# What an experiment without a circuit summary (a classification task) promises, read from its run's summary.json:
# (the promise in words, whether a run's summary keeps it). Each is its config header's claim.
PROMISES = {
    # Singh's phase change: the train loss leaves the ln 2 plateau (their criterion: below 0.4 ln 2)
    "singh_fewshot": ("train loss below 0.4 ln 2", lambda s: s.get("phase", {}).get("first_below") is not None),
    # Reddy: in-context accuracy jumps to ~1 as the two heads' patterns form: the label attends to its own item in
    # layer 0 (ILA) and the query to the label of its matching item in layer 1 (TILA); on the plateau their masses
    # are ~0.17 and ~0.06 (docs/experiments/reddy.md), so each at least 0.5 says the pattern carries the answer
    "reddy_bursty": ("in-context accuracy >= 0.9 with ILA (L0H0) and TILA (L1H0) >= 0.5",
                     lambda s: min(s["final"].get(k, 0.0) for k in ("ila/L0H0", "tila/L1H0")) >= 0.5
                     and s["final"].get("ic/acc", 0.0) >= 0.9),
}


def read(experiment: str, out: Path, wall: float) -> dict:
    """The table's row from a batch directory's runs (each run's own summary.json)."""
    runs = []
    for path in sorted(out.glob("*/summary.json")):
        s = json.loads(path.read_text())
        found = s.get("phase", {}).get("transitions") or []
        t = found[-1] if found else None  # the last: the circuit's phase change follows the plateau (Edelman's
        # unigram phase, the text task's first fall of the ICL score come first, and may be larger)
        circuit = s.get("circuit")
        promise = PROMISES.get(experiment) if circuit is None else None
        runs.append({"seed": s["seed"], "steps": s["steps"], "metric": s.get("phase", {}).get("metric"),
                     "transition_mid": None if t is None else t["mid"],
                     "circuit": None if circuit is None else bool(circuit.get("is_induction_circuit")),
                     "line": None if circuit is None else circuit.get("line"),
                     "kept": None if promise is None else bool(promise[1](s))})
    has_summary = any(r["circuit"] is not None for r in runs)
    # the seeds that kept the promise: an induction circuit by the run's own summary, else the task's PROMISES entry
    kept = [r for r in runs if (r["circuit"] if has_summary else r["kept"])]
    # the phase change of the seeds that kept it (a run stuck on the plateau still shows its first steps' fall to
    # the plateau as a transition); every seed's where the experiment states no promise
    counted = kept if has_summary or experiment in PROMISES else runs
    mids = [r["transition_mid"] for r in counted if r["transition_mid"] is not None]
    return {"experiment": experiment, "seeds": len(runs), "steps": runs[0]["steps"] if runs else None,
            "has_circuit_summary": has_summary,
            "promise": "an induction circuit" if has_summary else PROMISES.get(experiment, (None,))[0],
            "circuits": sum(bool(r["circuit"]) for r in runs),
            "kept": len(kept), "median_of": len(mids),  # seeds whose transition the median takes
            "median_transition": statistics.median(mids) if mids else None, "seconds": wall, "runs": runs}


def key(name: str, overrides: list[str], first_seed: int, seeds: int) -> str:
    """The entry's name in the table's file: the experiment, its overrides, and the seeds when they do not start at
    0, so that a variant or other seeds never overwrite the default's entry."""
    seeds_part = [f"seeds {first_seed}-{first_seed + seeds - 1}"] if first_seed else []
    return " ".join([name, *overrides, *seeds_part])


def row(r: dict) -> str:
    if "error" in r:
        return f"| {r['experiment']} | error: {r['error']} | | | {r['seconds']:.0f} s |"
    if not r["seeds"]:
        return f"| {r['experiment']} | no runs | | {r['seconds']:.0f} s |"
    circ = (f"{r['kept']} of {r['seeds']}" + ("" if r["has_circuit_summary"] else f" ({r['promise']})")
            if r.get("promise") else "no summary")
    mid = "-" if r["median_transition"] is None else f"{r['median_transition']:,.0f}"
    return f"| {r['experiment']} | {circ} | {mid} of {r['steps']:,} | {r['seconds']:.0f} s |"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiments", nargs="*", default=None, help="default: every configs/experiment/*.yaml")
    ap.add_argument("--seeds", type=int, default=5, help="how many seeds")
    ap.add_argument("--first-seed", type=int, default=0, help="seeds FIRST..FIRST+SEEDS-1 (default 0)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "experiments.json")
    ap.add_argument("--keep", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--one-by-one", action="store_true",
                    help="train the seeds one after another, a process each, not as one batch (bietti_full: on 2 cores "
                         "five seeds as one batch took some 7 s a step over their first 60 steps, one seed alone "
                         "0.6-0.8 s)")
    ap.add_argument("overrides", nargs="*", help="after --: overrides for every experiment")
    a = ap.parse_args(argv)
    names = a.experiments or experiments()
    unknown = sorted(set(names) - set(experiments()))
    if unknown:
        print(f"error: --experiments: {unknown[0]} is not in configs/experiment (one of {', '.join(experiments())})",
              file=sys.stderr)
        return 2
    root = a.keep or Path(tempfile.mkdtemp(prefix="check-experiments-"))
    results = {}
    print("| experiment | seeds keeping the promise (an induction circuit) | median transition step (those seeds) "
          "| time (2 cores) |")
    print("|---|---|---|---|")
    for name in names:
        r = check(name, a.seeds, a.overrides, root, a.one_by_one, a.first_seed)
        r.update(overrides=a.overrides, first_seed=a.first_seed)
        results[key(name, a.overrides, a.first_seed, a.seeds)] = r
        print(row(r), flush=True)
    old = json.loads(a.out.read_text()) if a.out.exists() else {}
    a.out.write_text(json.dumps({**old, **results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
