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


def read(experiment: str, out: Path, wall: float) -> dict:
    """The table's row from a batch directory's runs (each run's own summary.json)."""
    runs = []
    for path in sorted(out.glob("*/summary.json")):
        s = json.loads(path.read_text())
        found = s.get("phase", {}).get("transitions") or []
        t = found[-1] if found else None  # the last: the circuit's phase change follows the plateau (Edelman's
        # unigram phase, the text task's first fall of the ICL score come first, and may be larger)
        circuit = s.get("circuit")
        runs.append({"seed": s["seed"], "steps": s["steps"], "metric": s.get("phase", {}).get("metric"),
                     "transition_mid": None if t is None else t["mid"],
                     "circuit": None if circuit is None else bool(circuit.get("is_induction_circuit")),
                     "line": None if circuit is None else circuit.get("line")})
    with_circuit = [r for r in runs if r["circuit"]]
    # the phase change of the runs that made the circuit (a run stuck on the plateau still shows its first
    # steps' fall to the plateau as a transition); every run's where the task has no circuit summary
    counted = with_circuit if any(r["circuit"] is not None for r in runs) else runs
    mids = [r["transition_mid"] for r in counted if r["transition_mid"] is not None]
    return {"experiment": experiment, "seeds": len(runs), "steps": runs[0]["steps"] if runs else None,
            "has_circuit_summary": any(r["circuit"] is not None for r in runs),
            "circuits": len(with_circuit), "median_of": len(mids),  # seeds whose transition the median takes
            "median_transition": statistics.median(mids) if mids else None, "seconds": wall, "runs": runs}


def key(name: str, overrides: list[str], first_seed: int, seeds: int) -> str:
    """The entry's name in the table's file: the experiment, its overrides, and the seeds when they do not start at
    0, so that a variant or other seeds never overwrite the default's entry."""
    seeds_part = [f"seeds {first_seed}-{first_seed + seeds - 1}"] if first_seed else []
    return " ".join([name, *overrides, *seeds_part])


def row(r: dict) -> str:
    if "error" in r:
        return f"| {r['experiment']} | error: {r['error']} | | | {r['seconds']:.0f} s |"
    circ = f"{r['circuits']} of {r['seeds']}" if r["has_circuit_summary"] else "no summary"
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
    print("| experiment | seeds with an induction circuit | median transition step (those seeds) | time (2 cores) |")
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
