"""The ``lab`` command.

    lab train [OVERRIDES...]        train one run, e.g. `lab train experiment=reddy_bursty seed=3`;
                                    `trainer.num_seeds=8 conditions=[none,prev_token]`: 16 runs as one program
    lab resume RUN_DIR              continue an interrupted run from its last complete checkpoint
    lab fork RUN_DIR --step N [OVERRIDES...]   a new run from that checkpoint with changed settings
    lab replay RUN_DIR [--steps ...] [--measures ...] [OVERRIDES...]   measures over saved checkpoints
    lab compare RUN_DIR... [--metric ...] [--baseline RUN_DIR] [--out DIR] [--wandb [online]]   curves, table, report
    lab show RUN_DIR                a one-screen summary of a run
    lab config [OVERRIDES...]       print the composed, validated config without training

Errors in what the user typed or pointed at print one line and exit with code 2 (no traceback
unless --debug is given).
"""

from __future__ import annotations

import argparse
import os
import sys

from lab import runlog
from lab.errors import LabError

# Each subcommand imports what it needs inside its function, on purpose: `lab --help`, a usage error or
# `lab config` answer without importing JAX, orbax and wandb (seconds on a small machine). No import here
# dodges a cycle; lab's modules import each other at module level.


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (exit 2) instead of usage text."""

    def error(self, message):
        raise LabError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lab", description="induction-lab: watch induction heads form.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one run (hydra overrides: key=value ...)")
    t.add_argument("overrides", nargs="*", help="e.g. experiment=reddy_bursty seed=3 trainer.steps=20000")
    t.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    t.add_argument("-m", "--multirun", action="store_true",
                   help="a sweep through hydra's launchers: comma lists expand, e.g. seed=0,1,2 clamp=none,prev_token")
    c = sub.add_parser("config", help="print the composed config (hydra overrides: key=value ...)")
    c.add_argument("overrides", nargs="*")
    r = sub.add_parser("resume", help="continue an interrupted run from its last complete checkpoint")
    r.add_argument("run_dir")
    r.add_argument("--quiet", action="store_true")
    f = sub.add_parser("fork", help="a new run starting from a checkpoint, with changed settings")
    f.add_argument("run_dir")
    f.add_argument("--step", type=int, required=True)
    f.add_argument("--out", default=None, help="run directory of the fork (default: beside the parent)")
    f.add_argument("overrides", nargs="*", help="e.g. clamp=perfect_match trainer.steps=40000")
    f.add_argument("--quiet", action="store_true")
    rp = sub.add_parser("replay", help="evaluate measures at saved checkpoints (clamps at evaluation only)")
    rp.add_argument("run_dir")
    rp.add_argument("--steps", default=None, help="all (default), a list 100,200, or a range 100:1000")
    rp.add_argument("--measures", default=None, help="comma-separated measure names (default: the run's)")
    rp.add_argument("--name", default="replay.jsonl", help="output file in the run directory")
    rp.add_argument("overrides", nargs="*", help="e.g. '+measures.clamps.pm={site: ..., value: induction}'")
    rp.add_argument("--quiet", action="store_true")
    cp = sub.add_parser("compare", help="compare runs: curves by condition, phase-change table, HTML report")
    cp.add_argument("runs", nargs="+", help="run directories or folders of runs (a sweep, an experiment)")
    cp.add_argument("--metric", action="append", default=None, help="metric to compare (repeatable)")
    cp.add_argument("--baseline", default=None, help="run directory of the baseline condition")
    cp.add_argument("--threshold", type=float, default=None, help="also report the first step below this")
    cp.add_argument("--out", default="compare", help="output folder (default ./compare)")
    cp.add_argument("--wandb", nargs="?", const="offline", default=None, metavar="MODE",
                    help="also log the comparison to wandb as a run of job_type compare in the runs' group: "
                         "offline (default; under OUT/wandb, `wandb sync` uploads it) or online")
    lc = sub.add_parser("llc", help="the LLC at every checkpoint (whole model, layers, heads) as one program")
    lc.add_argument("run_dir")
    lc.add_argument("--restrict", default="all", help="comma-separated: all, L<l>, L<l>H<h> (default all)")
    lc.add_argument("--steps", default=None, help="checkpoint steps (default all), e.g. 0,500,1000")
    lc.add_argument("--sampler", default=None, help="sgld | rmsprop_sgld (default: the run's measures.llc_sampler)")
    for name, kind in (("chains", int), ("chain-steps", int), ("burn-in", int), ("eps", float), ("gamma", float),
                       ("nbeta", float), ("batch-size", int), ("seed", int)):
        lc.add_argument(f"--{name}", type=kind, default=None)
    lc.add_argument("--wandb", nargs="?", const="offline", default=None, metavar="MODE",
                    help="log to wandb (default: as the run's tracking.wandb.mode)")
    lc.add_argument("--calibrate", action="store_true",
                    help="sweep step size x nbeta (x gamma) at one checkpoint (--steps S, default the last), recommend")
    lc.add_argument("--eps-grid", default="1e-5,3e-5,1e-4,3e-4,1e-3", help="--calibrate: step sizes")
    lc.add_argument("--nbeta-grid", default=None, help="--calibrate: nbeta values (default: default/3, default, x3)")
    lc.add_argument("--gamma-grid", default=None, help="--calibrate: localisation strengths (default: --gamma alone)")
    lc.add_argument("--quiet", action="store_true")
    dy = sub.add_parser("dynamics", help="essential dynamics: PCA of the outputs across checkpoints, turning points")
    dy.add_argument("run_dir")
    dy.add_argument("--components", type=int, default=3)
    dy.add_argument("--probe", type=int, default=64, help="probe sequences (the first evaluation set's first N)")
    sh = sub.add_parser("show", help="one-screen summary of a run")
    sh.add_argument("run_dir")
    return p


def _train(args) -> int:
    from lab.batch import is_batch, train_batch
    from lab.config import load_config
    from lab.run import train_run

    if args.multirun:
        from lab.sweep import read_index, run_sweep

        sweep_dir = run_sweep(args.overrides, quiet=args.quiet)
        failed = [j for j in read_index(sweep_dir)["jobs"].values() if j["status"] != "done"]
        if args.quiet:
            print(sweep_dir)
        return 1 if failed else 0
    cfg, node = load_config(args.overrides)
    if is_batch(cfg):  # several seeds or conditions: one vmapped program, one run directory each
        run_dir = train_batch(cfg, node, args.overrides, quiet=args.quiet)
    else:
        run_dir = train_run(cfg, node, quiet=args.quiet, overrides=args.overrides)
    if args.quiet:
        print(run_dir)
    return 0


def _config(args) -> int:
    from omegaconf import OmegaConf

    from lab.config import load_config

    _, node = load_config(args.overrides)
    print(OmegaConf.to_yaml(node, resolve=True), end="")
    return 0


def _resume(args) -> int:
    from lab.replay import resume_run

    resume_run(args.run_dir, quiet=args.quiet)
    return 0


def _fork(args) -> int:
    from lab.replay import fork_run

    run_dir = fork_run(args.run_dir, args.step, args.overrides, run_dir=args.out, quiet=args.quiet)
    if args.quiet:
        print(run_dir)
    return 0


def _parse_steps(text: str | None, run_dir: str) -> list[int] | None:
    if text in (None, "all"):
        return None
    try:
        if ":" in text:
            from lab.rundir import check_run_dir, complete_steps

            lo, hi = (int(x) if x else None for x in text.split(":", 1))
            have = complete_steps(check_run_dir(run_dir))
            return [s for s in have if (lo is None or s >= lo) and (hi is None or s <= hi)]
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise LabError(f"--steps={text}: all, a comma-separated list of steps, or a range LO:HI") from None


def _replay(args) -> int:
    from lab.replay import replay_run

    steps = _parse_steps(args.steps, args.run_dir)
    measures = [m for m in args.measures.split(",") if m] if args.measures else None
    out = replay_run(args.run_dir, steps=steps, measures=measures, overrides=args.overrides, out_name=args.name,
                     quiet=args.quiet)
    print(out)
    return 0


def _compare(args) -> int:
    from lab.comparison import compare

    out = compare(args.runs, metrics=args.metric, baseline=args.baseline, out=args.out, threshold=args.threshold,
                  wandb_mode=args.wandb)
    print((out / "table.md").read_text(), end="")
    print(f"report: {out / 'report.html'}")
    return 0


def _llc(args) -> int:
    import dataclasses
    import json
    import math

    from lab.config import from_yaml
    from lab.devinterp import llc_over_checkpoints
    from lab.errors import LabError, check
    from lab.measures import llc_settings
    from lab.rundir import check_run_dir

    cfg, _ = from_yaml(check_run_dir(args.run_dir) / "config.yaml")
    b = cfg.trainer.batch_size if args.batch_size is None else args.batch_size
    check(b >= 1, "--batch-size", b, "must be >= 1")
    s = llc_settings(cfg.measures, b)
    given = {"sampler": args.sampler, "chains": args.chains, "steps": args.chain_steps, "burn_in": args.burn_in,
             "eps": args.eps, "gamma": args.gamma, "nbeta": args.nbeta}
    s = dataclasses.replace(s, **{k: v for k, v in given.items() if v is not None})
    if args.chain_steps is not None and args.burn_in is None:  # the run's burn-in: a quarter of the new length
        s = dataclasses.replace(s, burn_in=s.steps // 4)
    s.validate({k: "--" + k.replace("_", "-") for k in given} | {"steps": "--chain-steps"})
    steps = None
    if args.steps:
        try:
            steps = [int(x) for x in args.steps.split(",") if x]
        except ValueError as e:
            raise LabError(f"--steps={args.steps}: comma-separated checkpoint steps") from e
    if args.wandb not in (None, "online", "offline"):
        raise LabError(f"--wandb={args.wandb}: one of online, offline")
    if args.calibrate:
        from lab.devinterp import calibrate

        grids = {}
        for name, text, low in (("--eps-grid", args.eps_grid, "> 0"), ("--nbeta-grid", args.nbeta_grid, "> 0"),
                                ("--gamma-grid", args.gamma_grid, ">= 0")):
            allowed = f"comma-separated finite numbers {low}"
            try:
                grids[name] = [float(x) for x in text.split(",") if x] if text else None
            except ValueError as e:
                raise LabError(f"{name}={text!r}: {allowed}") from e
            values = grids[name]
            ok = (text is None and name != "--eps-grid") or bool(values) and all(
                math.isfinite(v) and (v >= 0 if low == ">= 0" else v > 0) for v in values)
            check(ok, name, text, allowed)
        check(steps is None or len(steps) == 1, "--steps", args.steps, "one checkpoint step with --calibrate")
        out = calibrate(args.run_dir, step=steps[0] if steps else None, eps=grids["--eps-grid"],
                        nbeta=grids["--nbeta-grid"], gamma=grids["--gamma-grid"], settings=s, batch_size=b,
                        seed=args.seed or 0, quiet=args.quiet)
        doc = json.loads((out / "calibration.json").read_text())
        for r in doc["recommended"]:
            stable = {None: "", True: ", the same at the neighbouring gamma", False: ", NOT the same at the "
                      "neighbouring gamma: the localisation bounds the chains"}[r["gamma_stable"]]
            print(f"nbeta {r['nbeta']:.4g}, gamma {r['gamma']:g}: eps {r['eps']:.0e} (llc {r['llc']:.3g} +- "
                  f"{r['std_err']:.2g}{stable})")
        if not doc["recommended"]:
            print("no usable cell: every one has diagnostics (see calibration.json); try smaller step sizes")
        print(out / "calibration.png")
        return 0
    out = llc_over_checkpoints(args.run_dir, s, restrict=[r for r in args.restrict.split(",") if r], steps=steps,
                               batch_size=b, seed=args.seed or 0, wandb_mode=args.wandb, quiet=args.quiet)
    print(out)
    return 0


def _dynamics(args) -> int:
    import json

    from lab.devinterp import essential_dynamics
    from lab.errors import check

    check(args.components >= 1, "--components", args.components, "must be >= 1")
    check(args.probe >= 1, "--probe", args.probe, "must be >= 1")
    out = essential_dynamics(args.run_dir, components=args.components, probe=args.probe)
    doc = json.loads((out / "dynamics.json").read_text())
    for tp in doc["turning_points"]:
        near = tp["nearest_transition"]
        print(f"turning point: steps {tp['from_step']}-{tp['to_step']} (extremum at {tp['step']})" +
              (f"; nearest transition {near['onset']:.0f}-{near['end']:.0f}, {tp['steps_from_transition']:.0f} "
               "steps away" if near else ""))
    print(out)
    return 0


def _show(args) -> int:
    from lab.comparison import show

    print(show(args.run_dir))
    return 0


COMMANDS = {"train": _train, "config": _config, "resume": _resume, "fork": _fork, "replay": _replay,
            "compare": _compare, "show": _show, "llc": _llc, "dynamics": _dynamics}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    import logging

    # a damaged checkpoint makes orbax's asyncio readers fail; the lab reports that in one line itself
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    debug = "--debug" in argv or os.environ.get("LAB_DEBUG") == "1"
    runlog.keep_terminal = debug  # background threads' and libraries' reports stay on the terminal too
    try:
        parser = _parser()
        args, extra = parser.parse_known_args(argv)
        # overrides may come after options (`fork RUN --step 5 clamp=x`): argparse leaves those over
        if extra and (not hasattr(args, "overrides") or any(e.startswith("-") for e in extra)):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if extra:
            args.overrides = list(args.overrides) + extra
        return COMMANDS[args.command](args)
    except LabError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # disk full, unwritable directory, ... at a write the up-front checks could not foresee
        if debug:
            raise
        print(f"error: {e.filename or ''}: {e.strerror or e} (what was saved before is intact; "
              "`lab resume RUN_DIR` continues from the last complete checkpoint)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
