"""Sweeps: `lab train -m KEY=A,B KEY2=X,Y ...` through Hydra's multirun and its launchers.

Hydra expands the sweep and hands each job to the launcher the config names (`hydra/launcher=`
basic (default, one after another), `joblib` (local processes), `submitit_local`, `submitit_slurm`, or
this repository's presets in `configs/hydra/launcher/`). Each job is one ordinary lab run (or one
batched program, when the job's own config asks for `trainer.seeds` / `conditions`) in
`SWEEP_DIR/<job number>/`, and `SWEEP_DIR/sweep.json` indexes them: job, overrides, status
(running | done | failed), the one-line reason of a failure, and the run directory.

A job that fails is recorded and does not stop the others. Rerunning the same command (same sweep
directory) skips the jobs that finished and resumes the ones that did not from their last complete
checkpoint. `lab compare SWEEP_DIR` reads the sweep directly.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from lab.batch import is_batch, train_batch
from lab.config import compose, config_dir, one_line, search_path_overrides, to_config
from lab.errors import LabError
from lab.replay import resume_run
from lab.run import train_run

INDEX = "sweep.json"


@contextmanager
def _locked(sweep_dir: Path):
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / ".sweep.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # jobs of a parallel launcher update the index one at a time
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_index(sweep_dir: Path) -> dict:
    p = Path(sweep_dir) / INDEX
    return json.loads(p.read_text()) if p.exists() else {"jobs": {}}


def update_index(sweep_dir: Path, job: int, **fields) -> None:
    with _locked(sweep_dir):
        index = read_index(sweep_dir)
        entry = index["jobs"].setdefault(str(job), {"job": job})
        entry.update(fields)
        tmp = sweep_dir / (INDEX + ".tmp")
        tmp.write_text(json.dumps(index, indent=2, sort_keys=True))
        tmp.replace(sweep_dir / INDEX)


def failure_line(e: BaseException) -> str:
    msg = (str(e).strip().splitlines() or [""])[0]
    return msg if isinstance(e, LabError) else f"{type(e).__name__}: {msg}"


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def _job(node: DictConfig) -> str:
    """One job of a sweep: train (or resume, or skip) its run and record the outcome in the index."""
    hc = HydraConfig.get()
    sweep_dir, job = Path(hc.sweep.dir), int(hc.job.num)
    run_dir = sweep_dir / str(job)
    overrides = list(hc.overrides.task)
    entry = {"overrides": overrides, "run_dir": str(run_dir)}
    before = read_index(sweep_dir)["jobs"].get(str(job), {}).get("overrides")
    if before is not None and before != overrides:  # the same directory, another sweep: touch nothing
        reason = (f"hydra.sweep.dir={sweep_dir}: job {job} there ran other overrides ({' '.join(before)}); "
                  "use a new sweep directory")
        print(f"job {job} failed: {reason}", file=sys.stderr)
        return "failed"
    runs = _runs_of(run_dir)
    if runs and all((r / "summary.json").exists() for r in runs):
        update_index(sweep_dir, job, status="done", **entry)
        return "skipped"
    update_index(sweep_dir, job, status="running", reason=None, **entry)
    try:
        if runs:  # started before: resume what did not finish from its last complete checkpoint
            for r in runs:
                if not (r / "summary.json").exists():
                    resume_run(r, quiet=True)
        else:
            OmegaConf.set_readonly(node, False)
            with open_dict(node):
                node.run.dir = str(run_dir)
            cfg = to_config(node)
            ov = [*overrides, f"run.dir={run_dir}"]
            if is_batch(cfg):
                train_batch(cfg, node, ov, quiet=True)
            else:
                train_run(cfg, node, quiet=True, overrides=ov)
    except BaseException as e:  # noqa: BLE001 - a failed job is recorded; the sweep goes on
        if isinstance(e, KeyboardInterrupt):
            raise
        update_index(sweep_dir, job, status="failed", reason=failure_line(e), **entry)
        print(f"job {job} failed: {failure_line(e)}", file=sys.stderr)
        return "failed"
    update_index(sweep_dir, job, status="done", reason=None, **entry)
    return "done"


def _runs_of(job_dir: Path) -> list[Path]:
    """The run directories a job has started: itself, or the runs of its batch."""
    if (job_dir / "batch.json").exists():
        return [job_dir / r["dir"] for r in json.loads((job_dir / "batch.json").read_text())["runs"]]
    return [job_dir] if (job_dir / "config.yaml").exists() else []


def default_sweep_dir(overrides: list[str]) -> Path:
    """A stable directory per sweep command, so rerunning the command finds its finished jobs."""
    exp = next((o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")),
               next((o.split("=", 1)[1] for o in overrides if o.startswith("task=")), "demo"))
    digest = hashlib.sha1("\n".join(sorted(overrides)).encode()).hexdigest()[:8]
    return Path("runs") / "sweeps" / f"{exp}-{digest}"


def check_jobs(overrides: list[str]) -> None:
    """Compose every value of every swept key (the others at their first value) against the schemas before
    hydra starts: an unknown field, option or type then gets the lab's one-line error, exit 2, and no sweep
    directory, instead of hydra's multi-line one after it wrote multirun.yaml. Values are checked by each
    job, as before: a job whose input is missing or out of range fails alone, recorded in sweep.json, and
    a rerun retries it. Interval sweeps (no list of values) and hydra's own keys are left to hydra."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:  # hydra's grammar errors span lines
        raise LabError(f"sweep {' '.join(overrides)}: {one_line(e)}") from None
    fixed, swept = [], []
    for o in parsed:
        key = o.get_key_element()
        if key.lstrip("+~").startswith(("hydra.", "hydra/")):
            continue
        if not o.is_sweep_override():
            fixed.append(f"{key}={o.get_value_element_as_str()}")
            continue
        try:
            swept.append((key, list(o.sweep_string_iterator())))
        except Exception:  # noqa: BLE001 - interval() and the like have no values to list
            continue
    first = [f"{k}={v[0]}" for k, v in swept]
    jobs = {(*first[:i], f"{k}={v}", *first[i + 1:]) for i, (k, values) in enumerate(swept) for v in values}
    for job in sorted(jobs):  # the all-first-values job once, not once per swept key
        to_config(compose([*fixed, *job]), validate=False)


def run_sweep(overrides: list[str], quiet: bool = False) -> Path:
    """Run a hydra multirun of `overrides`; returns the sweep directory. Exit status: failed jobs."""
    given = [o for o in overrides if o.startswith("hydra.sweep.dir=")]
    sweep_dir = Path(given[-1].split("=", 1)[1]) if given else default_sweep_dir(overrides)
    rest = [o for o in overrides if not o.startswith("hydra.sweep.dir=")]
    check_jobs(rest)
    # as compose() does: a task without an experiment gets experiment=none; plug-ins' config folders are searched
    argv = [sys.argv[0], "--multirun", *search_path_overrides(rest), f"hydra.sweep.dir={sweep_dir}",
            "hydra.sweep.subdir=${hydra.job.num}",
            "hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    # jobs that share a GPU must not each reserve most of its memory (JAX's default); they inherit this
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("WANDB__SERVICE_WAIT", "300")  # wandb's service can start slowly on busy nodes
    saved = sys.argv
    sys.argv = argv
    try:
        _job()
    except SystemExit as e:  # hydra exits on a bad override before any job ran
        if e.code not in (0, None):
            raise LabError(f"sweep {' '.join(rest)}: hydra refused the command line (see above)") from None
    finally:
        sys.argv = saved
    index = read_index(sweep_dir)
    jobs = sorted(index["jobs"].values(), key=lambda j: j["job"])
    if not quiet:
        for j in jobs:
            why = f"  ({j['reason']})" if j.get("reason") else ""
            print(f"job {j['job']:3d} {j['status']:7s} {' '.join(j['overrides'])}{why}", file=sys.stderr)
        print(f"sweep directory: {sweep_dir}  (sweep.json; `lab compare {sweep_dir}`)", file=sys.stderr)
    return sweep_dir
