"""The training step and evaluation as pure functions, and the trainer that compiles them for R runs at once.

A run is a pure function of its config and seed: the batch of step t is sampled on the device from
``fold_in(key, t)``, so any step can be recomputed, resumed or forked from a checkpoint alone. The step
(``train_step``) and the evaluation (``evaluate``) are module-level functions of one run's ``TrainState``;
``Trainer`` vmaps them over a leading run axis, once, for every program it compiles. One run is a program of
R = 1 runs, a batch (lab.batch: seeds x conditions x learning rates x task values) one of R > 1: the same code.

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
from lab.errors import LabError, check
from lab.hooks import NO_HOOKS, Hooks
from lab.measures import Measures
from lab.model import Transformer, build_model
from lab.optim import make_optimizer
from lab.rundir import reference_params
from lab.state import TrainState
from lab.tasks import make_task

GiB = 1024 ** 3


# ---- what the pure functions close over ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class Parts:
    """The static parts of one run's step: hashed by identity, so jit sees one program per Trainer."""

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
    if pos and not (hooks.wants("ln_final.hook_normalized") or hooks.wants("logits")):
        # a classification loss counts only at the query: read out there alone
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


def make_clamps(specs: dict, model, task) -> ClampSet:
    """A clamp set, with the parameters its ``value: reference`` clamps read loaded from their run directories."""
    refs = {n: reference_params(c.reference_dir, c.reference_step, model) for n, c in specs.items()
            if c.value == "reference"}
    return ClampSet(specs, model, task, references=refs)


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


# ---- the trainer of R runs ----------------------------------------------------------------------------------
class Trainer:
    """The task, model and clamps of R runs that share every shape (one config, or a batch's list of solo
    configs), and the jitted, vmapped programs that train and evaluate them. Its state holds the R runs
    stacked on a leading axis (``init_state``; ``run_state(state, i)`` is run i's as it would train alone)."""

    def __init__(self, cfgs, task=None, model: Transformer | None = None):
        self.cfgs = list(cfgs) if isinstance(cfgs, (list, tuple)) else [cfgs]
        self.runs = len(self.cfgs)
        cfg = self.cfg = self.cfgs[0]  # what the runs share: trainer, checkpoint, cadence, model, optimiser
        for c in self.cfgs:
            if dataclasses.replace(c.optim, lr=0.0) != dataclasses.replace(cfg.optim, lr=0.0):
                raise LabError(f"optim: batched runs may differ in optim.lr only, got {c.optim} and {cfg.optim}")
        self.task = task if task is not None else make_task(cfg.task)
        self.task_fields = self._task_fields()  # the task fields each run holds as data in its state
        self.model = model if model is not None else build_model(cfg.model, self.task, seed=cfg.seed)
        tc = cfg.trainer

        # clamps: one condition's as they are; several conditions' as the union, each renamed NAME@CONDITION
        # and switched on per run by state.gates
        conds: list[dict] = []
        self.cond_of: list[int] = []
        for c in self.cfgs:
            key = {n: dataclasses.asdict(s) for n, s in c.clamps.items()}
            if key not in conds:
                conds.append(key)
            self.cond_of.append(conds.index(key))
        self.conds = [dict(self.cfgs[self.cond_of.index(i)].clamps) for i in range(len(conds))]
        self.gated = len(self.conds) > 1
        specs = ({f"{n}@{i}": s for i, cl in enumerate(self.conds) for n, s in cl.items()} if self.gated
                 else dict(self.conds[0]))
        self.clamps = make_clamps(specs, self.model, self.task)
        # progress measures by clamp: the current model, as it runs (its own clamps included, as at the step),
        # with one more clamp it was not trained with. A run trained with one active head (Singh's single_head)
        # keeps the others ablated under the probe, as the authors' progress measures do (their Fig. 10 adds
        # the probe clamp to --opto_ablate_heads). A probe named like one of the run's clamps replaces it.
        self.probe_clamps = {name: make_clamps({**specs, name: spec}, self.model, self.task)
                             for name, spec in cfg.measures.clamps.items()}

        frozen = self.model.frozen_mask(self.model.params())
        any_frozen = any(jax.tree_util.tree_leaves(frozen))
        self.frozen = frozen if any_frozen else None
        self.own_lr = len({c.optim.lr for c in self.cfgs}) > 1  # each run's rate is data in its state
        mask = frozen if any_frozen else None
        self.opt = make_optimizer(cfg.optim, tc.steps, mask, lr=None)

        def optimizer(lr):  # the optimiser at a rate: the config's (None), or a run's own (state.lr, traced)
            return self.opt if lr is None else make_optimizer(cfg.optim, tc.steps, mask, lr=lr)

        self.parts = Parts(self.task, self.model, self.clamps, optimizer, self.frozen, tc.batch_size,
                           tc.steps_per_call, tc.on_nonfinite == "skip", tc.eval_batch_size)
        trainable = jax.tree_util.tree_map(lambda f: not f, frozen)
        self.measures = Measures(cfg.measures, self.model, self.task, loss_fn=self.loss, batch_size=tc.batch_size,
                                 trainable=trainable)
        self.evals = self._evaluation_sets()
        self.watch = cfg.watch or self.task.watch_metric

        p = self.parts
        r = self.runs
        self.scan_fn = OverRuns(lambda s: scan_steps(p, s), r, donate=True)  # steps_per_call steps
        self.run_fn = OverRuns(lambda s, n: run_steps(p, s, n), r, in_axes=(0, None), donate=True)
        self.step_fn = OverRuns(lambda s: train_step(p, s), r, donate=True)  # one step (tests, FLOP counts)
        self.finite_fn = jax.jit(all_finite)
        self._eval_fns: dict = {}
        if cfg.watch:  # a typo would otherwise surface only after training, as "no transition detected"
            names = self.metric_names()
            if cfg.watch not in names:
                heads = sorted({n.split("/")[0] + "/L{l}H{h}" for n in names if "/L" in n and n[-1].isdigit()})
                shown = [n for n in names if not ("/L" in n and n[-1].isdigit())] + heads
                check(False, "watch", cfg.watch, f"a metric this run logs: {', '.join(shown)}")

    # ---- one run's pure functions, bound to this trainer's parts (tests, measures, notebooks) --------------
    def loss(self, params, batch, hooks: Hooks = NO_HOOKS) -> jax.Array:
        return loss(self.parts, params, batch, hooks)

    def clamped_loss(self, params, batch, step, frozen=None, gates=None) -> jax.Array:
        return clamped_loss(self.parts, params, batch, step, frozen, gates)

    def batch_at(self, key, step, data: dict | None = None) -> dict:
        return batch_at(self.parts, key, step, data)

    # ---- the runs of this program ------------------------------------------------------------------------
    def _task_fields(self) -> list[str]:
        """The task fields in which the runs differ; only the task's data fields may."""
        base = dataclasses.asdict(self.cfgs[0].task)
        differ = sorted({k for c in self.cfgs for k, v in dataclasses.asdict(c.task).items() if v != base[k]})
        allowed = self.task.data_fields
        bad = [k for k in differ if k not in allowed]
        if bad:
            raise LabError(f"task.{bad[0]}: batched runs may differ only in the task's data fields "
                           f"({', '.join(allowed) or 'none'}); train other task settings as separate runs")
        return differ

    def _evaluation_sets(self) -> dict:
        """The task's evaluation sets; runs whose tasks differ in data fields may differ in them too (an
        evaluator on the training mixture): those are stacked per run (a leading run axis), the others shared."""
        evals = evaluation_sets(self.task, self.cfg.evaluators)
        if not self.task_fields:
            return evals
        built: dict[str, dict] = {}  # one task (and its compiled samplers) per distinct task config, not per run
        for c in self.cfgs:
            key = repr(dataclasses.asdict(c.task))
            if key not in built:
                built[key] = evaluation_sets(make_task(c.task), self.cfg.evaluators)
        per_run = [built[repr(dataclasses.asdict(c.task))] for c in self.cfgs]
        for name in list(evals):
            leaves = [jax.tree_util.tree_leaves(e[name]) for e in per_run]
            if not all(np.array_equal(a, b) for lv in leaves[1:] for a, b in zip(leaves[0], lv, strict=True)):
                evals[name] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *(e[name] for e in per_run))
        return evals

    def init_run_state(self, i: int = 0, params: dict | None = None) -> TrainState:
        """Run i's state at step 0, as it would train alone (``params``: its initial parameters)."""
        c = self.cfgs[i]
        params = self.model.params() if params is None else params
        frozen = sorted(n for n, spec in c.clamps.items() if spec.value == "frozen")  # its own frozen clamps
        return TrainState(params=params, opt_state=self.opt.init(params), step=jnp.zeros((), jnp.int32),
                          key=jax.random.fold_in(jax.random.PRNGKey(c.seed), 1),
                          frozen={n: jax.tree_util.tree_map(jnp.copy, params) for n in frozen} or None)

    def init_state(self) -> TrainState:
        """The R runs at step 0, stacked (each run's parameters from its own seed)."""
        states = []
        base_consts = jax.tree_util.tree_leaves(self.model.consts)
        for i, c in enumerate(self.cfgs):
            m = self.model if c.seed == self.cfg.seed else build_model(c.model, self.task, seed=c.seed)
            if not all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(m.consts), base_consts,
                                                            strict=True)):
                raise LabError(f"trainer.seeds: model.positions={c.model.positions} draws fixed arrays per seed, "
                               "which batched runs cannot hold apart; train these seeds as separate runs "
                               "(lab train -m seed=...)")
            states.append(self.init_run_state(i, m.params()))
        return self.stack(states)

    def stack(self, states: list[TrainState]) -> TrainState:
        """The program's state from its R runs' own states (as ``init_run_state`` or a checkpoint holds them):
        what the runs hold as data (rate, task fields, gates) is added, and the runs stacked."""
        if len(states) != self.runs:
            raise LabError(f"runs: this program trains {self.runs} runs, got {len(states)} states")
        full = []
        for i, (st, c) in enumerate(zip(states, self.cfgs, strict=True)):
            if self.gated and self.clamps.frozen_names:  # the program's names NAME@CONDITION; others' unused
                own = {f"{n}@{self.cond_of[i]}": v for n, v in (st.frozen or {}).items()}
                st = st.replace(frozen={n: own[n] if n in own else jax.tree_util.tree_map(jnp.copy, st.params)
                                        for n in self.clamps.frozen_names})
            full.append(st.replace(
                lr=jnp.float32(c.optim.lr) if self.own_lr else None,
                task=self.task.run_data({f: getattr(c.task, f) for f in self.task_fields}) if self.task_fields
                else None,
                gates={n: jnp.float32(n.rsplit("@", 1)[1] == str(self.cond_of[i])) for n in self.clamps.specs}
                if self.gated else None))
        return self.shard(jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *full))

    def run_state(self, state: TrainState, i: int) -> TrainState:
        """Run i's state, as a run trained alone would hold it (what its checkpoints store)."""
        one = state.run(i).own()
        if self.gated and one.frozen is not None:  # back to the run's own clamp names
            suffix = f"@{self.cond_of[i]}"
            own = {n[: -len(suffix)]: v for n, v in one.frozen.items() if n.endswith(suffix)}
            one = one.replace(frozen=own or None)
        return one

    def shard(self, state: TrainState) -> TrainState:
        """Spread the runs over the available devices (a mesh with one axis, "runs"): 8 GPUs train 8x the
        runs. Needs the number of runs to be a multiple of the device count; otherwise one device."""
        devices = jax.devices()
        if len(devices) < 2 or self.runs % len(devices):
            return state
        mesh = Mesh(np.array(devices), ("runs",))
        return jax.device_put(state, NamedSharding(mesh, PartitionSpec("runs")))

    def current_step(self, state: TrainState) -> int:
        return int(state.step[0])

    def condition(self, i: int) -> str:
        return "+".join(self.cfgs[i].clamps) or "none"

    def run_label(self, i: int) -> str:
        """How an error names run i ("" for a single run)."""
        return f" in run {i} (seed {self.cfgs[i].seed}, {self.condition(i)})" if self.runs > 1 else ""

    # ---- host-side driving ---------------------------------------------------------------------------------
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

    def views(self) -> list[tuple[str, ClampSet | None]]:
        """(suffix, clamps) of each evaluation: as trained, unclamped (if asked), and each probe clamp."""
        views = [("", self.clamps)]
        if self.clamps and self.cfg.trainer.log_unclamped:
            views.append(("@unclamped", None))
        return views + [(f"@{name}", cs) for name, cs in self.probe_clamps.items()]

    def metrics_of(self, evaluator: str) -> Callable | None:
        """How an evaluator's logits are scored: a registered evaluator's own metrics, else the task's (None)."""
        entry = plugins.evaluators.get(evaluator) if evaluator in self.cfg.evaluators else None
        return entry.metrics if entry is not None else None

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
            per_run = batch["tokens"].ndim == 3  # an evaluation set stacked per run (see _evaluation_sets)
            for suffix, clamps in self.views():
                out = self._eval_fn(clamps, per_run, self.metrics_of(name))(state.params, state.step, state.frozen,
                                                                            state.gates, batch)
                for k, v in out.items():
                    if suffix and suffix != "@unclamped" and k != "loss":
                        continue  # probe clamps log their loss only
                    row[f"{name}{suffix}/{k}"] = v
        host = {k: np.asarray(v).reshape(self.runs) for k, v in jax.device_get(row).items()}
        return [{k: float(v[i]) for k, v in host.items()} for i in range(self.runs)]

    def evaluate(self, state: TrainState) -> dict[str, float]:
        """The evaluators' metrics of a single run's state (as ``run_state`` or a checkpoint holds it); the
        program must train one run."""
        if self.runs != 1:
            raise LabError(f"runs: evaluate() takes one run's state; this program trains {self.runs} (use "
                           "evaluate_runs on the stacked state)")
        return self.evaluate_runs(self.stack([state]) if state.step.ndim == 0 else state)[0]

    def metric_names(self) -> list[str]:
        """The names of the metrics in this run's rows (the evaluators' from shapes alone, a frozen clamp's
        view with a snapshot of the initial parameters; the measures by computing them once there)."""
        params = self.model.params()
        frozen = self.clamps.init_frozen(params) if self.clamps.frozen_names else None
        names = {"train/batch_loss", "train/grad_norm", "train/update_ratio", "train/loss"}
        for name, batch in self.evals.items():
            batch = jax.tree_util.tree_map(lambda a: a[0], batch) if batch["tokens"].ndim == 3 else batch
            for suffix, clamps in self.views():
                keys = jax.eval_shape(lambda p, b, f, c=clamps, m=self.metrics_of(name):
                                      evaluate(self.parts, p, b, frozen=f, clamps=c, metrics=m), params, batch, frozen)
                names |= {f"{name}{suffix}/{k}" for k in keys if suffix in ("", "@unclamped") or k == "loss"}
        names |= set(self.measures(params))
        return sorted(names)

    # ---- memory --------------------------------------------------------------------------------------------
    def check_memory(self, state: TrainState, limit_bytes: float | None = None) -> dict:
        """Compile the step program and refuse it, before anything runs, if it would not fit."""
        need = _program_bytes(self.scan_fn.compile(state))  # the program just compiled is the one that runs
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
