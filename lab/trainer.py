"""The training step and loop.

A run is a pure function of its config and seed. The state is one pytree
``{params, opt_state, step, key}``; the batch of step t is sampled on the device from
``fold_in(key, t)``, so any step can be recomputed, resumed or forked from a checkpoint alone.
``steps_per_call`` steps fuse into one ``lax.scan`` per host call; the remainder that a logging or
checkpoint stop cuts off runs as one call of a loop whose length is data, so a stop anywhere costs
at most one extra call and a run compiles two step programs and one evaluation program, whatever its
cadence.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lab import kernels
from lab.clamp import ClampSet
from lab.errors import LabError, check
from lab.hooks import NO_HOOKS, Hooks
from lab.measures import Measures
from lab.measures.cadence import AdaptiveCadence
from lab.model import Transformer, build_model
from lab.optim import make_optimizer
from lab.tasks import make_task


@dataclass
class TrainerConfig:
    steps: int = 2000
    batch_size: int = 64
    steps_per_call: int = 50  # steps fused under lax.scan per host call
    eval_every: int = 100  # evaluate (and log a row) every N steps; 0: only log-spaced and final
    eval_log_points: int = 0  # extra log-spaced evaluations over the run
    eval_batch_size: int = 250  # sequences per forward pass when evaluating
    progress: bool = True  # show a progress bar
    seeds: list[int] | None = None  # several seeds trained as one vmapped program (lab.batch), one run dir each
    num_seeds: int = 1  # shorthand: seeds seed, seed+1, ..., seed+num_seeds-1
    memory_limit_gb: float | None = None  # refuse batches of runs needing more (default: the device's free memory)
    on_nonfinite: str = "stop"  # a non-finite loss or gradient: stop (keep the last good checkpoint) | skip the step
    log_unclamped: bool = False  # with clamps: also log each evaluator unclamped, as <evaluator>@unclamped/...

    def validate(self) -> None:
        check(self.steps >= 1, "trainer.steps", self.steps, "must be >= 1")
        check(self.batch_size >= 1, "trainer.batch_size", self.batch_size, "must be >= 1")
        check(self.steps_per_call >= 1, "trainer.steps_per_call", self.steps_per_call, "must be >= 1")
        check(self.eval_every >= 0, "trainer.eval_every", self.eval_every, "must be >= 0")
        check(self.eval_log_points >= 0, "trainer.eval_log_points", self.eval_log_points, "must be >= 0")
        check(self.eval_batch_size >= 1, "trainer.eval_batch_size", self.eval_batch_size, "must be >= 1")
        check(self.num_seeds >= 1, "trainer.num_seeds", self.num_seeds, "must be >= 1")
        check(self.on_nonfinite in ("stop", "skip"), "trainer.on_nonfinite", self.on_nonfinite, "one of stop, skip")
        if self.seeds is not None:
            check(len(self.seeds) >= 1 and all(int(x) >= 0 for x in self.seeds), "trainer.seeds", self.seeds,
                  "a non-empty list of seeds >= 0")
            check(len(set(self.seeds)) == len(self.seeds), "trainer.seeds", self.seeds, "seeds must be distinct")
            check(self.num_seeds == 1, "trainer.num_seeds", self.num_seeds,
                  "give trainer.seeds or trainer.num_seeds, not both")
        if self.memory_limit_gb is not None:
            check(self.memory_limit_gb > 0, "trainer.memory_limit_gb", self.memory_limit_gb, "must be > 0")


class NonFiniteError(LabError):
    exit_code = 1


def schedule(total: int, every: int, log_points: int, include_zero: bool = True) -> list[int]:
    """Steps in [0, total]: multiples of ``every``, ``log_points`` log-spaced steps, and the end."""
    s = {total}
    if include_zero:
        s.add(0)
    if every:
        s.update(range(every, total + 1, every))
    if log_points:
        s.update(int(round(v)) for v in np.geomspace(1, total, log_points))
    return sorted(x for x in s if 0 <= x <= total)


def _to_host_soon(tree):
    """Start copying a call's per-step outputs to the host as soon as the call ends (on an accelerator the
    copy then overlaps the next call instead of stalling the logging stop that reads them)."""
    for leaf in jax.tree_util.tree_leaves(tree):
        leaf.copy_to_host_async()
    return tree


def masked_nll(logits: jax.Array, batch: dict) -> jax.Array:
    """The training loss: mean cross-entropy over the batch's ``loss_mask``."""
    return kernels.masked_nll(logits.astype(jnp.float32), batch["targets"], batch["loss_mask"])


class Trainer:
    """Owns the jitted step, scan and evaluation programs for one (task, model, optimiser)."""

    def __init__(self, cfg, task=None, model: Transformer | None = None):
        self.cfg = cfg
        self.task = task if task is not None else make_task(cfg.task)
        self.model = model if model is not None else build_model(cfg.model, self.task, seed=cfg.seed)
        tc = cfg.trainer
        self.batch_size, self.chunk = tc.batch_size, tc.steps_per_call
        frozen = self.model.frozen_mask(self.model.params())
        any_frozen = any(jax.tree_util.tree_leaves(frozen))
        # the optimiser at a rate: cfg's (None), or a batched run's own (state["lr"], traced)
        self.opt_at = lambda lr: make_optimizer(cfg.optim, tc.steps, frozen if any_frozen else None, lr=lr)
        self.frozen = frozen if any_frozen else None  # model.freeze: the step computes no gradient for these
        self.opt = self.opt_at(None)
        self.clamps = ClampSet(getattr(cfg, "clamps", None) or {}, self.model, self.task)
        trainable = jax.tree_util.tree_map(lambda f: not f, frozen)
        self.measures = Measures(cfg.measures, self.model, self.task, loss_fn=self.loss, batch_size=tc.batch_size,
                                 trainable=trainable)
        # progress measures by clamp: the current model, as it runs (its own clamps included, as at the step),
        # with one more clamp it was not trained with. A run trained with one active head (Singh's single_head)
        # keeps the others ablated under the probe, as the authors' progress measures do (their Fig. 10 adds
        # the probe clamp to --opto_ablate_heads). A probe named like one of the run's clamps replaces it.
        run_specs = dict(getattr(cfg, "clamps", None) or {})
        self.probe_clamps = {name: ClampSet({**run_specs, name: spec}, self.model, self.task)
                             for name, spec in cfg.measures.clamps.items()}
        self.watch = cfg.watch or self.task.watch_metric
        self.scan_fn = jax.jit(self._scan, donate_argnums=0)  # steps_per_call steps
        self.run_fn = jax.jit(self._run, donate_argnums=0)  # (state, n < steps_per_call): a remainder, one call
        self.step_fn = jax.jit(self._step, donate_argnums=0)  # one step (tests, FLOP counts)
        self.eval_fn = jax.jit(self._evaluate, static_argnames="clamps")
        self.finite_fn = jax.jit(self._finite)  # per run: are all parameters finite
        if cfg.watch:  # a typo would otherwise surface only after training, as "no transition detected"
            names = self.metric_names()
            if cfg.watch not in names:
                heads = sorted({n.split("/")[0] + "/L{l}H{h}" for n in names if "/L" in n and n[-1].isdigit()})
                shown = [n for n in names if not ("/L" in n and n[-1].isdigit())] + heads
                check(False, "watch", cfg.watch, f"a metric this run logs: {', '.join(shown)}")

    # ---- pure functions ------------------------------------------------------------------
    def init_state(self, params: dict | None = None, seed: int | None = None) -> dict:
        """The state at step 0 (this run's, or the one a run with ``seed`` and initial ``params`` starts from)."""
        params = self.model.params() if params is None else params
        seed = self.cfg.seed if seed is None else seed
        state = {
            "params": params,
            "opt_state": self.opt.init(params),
            "step": jnp.zeros((), jnp.int32),
            "key": jax.random.fold_in(jax.random.PRNGKey(seed), 1),
        }
        if self.clamps.frozen_names:
            state["frozen"] = self.clamps.init_frozen(params)
        return state

    def batch_at(self, key, step, data: dict | None = None) -> dict:
        """The training batch of ``step``; ``data``: the task's data fields of a batched run (traced)."""
        k = jax.random.fold_in(key, step)
        if data is None:
            return self.task.sample(k, self.batch_size)
        return self.task.sample(k, self.batch_size, data=data)

    def loss(self, params, batch, hooks: Hooks = NO_HOOKS) -> jax.Array:
        pos = self.task.query_positions if self.task.classification else ()
        if pos and not (hooks.wants("ln_final.hook_normalized") or hooks.wants("logits")):
            # a classification loss counts only at the query: read out there alone
            sel = jnp.asarray(pos)
            picked = {"targets": batch["targets"][:, sel], "loss_mask": batch["loss_mask"][:, sel]}
            return masked_nll(self.model.apply(params, batch, hooks, readout=pos), picked)
        return masked_nll(self.model.apply(params, batch, hooks), batch)

    def clamped_loss(self, params, batch, step, frozen=None, gates=None) -> jax.Array:
        """The training loss with the run's clamps acting as they do at ``step``."""
        return self.loss(params, batch, self.clamps.hooks(params, batch, step, frozen, training=True, gates=gates))

    def _step(self, state):
        step = state["step"]
        new = dict(state)
        if "frozen" in state:
            new["frozen"] = self.clamps.update_frozen(state["frozen"], state["params"], step)
        batch = self.batch_at(state["key"], step, state.get("task"))

        def loss_fn(params):
            if self.frozen is not None:  # frozen weights' gradients (matmuls as large as the forward's) never computed
                params = jax.tree_util.tree_map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, self.frozen)
            return self.clamped_loss(params, batch, step, new.get("frozen"), state.get("gates"))

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        opt = self.opt if "lr" not in state else self.opt_at(state["lr"])
        updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        gnorm = optax.global_norm(grads)
        ratio = optax.global_norm(updates) / jnp.maximum(optax.global_norm(state["params"]), 1e-12)
        out = {"loss": loss, "grad_norm": gnorm, "update_ratio": ratio}
        if self.cfg.trainer.on_nonfinite == "skip":  # a non-finite step leaves parameters and optimiser as they were
            ok = jnp.isfinite(loss) & jnp.isfinite(gnorm) & jnp.isfinite(ratio)
            keep = lambda a, b: jnp.where(ok, a, b)  # noqa: E731
            params = jax.tree_util.tree_map(keep, params, state["params"])
            opt_state = jax.tree_util.tree_map(keep, opt_state, state["opt_state"])
            out["skipped"] = (~ok).astype(jnp.float32)
        new.update(params=params, opt_state=opt_state, step=step + 1)
        return new, out

    def metric_names(self) -> list[str]:
        """The names of the metrics in this run's rows (the evaluators' from shapes alone, a frozen clamp's
        view with a snapshot of the initial parameters; the measures by computing them once there)."""
        params = self.model.params()
        frozen = self.clamps.init_frozen(params) if self.clamps.frozen_names else None
        names = {"train/batch_loss", "train/grad_norm", "train/update_ratio", "train/loss"}
        for name, batch in self.task.evals.items():
            for suffix, clamps in self._views():
                keys = jax.eval_shape(lambda p, b, f, c=clamps: self._evaluate(p, b, frozen=f, clamps=c),
                                      params, batch, frozen)
                names |= {f"{name}{suffix}/{k}" for k in keys if suffix in ("", "@unclamped") or k == "loss"}
        names |= set(self.measures(params))
        return sorted(names)

    def _finite(self, params) -> jax.Array:
        lead = 1 if self.runs else 0  # a BatchTrainer's parameters carry the run axis first
        leaves = jax.tree_util.tree_leaves(params)
        return jnp.stack([jnp.all(jnp.isfinite(x), axis=tuple(range(lead, x.ndim))) for x in leaves]).all(0)

    def _scan(self, state):
        return jax.lax.scan(lambda s, _: self._step(s), state, None, length=self.chunk)

    def _run(self, state, n):
        """``n`` steps (traced, at most ``self.chunk``) and each step's outputs in [chunk] buffers (the first n
        filled; time axis last)."""
        shapes = jax.eval_shape(self._step, state)[1]
        bufs = jax.tree_util.tree_map(lambda o: jnp.zeros((self.chunk, *o.shape), o.dtype), shapes)

        def body(i, carry):
            st, b = carry
            st, out = self._step(st)
            return st, jax.tree_util.tree_map(lambda buf, o: buf.at[i].set(o), b, out)

        state, bufs = jax.lax.fori_loop(0, n, body, (state, bufs))
        return state, jax.tree_util.tree_map(lambda b: jnp.moveaxis(b, 0, -1), bufs)

    def _evaluate(self, params, batch, step=0, frozen=None, clamps: ClampSet | None = None, gates=None):
        n = batch["tokens"].shape[0]
        c = max(d for d in range(1, min(n, self.cfg.trainer.eval_batch_size) + 1) if n % d == 0)
        chunks = jax.tree_util.tree_map(lambda a: a.reshape(n // c, c, *a.shape[1:]), batch)

        if frozen is not None and clamps:
            # the snapshot a training step at `step` would use (taken when a window opens at `step`); probe
            # views hold the run's clamps too, so they use the same snapshot
            frozen = self.clamps.update_frozen(frozen, params, step)

        def fwd(b):
            hooks = clamps.hooks(params, b, step, frozen, training=False, gates=gates) if clamps else NO_HOOKS
            return self.model.apply(params, b, hooks)

        logits = jax.lax.map(fwd, chunks)
        logits = logits.reshape(n, *logits.shape[2:])
        return self.task.metrics(logits, batch)

    # ---- host-side driving ---------------------------------------------------------------
    runs: int | None = None  # None: the state holds one run; a BatchTrainer stacks `runs` of them

    def advance(self, state, n: int):
        """Run n steps; returns the new state and, per host call, (the per-step losses/grad norms in buffers on
        the device, time axis last; how many of their entries the call filled)."""
        outs = []
        while n >= self.chunk:  # the scan is a few per cent faster per step than the loop of data length
            state, out = self.scan_fn(state)
            outs.append((_to_host_soon(out), self.chunk))
            n -= self.chunk
        if n:
            state, out = self.run_fn(state, n)
            outs.append((_to_host_soon(out), n))
        return state, outs

    def _views(self):
        """(suffix, clamps) of each evaluation: as trained, unclamped (if asked), and each probe clamp."""
        views = [("", self.clamps)]
        if self.clamps and self.cfg.trainer.log_unclamped:
            views.append(("@unclamped", None))
        return views + [(f"@{name}", cs) for name, cs in self.probe_clamps.items()]

    def _eval_call(self, clamps, state, batch):
        return self.eval_fn(state["params"], batch, state["step"], state.get("frozen"), clamps=clamps,
                            gates=state.get("gates"))

    def evaluate_runs(self, state) -> list[dict[str, float]]:
        """Every evaluator's metrics (clamps acting as at the step, unless eval: false), one dict per run."""
        row = {}
        for name, batch in self.task.evals.items():
            for suffix, clamps in self._views():
                out = self._eval_call(clamps, state, batch)
                for k, v in out.items():
                    if suffix and suffix != "@unclamped" and k != "loss":
                        continue  # probe clamps log their loss only
                    row[f"{name}{suffix}/{k}"] = v
        host = {k: np.asarray(v).reshape(-1) for k, v in jax.device_get(row).items()}
        return [{k: float(v[i]) for k, v in host.items()} for i in range(self.runs or 1)]

    def evaluate(self, state) -> dict[str, float]:
        return self.evaluate_runs(state)[0]

    def measure_runs(self, state, which: list[int]) -> list[dict[str, float]]:
        return [self.measures(state["params"])]

    def current_step(self, state) -> int:
        return int(state["step"])

    def run_state(self, state, i: int) -> dict:
        """Run i's state, as a run trained alone would hold it (what its checkpoints store)."""
        return state

    def run_label(self, i: int) -> str:
        return ""

    def fit(self, state, log=None, save=None, progress=None, start_time: float | None = None,
            history: list[dict] | None = None) -> dict:
        """Train from ``state["step"]`` to ``trainer.steps``.

        log(row) receives each logged row; save(step, state) is called at checkpoint steps;
        progress(step, row) after each logged row. With ``cadence.adaptive``, rows (and
        checkpoints) come every ``cadence.dense_every`` steps while the watched metric moves.
        ``history``: rows already logged by this run (when resuming), replayed into the cadence so
        the continuation logs exactly where an uninterrupted run would. Returns the final state.
        """
        return self.drive(state, [log], [save], progress, start_time, [history or []])

    def drive(self, state, logs: list, saves: list, progress=None, start_time: float | None = None,
              histories: list[list[dict]] | None = None) -> dict:
        """``fit`` for R = len(logs) runs held in one state (one run, or R stacked by a BatchTrainer).

        Each run logs and checkpoints exactly where it would alone: its own adaptive cadence plans its
        stops, the program advances to the nearest planned stop of any run, and only the runs that planned
        that stop log there."""
        tc, cc = self.cfg.trainer, self.cfg.checkpoint
        total, n_runs = tc.steps, len(logs)
        histories = histories or [[] for _ in range(n_runs)]
        ckpts = set(schedule(total, cc.every, cc.log_points, include_zero=bool(cc.every or cc.log_points)))
        # every checkpoint is also a logged row: a run resumed from any checkpoint then logs exactly the rows
        # of an uninterrupted one, and no state is saved before its losses were checked for NaN
        evals = set(schedule(total, tc.eval_every, tc.eval_log_points)) | ckpts
        cadences = [AdaptiveCadence(self.cfg.cadence) for _ in range(n_runs)]
        for cad, hist in zip(cadences, histories, strict=True):
            for r in hist:
                cad.observe(r["step"], r.get(self.watch, 0.0))
        step = self.current_step(state)
        t0 = start_time if start_time is not None else time.perf_counter()
        last = [step] * n_runs  # the step of each run's latest row
        pending: list[tuple[int, dict]] = []  # (end step, per-step outputs) not yet logged by every run
        last_t, last_step = time.perf_counter(), step

        def log_rows(due, perf):
            rows = self._rows(step, state, due, pending, last, perf)
            for i, row in zip(due, rows, strict=True):
                cadences[i].observe(step, row.get(self.watch, 0.0))
                if logs[i]:
                    logs[i](row)
                last[i] = step
            if progress and rows:
                progress(step, rows[0])

        first = [i for i in range(n_runs) if not any(r["step"] == step for r in histories[i])]
        if first and (step in evals or step > 0):
            log_rows(first, None)  # the start (a fork's first row)
        if step == 0 and 0 in ckpts:
            for i, sv in enumerate(saves):
                if sv:
                    sv(0, self.run_state(state, i))
        planned: list[int | None] = [None] * n_runs
        while step < total:
            nxt = min(s for s in evals if s > step)
            planned = [p if p is not None and p > step else cad.next_stop(step, nxt)
                       for p, cad in zip(planned, cadences, strict=True)]
            stop = min(planned)
            state, outs = self.advance(state, stop - step)
            pending.append((stop, outs))
            step = stop
            due = [i for i in range(n_runs) if planned[i] == stop]
            jax.block_until_ready(state["step"])  # dispatch is asynchronous: time the steps, not their queueing
            now = time.perf_counter()
            log_rows(due, {"perf/steps_per_sec": (step - last_step) / max(now - last_t, 1e-9),
                           "perf/elapsed": now - t0})
            last_t, last_step = time.perf_counter(), step
            dense = stop not in evals
            for i in due:
                planned[i] = None
                if saves[i] and (stop in ckpts or (dense and self.cfg.cadence.checkpoint_dense)):
                    saves[i](stop, self.run_state(state, i))
            pending = [(e, o) for e, o in pending if e > min(last)]
        return state

    def _nonfinite_message(self, per_step, i, s0, step, skip) -> str:
        """Name the first step whose loss or gradient norm was not finite, and what was."""
        host = {k: np.asarray(v).reshape(self.runs or 1, -1)[i] for k, v in per_step.items()}
        if skip:
            return (f"every step from {s0} to {step - 1} was non-finite and skipped{self.run_label(i)}; stopping "
                    "(the last good checkpoint is kept)")
        for j in range(host["loss"].shape[0]):
            for k, name in (("loss", "loss"), ("grad_norm", "gradient norm"), ("update_ratio", "update")):
                if not math.isfinite(float(host[k][j])):
                    return (f"non-finite {name}={float(host[k][j])} at step {s0 + j}{self.run_label(i)}; stopping "
                            "(the last good checkpoint is kept; trainer.on_nonfinite=skip skips such steps)")
        return f"non-finite training statistics by step {step}{self.run_label(i)}; stopping"

    def _rows(self, step, state, due, pending, last, perf) -> list[dict]:
        rows = {i: {"step": step} for i in due}
        since: dict[int, list[int]] = {}
        for i in due:
            since.setdefault(last[i], []).append(i)
        names = {"loss": "train/batch_loss", "grad_norm": "train/grad_norm", "update_ratio": "train/update_ratio"}
        skip = self.cfg.trainer.on_nonfinite == "skip"
        for s0, idx in since.items():
            outs = [o for e, ch in pending if e > s0 for o in ch]
            if not outs:
                continue
            host = jax.device_get([buf for buf, _ in outs])  # each call's buffers hold n filled steps
            per_step = {k: np.concatenate([np.asarray(h[k], np.float64)[..., :n] for h, (_, n) in zip(host, outs,
                                                                                                    strict=True)],
                                          axis=-1) for k in host[0]}
            if skip:  # means over the steps that were taken; count the skipped ones
                took = per_step["skipped"] == 0
                with np.errstate(invalid="ignore", divide="ignore"):
                    stats = {names[k]: np.sum(np.where(took, per_step[k], 0.0), -1) / np.sum(took, -1) for k in names}
                stats["train/skipped_steps"] = np.sum(per_step["skipped"], -1)
            else:
                stats = {names[k]: np.mean(per_step[k], axis=-1) for k in names}
            for i in idx:
                for k, v in stats.items():
                    rows[i][k] = float(np.asarray(v).reshape(-1)[i])
                if not all(math.isfinite(rows[i][k]) for k in ("train/batch_loss", "train/grad_norm",
                                                               "train/update_ratio")):
                    raise NonFiniteError(self._nonfinite_message(per_step, i, s0, step, skip))
        # a finite loss, gradient and update can still overflow the parameters they are added to: nothing
        # (evaluators, measures, checkpoints) reads non-finite parameters
        finite = np.asarray(self.finite_fn(state["params"])).reshape(-1)
        for i in due:
            if not finite[i]:
                raise NonFiniteError(f"non-finite parameters by step {step}{self.run_label(i)}; stopping (the last "
                                     "good checkpoint is kept; lower optim.lr or set optim.clip_norm)")
        evals = self.evaluate_runs(state)
        measures = self.measure_runs(state, due)
        out = []
        for i, ms in zip(due, measures, strict=True):
            row = rows[i]
            row.update(evals[i])
            if "train/loss" not in row and "train/batch_loss" in row:
                row["train/loss"] = row["train/batch_loss"]
            row.update(ms)
            if perf:
                row.update(perf)
            out.append(row)
        return out
