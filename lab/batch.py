"""Many runs as one program: seeds x clamp conditions x learning rates x task values, vmapped.

The models are tiny, so one run leaves most of a machine idle. ``trainer.seeds=[0,1,2]`` (or
``trainer.num_seeds=N``), ``conditions=[none,prev_token,...]`` (clamp presets), ``optim.lrs=[1e-4,3e-4]``
and ``+task_values.p_C=[0,0.8]`` (a task's data fields) expand into one run per (condition, task values,
learning rate, seed). They share every shape, so they train as one jitted, vmapped program: lab.trainer's
``Runs`` of R runs (lab/runs.py), the very code that trains a single run (R = 1):

- each run's state is stacked on a leading axis (parameters from its own seed, its own data key);
- the clamps of all conditions form one clamp set, and each run switches on only its own through
  ``gates`` (data), so different conditions are different numbers, not different programs;
- each run's learning rate is a number in its state (``lr``), and the optimiser (its schedule,
  warmup and decay included) is built inside the step at that rate;
- each run's task data fields are in its state (``task``, what ``Task.run_data`` makes of them: numbers,
  or tables such as a class law) and the sampler reads them; evaluation sets that depend on them are
  stacked per run;
- each run still gets its own run directory, written exactly as if it had trained alone:
  ``config.yaml`` (a solo config, so ``lab resume`` / ``fork`` / ``replay`` work on it),
  ``metrics.jsonl``, checkpoints (a solo run's state), summary, curves and wandb run.
  The batch directory holds them all and ``batch.json``; ``lab compare BATCH_DIR`` reads it.

Before anything is written the batched program is compiled and its memory measured (XLA's own
accounting); a batch that would not fit the device's free memory is refused with how many would.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import jax
from omegaconf import DictConfig

from lab import rundir
from lab.config import load_config
from lab.errors import LabError
from lab.run import RunSink, execute
from lab.runs import Runs
from lab.trainer import GiB


def seeds_of(cfg) -> list[int]:
    tc = cfg.trainer
    return [int(s) for s in tc.seeds] if tc.seeds is not None else [cfg.seed + k for k in range(tc.num_seeds)]


def lrs_of(cfg) -> list[float | None]:
    return [float(x) for x in cfg.optim.lrs] if cfg.optim.lrs is not None else [None]


def task_points_of(cfg) -> list[dict]:
    """Every combination of the ``task_values`` grid, as {field: value} ([{}] without one)."""
    names = list(cfg.task_values)
    return [dict(zip(names, combo, strict=True))
            for combo in itertools.product(*(list(cfg.task_values[n]) for n in names))]


def is_batch(cfg) -> bool:
    # trainer.seeds=[1] is a batch of one run with seed 1 (as a solo run it would silently train `seed`)
    return (bool(cfg.conditions) or len(seeds_of(cfg)) > 1 or cfg.trainer.seeds is not None or cfg.optim.lrs is not None
            or bool(cfg.task_values))


def condition_label(cond: str) -> str:
    """A condition's run label: its clamp preset's own name (``fig5b/prev_token`` is ``prev_token``)."""
    return cond.rsplit("/", 1)[-1]


def expand(cfg, node: DictConfig, overrides: list[str]) -> list[dict]:
    """One solo (cfg, node, overrides, label) per (condition, task values, learning rate, seed), in that
    order. The label names the condition (and the task values and rate, when given): the runs that differ
    only in seed."""
    batch_keys = ("trainer.seeds=", "trainer.num_seeds=", "conditions=", "run.dir=", "seed=", "clamp=",
                  "optim.lrs=", "task_values")
    if cfg.optim.lrs is not None:
        batch_keys += ("optim.lr=",)
    batch_keys += tuple(f"task.{n}=" for n in cfg.task_values)
    base = [o for o in overrides if not o.lstrip("+~").startswith(batch_keys)]
    conds = list(cfg.conditions) or [None]
    labels = [condition_label(c) if c is not None else None for c in conds]
    if len(set(labels)) != len(labels):
        raise LabError(f"conditions={list(cfg.conditions)}: each condition once, by name (runs would share a "
                       "directory)")
    runs = []
    for cond in conds:
        extra = [f"clamp={cond}"] if cond is not None else [o for o in overrides if o.startswith("clamp=")]
        for point in task_points_of(cfg):
            for lr in lrs_of(cfg):
                for seed in seeds_of(cfg):
                    ov = (base + extra + [f"task.{k}={v!r}" for k, v in point.items()]
                          + ([f"optim.lr={lr!r}"] if lr is not None else []) + [f"seed={seed}"])
                    solo = ["trainer.seeds=null", "trainer.num_seeds=1", "conditions=[]", "optim.lrs=null"]
                    c, n = load_config(ov + solo)
                    label = condition_label(cond) if cond is not None else ("+".join(c.clamps) or "none")
                    label += "".join(f"-{k}{v:g}" for k, v in point.items())
                    if lr is not None:
                        label += f"-lr{lr:g}"
                    runs.append({"cfg": c, "node": n, "overrides": ov, "label": label, "seed": seed})
    return runs


def train_batch(cfg, node: DictConfig, overrides: list[str], quiet: bool = False, name: str | None = None,
                beside: bool = False) -> Path:
    """Train every (condition, seed) of ``cfg`` as one program; returns the batch directory.

    ``name``: the runs go to ``run.dir/<name>-s<seed>`` inside a folder that may already hold other runs
    (lab.conditions: one condition's seeds as one program beside the other conditions' runs), and the index
    to ``batch-<name>.json``. ``beside``: the runs go to ``run.dir/<condition>-s<seed>`` beside other runs there,
    the index to ``batch-<conditions>.json``."""
    runs = expand(cfg, node, overrides)
    if beside and name is None:
        index_name = "batch-" + "+".join(dict.fromkeys(r["label"] for r in runs)) + ".json"
    else:
        index_name = "batch.json" if name is None else f"batch-{name}.json"
    if name is not None or beside:
        root = Path(cfg.run.dir)
        for r in runs:
            rundir.check_empty(root / f"{name or r['label']}-s{r['seed']}")
    bt = Runs([r["cfg"] for r in runs])
    state = bt.init_state()
    limit = cfg.trainer.memory_limit_gb * GiB if cfg.trainer.memory_limit_gb is not None else None
    mem = bt.check_memory(state, limit)
    if name is None and not beside:
        root = rundir.resolve_run_dir(cfg)
    for r in runs:
        r["dir"] = root / f"{name or r['label']}-s{r['seed']}"
        r["overrides"] = r["overrides"] + [f"run.dir={r['dir']}"]
        r["node"].run.dir = str(r["dir"])
    for r in runs:
        rundir.create(r["dir"], r["node"], r["overrides"], extra={"batch": str(root)})
    index = {"experiment": cfg.experiment, "overrides": list(overrides), "conditions": list(cfg.conditions) or None,
             "seeds": seeds_of(cfg), "lrs": cfg.optim.lrs and [float(x) for x in cfg.optim.lrs],
             "memory_bytes": mem["bytes"], "device": str(jax.devices()[0].device_kind),
             "runs": [{"dir": r["dir"].name, "condition": r["label"], "seed": r["seed"]} for r in runs]}
    (root / index_name).write_text(json.dumps(index, indent=2))
    if not quiet:
        print(f"{len(runs)} runs as one program ({mem['bytes'] / 2**20:.1f} MiB): {root}", file=sys.stderr)
    execute(bt, [RunSink(r["dir"], r["cfg"], r["node"], r["label"]) for r in runs], state, quiet=quiet)
    return root
