"""After training: resume an interrupted run, fork a run at a checkpoint, replay measures over
checkpoints. Everything is read from the run directory and nothing else.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
from omegaconf import OmegaConf
from tqdm import tqdm

from lab import rundir
from lab.checkpoint import CheckpointReadError
from lab.config import from_yaml
from lab.errors import LabError
from lab.measures.mechanism import CircuitSummary, flat
from lab.run import RunSink, create_run, execute
from lab.rundir import check_run_dir, complete_steps, load_run_config, restore_state, run_overrides
from lab.runs import Runs, make_clamps
from lab.tracking import Tracker, read_metrics, wandb_id


def resume_run(run_dir: str | Path, quiet: bool = False) -> Path:
    """Continue an interrupted run from its last complete checkpoint; the result equals a run that
    was never interrupted (same parameters, same metrics rows)."""
    run_dir = check_run_dir(run_dir)
    rundir.lock(run_dir)  # before anything is rewritten: a second writer is refused
    cfg, node = from_yaml(run_dir / "config.yaml")  # the run's own resolved config, whatever configs/ says now
    steps = complete_steps(run_dir)
    last = steps[-1] if steps else 0
    if steps and last >= cfg.trainer.steps and (run_dir / "summary.json").exists():
        raise LabError(f"run_dir={run_dir}: already finished (step {last} of {cfg.trainer.steps})")
    trainer = Runs(cfg)
    state, bad = None, []
    for s in reversed(steps):  # the newest checkpoint that reads back whole
        try:
            state = restore_state(trainer, run_dir, s)
            break
        except CheckpointReadError as e:
            bad.append((s, e))
    if steps and state is None:  # none reads: a different model or code, not damage; change nothing
        raise LabError(f"run_dir={run_dir}: none of its {len(steps)} checkpoints can be restored; nothing was "
                       f"changed (newest: {bad[0][1]})")
    for s, e in bad:  # newer than one that reads: damaged. Kept for inspection, out of orbax's way
        aside = rundir.free_path(run_dir / "checkpoints" / f"damaged-{s}")
        (run_dir / "checkpoints" / str(s)).rename(aside)
        print(f"warning: skipping {e}; moved it to {aside}", file=sys.stderr)
    steps = [s for s in steps if s not in {b for b, _ in bad}]
    last = steps[-1] if steps else 0
    if state is None:  # killed before its first checkpoint completed: nothing was kept, so start again
        print(f"warning: {run_dir} has no complete checkpoint; starting again from step 0", file=sys.stderr)
        state = trainer.init_run_state()
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl")] if (run_dir / "metrics.jsonl").exists() else []
    kept = [r for r in rows if r["step"] <= last] if steps else []
    _rewrite_metrics(run_dir / "metrics.jsonl", kept)
    if not quiet:
        print(f"resuming {run_dir} from step {last}", file=sys.stderr)
    sink = RunSink(run_dir, cfg, node, trainer.condition(0), resume=True, history=kept)
    return execute(trainer, [sink], trainer.stack([state]), quiet=quiet)[0]


def _rewrite_metrics(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def fork_run(parent: str | Path, step: int, overrides: list[str], run_dir: str | None = None,
             quiet: bool = False) -> Path:
    """A new run that starts from the parent's checkpoint at ``step`` (parameters, optimiser state,
    data stream) with changed settings; it records its parent and the step."""
    parent = check_run_dir(parent)
    steps = complete_steps(parent)
    if step not in steps:
        raise LabError(f"--step={step}: no complete checkpoint at that step in {parent}; have {steps}")
    cfg, node = load_run_config(parent, overrides)
    # where the fork goes: --out, else a run.dir override, else beside the parent (PARENT-forkSTEP)
    given = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("run.dir=")]
    run_dir = run_dir or (given[-1] if given else None)
    if run_dir:
        cfg.run.dir = run_dir
    else:
        cfg.run.dir = str(rundir.free_path(parent.parent / f"{parent.name}-fork{step}"))
    node.run.dir = cfg.run.dir  # the fork's config.yaml names its own directory
    if step >= cfg.trainer.steps:
        raise LabError(f"--step={step}: must be below trainer.steps={cfg.trainer.steps} of the fork")
    trainer = Runs(cfg)
    state = trainer.stack([restore_state(trainer, parent, step)])
    saved = run_overrides(parent) or []
    path = create_run(trainer, state, node, [o for o in saved if not o.startswith("run.dir=")] + list(overrides),
                      extra={"parent": {"run_dir": str(parent), "step": step, "overrides": list(overrides)}})
    return execute(trainer, [RunSink(path, cfg, node, trainer.condition(0))], state, quiet=quiet)[0]


def replay_run(run_dir: str | Path, steps: list[int] | None = None, measures: list[str] | None = None,
               overrides: list[str] = (), out_name: str = "replay.jsonl", quiet: bool = False,
               wandb_mode: str | None = None) -> Path:
    """Evaluate the run's evaluators and measures (and any probe clamps given in ``overrides``,
    e.g. ``+measures.clamps.pm={...}``) at saved checkpoints; rows go to RUN_DIR/replay.jsonl and to
    wandb (same group, job_type ``replay``). The circuit summary is flattened as ``circuit/...`` (the model
    without clamps) and, for a run trained with clamps, also ``circuit_as_trained/...`` (its own clamps acting
    as they did at that step), the two views of the final summary, at every checkpoint."""
    run_dir = check_run_dir(run_dir)
    rundir.lock(run_dir)
    extra = list(overrides)
    if measures:
        extra.append(f"measures.names=[{','.join(measures)}]")
    cfg, node = load_run_config(run_dir, extra)
    if "/" in out_name or out_name in ("metrics.jsonl", "summary.json", "config.yaml", "overrides.json"):
        raise LabError(f"--name={out_name}: a plain file name other than the run's own files")
    have = complete_steps(run_dir)
    if steps is not None and not steps:
        raise LabError(f"--steps: selects no checkpoint of {run_dir}; have {have}")
    want = have if steps is None else steps
    missing = [s for s in want if s not in have]
    if missing:
        raise LabError(f"--steps={missing}: no complete checkpoint there in {run_dir}; have {have}")
    trainer = Runs(cfg)
    if wandb_mode:
        cfg.tracking.wandb.mode = wandb_mode
    circuit = None
    if trainer.task.mechanism_metric and cfg.measures.circuit:  # the circuit summary at every checkpoint
        circuit = CircuitSummary(trainer.model, trainer.task)
    out = run_dir / out_name
    out.unlink(missing_ok=True)
    replayed = {"replay_of": {"run_dir": str(run_dir.absolute()), "wandb_id": wandb_id(run_dir), "steps": want}}
    tracker = Tracker(run_dir, cfg.tracking, {**OmegaConf.to_container(node, resolve=True), **replayed},
                      name=f"{run_dir.name}-replay",
                      group=cfg.experiment, job_type="replay", metrics_file=out_name, wandb_id_suffix="replay",
                      sequences_per_step=cfg.trainer.batch_size)
    it = want
    if not quiet:
        it = tqdm(want, desc="replay", unit="ckpt", file=sys.stderr)
    skipped = []
    try:
        for s in it:
            try:
                state = restore_state(trainer, run_dir, s)
            except CheckpointReadError as e:  # a damaged checkpoint is skipped, never half-loaded
                print(f"warning: skipping {e}", file=sys.stderr)
                skipped.append(s)
                continue
            row = {"step": s}
            row.update(trainer.evaluate(state))
            row.update(trainer.measures(state.params))
            if circuit is not None:
                row.update(flat(circuit(state.params, row)))
                if cfg.clamps:  # the circuit the run trained with: its own clamps, as they acted at this step
                    # (a summariser per checkpoint: the clamps' windows and frozen snapshots depend on the step)
                    trained = CircuitSummary(trainer.model, trainer.task, step=s, frozen=state.frozen,
                                             clamps=make_clamps(cfg.clamps, trainer.model, trainer.task))
                    row.update(flat(trained(state.params, row), "circuit_as_trained/"))
            jax.block_until_ready(state)
            tracker.log(row)
    finally:
        tracker.close()
    if skipped and len(skipped) == len(want):
        raise LabError(f"run_dir={run_dir}: no selected checkpoint could be read ({skipped})")
    if not quiet:
        print(f"replayed {len(want) - len(skipped)} checkpoints -> {out}"
              + (f" (skipped damaged {skipped})" if skipped else ""), file=sys.stderr)
    return out
