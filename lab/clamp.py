"""Artificial optogenetics: clamp any named activation, for any window of training.

A clamp overwrites part of a site element by element,

    x <- where(mask, (1 - s·on(step)) · x + s·on(step) · v, x)

where ``mask`` selects heads and query/key positions, ``v`` comes from a value source, ``s`` is
the strength and ``on(step)`` is 1 inside the clamp's windows. Everything a clamp needs is data
traced into the step, so a window opening or closing never recompiles. With ``gradient: stop``
(the default) nothing flows into what the clamp replaced; with ``through``, gradient flows into
sources computed from the model (``mean``, ``frozen``... and the un-replaced share when s < 1).

Value sources (docs/science.md §3):
- ``zero``, ``constant`` (``constant`` field), ``mean`` (over the batch);
- ``previous_embed`` (residual-width sites such as ``blocks.0.hook_attn_out``, and the split inputs
  ``blocks.L.hook_q_input|hook_k_input|hook_v_input``): the embedding of the previous position (zero
  at position 0). On a split input it gives a head's queries or keys (or values) a stream of their
  own: Singh's layer-1-input clamp feeds layer 1's keys and queries the previous position's embedding
  and its values the plain embeddings (configs/clamp/layer0.yaml);
- attention patterns (``hook_pattern`` sites only): ``previous_token``, ``induction`` (token tasks:
  attend to the token after an earlier occurrence of the current token; classification tasks: at
  the query, weight ``induction_strength`` on the matching label(s), the rest on the other labels),
  ``uniform``, ``self``, ``first``;
- ``ablate``: zero the selected heads of a ``hook_v``/``hook_z``/``hook_result`` site, optionally
  preserving the later layers' patterns (``preserve: patterns``) or values (``preserve: values``)
  as an unmodified pass computes them;
- ``perfect_copy`` (``hook_pattern`` site): the head's attention on the context tokens becomes the
  output distribution at the selected query positions (logits = log of the attention mass per token);
- ``reference``: what another run's checkpoint (``reference_dir``, ``reference_step``) computes at
  this site on the same batch;
- ``frozen``: what this run's own parameters as they were when the clamp's window opened compute on
  the current batch: part of the circuit frozen mid-training while the rest learns;
- any value registered with ``lab.register_clamp_value(name, fn)`` (lab/plugins.py): ``fn(x, inputs)``
  with ``inputs`` a ``ClampInputs`` (batch, params, the spec and its ``args``, task, model). ``zero``,
  ``constant`` and ``mean`` are registered this way too: a user's value takes the same path.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lab import plugins
from lab.errors import LabError, check
from lab.hooks import Hooks
from lab.measures.attention import induction_targets

# the values with machinery of their own (extra forward passes, shared embeddings, other sites); the rest
# (zero, constant, mean, and a user's) are registered clamp values, functions of the activation
VALUES = ("previous_embed", "previous_token", "induction", "uniform", "self", "first",
          "ablate", "perfect_copy", "reference", "frozen")
PATTERN_VALUES = ("previous_token", "induction", "uniform", "self", "first", "perfect_copy")
POSITION_WORDS = ("all", "last", "query", "labels", "items")
# residual-width sites, the split inputs ([pos, head, d_model]) included: where previous_embed can go
SPLIT_INPUTS = ("hook_q_input", "hook_k_input", "hook_v_input")
# values that act alike on every head's copy of a split input (a user's value might not: it is given every copy)
HEAD_BLIND = ("previous_embed", "zero", "constant", "mean")
RESIDUAL_WIDE = ("hook_attn_out", "hook_resid_pre", "hook_resid_post", "hook_q_input", "hook_k_input", "hook_v_input")
plugins.clamp_values.reserve(VALUES)  # a plug-in named like one of these would never be called


@dataclass
class ClampConfig:
    site: str = "blocks.0.attn.hook_pattern"  # TransformerLens site name; globs allowed
    heads: list[int] | None = None  # heads to clamp (sites with a head axis); null: all
    query: str = "all"  # positions (query axis): all | last | query | labels | items | "0,3,5" | a slice "1:-1"
    key: str = "all"  # key positions of attention sites, same words
    value: str = "zero"
    constant: float = 0.0  # value=constant
    induction_strength: float = 1.0  # value=induction on classification tasks: Singh's s
    strength: float = 1.0  # x <- (1 - strength) x + strength v
    gradient: str = "stop"  # stop | through
    windows: list[list[int]] = field(default_factory=list)  # [[start, stop), ...]; empty: always on
    eval: bool = True  # also clamp in evaluation
    preserve: str = "none"  # value=ablate: none | patterns | values
    reference_dir: str | None = None  # value=reference: a run directory
    reference_step: int | None = None  # value=reference: a checkpoint step of that run (default: latest)
    args: dict[str, Any] = field(default_factory=dict)  # a registered value's own settings (ClampInputs.spec.args)


@dataclass(frozen=True)
class ClampInputs:
    """What a registered clamp value reads besides the activation: the forward pass's batch and parameters,
    the clamp's spec (its ``args`` hold the value's own settings), the task and the model."""

    batch: dict
    params: Any
    spec: ClampConfig
    task: Any
    model: Any


def _zero(x, inputs: ClampInputs):
    return jnp.zeros_like(x)


def _constant(x, inputs: ClampInputs):
    return jnp.full_like(x, inputs.spec.constant)


def _mean(x, inputs: ClampInputs):
    """The mean over the batch (of this batch's sequences, position by position)."""
    return jnp.broadcast_to(jnp.mean(x, axis=0, keepdims=True), x.shape)


plugins.register_clamp_value("zero", _zero)
plugins.register_clamp_value("constant", _constant)
plugins.register_clamp_value("mean", _mean)


def _field(name, f):
    return f"clamps.{name}.{f}"


def validate_spec(name: str, c: ClampConfig) -> None:
    check(c.value in VALUES or c.value in plugins.clamp_values, _field(name, "value"), c.value,
          f"one of {', '.join((*plugins.clamp_values.names(), *VALUES))}")
    check(0.0 <= c.strength <= 1.0, _field(name, "strength"), c.strength, "must be in [0, 1]")
    check(0.0 <= c.induction_strength <= 1.0, _field(name, "induction_strength"), c.induction_strength,
          "must be in [0, 1]")
    check(c.gradient in ("stop", "through"), _field(name, "gradient"), c.gradient, "one of stop, through")
    check(c.preserve in ("none", "patterns", "values"), _field(name, "preserve"), c.preserve,
          "one of none, patterns, values")
    for w in c.windows:
        check(len(w) == 2 and w[0] >= 0 and (w[1] < 0 or w[1] > w[0]), _field(name, "windows"), list(c.windows),
              "a list of [start, stop] pairs with 0 <= start < stop (stop -1: to the end)")
    if c.value == "reference":
        check(c.reference_dir is not None, _field(name, "reference_dir"), c.reference_dir,
              "a run directory is needed for value=reference")


def _positions(sel: str, n: int, task, fld: str) -> np.ndarray:
    """Boolean [n] of the positions a selection names."""
    sel = str(sel).strip()
    out = np.zeros(n, bool)
    if sel == "all":
        out[:] = True
    elif sel == "last":
        out[-1] = True
    elif sel in ("query", "labels", "items"):
        pos = {"query": task.query_positions, "labels": task.label_positions, "items": task.item_positions}[sel]
        check(len(pos) > 0, fld, sel, f"the task {task.cfg.name} has no {sel} positions; use all, last or indices")
        out[list(pos)] = True
    elif ":" in sel:  # a Python slice, e.g. 1:-1 (every position but the first and the last)
        try:
            out[slice(*[int(t) if t.strip() else None for t in sel.split(":")])] = True
        except (ValueError, TypeError):
            raise LabError(f"{fld}={sel!r}: one of {', '.join(POSITION_WORDS)}, comma-separated indices or a "
                           "slice such as 1:-1") from None
        check(out.any(), fld, sel, f"selects no position of {n}")
    else:
        try:
            idx = [int(t) for t in sel.replace(" ", "").split(",") if t != ""]
        except ValueError:
            raise LabError(f"{fld}={sel!r}: one of {', '.join(POSITION_WORDS)}, comma-separated indices or a "
                           "slice such as 1:-1") from None
        for i in idx:
            check(-n <= i < n, fld, sel, f"indices must be in [0, {n})")
        out[idx] = True
    return out


class _Clamp:
    """One resolved clamp on one site."""

    def __init__(self, name: str, c: ClampConfig, site: str, shape: tuple, model, task):
        self.name, self.c, self.site = name, c, site
        cfg = model.cfg
        self.layer = int(site.split(".")[1]) if site.startswith("blocks.") else None
        kind = site.split(".")[-1]
        self.is_pattern = kind == "hook_pattern"
        if c.value in PATTERN_VALUES:
            check(self.is_pattern, _field(name, "site"), site, f"value={c.value} needs an attention pattern site "
                  "(blocks.L.attn.hook_pattern)")
        if c.value == "ablate":
            check(kind in ("hook_v", "hook_z", "hook_result"), _field(name, "site"), site,
                  "value=ablate needs a blocks.L.attn.hook_v, hook_z or hook_result site")
        if c.value == "previous_embed":
            check(kind in RESIDUAL_WIDE and shape[-1] == cfg.d_model, _field(name, "site"), site,
                  "value=previous_embed needs a blocks.L.hook_attn_out, hook_resid_pre, hook_resid_post or "
                  "hook_q_input/hook_k_input/hook_v_input site")
        plugin = plugins.clamp_values.get(c.value) if c.value not in VALUES else None
        if plugin is not None and plugin.sites is not None:
            check(kind in plugin.sites, _field(name, "site"), site,
                  f"value={c.value} (package {plugin.package}) acts on {', '.join(plugin.sites)} sites only")
        self.plugin = plugin
        if c.value == "perfect_copy":
            check(c.heads is not None and len(c.heads) == 1, _field(name, "heads"), c.heads,
                  "value=perfect_copy needs exactly one head")
        # axes (without batch): which is heads, which is query/pos, which is key
        if kind in ("hook_pattern", "hook_attn_scores"):
            axes = {"head": 0, "query": 1, "key": 2}
        elif kind in ("hook_q", "hook_k", "hook_v", "hook_z", "hook_result", "hook_rot_q", "hook_rot_k", "hook_q_input",
                      "hook_k_input", "hook_v_input"):
            axes = {"query": 0, "head": 1}
        else:
            axes = {"query": 0}
        mask = np.ones(shape, bool)
        if c.heads is not None:
            check("head" in axes, _field(name, "heads"), list(c.heads), f"site {site} has no head axis; use null")
            n_heads = shape[axes["head"]]
            for h in c.heads:
                check(0 <= h < n_heads, _field(name, "heads"), list(c.heads),
                      f"heads of {site} are 0..{n_heads - 1}")
            sel = np.zeros(n_heads, bool)
            sel[list(c.heads)] = True
            mask &= _expand(sel, axes["head"], len(shape))
        q = _positions(c.query, shape[axes["query"]], task, _field(name, "query"))
        mask &= _expand(q, axes["query"], len(shape))
        if c.key != "all":
            check("key" in axes, _field(name, "key"), c.key, f"site {site} has no key axis; use all")
        if "key" in axes:
            mask &= _expand(_positions(c.key, shape[axes["key"]], task, _field(name, "key")), axes["key"], len(shape))
        self.mask = jnp.asarray(mask)
        self.query_axis = axes["query"]
        # a split input clamped alike on every head (every head selected, a value that does not depend on the
        # head) can be computed as one copy of the stream instead of n_heads (lab.hooks.Hooks.head_uniform)
        self.head_uniform = (kind in SPLIT_INPUTS and c.value in HEAD_BLIND
                             and bool((mask == mask[:, :1]).all()))
        w = np.array([[a, b if b >= 0 else np.iinfo(np.int32).max] for a, b in c.windows], np.int32).reshape(-1, 2)
        self.windows = jnp.asarray(w)
        self.always = len(c.windows) == 0
        self.starts = tuple(int(a) for a, _ in c.windows)

    def on(self, step) -> jax.Array:
        if self.always:
            return jnp.ones((), jnp.float32)
        s = jnp.asarray(step, jnp.int32)
        return jnp.any((self.windows[:, 0] <= s) & (s < self.windows[:, 1])).astype(jnp.float32)


def _expand(v: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return v.reshape(shape)


def _normalise(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rows of w scaled to sum to 1, and whether a row had any weight."""
    tot = w.sum(-1, keepdims=True)
    return w / jnp.where(tot > 0, tot, 1.0), tot[..., 0] > 0


def _static_pattern(kind: str, t: int) -> np.ndarray:
    """The batch-independent ideal patterns [q, k], rows normalised, built once at trace time."""
    qi, ki = np.arange(t)[:, None], np.arange(t)[None, :]
    w = {"previous_token": (ki == qi - 1) | ((qi == 0) & (ki == 0)), "self": ki == qi, "first": ki == 0,
         "uniform": ki <= qi}[kind].astype(np.float32)
    return w / w.sum(-1, keepdims=True)


def ideal_pattern(kind: str, batch: dict, task, t: int, strength: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """A hand-designed attention pattern [batch or 1, 1, q, k] and where it is defined [.., 1, q, 1]."""
    if kind in ("previous_token", "self", "first", "uniform"):
        w = jnp.asarray(_static_pattern(kind, t))
        return w[None, None], jnp.ones((1, 1, t, 1), bool)
    if kind != "induction":
        raise ValueError(kind)
    if "query_match" in batch and task.classification:
        labels = np.zeros(t, np.float32)
        labels[list(task.label_positions)] = 1.0
        match = batch["query_match"]  # [b, k]
        m, _ = _normalise(match)
        o, has_other = _normalise((1.0 - match) * labels)
        s = jnp.where(has_other[:, None], strength, 1.0)
        row = s * m + (1.0 - s) * o  # [b, k]
        isq = np.zeros(t, bool)
        isq[list(task.query_positions)] = True
        w = jnp.where(jnp.asarray(isq)[None, :, None], row[:, None, :], 0.0)
    else:
        w = induction_targets(batch["tokens"])  # the token after an earlier occurrence of the current one
    w, ok = _normalise(w)
    return w[:, None], ok[:, None, :, None]


class ClampSet:
    """All clamps of a run, resolved against a model and a task."""

    def __init__(self, specs: dict, model, task, references: dict | None = None):
        """``references``: clamp name -> parameters of the run a ``value: reference`` clamp reads (the trainer
        loads them with lab.rundir.reference_params)."""
        self.model, self.task = model, task
        self.specs = dict(specs or {})
        shapes = _site_shapes(model, task)
        self.clamps: list[_Clamp] = []
        for name, c in self.specs.items():
            validate_spec(name, c)
            sites = [s for s in shapes if fnmatch.fnmatchcase(s, c.site)]
            check(len(sites) > 0, _field(name, "site"), c.site,
                  "no such site; valid sites: " + ", ".join(_site_summary(list(shapes))))
            for s in sites:
                self.clamps.append(_Clamp(name, c, s, shapes[s], model, task))
        self.reference_params = {name: (references or {})[name] for name, c in self.specs.items()
                                 if c.value == "reference"}
        self.frozen_names = sorted({cl.name for cl in self.clamps if cl.c.value == "frozen"})

    def __bool__(self) -> bool:
        return bool(self.clamps)

    @property
    def condition(self) -> str:
        return "+".join(self.specs) if self.specs else "none"

    # ---- state for `frozen` ----------------------------------------------------------------
    def init_frozen(self, params) -> dict:
        return {name: jax.tree_util.tree_map(jnp.copy, params) for name in self.frozen_names}

    def update_frozen(self, frozen: dict, params, step) -> dict:
        """Snapshot the parameters when a frozen clamp's window opens (step == start)."""
        out = {}
        for name in self.frozen_names:
            starts = sorted({s for cl in self.clamps if cl.name == name for s in cl.starts}) or [0]
            hit = jnp.any(jnp.asarray(starts) == step)
            out[name] = jax.tree_util.tree_map(lambda p, f, hit=hit: jnp.where(hit, p, f), params, frozen[name])
        return out

    # ---- the interventions of one forward pass --------------------------------------------
    def hooks(self, params, batch, step, frozen: dict | None = None, training: bool = True,
              capture=(), gates: dict | None = None) -> Hooks:
        """``gates``: clamp name -> 0/1 (data) that switches a clamp off or on; runs of different conditions
        trained as one program share the union of their clamps and differ only in their gates."""
        active = [cl for cl in self.clamps if training or cl.c.eval]
        if not active:
            return Hooks(capture=capture)
        t = batch["tokens"].shape[1]
        extra: dict[str, dict] = {}  # values computed by extra forward passes, by clamp name

        def pass_sites(p, names):
            h = Hooks(capture=names)
            self.model.apply(p, batch, h)
            return h.cache

        for name in {cl.name for cl in active}:
            mine = [cl for cl in active if cl.name == name]
            c = mine[0].c
            if c.value == "reference":
                extra[name] = pass_sites(self.reference_params[name], [cl.site for cl in mine])
            elif c.value == "frozen":
                extra[name] = pass_sites(frozen[name], [cl.site for cl in mine])
            elif c.value == "ablate" and c.preserve != "none":
                layer = min(cl.layer for cl in mine)
                kind = "hook_pattern" if c.preserve == "patterns" else "hook_v"
                later = [f"blocks.{l}.attn.{kind}" for l in range(layer + 1, self.model.cfg.n_layers)]
                extra[name] = pass_sites(params, later)
        interventions: dict[str, list] = {}
        shared: dict[str, jax.Array] = {}
        for cl in active:
            # a probe clamp (measures.clamps) has no gate: it acts on every run of a batch alike
            on = cl.on(step) if gates is None or cl.name not in gates else cl.on(step) * gates[cl.name]
            interventions.setdefault(cl.site, []).append(self._make(cl, batch, on, extra.get(cl.name), t, shared,
                                                                    params))
            if cl.c.value == "ablate" and cl.c.preserve != "none":
                for site, v in extra[cl.name].items():  # patterns (query axis 2) or values (every position)
                    interventions.setdefault(site, []).append(_overwrite(v, on, 2))
            if cl.c.value == "perfect_copy":
                interventions.setdefault("logits", []).append(self._copy_logits(cl, batch, on, shared))
        if any(cl.c.value == "previous_embed" for cl in active):
            interventions.setdefault("hook_embed", []).insert(0, _store(shared, "hook_embed"))
        fns = {site: _chain(fs) for site, fs in interventions.items()}
        uniform = {site for site in fns if all(cl.head_uniform for cl in active if cl.site == site)
                   and any(cl.site == site for cl in active)}
        # a user's value is a function of the whole activation: its site keeps every position
        rows_ok = {site for site in fns if not any(cl.site == site and cl.plugin is not None
                                                   and cl.c.value not in HEAD_BLIND for cl in active)}
        return Hooks(capture=capture, interventions=fns, head_uniform=uniform, row_aware=rows_ok)

    def _make(self, cl: _Clamp, batch, on, extra, t, shared, params=None):
        c = cl.c

        qa = cl.query_axis + 1  # with the batch axis

        def source(x, rows):
            if cl.plugin is not None:  # a registered value: a function of the activation and the pass's inputs
                v = cl.plugin.fn(x, ClampInputs(batch, params, c, self.task, self.model))
                if getattr(v, "shape", None) != x.shape:
                    raise LabError(f"clamps.{cl.name}.value={c.value}: the value (package {cl.plugin.package}) "
                                   f"returned shape {getattr(v, 'shape', type(v).__name__)}, the site "
                                   f"{cl.site} has {x.shape}")
                return v.astype(x.dtype), None
            if c.value == "ablate":
                return jnp.zeros_like(x), None
            if c.value in ("reference", "frozen"):
                return _rows(extra[cl.site], rows, qa), None
            if c.value == "previous_embed":
                e = shared["hook_embed"]
                e = _rows(jnp.concatenate([jnp.zeros_like(e[:, :1]), e[:, :-1]], axis=1), rows, 1)
                return jnp.broadcast_to(e[:, :, None] if x.ndim == 4 else e, x.shape), None  # split inputs: per head
            if c.value == "perfect_copy":
                return x, None
            w, ok = ideal_pattern(c.value, batch, self.task, t, c.induction_strength)
            return jnp.broadcast_to(_rows(w, rows, 2), x.shape), _rows(ok, rows, 2)

        def fn(x, rows=None):
            """``rows``: the query positions x holds when the model computes only some (Hooks.row_aware)."""
            if c.value == "perfect_copy":
                shared[cl.name] = x
                return x
            v, ok = source(x, rows)
            if c.gradient == "stop":
                v = jax.lax.stop_gradient(v)
            mask = _rows(cl.mask[None], rows, qa)
            if cl.head_uniform and x.shape[2] == 1:  # one copy for every head (Hooks.head_uniform)
                mask = mask[:, :, :1]
            if ok is not None:
                mask = mask & ok
            s = c.strength * on
            return jnp.where(mask, (1.0 - s) * x + s * v, x)

        return fn

    def _copy_logits(self, cl: _Clamp, batch, on, shared):
        """Logits at the clamp's query positions <- log of the head's attention mass per context token."""
        h = cl.c.heads[0]
        n_out = self.model.n_outputs
        tokens = batch["tokens"]
        carries = jnp.ones(tokens.shape, jnp.float32)
        if "is_feature" in batch:
            carries = 1.0 - batch["is_feature"].astype(jnp.float32)  # only label tokens are copied
        qsel = cl.mask.any(axis=(0, 2))  # [q]

        def fn(logits, rows=None):
            pat = shared[cl.name][:, h] * carries[:, None, :]  # [b, q, k]: the match learns through the copy
            b, q, k = pat.shape
            # mass[b, q, v] = sum of the attention on keys holding token v (scatter-add, not a one-hot product)
            bi, qi = jnp.arange(b)[:, None, None], jnp.arange(q)[None, :, None]
            mass = jnp.zeros((b, q, n_out), pat.dtype).at[bi, qi, tokens[:, None, :]].add(pat, mode="drop")
            v = jnp.log(mass + 1e-6)
            s = cl.c.strength * on
            return jnp.where(_rows(qsel, rows, 0)[None, :, None], (1.0 - s) * logits + s * v, logits)

        return fn


def _rows(a, rows, axis: int):
    """``a`` at the query positions ``rows`` along ``axis`` (all of it when rows is None; a broadcast axis of 1
    stays as it is)."""
    if rows is None or a.shape[axis] == 1:
        return a
    return jnp.take(a, jnp.asarray(rows), axis=axis)


def _store(shared: dict, key: str):
    def fn(x, rows=None):
        shared[key] = x
        return x

    return fn


def _overwrite(v, on, query_axis: int):
    def fn(x, rows=None):
        return jnp.where(on > 0, jax.lax.stop_gradient(_rows(v, rows, query_axis)), x)

    return fn


def _chain(fs):
    def fn(x, rows=None):
        for f in fs:
            x = f(x) if rows is None else f(x, rows)
        return x

    return fn


def _site_shapes(model, task) -> dict[str, tuple]:
    """Site name -> shape without the batch axis (traced abstractly: no compute)."""
    batch = jax.eval_shape(lambda k: task.sample(k, 1), jax.random.PRNGKey(0))
    names = model.site_names()

    def run(p, b):
        return model.run_with_cache(p, b, names)[1]

    shapes = jax.eval_shape(run, model.params(), batch)
    return {n: tuple(shapes[n].shape[1:]) for n in names}


def _site_summary(names: list[str]) -> list[str]:
    """Site names with layer numbers folded into a range, to keep error lines short."""
    seen, out = set(), []
    layers = sorted({int(m.group(1)) for n in names if (m := re.match(r"blocks\.(\d+)\.", n))})
    for n in names:
        g = re.sub(r"^blocks\.\d+\.", "blocks.{l}.", n)
        if g not in seen:
            seen.add(g)
            out.append(g)
    if layers:
        out.append(f"with l in 0..{layers[-1]}")
    return out
