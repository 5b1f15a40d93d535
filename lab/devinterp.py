"""Developmental interpretability over a run's checkpoints: the LLC at every checkpoint (whole model, per layer,
per head) as one program, and essential dynamics (PCA of the model's outputs across checkpoints).

``lab llc RUN`` restores every complete checkpoint, stacks their parameters on a leading axis and runs
checkpoints x chains SGLD chains as one jitted program per restriction (lab/measures/llc.py); it writes
``RUN_DIR/llc/llc.json`` (per step and restriction: the estimate, its standard error over chains, each chain's
estimate, the fraction of draws below the start, the diagnostics), ``traces.npz`` (every chain's loss trace)
and ``llc.png`` (LLC against step, the run's detected transitions marked), and logs the same to wandb as a run of
job_type ``llc`` in the run's group.

A restriction (``all``, ``L1``, ``L1H0``) lets only those weights move: a layer's every parameter, or a head's
slices of W_Q, W_K, W_V, W_O (and b_Q, b_K, b_V); the rest stay at the checkpoint. Frozen parameters never move.

``lab dynamics RUN`` (essential dynamics): the log-probabilities of every checkpoint on a fixed probe set (the
first sequences of the task's first evaluation set, at its loss positions), PCA across checkpoints, the
trajectory in the top components with step as colour, its turning points (where a top component turns back,
by more than ``prominence`` of its range), and each turning point's nearest detected transition.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from lab.config import from_yaml
from lab.errors import LabError
from lab.measures.llc import LLCSettings, diagnose, estimate, map_chains
from lab.plots import figure
from lab.rundir import check_run_dir, complete_steps, restore_state

RESTRICTION = re.compile(r"^(all|L(\d+)|L(\d+)H(\d+))$")


def json_safe(x):
    """``x`` with every non-finite float as None: a diverged chain's NaN is not JSON (strict readers refuse it)."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def run_transitions(run_dir: Path) -> list[dict]:
    """The watched metric's transitions the run's summary.json records (none for an unfinished run)."""
    path = run_dir / "summary.json"
    return json.loads(path.read_text()).get("phase", {}).get("transitions", []) if path.is_file() else []


def load_checkpoints(run_dir: Path, steps: list[int] | None = None):
    """(trainer, steps, parameters of every checkpoint stacked on a leading axis)."""
    from lab.runs import Runs

    cfg, _ = from_yaml(run_dir / "config.yaml")  # the run's own resolved config, whatever configs/ says now
    have = complete_steps(run_dir)
    want = have if steps is None else steps
    missing = [s for s in want if s not in have]
    if not want or missing:
        raise LabError(f"--steps={missing or want}: no complete checkpoint there in {run_dir}; have {have}")
    trainer = Runs(cfg)
    params = [restore_state(trainer, run_dir, s).params for s in want]
    return trainer, list(want), jax.tree_util.tree_map(lambda *x: jnp.stack(x), *params)


def restriction_mask(params: dict, spec: str, trainable) -> dict:
    """Bools like ``params`` (element by element): what a restricted LLC lets move. ``spec``: all | L{l} |
    L{l}H{h}; a head owns its slices of W_Q, W_K, W_V (and b_Q, b_K, b_V), of W_O and of W_rel."""
    m = RESTRICTION.match(spec)
    if m is None:
        raise LabError(f"--restrict={spec}: one of all, L<layer>, L<layer>H<head> (e.g. L1H0)")
    layer = m.group(2) or m.group(3)
    head = int(m.group(4)) if m.group(4) is not None else None
    blocks = params["blocks"]
    if layer is not None and layer not in blocks:
        raise LabError(f"--restrict={spec}: the model's layers are L0..L{len(blocks) - 1}")
    if head is not None and head >= blocks[layer]["attn"]["W_K"].shape[0]:
        raise LabError(f"--restrict={spec}: layer {layer}'s heads are H0..H{blocks[layer]['attn']['W_K'].shape[0] - 1}")

    def leaf(path, x, t):
        names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        on = np.zeros(x.shape, bool)
        if spec == "all":
            on[...] = True
        elif names[:2] == ["blocks", layer]:
            if head is None:
                on[...] = True
            elif len(names) == 4 and names[2] == "attn" and names[3] in ("W_Q", "W_K", "W_V", "W_O", "W_rel", "b_Q",
                                                                           "b_K", "b_V"):
                on[head] = True
        return jnp.asarray(on & np.asarray(t, bool))

    return jax.tree_util.tree_map_with_path(leaf, params, trainable)


def ticked(result: dict, bar) -> dict:
    """``result``, and a tick of ``bar`` once it is computed: the progress of one program that estimates many
    checkpoints (or calibration cells) one after another (a host callback per estimate: negligible)."""
    if bar is not None:
        jax.debug.callback(lambda _: bar.update(1), result["mean"])
    return result


def llc_over_checkpoints(run_dir, settings: LLCSettings | None = None, restrict: list[str] = ("all",),
                         steps: list[int] | None = None, batch_size: int | None = None, seed: int = 0,
                         wandb_mode: str | None = None, quiet: bool = False) -> Path:
    """The LLC of every checkpoint, for each restriction; see the module doc. Returns RUN_DIR/llc."""
    from lab.measures import llc_settings

    run_dir = check_run_dir(run_dir)
    if not restrict:
        raise LabError("--restrict=: names no restriction; one or more of all, L<layer>, L<layer>H<head>")
    for r in restrict:  # the form now, the layer and head ranges once the model is known: before any work
        if RESTRICTION.match(r) is None:
            raise LabError(f"--restrict={r}: one of all, L<layer>, L<layer>H<head> (e.g. L1H0)")
    trainer, steps, stacked = load_checkpoints(run_dir, steps)
    cfg = trainer.cfg
    b = batch_size or cfg.trainer.batch_size
    s = settings or llc_settings(cfg.measures, b)
    one = jax.tree_util.tree_map(lambda x: x[0], stacked)  # (frozen_mask below reads names, not values)
    trainable = jax.tree_util.tree_map(lambda f: not f, trainer.model.frozen_mask(one))
    masks = {r: restriction_mask(one, r, trainable) for r in restrict}  # bad specs fail before any work
    out = run_dir / "llc"
    out.mkdir(exist_ok=True)
    sample = lambda k: trainer.task.sample(k, b)  # noqa: E731
    results, traces = {}, {}
    bar = None if quiet else tqdm(total=len(restrict) * len(steps), unit="checkpoint", file=sys.stderr,
                                  desc=f"llc: {len(restrict)} restriction(s) x {len(steps)} checkpoints x {s.chains} "
                                       f"chains x {s.steps} steps")
    for i, r in enumerate(restrict):
        run = jax.jit(lambda P, K, m=masks[r]: map_chains(
            lambda a: ticked(estimate(trainer.program.loss, a[0], sample, a[1], s, trainable=m), bar), (P, K)))
        keys = jax.random.split(jax.random.PRNGKey(seed + i), len(steps))
        res = jax.device_get(run(stacked, keys))
        traces[r] = s.nbeta * (np.asarray(res["loss"]) - np.asarray(res["ref"]))
        results[r] = [{"step": st, "llc": float(res["mean"][j]), "std_err": float(res["std_err"][j]),
                       "chains": [float(x) for x in res["llc"][j]],
                       "below_start": [float(x) for x in res["below_start"][j]],
                       "diagnostics": diagnose({k: v[j] for k, v in res.items()}, s)} for j, st in enumerate(steps)]
    if bar is not None:
        bar.close()
    transitions = run_transitions(run_dir)
    doc = {"run_dir": str(run_dir), "settings": asdict(s), "batch_size": b, "seed": seed, "steps": steps,
           "restrictions": results, "transitions": transitions}
    (out / "llc.json").write_text(json.dumps(json_safe(doc), indent=2))
    np.savez_compressed(out / "traces.npz", **{r: t for r, t in traces.items()})  # nβ (loss - start) per step
    plot_llc(results, transitions, out / "llc.png", title=f"{cfg.experiment}: LLC over checkpoints ({run_dir.name})")
    if wandb_mode or cfg.tracking.wandb.mode != "disabled":
        _log_llc(run_dir, cfg, results, s, out / "llc.png", wandb_mode)
    return out


def plot_llc(results: dict, transitions: list[dict], path: Path, title: str = "") -> None:
    """LLC against step with its standard error; the whole model's on the left axis, restricted ones (a layer's,
    a head's: far smaller) on the right."""
    fig, ax = figure(figsize=(8, 4.5))
    twin = ax.twinx() if any(r != "all" for r in results) and "all" in results else None
    for i, (r, rows) in enumerate(results.items()):
        x = np.array([row["step"] for row in rows], float)
        y = np.array([row["llc"] for row in rows])
        e = np.array([row["std_err"] for row in rows])
        on = twin if (twin is not None and r != "all") else ax
        on.errorbar(x, y, yerr=e, marker="o", ms=3, capsize=2, color=f"C{i}", label=f"LLC {r}")
        on.set_ylabel("LLC (restricted)" if on is twin or r != "all" else "LLC (whole model)")
    for t in transitions:
        ax.axvline(t["mid"], color="gray", ls="--", lw=1)
        ax.axvspan(t["onset"], t["end"], color="gray", alpha=0.1)
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=10)
    handles = [h for a in fig.axes for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _log_llc(run_dir: Path, cfg, results: dict, s: LLCSettings, png: Path, mode: str | None) -> None:
    """The estimates at each checkpoint step, as a wandb run of job_type ``llc`` in the run's group."""
    from lab.tracking import WandbConfig, start_wandb, wandb_id

    wb = WandbConfig(**{**asdict(cfg.tracking.wandb), **({"mode": mode} if mode else {})})
    run = start_wandb(wb, dir=str(run_dir), group=wb.group or cfg.experiment, job_type="llc",
                      name=f"{run_dir.name}-llc", id=f"{wandb_id(run_dir)}llc{int(time.time())}",  # one per `lab llc`
                      config={"llc_of": {"run_dir": str(run_dir.absolute()), "wandb_id": wandb_id(run_dir)},
                              "settings": asdict(s)})
    if run is None:
        return
    try:
        import wandb

        steps = [row["step"] for row in next(iter(results.values()))]
        for j, st in enumerate(steps):
            row = {}
            for r, rows in results.items():
                key = "llc/mean" if r == "all" else f"llc/{r}"
                row[key], row[key.replace("llc/", "llc_se/")] = rows[j]["llc"], rows[j]["std_err"]
            run.log(row, step=int(st))
        run.log({"llc/figure": wandb.Image(str(png))}, step=int(steps[-1]))
        run.finish()
    except Exception as e:  # wandb must never stop the work; everything is in RUN_DIR/llc
        print(f"warning: wandb llc logging failed ({e}); continuing", file=sys.stderr)


# ---- essential dynamics --------------------------------------------------------------------------------------
def turning_points(coords: np.ndarray, prominence: float = 0.1, flat: float = 0.05) -> list[tuple[int, int, int]]:
    """Where one of the top components turns back: a local maximum or minimum of the coordinate whose topographic
    prominence (scipy.signal's: the drop to the higher of the two bases on either side) exceeds ``prominence`` of
    the coordinate's range; wiggles on a plateau turn back too, by far less. A turn can be flat-bottomed (a
    plateau between two moves): each is given as (first, extremum, last) indices, the run of checkpoints within
    ``flat`` of the range of the extremum's value, so the turn is a span of steps, not a noisy point in it."""
    from scipy.signal import find_peaks

    found = {}
    for c in range(coords.shape[1]):
        x = coords[:, c]
        span = float(np.ptp(x)) or 1.0
        for sign in (1, -1):
            for i in find_peaks(sign * x, prominence=prominence * span)[0]:
                near = np.abs(x - x[i]) <= flat * span
                lo, hi = int(i), int(i)
                while lo > 0 and near[lo - 1]:
                    lo -= 1
                while hi < len(x) - 1 and near[hi + 1]:
                    hi += 1
                found[(lo, hi)] = (lo, int(i), hi)
    return sorted(found.values())


def essential_dynamics(run_dir, components: int = 3, probe: int = 64, steps: list[int] | None = None,
                       prominence: float = 0.1) -> Path:
    """PCA of the log-probabilities across checkpoints; see the module doc. Returns RUN_DIR/dynamics."""
    run_dir = check_run_dir(run_dir)
    trainer, steps, stacked = load_checkpoints(run_dir, steps)
    if len(steps) < 3:
        raise LabError(f"run_dir={run_dir}: essential dynamics needs >= 3 checkpoints, it has {len(steps)}")
    batch = jax.tree_util.tree_map(lambda a: a[:probe], next(iter(trainer.task.evals.values())))
    where = np.asarray(batch["loss_mask"]) > 0  # the positions the loss reads: [probe, pos]

    def outputs(p):
        return jax.nn.log_softmax(trainer.model.apply(p, batch), axis=-1)

    logp = np.asarray(jax.device_get(jax.jit(jax.vmap(outputs))(stacked)))  # [ckpt, probe, pos, vocab]
    x = logp[:, where].reshape(len(steps), -1).astype(np.float64)
    x -= x.mean(0)
    u, sv, _ = np.linalg.svd(x, full_matrices=False)
    k = min(components, len(steps) - 1)
    coords = u[:, :k] * sv[:k]
    explained = (sv[:k] ** 2 / (sv ** 2).sum()).tolist()
    turns = turning_points(coords[:, : min(2, k)], prominence)  # the top two: the rest is mostly noise
    transitions = run_transitions(run_dir)
    tp = []
    for lo, i, hi in turns:  # the turn's span [steps[lo], steps[hi]] against each transition's [onset, end]
        gap = lambda t, a=steps[lo], b=steps[hi]: max(t["onset"] - b, a - t["end"], 0.0)  # noqa: E731 (0: overlap)
        near = min(transitions, key=gap) if transitions else None
        tp.append({"step": steps[i], "from_step": steps[lo], "to_step": steps[hi],
                   "nearest_transition": near and {k: near[k] for k in ("onset", "mid", "end")},
                   "steps_from_transition": near and gap(near)})
    out = run_dir / "dynamics"
    out.mkdir(exist_ok=True)
    doc = {"run_dir": str(run_dir), "steps": steps, "probe_sequences": int(probe), "features": int(x.shape[1]),
           "explained_variance": explained, "coords": coords.tolist(), "turning_points": tp,
           "transitions": transitions}
    (out / "dynamics.json").write_text(json.dumps(doc, indent=2))
    plot_dynamics(np.asarray(steps), coords, turns, transitions, explained, out / "dynamics.png",
                  title=f"{trainer.cfg.experiment}: essential dynamics ({run_dir.name})")
    return out


def plot_dynamics(steps, coords, turns, transitions, explained, path: Path, title: str = "") -> None:
    fig, (a, b) = figure(1, 2, figsize=(12, 4.5))
    if coords.shape[1] >= 2:
        a.plot(coords[:, 0], coords[:, 1], color="lightgray", lw=1, zorder=1)
        sc = a.scatter(coords[:, 0], coords[:, 1], c=steps, cmap="viridis", s=25, zorder=2)
        at = [i for _, i, _ in turns]
        a.scatter(coords[at, 0], coords[at, 1], marker="x", color="red", s=80, zorder=3, label="turning point")
        fig.colorbar(sc, ax=a, label="step")
        a.set(xlabel=f"PC1 ({explained[0]:.0%})", ylabel=f"PC2 ({explained[1]:.0%})", title="trajectory")
        if turns:
            a.legend(fontsize=8)
    for c in range(coords.shape[1]):
        b.plot(steps, coords[:, c], marker="o", ms=3, label=f"PC{c + 1}")
    for t in transitions:
        b.axvline(t["mid"], color="gray", ls="--", lw=1)
        b.axvspan(t["onset"], t["end"], color="gray", alpha=0.1)
    for lo, _, hi in turns:
        b.axvspan(steps[lo], steps[hi], color="red", alpha=0.08)
        b.axvline(steps[hi], color="red", ls=":", lw=1)
    b.set(xlabel="step", ylabel="coordinate", title="components against step (grey: transitions; red: turns)")
    b.set_xscale("symlog", linthresh=max(float(steps[1]), 1.0))  # log-spaced early checkpoints, and step 0
    b.set_xlim(0, steps[-1] * 1.05)
    b.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---- calibration ---------------------------------------------------------------------------------------------
def calibrate(run_dir, step: int | None = None, eps: list[float] = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3),
              nbeta: list[float] | None = None, settings: LLCSettings | None = None, batch_size: int | None = None,
              seed: int = 0, gamma: list[float] | None = None, quiet: bool = False) -> Path:
    """The ε x nβ (x γ) sweep devinterp's notebooks do by hand, as one program at one checkpoint (default
    the last): every cell's chains, their traces plotted per cell, and a recommendation. A cell is usable when its
    diagnostics are clean (finite, not escaping, stationary, not negative); for each nβ and γ the recommended ε is
    the largest usable one whose estimate agrees (within 2 standard errors or 5 %) with the next smaller usable
    ε's (a step size past that changes the answer: the discretisation, not the posterior, sets it); none when no
    two neighbouring usable step sizes agree.

    γ (default: the settings' one alone) asks a second question: does the localisation, rather than the loss, bound
    the chains? Around a quadratic minimum with curvatures h, λ̂ = Σ nβh / (2 (nβh + γ)): directions with nβh >> γ
    count 1/2 each, whatever γ, while directions with nβh << γ count nβh / 2γ, proportional to nβ / γ. So an
    estimate that moves with γ, and grows with nβ, is the localisation's, not the model's. Each recommendation
    says whether its estimate agrees (as above) with the same cell at the neighbouring γ of the grid, the next
    larger or, for the largest, the next smaller (``gamma_stable``; None with one γ, or when that cell has
    diagnostics). Writes RUN_DIR/llc/calibration.json and calibration.png; returns the folder."""
    import dataclasses

    from lab.measures import llc_settings

    run_dir = check_run_dir(run_dir)
    have = complete_steps(run_dir)
    step = have[-1] if step is None and have else step
    trainer, _, stacked = load_checkpoints(run_dir, [step])
    p = jax.tree_util.tree_map(lambda x: x[0], stacked)
    b = batch_size or trainer.cfg.trainer.batch_size
    s = settings or llc_settings(trainer.cfg.measures, b)
    nbeta = sorted(set(nbeta or [s.nbeta / 3, s.nbeta, s.nbeta * 3]))  # a repeated value would repeat its cells
    gamma = sorted(set(gamma or [s.gamma]))
    eps = sorted(set(eps))
    grid = [(e, nb, g) for g in gamma for nb in nbeta for e in eps]
    bar = None if quiet else tqdm(total=len(grid), unit="cell", file=sys.stderr,
                                  desc=f"llc --calibrate at step {step}: eps x nbeta x gamma cells x {s.chains} "
                                       f"chains x {s.steps} steps")
    trainable = jax.tree_util.tree_map(lambda f: not f, trainer.model.frozen_mask(p))
    sample = lambda k: trainer.task.sample(k, b)  # noqa: E731

    def cell(e, nb, g, k):  # ε, nβ and γ are traced: the whole grid is one program
        return ticked(estimate(trainer.program.loss, p, sample, k, dataclasses.replace(s, eps=e, nbeta=nb, gamma=g),
                               trainable=trainable), bar)

    e_arr, nb_arr, g_arr = (jnp.asarray([c[i] for c in grid], jnp.float32) for i in (0, 1, 2))
    keys = jax.random.split(jax.random.PRNGKey(seed), len(grid))
    res = jax.device_get(jax.jit(lambda *xs: map_chains(lambda a: cell(*a), xs))(e_arr, nb_arr, g_arr, keys))
    if bar is not None:
        bar.close()
    cells = []
    for j, (e, nb, g) in enumerate(grid):
        sj = dataclasses.replace(s, eps=e, nbeta=nb, gamma=g)
        cells.append({"eps": e, "nbeta": nb, "gamma": g, "llc": float(res["mean"][j]),
                      "std_err": float(res["std_err"][j]), "chains": [float(x) for x in res["llc"][j]],
                      "diagnostics": diagnose({k: v[j] for k, v in res.items()}, sj)})

    def agree(lo, hi):
        return abs(hi["llc"] - lo["llc"]) <= max(2 * math.hypot(lo["std_err"], hi["std_err"]), 0.05 * abs(lo["llc"]))

    at = {(c["eps"], c["nbeta"], c["gamma"]): c for c in cells}
    recommended = []
    for g in gamma:
        for nb in nbeta:
            row = [c for c in cells if c["nbeta"] == nb and c["gamma"] == g and not c["diagnostics"]]
            pick = None
            for lo, hi in zip(row, row[1:], strict=False):  # ascending ε
                if agree(lo, hi):
                    pick = hi
            if pick is None:  # no two neighbouring usable step sizes agree; widen the grid or the steps
                continue
            # the neighbouring γ: the next larger one, or for the largest the next smaller one
            near = [x for x in gamma if x > g][:1] or [x for x in gamma if x < g][-1:]
            other = at[(pick["eps"], nb, near[0])] if near else None
            stable = None if other is None or other["diagnostics"] else agree(pick, other)
            recommended.append({"nbeta": nb, "gamma": g, "eps": pick["eps"], "llc": pick["llc"],
                                "std_err": pick["std_err"], "gamma_stable": stable})
    out = run_dir / "llc"
    out.mkdir(exist_ok=True)
    doc = {"run_dir": str(run_dir), "step": step, "batch_size": b, "settings": asdict(s), "gamma": gamma,
           "cells": cells, "recommended": recommended}
    (out / "calibration.json").write_text(json.dumps(json_safe(doc), indent=2))
    traces = (np.asarray(res["loss"]) - np.asarray(res["ref"])) * np.asarray(nb_arr)[:, None, None]
    rows = [(g, nb) for g in gamma for nb in nbeta]
    fig, axs = figure(len(rows), len(eps), figsize=(2.6 * len(eps), 2.1 * len(rows)), squeeze=False, sharex=True)
    for j, c in enumerate(cells):
        ax = axs[rows.index((c["gamma"], c["nbeta"])), eps.index(c["eps"])]
        ax.plot(traces[j].T, lw=0.7)
        ax.axvline(s.burn_in, color="gray", ls=":", lw=0.8)
        good = not c["diagnostics"]
        chosen = any((r["eps"], r["nbeta"], r["gamma"]) == (c["eps"], c["nbeta"], c["gamma"]) for r in recommended)
        ax.set_title(f"eps {c['eps']:.0e}, nβ {c['nbeta']:.3g}" + (f", γ {c['gamma']:g}" if len(gamma) > 1 else "")
                     + f"\nλ̂ {c['llc']:.3g} ± {c['std_err']:.2g}", fontsize=7,
                     color="green" if chosen else ("black" if good else "red"))
        ax.tick_params(labelsize=6)
        if not np.all(np.isfinite(traces[j])):
            ax.text(0.5, 0.5, "diverged", transform=ax.transAxes, ha="center", color="red")
    fig.suptitle(f"nβ (loss - start) per chain at step {step}; green: recommended, red: diagnostics", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the suptitle above the top row
    fig.savefig(out / "calibration.png", dpi=110)
    return out
