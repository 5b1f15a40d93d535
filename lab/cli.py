"""The ``lab`` command.

    lab train [OVERRIDES...]        train one run, e.g. `lab train experiment=reddy_bursty seed=3`
    lab config [OVERRIDES...]       print the composed, validated config without training

Errors in what the user typed or pointed at print one line and exit with code 2 (no traceback
unless --debug is given).
"""

from __future__ import annotations

import argparse
import os
import sys

from lab.errors import LabError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lab", description="induction-lab: watch induction heads form.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one run (hydra overrides: key=value ...)")
    t.add_argument("overrides", nargs="*", help="e.g. experiment=reddy_bursty seed=3 trainer.steps=20000")
    t.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    c = sub.add_parser("config", help="print the composed config (hydra overrides: key=value ...)")
    c.add_argument("overrides", nargs="*")
    return p


def _train(args) -> int:
    from lab.config import load_config
    from lab.run import train_run

    cfg, node = load_config(args.overrides)
    run_dir = train_run(cfg, node, quiet=args.quiet)
    if args.quiet:
        print(run_dir)
    return 0


def _config(args) -> int:
    from omegaconf import OmegaConf

    from lab.config import load_config

    _, node = load_config(args.overrides)
    print(OmegaConf.to_yaml(node, resolve=True), end="")
    return 0


COMMANDS = {"train": _train, "config": _config}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LAB_DEBUG") == "1"
    try:
        args = _parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except LabError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
