"""The stages of a language model trained on real text: the ICL score, the heads' births, the LLC and essential
dynamics on one time axis (Olsson et al. 2022's phase change; Hoogland et al. 2024's LM stages, found with the
LLC and essential dynamics).

Reads a finished `experiment=olsson_text` run (or any token-task run with per-head measures) and, where its
``llc/llc.json`` or ``dynamics/dynamics.json`` is missing, computes them first with the lab's own ``lab llc`` and
``lab dynamics`` (the LLC at the settings given here; calibrate them with ``lab llc RUN --calibrate``). Then it
finds, from the run's own files:

- the transitions of the watched metric (``heldout/icl_score``: the run's phase detector, in summary.json);
- the births of the heads: the first logged step at which the best layer-0 head's previous-token score and the
  best later head's prefix-matching score exceed the circuit summary's threshold (0.3), and which heads;
- the LLC's stage boundaries: where its curve turns (a local maximum or minimum, or the edge of a flat stretch,
  found as essential dynamics finds its turns, with the same prominence rule) and the slope of log-LLC against
  log-step between checkpoints;
- essential dynamics' turning points.

It prints them as one table, writes ``RUN/stages/stages.json`` and draws ``RUN/stages/stages.png`` (four panels
sharing the step axis).

Run:  .venv/bin/lab train experiment=olsson_text trainer.steps=14000 checkpoint.every=500 trainer.eval_every=500
      .venv/bin/python experiments/text_stages.py RUN --eps 1e-3        # + the LLC of every checkpoint
(docs/experiments/olsson-text.md: 40 checkpoints, about 1.5 min each for the LLC on 2 CPU cores shared with
another run; ``lab llc RUN --eps 1e-3 --steps ...`` first computes it at fewer, which this script then reads.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lab.devinterp import essential_dynamics, llc_over_checkpoints, turning_points  # noqa: E402
from lab.measures import llc_settings  # noqa: E402
from lab.measures.phase import first_crossing  # noqa: E402
from lab.rundir import check_run_dir, load_run_config  # noqa: E402
from lab.tracking import read_metrics  # noqa: E402

HEAD_THRESHOLD = 0.3  # the circuit summary's threshold for a previous-token head and an induction head


def per_step(rows: list[dict]) -> dict[int, dict]:
    """One row per step (a resumed or forked run can log a step twice: the later row wins)."""
    out: dict[int, dict] = {}
    for r in rows:
        out.setdefault(int(r["step"]), {}).update(r)
    return dict(sorted(out.items()))


def series(rows: dict[int, dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(s, r[key]) for s, r in rows.items() if r.get(key) is not None]
    return np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)


def head_births(rows: dict[int, dict], measure: str, layers) -> dict:
    """The first logged step at which the best head (over ``layers``) of ``measure`` exceeds the threshold."""
    keys = sorted(k for k in set().union(*rows.values()) if k.startswith(f"{measure}/L")
                  and int(k.split("/L")[1].split("H")[0]) in layers)
    if not keys:
        return {"measure": measure, "heads": [], "birth": None}
    steps = np.array(list(rows), float)
    best = np.array([max((r[k] for k in keys if r.get(k) is not None), default=np.nan) for r in rows.values()])
    birth = first_crossing(steps, best, HEAD_THRESHOLD, below=False)
    last = rows[max(rows)]
    final = {k.split("/")[1]: round(float(last[k]), 3) for k in keys if k in last}
    top = max(final, key=final.get) if final else None
    return {"measure": measure, "heads": keys, "birth": birth, "top_head": top, "final": final}


def llc_stages(llc: dict, prominence: float) -> dict:
    """The whole model's LLC curve: its turns (extrema and flat stretches) and its log-log slope per interval."""
    rows = llc["restrictions"]["all"]
    steps = np.array([r["step"] for r in rows], float)
    value = np.array([r["llc"] for r in rows], float)
    turns = turning_points(value[:, None], prominence=prominence)
    pos = (steps > 0) & (value > 0)
    s, v = steps[pos], value[pos]
    slopes = [{"from": float(a), "to": float(b), "slope": float(np.log(vb / va) / np.log(b / a))}
              for a, b, va, vb in zip(s[:-1], s[1:], v[:-1], v[1:], strict=True)]
    return {"steps": steps.tolist(), "llc": value.tolist(),
            "std_err": [r["std_err"] for r in rows],
            "turns": [{"from_step": float(steps[lo]), "step": float(steps[i]), "to_step": float(steps[hi]),
                       "kind": "maximum" if value[i] >= value[i - 1] else "minimum"}  # never an end point
                      for lo, i, hi in turns],
            "loglog_slopes": slopes}


def draw(rows, phase, births, llc, ed, path: Path, title: str) -> None:
    fig, axes = plt.subplots(4, 1, figsize=(9, 11), sharex=True)
    metric = phase["metric"]
    x, y = series(rows, metric)
    a = axes[0]
    a.plot(x, y, "k.-", label=metric)
    loss_key = metric.split("/")[0] + "/loss"
    if any(loss_key in r for r in rows.values()):
        t = a.twinx()
        lx, ly = series(rows, loss_key)
        t.plot(lx, ly, color="C7", lw=1, label=loss_key)
        t.set_ylabel(loss_key, color="C7")
    a.set_ylabel(metric)
    a.set_title("in-context learning score (grey: detected transitions)")
    h = axes[1]
    for b, colour in ((births["prev_token"], "C0"), (births["prefix_matching"], "C1")):
        for key in b["heads"]:
            hx, hy = series(rows, key)
            top = key.split("/")[1] == b.get("top_head")  # the head the score ends highest in: drawn bold
            h.plot(hx, hy, color=colour, alpha=1.0 if top else 0.35, lw=1.5 if top else 0.8, label=key if top else None)
        if b["birth"] is not None:
            h.axvline(b["birth"], color=colour, ls=":", lw=1.2)
    h.axhline(HEAD_THRESHOLD, color="gray", lw=0.8, ls="--")
    h.set_ylabel("score")
    h.set_title("heads: previous-token (layer 0, blue) and prefix matching (later layers, orange); dotted: births")
    h.legend(fontsize=8, loc="upper left")
    lax = axes[2]
    st, v, se = np.array(llc["steps"]), np.array(llc["llc"]), np.array(llc["std_err"])
    lax.errorbar(st, v, yerr=se, fmt="o-", ms=3, color="C2")
    for turn in llc["turns"]:
        lax.axvspan(turn["from_step"], turn["to_step"], color="C2", alpha=0.12)
        lax.axvline(turn["step"], color="C2", ls=":", lw=1)
    lax.set_ylabel("LLC (whole model)")
    lax.set_title("local learning coefficient (green: its turns)")
    e = axes[3]
    coords = np.array(ed["coords"])
    for c in range(min(2, coords.shape[1])):
        e.plot(ed["steps"], coords[:, c], "o-", ms=3, label=f"PC{c + 1} ({ed['explained_variance'][c]:.0%})")
    for tp in ed["turning_points"]:
        e.axvspan(tp["from_step"], tp["to_step"], color="red", alpha=0.08)
        e.axvline(tp["step"], color="red", ls=":", lw=1)
    e.set_ylabel("coordinate")
    e.set_title("essential dynamics (red: turning points)")
    e.legend(fontsize=8)
    for ax in axes:
        for tr in phase["transitions"]:
            ax.axvspan(tr["onset"], tr["end"], color="gray", alpha=0.12)
            ax.axvline(tr["mid"], color="gray", ls="--", lw=1)
        ax.set_xscale("symlog", linthresh=max(float(ed["steps"][1]), 1.0))
    e.set_xlim(0, max(rows) * 1.05)
    e.set_xlabel("step")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--eps", type=float, default=None, help="the LLC's step size (default: the run's measures)")
    p.add_argument("--nbeta", type=float, default=None)
    p.add_argument("--gamma", type=float, default=None)
    p.add_argument("--chains", type=int, default=None)
    p.add_argument("--chain-steps", type=int, default=None)
    p.add_argument("--prominence", type=float, default=0.1, help="a turn's prominence, as a fraction of the range")
    p.add_argument("--recompute", action="store_true", help="recompute the LLC and essential dynamics")
    a = p.parse_args(argv)
    run = check_run_dir(a.run_dir)
    if a.recompute or not (run / "llc" / "llc.json").is_file():
        cfg, _ = load_run_config(run)
        s = llc_settings(cfg.measures, cfg.trainer.batch_size)
        given = {"eps": a.eps, "nbeta": a.nbeta, "gamma": a.gamma, "chains": a.chains, "steps": a.chain_steps}
        s = dataclasses.replace(s, **{k: v for k, v in given.items() if v is not None})
        llc_over_checkpoints(run, s, wandb_mode="disabled")
    if a.recompute or not (run / "dynamics" / "dynamics.json").is_file():
        essential_dynamics(run)
    rows = per_step(read_metrics(run / "metrics.jsonl"))
    summary = json.loads((run / "summary.json").read_text())
    phase = summary["phase"]
    n_layers = 1 + max(int(k.split("/L")[1].split("H")[0]) for r in rows.values() for k in r if "/L" in k)
    births = {"prev_token": head_births(rows, "prev_token", [0]),
              "prefix_matching": head_births(rows, "prefix_matching", list(range(1, n_layers)))}
    llc = llc_stages(json.loads((run / "llc" / "llc.json").read_text()), a.prominence)
    ed = json.loads((run / "dynamics" / "dynamics.json").read_text())
    doc = {"run_dir": str(run), "steps": max(rows), "transitions": phase["transitions"], "metric": phase["metric"],
           "births": births, "llc": llc, "dynamics_turning_points": ed["turning_points"],
           "circuit": (summary.get("circuit") or {}).get("line")}
    (run / "stages").mkdir(exist_ok=True)
    (run / "stages" / "stages.json").write_text(json.dumps(doc, indent=2))
    draw(rows, phase, births, llc, ed, run / "stages" / "stages.png",
         f"{summary.get('experiment', '')} seed {summary.get('seed', '')}: stages over {max(rows):,} steps")
    print(f"{'event':58s} step(s)")
    for t in phase["transitions"]:
        print(f"{phase['metric'] + ' transition (onset, mid, end)':58s} {t['onset']:,.0f}, {t['mid']:,.0f}, "
              f"{t['end']:,.0f}")
    for b in births.values():
        where = "never" if b["birth"] is None else f"{b['birth']:,.0f}"
        print(f"{'birth: best ' + b['measure'] + ' head > 0.3 (top: ' + str(b.get('top_head')) + ')':58s} {where}")
    for t in llc["turns"]:
        print(f"{'LLC ' + t['kind'] + ' (span)':58s} {t['step']:,.0f} ({t['from_step']:,.0f}-{t['to_step']:,.0f})")
    for t in ed["turning_points"]:
        print(f"{'essential dynamics turn (span)':58s} {t['step']:,.0f} ({t['from_step']:,.0f}-{t['to_step']:,.0f})")
    print("LLC:", ", ".join(f"{s:,.0f}: {v:.1f}" for s, v in zip(llc["steps"], llc["llc"], strict=True)))
    print(f"wrote {run / 'stages' / 'stages.png'} and stages.json")


if __name__ == "__main__":
    main()
