"""The runs layer: R runs' configs as one program.

``Runs(cfgs)`` reads what the runs are -- their task, model, conditions, seeds, learning rates and task data
values -- and builds the parts a ``lab.trainer.Program`` compiles from: the task and model they share, the
union of their clamps (each renamed NAME@CONDITION and switched on per run by ``state.gates`` when the runs
are of several conditions), the parameters of the checkpoints that ``value: reference`` clamps read, the
optimiser (at a run's own rate, ``state.lr``, where rates differ), the measures and the evaluation sets (stacked
per run where the runs' task data differ). It also gives each run its state at step 0 (from its own seed),
stacks runs into the program's state and takes each back out (``run_state``: what a checkpoint holds), and
makes the host loop's ``Plan`` from the config's trainer, checkpoint, tracking and cadence sections.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from lab import plugins
from lab.clamp import ClampSet
from lab.errors import LabError, check
from lab.loop import Plan, schedule
from lab.measures import Measures
from lab.model import Transformer, build_model
from lab.optim import make_optimizer
from lab.rundir import reference_params
from lab.state import TrainState
from lab.tasks import make_task
from lab.trainer import GiB, Parts, Program, evaluation_sets, free_device_bytes, loss


def make_clamps(specs: dict, model, task) -> ClampSet:
    """A clamp set, with the parameters its ``value: reference`` clamps read loaded from their run directories."""
    refs = {n: reference_params(c.reference_dir, c.reference_step, model) for n, c in specs.items()
            if c.value == "reference"}
    return ClampSet(specs, model, task, references=refs)


def plan_of(cfg) -> Plan:
    """The host loop's plan for a run of ``cfg``: its checkpoint, evaluation and picture steps, its adaptive
    cadence's checkpoint policy and what a non-finite step does."""
    tc, cc = cfg.trainer, cfg.checkpoint
    total = tc.steps
    ckpts = frozenset(schedule(total, cc.every, cc.log_points, include_zero=bool(cc.every or cc.log_points)))
    pics = frozenset(s for s in cfg.tracking.attention_at if s not in ckpts) if cfg.tracking.attention_images \
        else frozenset()
    evals = frozenset(schedule(total, tc.eval_every, tc.eval_log_points)) | ckpts | pics  # a picture's step is a row
    return Plan(total=total, checkpoints=ckpts, evaluations=evals, pictures=pics,
                checkpoint_dense=cfg.cadence.checkpoint_dense, skip_nonfinite=tc.on_nonfinite == "skip")


class Runs:
    """R runs that share every shape (one config, or a batch's list of solo configs) and the ``Program`` that
    trains and evaluates them (``program``). Its state holds the R runs stacked on a leading axis
    (``init_state``; ``run_state(state, i)`` is run i's as it would train alone)."""

    def __init__(self, cfgs, task=None, model: Transformer | None = None):
        self.cfgs = list(cfgs) if isinstance(cfgs, (list, tuple)) else [cfgs]
        self.runs = len(self.cfgs)
        cfg = self.cfg = self.cfgs[0]  # what the runs share: trainer, checkpoint, cadence, model, optimiser
        for c in self.cfgs:
            if dataclasses.replace(c.optim, lr=0.0) != dataclasses.replace(cfg.optim, lr=0.0):
                raise LabError(f"optim: batched runs may differ in optim.lr only, got {c.optim} and {cfg.optim}")
        task = task if task is not None else make_task(cfg.task)
        self.task_fields = self._task_fields(task)  # the task fields each run holds as data in its state
        model = model if model is not None else build_model(cfg.model, task, seed=cfg.seed)
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
        clamps = make_clamps(specs, model, task)
        # progress measures by clamp: the current model, as it runs (its own clamps included, as at the step),
        # with one more clamp it was not trained with. A run trained with one active head (Singh's single_head)
        # keeps the others ablated under the probe, as the authors' progress measures do (their Fig. 10 adds
        # the probe clamp to --opto_ablate_heads). A probe named like one of the run's clamps replaces it.
        probes = {name: make_clamps({**specs, name: spec}, model, task) for name, spec in cfg.measures.clamps.items()}
        views = [("", clamps)]
        if clamps and tc.log_unclamped:
            views.append(("@unclamped", None))
        views += [(f"@{name}", cs) for name, cs in probes.items()]

        frozen = model.frozen_mask(model.params())
        any_frozen = any(jax.tree_util.tree_leaves(frozen))
        self.own_lr = len({c.optim.lr for c in self.cfgs}) > 1  # each run's rate is data in its state
        mask = frozen if any_frozen else None
        self.opt = make_optimizer(cfg.optim, tc.steps, mask, lr=None)

        def optimizer(lr):  # the optimiser at a rate: the config's (None), or a run's own (state.lr, traced)
            return self.opt if lr is None else make_optimizer(cfg.optim, tc.steps, mask, lr=lr)

        parts = Parts(task, model, clamps, optimizer, mask, tc.batch_size, tc.steps_per_call,
                      tc.on_nonfinite == "skip", tc.eval_batch_size)
        trainable = jax.tree_util.tree_map(lambda f: not f, frozen)
        measures = Measures(cfg.measures, model, task, loss_fn=partial(loss, parts), batch_size=tc.batch_size,
                            trainable=trainable)
        metrics = {n: plugins.evaluators[n].metrics for n in cfg.evaluators}
        self.program = Program(parts, self.runs, measures, self._evaluation_sets(task), views, metrics)
        self.watch = cfg.watch or task.watch_metric
        self.plan = plan_of(cfg)
        if cfg.watch:  # a typo would otherwise surface only after training, as "no transition detected"
            names = self.program.metric_names()
            if cfg.watch not in names:
                heads = sorted({n.split("/")[0] + "/L{l}H{h}" for n in names if "/L" in n and n[-1].isdigit()})
                shown = [n for n in names if not ("/L" in n and n[-1].isdigit())] + heads
                check(False, "watch", cfg.watch, f"a metric this run logs: {', '.join(shown)}")

    # ---- the program's parts -------------------------------------------------------------------------------
    @property
    def task(self):
        return self.program.task

    @property
    def model(self) -> Transformer:
        return self.program.model

    @property
    def clamps(self) -> ClampSet:
        return self.program.clamps

    @property
    def measures(self) -> Measures:
        return self.program.measures

    @property
    def evals(self) -> dict:
        return self.program.evals

    # ---- the runs of this program ------------------------------------------------------------------------
    def _task_fields(self, task) -> list[str]:
        """The task fields in which the runs differ; only the task's data fields may."""
        base = dataclasses.asdict(self.cfgs[0].task)
        differ = sorted({k for c in self.cfgs for k, v in dataclasses.asdict(c.task).items() if v != base[k]})
        bad = [k for k in differ if k not in task.data_fields]
        if bad:
            raise LabError(f"task.{bad[0]}: batched runs may differ only in the task's data fields "
                           f"({', '.join(task.data_fields) or 'none'}); train other task settings as separate runs")
        return differ

    def _evaluation_sets(self, task) -> dict:
        """The task's evaluation sets and the config's registered evaluators; runs whose tasks differ in data
        fields may differ in them too (an evaluator on the training mixture): those are stacked per run (a
        leading run axis), the others shared."""
        evaluators = self.cfg.evaluators
        evals = evaluation_sets(task, evaluators)
        chosen = self.cfg.trainer.eval_sets
        if chosen is not None:
            for name in chosen:
                check(name in task.evals, "trainer.eval_sets", list(chosen),
                      f"evaluation sets of task {task.cfg.name}: {', '.join(task.evals)}")
            evals = {n: b for n, b in evals.items() if n in chosen or n in evaluators}
        if not self.task_fields:
            return evals
        built: dict[str, dict] = {}  # one task (and its compiled samplers) per distinct task config, not per run
        for c in self.cfgs:
            key = repr(dataclasses.asdict(c.task))
            if key not in built:
                built[key] = evaluation_sets(make_task(c.task), evaluators)
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
        return self.program.shard(jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *full))

    def run_state(self, state: TrainState, i: int) -> TrainState:
        """Run i's state, as a run trained alone would hold it (what its checkpoints store)."""
        one = state.run(i).own()
        if self.gated and one.frozen is not None:  # back to the run's own clamp names
            suffix = f"@{self.cond_of[i]}"
            own = {n[: -len(suffix)]: v for n, v in one.frozen.items() if n.endswith(suffix)}
            one = one.replace(frozen=own or None)
        return one

    def condition(self, i: int) -> str:
        return "+".join(self.cfgs[i].clamps) or "none"

    def run_label(self, i: int) -> str:
        """How an error names run i ("" for a single run)."""
        return f" in run {i} (seed {self.cfgs[i].seed}, {self.condition(i)})" if self.runs > 1 else ""

    def evaluate(self, state: TrainState) -> dict[str, float]:
        """The evaluators' metrics of a single run's own state (as ``run_state`` or a checkpoint holds it)."""
        return self.program.evaluate(self.stack([state]) if state.step.ndim == 0 else state)

    def check_memory(self, state: TrainState, limit_bytes: float | None = None) -> dict:
        """Compile the step program and refuse it, before anything runs, if it would not fit."""
        info = self.program.memory(state)  # the program just compiled is the one that runs
        limit = limit_bytes if limit_bytes is not None else free_device_bytes()
        info["limit_bytes"] = limit
        need, per_run = info["bytes"], info["bytes_per_run"]
        if limit is not None and need > limit:
            has = (f"the limit is trainer.memory_limit_gb={limit / GiB:g}" if limit_bytes is not None
                   else f"{limit / GiB:.2f} GiB is free on {jax.devices()[0].device_kind}")
            raise LabError(f"trainer.seeds: {self.runs} runs need {need / GiB:.2f} GiB ({per_run / GiB:.3f} GiB each) "
                           f"but {has}; at most {int(limit // per_run)} fit")
        return info


