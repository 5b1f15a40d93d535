"""Many runs as one program: seeds x clamp conditions x learning rates x task values, vmapped.

The models are tiny, so one run leaves most of a machine idle. ``trainer.seeds=[0,1,2]`` (or
``trainer.num_seeds=N``), ``conditions=[none,prev_token,...]`` (clamp presets), ``optim.lrs=[1e-4,3e-4]``
and ``+task_values.p_C=[0,0.8]`` (a task's data fields) expand into one run per (condition, task values,
learning rate, seed). They share every shape, so they train as one jitted, vmapped program:

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

import dataclasses
import itertools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig

from lab.errors import LabError
from lab.model import build_model
from lab.trainer import Trainer

GiB = 1024 ** 3


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


def expand(cfg, node: DictConfig, overrides: list[str]) -> list[dict]:
    """One solo (cfg, node, overrides, label) per (condition, task values, learning rate, seed), in that
    order. The label names the condition (and the task values and rate, when given): the runs that differ
    only in seed."""
    from lab.config import load_config

    batch_keys = ("trainer.seeds=", "trainer.num_seeds=", "conditions=", "run.dir=", "seed=", "clamp=",
                  "optim.lrs=", "task_values")
    if cfg.optim.lrs is not None:
        batch_keys += ("optim.lr=",)
    batch_keys += tuple(f"task.{n}=" for n in cfg.task_values)
    base = [o for o in overrides if not o.lstrip("+~").startswith(batch_keys)]
    conds = list(cfg.conditions) or [None]
    if len(set(conds)) != len(conds):
        raise LabError(f"conditions={list(cfg.conditions)}: each condition once (runs would share a directory)")
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
                    label = cond if cond is not None else ("+".join(c.clamps) or "none")
                    label += "".join(f"-{k}{v:g}" for k, v in point.items())
                    if lr is not None:
                        label += f"-lr{lr:g}"
                    runs.append({"cfg": c, "node": n, "overrides": ov, "label": label, "seed": seed})
    return runs


class BatchTrainer(Trainer):
    """Trainer of R runs that share shapes: the same step, vmapped over a stacked state."""

    def __init__(self, cfgs: list):
        self.cfgs = cfgs
        conds: list[dict] = []
        self.cond_of = []
        for c in cfgs:
            key = {n: dataclasses.asdict(s) for n, s in c.clamps.items()}
            if key not in conds:
                conds.append(key)
            self.cond_of.append(conds.index(key))
        self.conds = [dict(cfgs[self.cond_of.index(i)].clamps) for i in range(len(conds))]
        rates = [c.optim.lr for c in cfgs]
        for c in cfgs:
            if dataclasses.replace(c.optim, lr=0.0) != dataclasses.replace(cfgs[0].optim, lr=0.0):
                raise LabError(f"optim: batched runs may differ in optim.lr only, got {c.optim} and {cfgs[0].optim}")
        self.own_lr = len(set(rates)) > 1  # each run's rate is data in its state
        fields = self._task_fields(cfgs)  # the task fields each run holds as data in its state
        # the union of every condition's clamps, each renamed NAME@CONDITION and gated per run
        union = {f"{n}@{i}": spec for i, cl in enumerate(self.conds) for n, spec in cl.items()}
        super().__init__(dataclasses.replace(cfgs[0], clamps=union))
        self.runs = len(cfgs)
        self.task_data = [{f: getattr(c.task, f) for f in fields} for c in cfgs] if fields else None
        if fields:
            self._per_run_evals(cfgs)
        self.scan_fn = jax.jit(jax.vmap(self._scan), donate_argnums=0)
        self.run_fn = jax.jit(jax.vmap(self._run, in_axes=(0, None)), donate_argnums=0)
        self.step_fn = jax.jit(jax.vmap(self._step), donate_argnums=0)
        self._beval = {}

    @staticmethod
    def _task_fields(cfgs) -> list[str]:
        """The task fields in which the runs differ; only the task's data fields may."""
        from lab.tasks import TASKS

        base = dataclasses.asdict(cfgs[0].task)
        differ = sorted({k for c in cfgs for k, v in dataclasses.asdict(c.task).items() if v != base[k]})
        allowed = TASKS[cfgs[0].task.name][1].data_fields
        bad = [k for k in differ if k not in allowed]
        if bad:
            raise LabError(f"task.{bad[0]}: batched runs may differ only in the task's data fields "
                           f"({', '.join(allowed) or 'none'}); train other task settings as separate runs")
        return differ

    def _per_run_evals(self, cfgs) -> None:
        """Runs whose tasks differ in data fields may differ in their evaluation sets too (an evaluator on
        the training mixture): those are stacked per run, the others shared."""
        from lab.tasks import make_task

        built: dict[str, dict] = {}  # one task (and its compiled samplers) per distinct task config, not per run
        for c in cfgs:
            key = repr(dataclasses.asdict(c.task))
            if key not in built:
                built[key] = make_task(c.task).evals
        per_run = [built[repr(dataclasses.asdict(c.task))] for c in cfgs]
        evals = dict(self.task.evals)
        for name in list(evals):
            leaves = [jax.tree_util.tree_leaves(e[name]) for e in per_run]
            if not all(np.array_equal(a, b) for lv in leaves[1:] for a, b in zip(leaves[0], lv, strict=True)):
                evals[name] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *(e[name] for e in per_run))
        self.task.__dict__["evals"] = evals  # the cached property, replaced

    # ---- the stacked state ----------------------------------------------------------------
    def init_state(self) -> dict:
        states = []
        base_consts = jax.tree_util.tree_leaves(self.model._consts)
        for c, ci in zip(self.cfgs, self.cond_of, strict=True):
            m = build_model(c.model, self.task, seed=c.seed)
            if not all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(m._consts), base_consts,
                                                            strict=True)):
                raise LabError(f"trainer.seeds: model.positions={c.model.positions} draws fixed arrays per seed, "
                               "which batched runs cannot hold apart; train these seeds as separate runs "
                               "(lab train -m seed=...)")
            st = super().init_state(m.params(), c.seed)
            if self.own_lr:
                st["lr"] = jnp.float32(c.optim.lr)
            if self.task_data:
                st["task"] = self.task.run_data(self.task_data[len(states)])
            if self.clamps:
                st["gates"] = {n: jnp.float32(n.rsplit("@", 1)[1] == str(ci)) for n in self.cfg.clamps}
            states.append(st)
        state = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *states)
        return self.shard(state)

    def shard(self, state):
        """Spread the runs over the available devices (a mesh with one axis, "runs"): 8 GPUs train 8x the
        runs. Needs the number of runs to be a multiple of the device count; otherwise one device."""
        devices = jax.devices()
        if len(devices) < 2 or self.runs % len(devices):
            return state
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        mesh = Mesh(np.array(devices), ("runs",))
        return jax.device_put(state, NamedSharding(mesh, PartitionSpec("runs")))

    def run_state(self, state, i: int) -> dict:
        one = jax.tree_util.tree_map(lambda a: a[i], state)
        one.pop("gates", None)
        one.pop("lr", None)
        one.pop("task", None)
        if "frozen" in one:  # back to the run's own clamp names, as its solo program keeps them
            suffix = f"@{self.cond_of[i]}"
            one["frozen"] = {n[: -len(suffix)]: v for n, v in one["frozen"].items() if n.endswith(suffix)}
            if not one["frozen"]:
                one.pop("frozen")
        return one

    def current_step(self, state) -> int:
        return int(state["step"][0])

    def run_label(self, i: int) -> str:
        return f" in run {i} (seed {self.cfgs[i].seed}, {self.condition(i)})"

    def condition(self, i: int) -> str:
        return "+".join(self.cfgs[i].clamps) or "none"

    # ---- evaluation of every run at once ---------------------------------------------------
    def _eval_call(self, clamps, state, batch):
        per_run = batch["tokens"].ndim == 3  # an evaluation set stacked per run (see _per_run_evals)
        key = (id(clamps), per_run)
        if key not in self._beval:
            def one(params, step, frozen, gates, batch, clamps=clamps):
                return self._evaluate(params, batch, step, frozen, clamps=clamps, gates=gates)

            self._beval[key] = jax.jit(jax.vmap(one, in_axes=(0, 0, 0, 0, 0 if per_run else None)))
        return self._beval[key](state["params"], state["step"], state.get("frozen"), state.get("gates"), batch)

    def measure_runs(self, state, which: list[int]) -> list[dict[str, float]]:
        return [self.measures(jax.tree_util.tree_map(lambda a, i=i: a[i], state["params"])) for i in which]

    # ---- memory ------------------------------------------------------------------------------
    def check_memory(self, state, limit_bytes: float | None = None) -> dict:
        """Compile the batched step program and refuse it, before anything runs, if it would not fit."""
        compiled = self.scan_fn.lower(state).compile()
        need = _program_bytes(compiled)
        limit = limit_bytes if limit_bytes is not None else free_device_bytes()
        ndev = len(jax.devices()) if self.runs % len(jax.devices()) == 0 else 1
        per_run = need * ndev / self.runs  # XLA reports one device's share of a sharded program
        info = {"runs": self.runs, "bytes": need, "bytes_per_run": per_run, "limit_bytes": limit,
                "devices": len(jax.devices())}
        if limit is not None and need > limit:
            fit = int(limit // per_run)
            has = (f"the limit is trainer.memory_limit_gb={limit / GiB:g}" if limit_bytes is not None
                   else f"{limit / GiB:.2f} GiB is free on {jax.devices()[0].device_kind}")
            raise LabError(f"trainer.seeds: {self.runs} runs need {need / GiB:.2f} GiB ({per_run / GiB:.3f} GiB each) "
                           f"but {has}; at most {fit} fit")
        self.scan_fn = compiled  # the program just compiled is the one that runs
        return info


def _program_bytes(compiled) -> float:
    m = compiled.memory_analysis()
    if m is None:
        return 0.0
    return float(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def free_device_bytes() -> float | None:
    """Free memory of the default device: the accelerator's allocator limit, or the host's available RAM."""
    d = jax.devices()[0]
    try:
        stats = d.memory_stats()
    except Exception:  # not every backend reports
        stats = None
    if stats and "bytes_limit" in stats:
        return float(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def train_batch(cfg, node: DictConfig, overrides: list[str], quiet: bool = False, name: str | None = None) -> Path:
    """Train every (condition, seed) of ``cfg`` as one program; returns the batch directory.

    ``name``: the runs go to ``run.dir/<name>-s<seed>`` inside a folder that may already hold other runs
    (lab.conditions: one condition's seeds as one program beside the other conditions' runs), and the index
    to ``batch-<name>.json``."""
    from lab.run import _write_config, execute_runs, resolve_run_dir

    runs = expand(cfg, node, overrides)
    if name is not None:
        root = Path(cfg.run.dir)
        for r in runs:
            d = root / f"{name}-s{r['seed']}"
            if d.exists() and any(d.iterdir()):
                raise LabError(f"run.dir={d}: exists and is not empty; choose a new directory "
                               "(a run directory is never overwritten)")
    bt = BatchTrainer([r["cfg"] for r in runs])
    state = bt.init_state()
    limit = cfg.trainer.memory_limit_gb * GiB if cfg.trainer.memory_limit_gb is not None else None
    mem = bt.check_memory(state, limit)
    if name is None:
        root = resolve_run_dir(cfg)
    for r in runs:
        r["dir"] = root / f"{name or r['label']}-s{r['seed']}"
        r["overrides"] = r["overrides"] + [f"run.dir={r['dir']}"]
        r["node"].run.dir = str(r["dir"])
    for r in runs:
        _write_config(r["dir"], r["node"], r["overrides"], extra={"batch": str(root)})
    index = {"experiment": cfg.experiment, "overrides": list(overrides), "conditions": list(cfg.conditions) or None,
             "seeds": seeds_of(cfg), "lrs": cfg.optim.lrs and [float(x) for x in cfg.optim.lrs],
             "memory_bytes": mem["bytes"], "device": str(jax.devices()[0].device_kind),
             "runs": [{"dir": r["dir"].name, "condition": r["label"], "seed": r["seed"]} for r in runs]}
    (root / ("batch.json" if name is None else f"batch-{name}.json")).write_text(json.dumps(index, indent=2))
    if not quiet:
        print(f"{len(runs)} runs as one program ({mem['bytes'] / 2**20:.1f} MiB): {root}", file=sys.stderr)
    execute_runs(bt, [r["node"] for r in runs], [r["dir"] for r in runs], state, quiet=quiet,
                 conditions=[r["label"] for r in runs])
    return root
