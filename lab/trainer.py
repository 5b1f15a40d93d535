"""The training step and evaluation as pure functions, and the program that compiles them for R runs at once.

A run is a pure function of its config and seed: the batch of step t is sampled on the device from
``fold_in(key, t)``, so any step can be recomputed, resumed or forked from a checkpoint alone. The step
(``train_step``) and the evaluation (``evaluate``) are module-level functions of one run's ``TrainState`` and
the run's ``Parts`` (task, model, clamps, optimiser). ``Program`` is built from those parts alone -- no config,
no disk -- and vmaps the functions over a leading run axis, once, for every program it compiles. One run is a
program of R = 1 runs, a batch (lab.batch: seeds x conditions x learning rates x task values) one of R > 1: the
same code. What the runs are (their configs, conditions, rates, seeds, reference checkpoints) is the runs
layer's business (lab/runs.py), which builds the parts and hands them here.

Runs of one program share every shape; where they differ, it is in data held in their state: the learning rate
(``state.lr``, the optimiser is built at that rate inside the step), the task's data fields (``state.task``),
and, for runs of different clamp conditions, the union of their clamps with each run switching on its own
(``state.gates``). ``steps_per_call`` steps fuse into one ``lax.scan`` per host call; the remainder that a logging
or checkpoint stop cuts off runs as one call of a loop whose length is data, so a stop anywhere costs at most one
extra call and a program compiles two step programs and one evaluation program per evaluation set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lab import kernels, plugins
from lab.clamp import ClampSet
from lab.errors import LabError
from lab.hooks import NO_HOOKS, Hooks
from lab.measures import Measures
from lab.model import Transformer
from lab.state import TrainState

GiB = 1024 ** 3


# ---- what the pure functions close over ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class Parts:
    """The static parts of one run's step: hashed by identity, so jit sees one program per Program."""

    task: Any
    model: Transformer
    clamps: ClampSet
    optimizer: Callable[[Any], optax.GradientTransformation]  # the optimiser at a rate (None: the config's)
    frozen_mask: Any  # model.freeze: a pytree of bools, or None when nothing is frozen
    batch_size: int
    chunk: int  # steps_per_call
    skip_nonfinite: bool  # trainer.on_nonfinite == "skip"
    eval_batch_size: int


def masked_nll(logits: jax.Array, batch: dict) -> jax.Array:
    """The training loss: mean cross-entropy over the batch's ``loss_mask``."""
    return kernels.masked_nll(logits.astype(jnp.float32), batch["targets"], batch["loss_mask"])


def batch_at(parts: Parts, key, step, data: dict | None = None) -> dict:
    """The training batch of ``step``; ``data``: the run's task data fields (``state.task``) if it holds any."""
    k = jax.random.fold_in(key, step)
    if data is None:
        return parts.task.sample(k, parts.batch_size)
    return parts.task.sample(k, parts.batch_size, data=data)


def loss(parts: Parts, params, batch, hooks: Hooks = NO_HOOKS) -> jax.Array:
    task = parts.task
    pos = task.query_positions if task.classification else ()
    if pos and hooks.allows_rows("ln_final.hook_normalized") and hooks.allows_rows("logits"):
        # a classification loss counts only at the query: read out there alone (a clamp on the logits, Singh's
        # perfect copy, takes the rows)
        sel = jnp.asarray(pos)
        picked = {"targets": batch["targets"][:, sel], "loss_mask": batch["loss_mask"][:, sel]}
        return masked_nll(parts.model.apply(params, batch, hooks, readout=pos), picked)
    return masked_nll(parts.model.apply(params, batch, hooks), batch)


def clamped_loss(parts: Parts, params, batch, step, frozen=None, gates=None) -> jax.Array:
    """The training loss with the run's clamps acting as they do at ``step``."""
    return loss(parts, params, batch, parts.clamps.hooks(params, batch, step, frozen, training=True, gates=gates))


def train_step(parts: Parts, state: TrainState) -> tuple[TrainState, dict]:
    """One optimiser step of one run; returns the new state and the step's loss, gradient norm and update ratio."""
    step = state.step
    frozen = parts.clamps.update_frozen(state.frozen, state.params, step) if state.frozen is not None else None
    batch = batch_at(parts, state.key, step, state.task)

    def loss_fn(params):
        if parts.frozen_mask is not None:  # frozen weights' gradients (forward-sized matmuls) never computed
            params = jax.tree_util.tree_map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params,
                                            parts.frozen_mask)
        return clamped_loss(parts, params, batch, step, frozen, state.gates)

    value, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = parts.optimizer(state.lr).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    gnorm = optax.global_norm(grads)
    ratio = optax.global_norm(updates) / jnp.maximum(optax.global_norm(state.params), 1e-12)
    out = {"loss": value, "grad_norm": gnorm, "update_ratio": ratio}
    if parts.skip_nonfinite:  # a non-finite step leaves parameters and optimiser as they were
        ok = jnp.isfinite(value) & jnp.isfinite(gnorm) & jnp.isfinite(ratio)
        keep = lambda a, b: jnp.where(ok, a, b)  # noqa: E731
        params = jax.tree_util.tree_map(keep, params, state.params)
        opt_state = jax.tree_util.tree_map(keep, opt_state, state.opt_state)
        out["skipped"] = (~ok).astype(jnp.float32)
    return state.replace(params=params, opt_state=opt_state, step=step + 1, frozen=frozen), out


def scan_steps(parts: Parts, state: TrainState):
    """``steps_per_call`` steps under one lax.scan; each step's outputs stacked, time axis first."""
    return jax.lax.scan(lambda s, _: train_step(parts, s), state, None, length=parts.chunk)


def run_steps(parts: Parts, state: TrainState, n):
    """``n`` steps (traced, at most ``steps_per_call``) and each step's outputs in [chunk] buffers (the first n
    filled; time axis last)."""
    shapes = jax.eval_shape(lambda s: train_step(parts, s), state)[1]
    bufs = jax.tree_util.tree_map(lambda o: jnp.zeros((parts.chunk, *o.shape), o.dtype), shapes)

    def body(i, carry):
        st, b = carry
        st, out = train_step(parts, st)
        return st, jax.tree_util.tree_map(lambda buf, o: buf.at[i].set(o), b, out)

    state, bufs = jax.lax.fori_loop(0, n, body, (state, bufs))
    return state, jax.tree_util.tree_map(lambda b: jnp.moveaxis(b, 0, -1), bufs)


def evaluate(parts: Parts, params, batch, step=0, frozen=None, clamps: ClampSet | None = None, gates=None,
             metrics: Callable | None = None) -> dict:
    """The task's metrics (or ``metrics(logits, batch)``: a registered evaluator's) of one run on an evaluation
    ``batch``, in chunks of ``eval_batch_size`` sequences, with ``clamps`` acting as at ``step`` (None:
    unclamped)."""
    n = batch["tokens"].shape[0]
    c = max(d for d in range(1, min(n, parts.eval_batch_size) + 1) if n % d == 0)
    chunks = jax.tree_util.tree_map(lambda a: a.reshape(n // c, c, *a.shape[1:]), batch)
    if frozen is not None and clamps:
        # the snapshot a training step at `step` would use (taken when a window opens at `step`); probe
        # views hold the run's clamps too, so they use the same snapshot
        frozen = parts.clamps.update_frozen(frozen, params, step)

    def fwd(b):
        hooks = clamps.hooks(params, b, step, frozen, training=False, gates=gates) if clamps else NO_HOOKS
        return parts.model.apply(params, b, hooks)

    logits = jax.lax.map(fwd, chunks)
    logits = logits.reshape(n, *logits.shape[2:])
    return (metrics or parts.task.metrics)(logits, batch)


def evaluation_sets(task, evaluators: list[str] = ()) -> dict:
    """The task's own evaluation sets and those of the registered ``evaluators`` (lab.plugins), by name."""
    sets = dict(task.evals)
    for name in evaluators:
        if name in sets:
            raise LabError(f"evaluators={list(evaluators)}: {name!r} is already an evaluator of task "
                           f"{task.cfg.name}; register it under another name")
        entry = plugins.evaluators[name]
        batch = entry.build(task)
        shape = tuple(getattr(batch.get("tokens") if isinstance(batch, dict) else None, "shape", ()))
        if len(shape) != 2 or shape[1] != task.seq_len or not {"targets", "loss_mask"} <= set(batch):
            raise LabError(f"evaluators: {name} (package {entry.package}) must build a batch with tokens [n, "
                           f"{task.seq_len}], targets and loss_mask; its tokens are {list(shape) or 'missing'}")
        sets[name] = batch
    return sets


def all_finite(params) -> jax.Array:
    """Per run (leading axis): are all parameters finite."""
    leaves = jax.tree_util.tree_leaves(params)
    return jnp.stack([jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim))) for x in leaves]).all(0)


class OverRuns:
    """A function of one run's arguments, jitted and called on R runs stacked on a leading axis: vmapped for
    R > 1. For R = 1 the run's slice goes to the jitted function of one run itself, on the host side of the
    call, and comes back with the run axis restored, so a single run compiles the very program it would alone
    (slicing inside the program changes XLA's fusion, and with it the float rounding of a step by a few ulps,
    which Adam's first, sign-like steps amplify; and its CPU backend runs a batched matmul with a batch of one
    some 15 % slower)."""

    def __init__(self, fn, runs: int, in_axes=0, donate: bool = False):
        self.runs = runs
        self.run_axis = in_axes if isinstance(in_axes, tuple) else None  # None: every argument has the run axis
        self.fn = jax.jit(jax.vmap(fn, in_axes=in_axes) if runs > 1 else fn, donate_argnums=0 if donate else ())

    def _args(self, args):
        if self.runs > 1:
            return args
        return [a if self.run_axis is not None and self.run_axis[k] is None
                else jax.tree_util.tree_map(lambda x: x[0], a) for k, a in enumerate(args)]

    def __call__(self, *args):
        out = self.fn(*self._args(args))
        return out if self.runs > 1 else jax.tree_util.tree_map(lambda x: x[None], out)

    def check(self, *args) -> None:
        """Trace for these (stacked) arguments without compiling or running (jit keeps the trace for the call that
        follows): what only tracing finds, such as a registered clamp value of the wrong shape, is refused before
        anything is written."""
        jax.eval_shape(self.fn, *self._args(args))

    def lower(self, *args):
        """The program for these (stacked) arguments, lowered (for cost and memory analyses)."""
        return self.fn.lower(*self._args(args))

    def compile(self, *args):
        """Compile for these arguments now; later calls run this compiled program. Returns it."""
        compiled = self.lower(*args).compile()
        self.fn = compiled
        return compiled

    def cache_size(self) -> int:
        """How many programs the jitted function holds (one per argument shapes)."""
        return self.fn._cache_size()


def _to_host_soon(tree):
    """Start copying a call's per-step outputs to the host as soon as the call ends (on an accelerator the
    copy then overlaps the next call instead of stalling the logging stop that reads them)."""
    for leaf in jax.tree_util.tree_leaves(tree):
        leaf.copy_to_host_async()
    return tree


# ---- the program of R runs ---------------------------------------------------------------------------------
class Program:
    """The compiled step and evaluation of R runs stacked on a leading axis, from parts alone: the one-run
    ``parts`` (task, model, clamps -- the union of the runs' conditions, gated per run by ``state.gates`` --,
    optimiser), the ``measures``, the evaluation sets ``evals`` (a set stacked per run has a leading run axis)
    scored by ``eval_metrics[name]`` (None: the task's metrics), and the ``views`` each set is evaluated in:
    (suffix, clamps) pairs, "" as trained first."""

    def __init__(self, parts: Parts, runs: int, measures: Measures, evals: dict,
                 views: list[tuple[str, ClampSet | None]], eval_metrics: dict[str, Callable | None] | None = None):
        self.parts, self.runs, self.measures, self.evals = parts, runs, measures, evals
        self.views = list(views)
        self.eval_metrics = dict(eval_metrics or {})
        p = parts
        self.scan_fn = OverRuns(lambda s: scan_steps(p, s), runs, donate=True)  # steps_per_call steps
        self.run_fn = OverRuns(lambda s, n: run_steps(p, s, n), runs, in_axes=(0, None), donate=True)
        self.step_fn = OverRuns(lambda s: train_step(p, s), runs, donate=True)  # one step (tests, FLOP counts)
        self.finite_fn = jax.jit(all_finite)
        self._eval_fns: dict = {}

    @property
    def task(self):
        return self.parts.task

    @property
    def model(self) -> Transformer:
        return self.parts.model

    @property
    def clamps(self) -> ClampSet:
        return self.parts.clamps

    # ---- one run's pure functions, bound to this program's parts (tests, measures, notebooks) --------------
    def loss(self, params, batch, hooks: Hooks = NO_HOOKS) -> jax.Array:
        return loss(self.parts, params, batch, hooks)

    def clamped_loss(self, params, batch, step, frozen=None, gates=None) -> jax.Array:
        return clamped_loss(self.parts, params, batch, step, frozen, gates)

    def batch_at(self, key, step, data: dict | None = None) -> dict:
        return batch_at(self.parts, key, step, data)

    # ---- driving it ----------------------------------------------------------------------------------------
    def current_step(self, state: TrainState) -> int:
        return int(state.step[0])

    def shard(self, state: TrainState) -> TrainState:
        """Spread the runs over the available devices (a mesh with one axis, "runs"): 8 GPUs train 8x the
        runs. Needs the number of runs to be a multiple of the device count; otherwise one device."""
        devices = jax.devices()
        if len(devices) < 2 or self.runs % len(devices):
            return state
        mesh = Mesh(np.array(devices), ("runs",))
        return jax.device_put(state, NamedSharding(mesh, PartitionSpec("runs")))

    def advance(self, state: TrainState, n: int):
        """Run n steps; returns the new state and, per host call, (the per-step losses/grad norms in buffers on
        the device, run axis first and time axis last; how many of their entries the call filled)."""
        outs = []
        while n >= self.parts.chunk:  # the scan is a few per cent faster per step than the loop of data length
            state, out = self.scan_fn(state)
            outs.append((_to_host_soon(out), self.parts.chunk))  # [runs, chunk]: time axis last
            n -= self.parts.chunk
        if n:
            state, out = self.run_fn(state, n)
            outs.append((_to_host_soon(out), n))
        return state, outs

    def _eval_fn(self, clamps: ClampSet | None, per_run: bool, metrics: Callable | None = None):
        key = (id(clamps), per_run, id(metrics))
        if key not in self._eval_fns:
            p = self.parts

            def one(params, step, frozen, gates, batch):
                return evaluate(p, params, batch, step, frozen, clamps=clamps, gates=gates, metrics=metrics)

            self._eval_fns[key] = OverRuns(one, self.runs, in_axes=(0, 0, 0, 0, 0 if per_run else None))
        return self._eval_fns[key]

    def evaluate_runs(self, state: TrainState) -> list[dict[str, float]]:
        """Every evaluator's metrics (clamps acting as at the step, unless eval: false), one dict per run."""
        row = {}
        for name, batch in self.evals.items():
            per_run = batch["tokens"].ndim == 3  # an evaluation set stacked per run
            for suffix, clamps in self.views:
                out = self._eval_fn(clamps, per_run, self.eval_metrics.get(name))(
                    state.params, state.step, state.frozen, state.gates, batch)
                for k, v in out.items():
                    if suffix and suffix != "@unclamped" and k != "loss":
                        continue  # probe clamps log their loss only
                    row[f"{name}{suffix}/{k}"] = v
        host = {k: np.asarray(v).reshape(self.runs) for k, v in jax.device_get(row).items()}
        return [{k: float(v[i]) for k, v in host.items()} for i in range(self.runs)]

    def evaluate(self, state: TrainState) -> dict[str, float]:
        """The evaluators' metrics of a single run's state (as a checkpoint holds it, or stacked); the program
        must train one run."""
        if self.runs != 1:
            raise LabError(f"runs: evaluate() takes one run's state; this program trains {self.runs} (use "
                           "evaluate_runs on the stacked state)")
        stacked = jax.tree_util.tree_map(lambda a: a[None], state) if state.step.ndim == 0 else state
        return self.evaluate_runs(stacked)[0]

    def metric_names(self) -> list[str]:
        """The names of the metrics in a run's rows (the evaluators' from shapes alone, a frozen clamp's view
        with a snapshot of the initial parameters; the measures by computing them once there)."""
        params = self.model.params()
        frozen = self.clamps.init_frozen(params) if self.clamps.frozen_names else None
        names = {"train/batch_loss", "train/grad_norm", "train/update_ratio", "train/loss"}
        for name, batch in self.evals.items():
            batch = jax.tree_util.tree_map(lambda a: a[0], batch) if batch["tokens"].ndim == 3 else batch
            for suffix, clamps in self.views:
                keys = jax.eval_shape(lambda p, b, f, c=clamps, m=self.eval_metrics.get(name):
                                      evaluate(self.parts, p, b, frozen=f, clamps=c, metrics=m), params, batch, frozen)
                names |= {f"{name}{suffix}/{k}" for k in keys if suffix in ("", "@unclamped") or k == "loss"}
        names |= set(self.measures(params))
        return sorted(names)

    def memory(self, state: TrainState) -> dict:
        """Compile the step program for ``state`` now (later calls run this compiled program) and say what it
        needs: bytes in all and per run, and the device count it is spread over."""
        need = _program_bytes(self.scan_fn.compile(state))
        ndev = len(jax.devices()) if self.runs % len(jax.devices()) == 0 else 1
        return {"runs": self.runs, "bytes": need, "bytes_per_run": need * ndev / self.runs,  # XLA reports one
                "devices": len(jax.devices())}  # device's share of a sharded program


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
    except Exception:  # a backend without memory statistics raises (which type varies by backend): no limit known
        stats = None
    if stats and "bytes_limit" in stats:
        return float(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:  # no /proc (not Linux): no limit known
        pass
    return None
