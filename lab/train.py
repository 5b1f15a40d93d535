"""The training step and loop.

A run is a pure function of its config and seed. The state is one pytree
``{params, opt_state, step, key}``; the batch of step t is sampled on the device from
``fold_in(key, t)``, so any step can be recomputed, resumed or forked from a checkpoint alone.
``steps_per_call`` steps fuse into one ``lax.scan`` per host call; remainders that a logging or
checkpoint step cuts off run one jitted step at a time, so a run compiles two step programs and
one evaluation program, whatever its cadence.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

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
    log_unclamped: bool = False  # with clamps: also log each evaluator unclamped, as <evaluator>@unclamped/...

    def validate(self) -> None:
        check(self.steps >= 1, "trainer.steps", self.steps, "must be >= 1")
        check(self.batch_size >= 1, "trainer.batch_size", self.batch_size, "must be >= 1")
        check(self.steps_per_call >= 1, "trainer.steps_per_call", self.steps_per_call, "must be >= 1")
        check(self.eval_every >= 0, "trainer.eval_every", self.eval_every, "must be >= 0")
        check(self.eval_log_points >= 0, "trainer.eval_log_points", self.eval_log_points, "must be >= 0")
        check(self.eval_batch_size >= 1, "trainer.eval_batch_size", self.eval_batch_size, "must be >= 1")


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


def masked_nll(logits: jax.Array, batch: dict) -> jax.Array:
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    m = batch["loss_mask"]
    return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)


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
        self.opt = make_optimizer(cfg.optim, tc.steps, frozen if any_frozen else None)
        self.clamps = ClampSet(getattr(cfg, "clamps", None) or {}, self.model, self.task)
        trainable = jax.tree_util.tree_map(lambda f: not f, frozen)
        self.measures = Measures(cfg.measures, self.model, self.task, loss_fn=self.loss, batch_size=tc.batch_size,
                                 trainable=trainable)
        # progress measures by clamp: the current model evaluated with a clamp it was not trained with
        self.probe_clamps = {name: ClampSet({name: spec}, self.model, self.task)
                             for name, spec in cfg.measures.clamps.items()}
        self.watch = cfg.watch or self.task.watch_metric
        self.step_fn = jax.jit(self._step, donate_argnums=0)
        self.scan_fn = jax.jit(self._scan, donate_argnums=0)
        self.eval_fn = jax.jit(self._evaluate, static_argnames="clamps")

    # ---- pure functions ------------------------------------------------------------------
    def init_state(self) -> dict:
        params = self.model.params()
        state = {
            "params": params,
            "opt_state": self.opt.init(params),
            "step": jnp.zeros((), jnp.int32),
            "key": jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed), 1),
        }
        if self.clamps.frozen_names:
            state["frozen"] = self.clamps.init_frozen(params)
        return state

    def batch_at(self, key, step) -> dict:
        return self.task.sample(jax.random.fold_in(key, step), self.batch_size)

    def loss(self, params, batch, hooks: Hooks = NO_HOOKS) -> jax.Array:
        pos = self.task.query_positions if self.task.classification else ()
        if pos and not (hooks.wants("ln_final.hook_normalized") or hooks.wants("logits")):
            # a classification loss counts only at the query: read out there alone
            sel = jnp.asarray(pos)
            picked = {"targets": batch["targets"][:, sel], "loss_mask": batch["loss_mask"][:, sel]}
            return masked_nll(self.model.apply(params, batch, hooks, readout=pos), picked)
        return masked_nll(self.model.apply(params, batch, hooks), batch)

    def clamped_loss(self, params, batch, step, frozen=None) -> jax.Array:
        """The training loss with the run's clamps acting as they do at ``step``."""
        return self.loss(params, batch, self.clamps.hooks(params, batch, step, frozen, training=True))

    def _step(self, state):
        step = state["step"]
        new = dict(state)
        if "frozen" in state:
            new["frozen"] = self.clamps.update_frozen(state["frozen"], state["params"], step)
        batch = self.batch_at(state["key"], step)
        loss, grads = jax.value_and_grad(self.clamped_loss)(state["params"], batch, step, new.get("frozen"))
        updates, opt_state = self.opt.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new.update(params=params, opt_state=opt_state, step=step + 1)
        ratio = optax.global_norm(updates) / jnp.maximum(optax.global_norm(state["params"]), 1e-12)
        return new, {"loss": loss, "grad_norm": optax.global_norm(grads), "update_ratio": ratio}

    def _scan(self, state):
        return jax.lax.scan(lambda s, _: self._step(s), state, None, length=self.chunk)

    def _evaluate(self, params, batch, step=0, frozen=None, clamps: ClampSet | None = None):
        n = batch["tokens"].shape[0]
        c = max(d for d in range(1, min(n, self.cfg.trainer.eval_batch_size) + 1) if n % d == 0)
        chunks = jax.tree_util.tree_map(lambda a: a.reshape(n // c, c, *a.shape[1:]), batch)

        if frozen is not None and clamps is self.clamps:
            # the snapshot a training step at `step` would use (taken when a window opens at `step`)
            frozen = self.clamps.update_frozen(frozen, params, step)

        def fwd(b):
            hooks = clamps.hooks(params, b, step, frozen, training=False) if clamps else NO_HOOKS
            return self.model.apply(params, b, hooks)

        logits = jax.lax.map(fwd, chunks)
        logits = logits.reshape(n, *logits.shape[2:])
        return self.task.metrics(logits, batch)

    # ---- host-side driving ---------------------------------------------------------------
    def advance(self, state, n: int):
        """Run n steps; returns the new state and the per-step losses/grad norms (on device)."""
        outs = []
        while n >= self.chunk:
            state, out = self.scan_fn(state)
            outs.append(out)
            n -= self.chunk
        for _ in range(n):
            state, out = self.step_fn(state)
            outs.append(jax.tree_util.tree_map(lambda a: a[None], out))
        return state, outs

    def evaluate(self, state) -> dict[str, float]:
        """Every evaluator's metrics for a state (clamps acting as at its step, unless eval: false)."""
        row = {}
        views = [("", self.clamps)]
        if self.clamps and self.cfg.trainer.log_unclamped:
            views.append(("@unclamped", None))
        views += [(f"@{name}", cs) for name, cs in self.probe_clamps.items()]
        for name, batch in self.task.evals.items():
            for suffix, clamps in views:
                out = self.eval_fn(state["params"], batch, state["step"], state.get("frozen"), clamps=clamps)
                for k, v in out.items():
                    if suffix and suffix != "@unclamped" and k != "loss":
                        continue  # probe clamps log their loss only
                    row[f"{name}{suffix}/{k}"] = v
        return {k: float(v) for k, v in jax.device_get(row).items()}

    def fit(self, state, log=None, save=None, progress=None, start_time: float | None = None,
            history: list[dict] | None = None) -> dict:
        """Train from ``state["step"]`` to ``trainer.steps``.

        log(row) receives each logged row; save(step, state) is called at checkpoint steps;
        progress(step, row) after each logged row. With ``cadence.adaptive``, rows (and
        checkpoints) come every ``cadence.dense_every`` steps while the watched metric moves.
        ``history``: rows already logged by this run (when resuming), replayed into the cadence so
        the continuation logs exactly where an uninterrupted run would. Returns the final state.
        """
        tc, cc = self.cfg.trainer, self.cfg.checkpoint
        total = tc.steps
        ckpts = set(schedule(total, cc.every, cc.log_points, include_zero=bool(cc.every or cc.log_points)))
        # every checkpoint is also a logged row: a run resumed from any checkpoint then logs exactly the rows
        # of an uninterrupted one, and no state is saved before its losses were checked for NaN
        evals = set(schedule(total, tc.eval_every, tc.eval_log_points)) | ckpts
        cadence = AdaptiveCadence(self.cfg.cadence)
        history = history or []
        for r in history:
            cadence.observe(r["step"], r.get(self.watch, 0.0))
        step = int(state["step"])
        t0 = start_time if start_time is not None else time.perf_counter()
        pending, last_t, last_step = [], time.perf_counter(), step
        if not any(r["step"] == step for r in history) and (step in evals or step > 0):
            row = self._log_row(step, state, [], log, progress, None)  # the start (a fork's first row)
            cadence.observe(step, row.get(self.watch, 0.0))
        if step == 0 and 0 in ckpts and save:
            save(0, state)
        while step < total:
            stop = cadence.next_stop(step, min(s for s in evals | ckpts if s > step))
            dense = stop not in evals and stop not in ckpts
            state, outs = self.advance(state, stop - step)
            pending += outs
            step = stop
            if stop in evals or dense:
                now = time.perf_counter()
                perf = {"perf/steps_per_sec": (step - last_step) / max(now - last_t, 1e-9),
                        "perf/elapsed": now - t0}
                row = self._log_row(step, state, pending, log, progress, perf)
                cadence.observe(step, row.get(self.watch, 0.0))
                pending, last_t, last_step = [], time.perf_counter(), step
            if save and (stop in ckpts or (dense and self.cfg.cadence.checkpoint_dense)):
                save(stop, state)
        return state

    def _log_row(self, step, state, pending, log, progress, perf):
        row = {"step": step}
        if pending:
            losses = jnp.concatenate([o["loss"] for o in pending])
            norms = jnp.concatenate([o["grad_norm"] for o in pending])
            ratios = jnp.concatenate([o["update_ratio"] for o in pending])
            row["train/batch_loss"] = float(jnp.mean(losses))
            row["train/grad_norm"] = float(jnp.mean(norms))
            row["train/update_ratio"] = float(jnp.mean(ratios))
            if not math.isfinite(row["train/batch_loss"]) or not math.isfinite(row["train/grad_norm"]):
                bad = "train/batch_loss" if not math.isfinite(row["train/batch_loss"]) else "train/grad_norm"
                raise NonFiniteError(f"non-finite {bad}={row[bad]} by step {step}; stopping "
                                     "(the last good checkpoint is kept)")
        row.update(self.evaluate(state))
        if "train/loss" not in row and "train/batch_loss" in row:
            row["train/loss"] = row["train/batch_loss"]
        row.update(self.measures(state["params"]))
        if perf:
            row.update(perf)
        if log:
            log(row)
        if progress:
            progress(step, row)
        return row
