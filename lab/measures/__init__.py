"""Progress measures (docs/science.md §2), logged by name.

Attention measures run inside one jitted program on a fixed probe batch and log one value per
head as ``<measure>/L{l}H{h}``; weight measures (copying, composition, parameter norms) run on
the host from the parameters; registered measures (lab.plugins.register_measure: a user's own)
are functions of (params, model, task), jitted unless registered with ``jit=False``. ``measures.names``
picks them per experiment; ``auto`` gives each task its sensible set (plus the task's
``auto_measures`` and measures registered with ``auto=True``). The trainer, replay and notebooks call
the same functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lab import plugins
from lab.errors import check
from lab.measures import attention as att
from lab.measures import circuits
from lab.measures.llc import LLCSettings, default_nbeta, estimate
from lab.tasks.base import vmap_sequences
from lab.tasks.layouts import copy_layout, length_table

# name -> (function of (pattern, batch, task) -> [head], needs token inputs, needs a classification task)
ATTENTION = {
    "prev_token": (att.previous_token_score, False, False),
    "prefix_matching": (att.prefix_matching_score, True, False),
    "induction_strength": (att.induction_strength, False, True),
    "ila": (att.ila, False, True),
    "tila": (att.tila, False, True),
    "tla": (att.tla, False, True),
    "entropy": (att.entropy, False, False),
}
WEIGHTS = ("copying", "composition", "param_norm", "memory_recall")
SLOW = ("llc",)  # never in `auto`: ask for it by name
ALL = tuple(ATTENTION) + WEIGHTS + SLOW
plugins.measures.reserve((*ALL, "auto", "none"))  # a plug-in named like one of these would never be called


@dataclass
class MeasuresConfig:
    names: list[str] = field(default_factory=lambda: ["auto"])  # auto | none | any of ALL
    probe_size: int = 128  # sequences in the fixed probe batch
    # token tasks: the circuit summary (lab.measures.mechanism) at the end of a run and in replay
    circuit: bool = True
    # progress measure by clamp: the current model's loss on each evaluator with these clamps on,
    # logged as <evaluator>@<name>/loss (mappings of clamp fields, as in `clamps`)
    clamps: dict[str, Any] = field(default_factory=dict)
    # local learning coefficient (`llc` in names): SGLD chains around the current parameters (lab/measures/llc.py)
    llc_sampler: str = "sgld"  # sgld | rmsprop_sgld
    llc_chains: int = 4
    llc_steps: int = 200  # per chain, burn-in included
    llc_burn_in: int | None = None  # steps discarded; default a quarter of llc_steps
    llc_eps: float = 1e-4
    llc_gamma: float = 100.0
    llc_nbeta: float | None = None  # nβ; default devinterp's: b / ln b for the SGLD minibatch of b sequences
    llc_seed: int = 0

    def validate(self) -> None:
        for n in self.names:
            check(n in ALL or n in ("auto", "none") or n in plugins.measures, "measures.names", list(self.names),
                  f"each one of auto, none, {', '.join((*ALL, *plugins.measures.names()))}")
        check(self.probe_size >= 1, "measures.probe_size", self.probe_size, "must be >= 1")
        check(self.llc_nbeta is None or self.llc_nbeta > 0, "measures.llc_nbeta", self.llc_nbeta,
              "must be > 0 or null (devinterp's default)")
        llc_settings(self, 1).validate(LLC_FIELDS)  # the same checks as `lab llc`'s flags, named as config fields


# how a config names each LLC setting (lab.measures.llc.LLCSettings.validate)
LLC_FIELDS = {"sampler": "measures.llc_sampler", "chains": "measures.llc_chains", "steps": "measures.llc_steps",
              "burn_in": "measures.llc_burn_in", "eps": "measures.llc_eps", "gamma": "measures.llc_gamma",
              "nbeta": "measures.llc_nbeta"}


def llc_settings(cfg: MeasuresConfig, batch_size: int) -> LLCSettings:
    """The LLC sampler settings of the measures config, for SGLD minibatches of ``batch_size`` sequences."""
    return LLCSettings(nbeta=cfg.llc_nbeta or default_nbeta(batch_size), sampler=cfg.llc_sampler, eps=cfg.llc_eps,
                       gamma=cfg.llc_gamma, chains=cfg.llc_chains, steps=cfg.llc_steps,
                       burn_in=cfg.llc_steps // 4 if cfg.llc_burn_in is None else cfg.llc_burn_in)


def resolve_names(cfg: MeasuresConfig, task) -> list[str]:
    names = list(cfg.names)
    if "none" in names:
        return []
    if "auto" in names:
        auto = ["prev_token", "entropy", "param_norm"]
        if task.classification:
            auto += ["induction_strength", "ila", "tila", "tla"]
        if not task.feature_dim:
            auto += ["prefix_matching", "copying"]
        auto += list(task.auto_measures)
        auto.append("composition")
        auto += [m.name for m in plugins.measures.values() if m.auto]
        names = [n for n in names if n != "auto"] + [n for n in auto if n not in names]
    usable = []
    for n in names:
        if n in ATTENTION:
            _, tokens_only, cls_only = ATTENTION[n]
            why = ("a task without continuous features" if tokens_only and task.feature_dim else
                   "a classification task" if cls_only and not task.classification else None)
            if why:
                if n in cfg.names:  # asked for by name, not by auto: say so rather than drop it
                    check(False, "measures.names", list(cfg.names), f"{n} needs {why}; task {task.cfg.name} is not")
                continue
        usable.append(n)
    return usable


def repeated_probe(key, n: int, t: int, vocab: int, bos: int | None = None) -> dict:
    """Where prefix matching is measured: random tokens in which one segment (length uniform in
    [2, t // 2]) is copied once, both copies at random offsets, with BOS first where the task has one.

    The layout varies per sequence so that no fixed offset coincides with the induction target: with
    the second half repeating the first, a head that attends t/2 - 1 back by position alone would score
    as an induction head (the fixed layout's layer-0 heads do: ``task.layout=fixed``)."""
    body = t - 1 if bos is not None else t
    table = length_table(list(range(2, max(2, body // 2) + 1)), body // 2 + 1)
    draws = {"tokens": (max(vocab, body),), "length": (), "bars": (body + 2,)}
    x = jax.jit(lambda k: vmap_sequences(lambda u: copy_layout(u, body, vocab, table, -1)[0], k, n, draws))(key)
    x = x[:, 1:]  # the layout's own first slot (its BOS) dropped: the body
    if bos is not None:
        x = jnp.concatenate([jnp.full((n, 1), bos, jnp.int32), x], axis=1)
    return {"tokens": x}


class Measures:
    """The chosen measures of one run, with their probe batch and one jitted program."""

    def __init__(self, cfg: MeasuresConfig, model, task, loss_fn=None, batch_size: int = 64, trainable=None):
        self.cfg, self.model, self.task = cfg, model, task
        self.names = resolve_names(cfg, task)
        self.attn_names = [n for n in self.names if n in ATTENTION]
        n = cfg.probe_size
        self.probe = jax.tree_util.tree_map(lambda a: a[:n], next(iter(task.evals.values())))
        self.token_probe = None
        if any(ATTENTION[m][1] for m in self.attn_names):
            self.token_probe = task.token_probe(jax.random.PRNGKey(7), n)
        self._vector_fns: dict[int, Any] = {}  # runs -> the attention measures of stacked runs as one array
        self.llc_fn = None
        if "llc" in self.names and loss_fn is not None:
            self.llc_settings = llc_settings(cfg, batch_size)

            def llc(params):
                r = estimate(loss_fn, params, lambda k: task.sample(k, batch_size), jax.random.PRNGKey(cfg.llc_seed),
                             self.llc_settings, trainable=trainable)
                return {"llc/mean": r["mean"], "llc/std_err": r["std_err"], "llc/below_start": r["below_start"].mean(),
                        "llc/finite_chains": jnp.sum(jnp.all(jnp.isfinite(r["loss"]), axis=1))}

            self.llc_fn = jax.jit(llc)
        # registered measures: each its own function of the parameters (jitted unless registered jit=False)
        self.plugin_fns = {}
        for name in self.names:
            m = plugins.measures.get(name) if name not in ALL else None
            if m is not None:
                def fn(p, f=m.fn):
                    return f(p, model, task)

                self.plugin_fns[name] = (jax.jit(fn) if m.jit else fn, m.per_head)

    def _attention(self, params, probe, token_probe):
        L = self.model.cfg.n_layers
        sites = [f"blocks.{l}.attn.hook_pattern" for l in range(L)]
        out = {}
        if not self.attn_names:
            return out
        _, cache = self.model.run_with_cache(params, probe, sites)
        tcache = self.model.run_with_cache(params, token_probe, sites)[1] if token_probe is not None else None
        for name in self.attn_names:
            fn, tokens_only, _ = ATTENTION[name]
            src, batch = (tcache, token_probe) if tokens_only else (cache, probe)
            for l in range(L):
                vals = fn(src[sites[l]], batch, self.task)
                for h in range(vals.shape[0]):
                    out[f"{name}/L{l}H{h}"] = vals[h]
        return out

    def _vector_fn(self, runs: int):
        """The attention measures of R runs stacked on a leading axis as one [R, n] array and their n names: one
        program and one copy to the host per stop, however many runs and heads (a copy per value cost more than
        the measures themselves)."""
        if runs not in self._vector_fns:
            names = sorted(jax.eval_shape(self._attention, self.model.params(), self.probe, self.token_probe))

            def vector(params):
                out = self._attention(params, self.probe, self.token_probe)
                return jnp.stack([jnp.asarray(out[n], jnp.float32) for n in names]) if names else jnp.zeros((0,))

            self._vector_fns[runs] = (names, jax.jit(jax.vmap(vector) if runs > 1 else lambda p: vector(p)[None]))
        return self._vector_fns[runs]

    def over_runs(self, params, runs: int) -> list[dict[str, float]]:
        """Every measure of each of R runs whose parameters are stacked on a leading axis, one dict per run."""
        if runs == 1:  # one run's own program, on its parameters sliced on the host side (as lab.trainer.OverRuns)
            return [self(jax.tree_util.tree_map(lambda a: a[0], params))]
        return self._rows(params, runs)

    def __call__(self, params) -> dict[str, float]:
        """Every measure of one run's parameters."""
        return self._rows(params, 1)[0]

    def _rows(self, params, runs: int) -> list[dict[str, float]]:
        names, fn = self._vector_fn(runs)
        values = np.asarray(jax.device_get(fn(params)))
        host = jax.device_get(params) if self._host_measures() else None
        out = []
        for i in range(runs):
            row = {n: float(v) for n, v in zip(names, values[i], strict=True)}
            if host is not None:
                row.update(self._other_measures(host if runs == 1 else jax.tree_util.tree_map(lambda a, i=i: a[i],
                                                                                                host)))
            out.append(row)
        return out

    def _host_measures(self) -> bool:
        return self.llc_fn is not None or any(n in WEIGHTS for n in self.names) or bool(self.plugin_fns)

    def _other_measures(self, params) -> dict[str, float]:
        """The measures that are no attention measure: the LLC, the weight measures and the registered ones."""
        row = {}
        if self.llc_fn is not None:
            row.update({k: float(v) for k, v in jax.device_get(self.llc_fn(params)).items()})
        if any(n in WEIGHTS for n in self.names):
            with np.errstate(over="ignore", invalid="ignore"):  # weights on their way to diverging: inf, not noise
                row.update(self._weight_measures(jax.device_get(params)))
        for name, (fn, per_head) in self.plugin_fns.items():
            row.update(measure_row(name, jax.device_get(fn(params)), per_head, self.model.cfg))
        return row

    def _weight_measures(self, host) -> dict[str, float]:
        """The measures computed on the host from the parameters (numpy)."""
        row = {}
        if "copying" in self.names:
            row.update(circuits.copying_scores(host, self.task.n_outputs))
        if "composition" in self.names:
            row.update(circuits.composition_scores(host))
        if "param_norm" in self.names:
            row.update(circuits.param_norms(host))
        if "memory_recall" in self.names:
            tables = self.task.memory_tables()  # the authors' wk1 runs over the fixed triggers when they are fixed
            trig = tables.get("triggers")
            # ff1 (a feed-forward layer in block 1): the bigram memory, over every token but the fixed triggers
            ff1 = None if trig is None else np.setdiff1d(np.arange(self.task.n_outputs), trig)
            row.update(circuits.memory_recall(host, self.model.consts, self.task.n_outputs, triggers=trig,
                                              bigram=tables.get("bigram_law"), ff1_tokens=ff1,
                                              act_fn=self.model.cfg.act_fn))
        return row


def measure_row(name: str, value, per_head: bool, model_cfg) -> dict[str, float]:
    """A registered measure's value as logged entries: a number as ``name``, a dict as ``name/key``, a
    [n_layers, n_heads] array (``per_head``) as ``name/L{l}H{h}``; anything else is refused in one line."""
    if isinstance(value, dict):
        return {f"{name}/{k}": float(v) for k, v in value.items()}
    arr = np.asarray(value, np.float64)
    if per_head:
        want = (model_cfg.n_layers, model_cfg.n_heads)
        check(arr.shape == want, f"measure {name}", list(arr.shape), f"a per-head measure returns shape {list(want)}")
        return {f"{name}/L{l}H{h}": float(arr[l, h]) for l in range(want[0]) for h in range(want[1])}
    check(arr.ndim == 0, f"measure {name}", list(arr.shape),
          "a number, a dict of numbers, or (registered per_head=True) an [n_layers, n_heads] array")
    return {name: float(arr)}
