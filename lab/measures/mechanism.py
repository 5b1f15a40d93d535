"""The circuit summary: is the head whose birth a run watched an induction head?

A loss curve that drops is not a mechanism. For token tasks the lab checks, at the end of every run
(and at every checkpoint ``lab replay`` reads), the circuit Olsson et al. describe, by three kinds of
evidence:

- attention: the head with the highest prefix-matching score (attention from a token to the token
  after its earlier occurrence, on random tokens with one copied segment at random offsets) is the
  induction head, and every head after layer 0 scoring at least PREFIX_MATCHING_MIN is one of the
  induction heads; likewise the earlier-layer head with the highest previous-token score, and every
  earlier head scoring at least PREV_TOKEN_MIN, are the previous-token heads;
- weights: the K-composition between the two (||W_K^ind^T W_OV^prev||_F / (||W_OV|| ||W_K||),
  Elhage et al. 2021), beside the same score for random matrices of the same shapes;
- cause: the task's mechanism loss (``task.mechanism_metric``: for the repeat task the repeated-token
  loss on held-out layouts) with the induction heads' values set to zero together (zero-ablation: a
  head then writes only its share of the output bias) minus the loss intact; also each head alone
  and the previous-token heads together;

Where a task needs the circuit only at some positions (``task.circuit_positions``: Bietti's triggers),
both attention scores are measured there, on the task's own sequences.

And, where the task has held-out layouts, generalisation: the held-out repeated loss next to the
trained one. The verdict is "induction circuit" only when every check passes (thresholds below, and
the task's ``mechanism_min_effect``); otherwise the summary names the checks that failed.

Two views. Without clamps (``summary.json`` -> ``circuit``): the model as it is, what it learnt. As trained
(``circuit_as_trained``, for a run with clamps): the same checks with the run's own clamps acting as they
do at its last step (``CircuitSummary(..., clamps=...)``): the circuit the run trained with, e.g. a clamped
previous-token head feeding a learnt layer-1 induction head; the clamped heads are named. A failed check is
worded as what was found ("the top prefix-matching head, L0H2, is in layer 0").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lab.hooks import Hooks
from lab.measures import attention as att
from lab.measures.circuits import ov_matrix
from lab.model import merge_consts

PREV_TOKEN_MIN = 0.3  # previous-token score of a previous-token head (uniform attention over 16 keys: ~0.06)
# a model with several heads a layer may share the previous-token role among them (Bietti's full model: three layer-0
# heads at 0.22-0.28 each, one alone ablated costing nothing, the three together +5.8 nats): heads scoring at least
# this share the role when no head reaches PREV_TOKEN_MIN, their scores add up to it, and ablating them together
# raises the mechanism loss by the task's margin (a causal check a single head is not asked for)
PREV_TOKEN_SHARE_MIN = 0.15
PREFIX_MATCHING_MIN = 0.3  # prefix-matching score of an induction head
GENERALISATION_MAX = 1.0  # nats the held-out repeated loss may exceed the trained one by
ABLATION_SEQUENCES = 256  # sequences of the mechanism evaluator each ablation is scored on


def head_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def k_composition(params: dict, consts: dict, prev: tuple[int, int], ind: tuple[int, int]) -> float:
    """How much of the previous-token head's output the induction head's keys read (0..1)."""
    p = merge_consts(params, consts)
    ov = ov_matrix(p, consts, *prev)  # [d, d]
    wk = np.asarray(p["blocks"][str(ind[0])]["attn"]["W_K"][ind[1]])  # [d, d_head]
    den = np.linalg.norm(ov) * np.linalg.norm(wk)
    return float(np.linalg.norm(ov @ wk) / den) if den > 0 else 0.0


def random_k_composition(d_model: int, d_head: int, trials: int = 32, seed: int = 0) -> float:
    """The K-composition of random Gaussian matrices of the same shapes: the score's chance level."""
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(trials):
        ov = rng.standard_normal((d_model, d_head)) @ rng.standard_normal((d_head, d_model))
        wk = rng.standard_normal((d_model, d_head))
        vals.append(np.linalg.norm(ov @ wk) / (np.linalg.norm(ov) * np.linalg.norm(wk)))
    return float(np.mean(vals))


class CircuitSummary:
    """The circuit summary of one model on one task; ``__call__(params)`` gives a dict (see ``summarise``).
    ``clamps`` (a lab.clamp.ClampSet; with ``step`` and a frozen clamp's ``frozen`` snapshots): every forward
    pass of the summary runs with them, as at that training step (the as-trained view)."""

    def __init__(self, model, task, clamps=None, step: int = 0, frozen: dict | None = None):
        self.model, self.task = model, task
        self.clamps, self.step, self.frozen = (clamps or None), step, frozen
        self.n_layers, self.n_heads = model.cfg.n_layers, model.cfg.n_heads
        self.metric = task.mechanism_metric
        self.evaluator, self.metric_key = self.metric.split("/", 1)
        batch = task.evals[self.evaluator]
        self.batch = jax.tree_util.tree_map(lambda a: a[:ABLATION_SEQUENCES], batch)
        self.probe = jax.tree_util.tree_map(lambda a: a[:128], next(iter(task.evals.values())))
        where = task.circuit_positions(self.probe)
        if where is None:  # random tokens with a copied segment: every repeat is an induction target
            self.token_probe = task.token_probe(jax.random.PRNGKey(7), 128)
            self.prev_where = self.ind_where = None
        else:  # the task's own sequences, at the positions where the circuit is needed
            self.token_probe = self.probe
            self.prev_where, self.ind_where = where
        self.chance_k = random_k_composition(model.cfg.d_model, model.cfg.head_dim)
        self._scores = jax.jit(self._attention_scores)
        self._ablated = jax.jit(self._ablated_metric)

    def _hooks(self, params, batch, capture=(), ablate: dict | None = None) -> Hooks:
        """The hooks of one of the summary's passes: the clamps (if any) as at ``step``, then ``ablate``'s
        interventions on top of theirs at the same sites."""
        hooks = (self.clamps.hooks(params, batch, self.step, self.frozen, training=True, capture=capture)
                 if self.clamps else Hooks(capture=capture))
        for site, fn in (ablate or {}).items():
            before = hooks.interventions.get(site)
            hooks.interventions[site] = fn if before is None else (lambda v, f=fn, b=before: f(b(v)))
        return hooks

    def _cache(self, params, batch, sites):
        hooks = self._hooks(params, batch, capture=sites)
        self.model.apply(params, batch, hooks)
        return hooks.cache

    def clamped_heads(self) -> list[str]:
        """The heads (or sites without a head axis) the clamps act on, as 'L0H2 (hook_pattern: previous_token)'."""
        out = []
        for cl in (self.clamps.clamps if self.clamps else []):
            kind = cl.site.rsplit(".", 1)[-1]
            where = ([head_name(cl.layer, h) for h in cl.c.heads] if cl.c.heads is not None and cl.layer is not None
                     else [f"L{cl.layer}" if cl.layer is not None else cl.site])
            out += [f"{w} ({kind}: {cl.c.value})" for w in where]
        return list(dict.fromkeys(out))

    def _attention_scores(self, params):
        sites = [f"blocks.{layer}.attn.hook_pattern" for layer in range(self.n_layers)]
        cache = self._cache(params, self.probe, sites)
        tcache = self._cache(params, self.token_probe, sites)
        prev = jnp.stack([att.previous_token_score(cache[s], where=self.prev_where) for s in sites])  # [layer, head]
        pm = jnp.stack([att.prefix_matching_score(tcache[s], self.token_probe, where=self.ind_where) for s in sites])
        return prev, pm

    def _ablated_metric(self, params, keep):
        """The mechanism metric with the values of the heads where ``keep`` [layer, head] is 0 set to zero
        (one program for every choice of heads: ``keep`` is data)."""
        hooks = self._hooks(params, self.batch, ablate={
            f"blocks.{layer}.attn.hook_v": (lambda v, layer=layer: v * keep[layer][None, None, :, None])
            for layer in range(self.n_layers)})
        logits = self.model.apply(params, self.batch, hooks)
        return self.task.metrics(logits, self.batch)[self.metric_key]

    def ablated(self, params, heads: list[tuple[int, int]]) -> float:
        """The mechanism metric with these heads' values set to zero."""
        keep = np.ones((self.n_layers, self.n_heads), np.float32)
        for lh in heads:
            keep[lh] = 0.0
        return float(self._ablated(params, keep))

    def __call__(self, params, metrics: dict | None = None) -> dict:
        return summarise(self, params, metrics)


def _names(heads) -> str:
    return ",".join(head_name(*h) for h in heads)


def summarise(cs: CircuitSummary, params, metrics: dict | None = None) -> dict:
    """The summary: heads, scores, K-composition, ablation effects, checks, verdict and a one-line text.

    A model with many heads may spread the circuit over several (every layer-1 head of an 8-head model can
    prefix-match): the induction heads are all heads after layer 0 scoring >= PREFIX_MATCHING_MIN (else the
    top one), the previous-token heads all heads of earlier layers scoring >= PREV_TOKEN_MIN (else the top
    one), and the causal check ablates the induction heads together.

    ``metrics``: the run's last evaluation row (for the held-out vs trained comparison)."""
    prev, pm = (np.asarray(x) for x in jax.device_get(cs._scores(params)))
    grid = [(l, h) for l in range(cs.n_layers) for h in range(cs.n_heads)]
    ind = max(grid, key=lambda lh: pm[lh])
    inds = sorted((lh for lh in grid if lh[0] >= 1 and pm[lh] >= PREFIX_MATCHING_MIN), key=lambda lh: -pm[lh])
    inds = inds or [ind]
    first = min(lh[0] for lh in inds)
    earlier = [lh for lh in grid if lh[0] < first] or grid
    prv = max(earlier, key=lambda lh: prev[lh])
    prevs = sorted((lh for lh in earlier if prev[lh] >= PREV_TOKEN_MIN), key=lambda lh: -prev[lh])
    sharing = sorted((lh for lh in earlier if prev[lh] >= PREV_TOKEN_SHARE_MIN), key=lambda lh: -prev[lh])
    shared = not prevs and len(sharing) > 1 and sum(prev[lh] for lh in sharing) >= PREV_TOKEN_MIN
    prevs = prevs or (sharing if shared else [prv])
    host = jax.device_get(params)
    kc = k_composition(host, cs.model.consts, prv, ind) if prv[0] < ind[0] else None
    intact = cs.ablated(params, [])
    single = {head_name(*lh): cs.ablated(params, [lh]) - intact for lh in dict.fromkeys(inds + prevs)}
    abl_inds = cs.ablated(params, inds) - intact
    abl_prevs = cs.ablated(params, prevs) - intact
    min_effect = cs.task.mechanism_min_effect
    together = float(sum(prev[lh] for lh in prevs))
    # each check: (what an induction circuit needs, with what was measured) -> (it holds, what was found if not)
    checks = {
        f"the top prefix-matching head is after layer 0 (it is {head_name(*ind)})":
            (ind[0] >= 1, f"the top prefix-matching head, {head_name(*ind)}, is in layer 0"),
        f"its prefix-matching score >= {PREFIX_MATCHING_MIN} (it is {pm[ind]:.2f})":
            (pm[ind] >= PREFIX_MATCHING_MIN, f"the top prefix-matching head, {head_name(*ind)}, scores only "
                                             f"{pm[ind]:.2f} (an induction head: >= {PREFIX_MATCHING_MIN})"),
        **({f"earlier heads share the previous-token role: {_names(prevs)} score >= {PREV_TOKEN_SHARE_MIN} each, "
            f"together {together:.2f} >= {PREV_TOKEN_MIN}, and ablating them together raises {cs.metric} by >= "
            f"{min_effect:.1f} nats (it adds {abl_prevs:+.2f})":
            (ind[0] >= 1 and abl_prevs >= min_effect,
             f"{_names(prevs)} share previous-token attention (together {together:.2f}) but ablating them together "
             f"adds only {abl_prevs:+.2f} nats to {cs.metric} (a shared previous-token role's: >= {min_effect:.1f})"
             if ind[0] >= 1 else f"no layer precedes {head_name(*ind)} for a previous-token head")}
           if shared else {
            f"an earlier head's previous-token score >= {PREV_TOKEN_MIN} (best {head_name(*prv)}: {prev[prv]:.2f})":
            (ind[0] >= 1 and prev[prv] >= PREV_TOKEN_MIN,
             f"no head before {head_name(*ind)} attends to the previous token (best {head_name(*prv)}: "
             f"{prev[prv]:.2f}; a previous-token head: >= {PREV_TOKEN_MIN})" if ind[0] >= 1 else
             f"no layer precedes it for a previous-token head (the best previous-token score is "
             f"{head_name(*prv)}'s, {prev[prv]:.2f})")}),
        f"ablating {_names(inds)} raises {cs.metric} by >= {min_effect:.1f} nats (it adds {abl_inds:+.2f})":
            (abl_inds >= min_effect, f"ablating {_names(inds)} adds only {abl_inds:+.2f} nats to {cs.metric} "
                                     f"(an induction circuit's: >= {min_effect:.1f})"),
    }
    out = {
        "induction_head": head_name(*ind), "prefix_matching": float(pm[ind]),
        "induction_heads": [head_name(*lh) for lh in inds],
        "prev_token_head": head_name(*prv), "prev_token": float(prev[prv]),
        "prev_token_heads": [head_name(*lh) for lh in prevs],
        "prev_token_shared": bool(shared), "prev_token_together": together,
        "k_composition": kc, "k_composition_random": cs.chance_k,
        "mechanism_metric": cs.metric, "mechanism_loss": intact,
        "ablation": single, "ablation_induction_heads": abl_inds, "ablation_prev_token_heads": abl_prevs,
        "prefix_matching_by_head": {head_name(*lh): float(pm[lh]) for lh in grid},
        "prev_token_by_head": {head_name(*lh): float(prev[lh]) for lh in grid},
    }
    gap = cs.task.heldout_gap
    if gap and metrics and all(k in metrics for k in gap):
        held, trained = metrics[gap[0]], metrics[gap[1]]
        out["heldout_loss"], out["trained_loss"] = held, trained
        checks[f"{gap[0]} within {GENERALISATION_MAX:g} nat of {gap[1]} ({held:.2f} vs {trained:.2f})"] = (
            held - trained <= GENERALISATION_MAX,
            f"{gap[0]} is {held - trained:.2f} nats above {gap[1]} ({held:.2f} vs {trained:.2f}; an induction "
            f"circuit's: <= {GENERALISATION_MAX:g})")
    out["checks"] = {k: bool(ok) for k, (ok, _) in checks.items()}
    out["failed"] = [found for ok, found in checks.values() if not ok]
    out["is_induction_circuit"] = all(out["checks"].values())
    if cs.clamps:
        out["clamped"] = cs.clamped_heads()
    out["line"] = summary_line(out)
    return out


def summary_line(s: dict) -> str:
    """One line: the circuit and its evidence, or what was found instead; an as-trained view (``clamped``)
    says so and names the clamped heads first."""
    view = f"as trained (clamped: {', '.join(s['clamped'])}): " if s.get("clamped") else ""
    return view + _verdict(s)


def _verdict(s: dict) -> str:
    if s["is_induction_circuit"]:
        kc = f"K-composition {s['k_composition']:.2f} (random {s['k_composition_random']:.2f})"
        more = lambda names: f" (+{len(names) - 1} more)" if len(names) > 1 else ""  # noqa: E731
        prev = f"{s['prev_token']:.2f}"
        if s.get("prev_token_shared"):  # the role shared: the heads' scores together
            prev += f"; together {s['prev_token_together']:.2f}"
        return (f"induction circuit: {s['prev_token_head']}{more(s['prev_token_heads'])} previous-token "
                f"({prev}) -> {s['induction_head']}{more(s['induction_heads'])} induction (prefix "
                f"matching {s['prefix_matching']:.2f}), {kc}; ablating {','.join(s['induction_heads'])} adds "
                f"{s['ablation_induction_heads']:+.2f} nats to {s['mechanism_metric']}")
    failed = s.get("failed") or [k for k, ok in s["checks"].items() if not ok]  # older summaries: the criteria
    return "NOT an induction circuit: " + "; ".join(failed)


def flat(s: dict, prefix: str = "circuit/") -> dict:
    """The numeric essentials as flat metrics (replay rows, wandb summary)."""
    out = {f"{prefix}is_induction_circuit": float(s["is_induction_circuit"]),
           f"{prefix}prefix_matching": s["prefix_matching"], f"{prefix}prev_token": s["prev_token"],
           f"{prefix}mechanism_loss": s["mechanism_loss"],
           f"{prefix}ablation_induction_heads": s["ablation_induction_heads"],
           f"{prefix}ablation_prev_token_heads": s["ablation_prev_token_heads"],
           f"{prefix}induction_heads": float(len(s["induction_heads"]))}
    if s["k_composition"] is not None:
        out[f"{prefix}k_composition"] = s["k_composition"]
    return out
