"""Put runs side by side: curves grouped by condition (mean and spread over seeds), detected
transitions, and a table of phase-change steps against a baseline; PNG files and one
self-contained HTML report. Also ``show``: a one-screen summary of one run.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np
import yaml

from lab.errors import LabError
from lab.measures.phase import detect_transitions, first_crossing
from lab.plots import plt
from lab.tracking import read_metrics


def find_runs(paths) -> list[Path]:
    """Run directories named directly, or found (by summary.json) under sweep/experiment folders."""
    runs = []
    for p in map(Path, paths):
        if (p / "summary.json").is_file():
            runs.append(p)
        elif p.is_dir():
            found = sorted(q.parent for q in p.rglob("summary.json"))
            if not found:
                raise LabError(f"run_dir={p}: not a run directory and holds none (no summary.json)")
            runs += found
        else:
            raise LabError(f"run_dir={p}: no such directory")
    return runs


def load(run: Path) -> dict:
    if not (run / "metrics.jsonl").is_file():
        raise LabError(f"run_dir={run}: has no metrics.jsonl")
    summary = json.loads((run / "summary.json").read_text())
    return {"dir": run, "summary": summary, "rows": read_metrics(run / "metrics.jsonl")}


def label_of(s: dict) -> str:
    return f"{s.get('experiment', '?')}/{s.get('condition', 'none')}"


def group_runs(runs: list[Path]) -> dict[str, list[dict]]:
    loaded = [load(r) for r in runs]
    tasks = {d["summary"].get("task") for d in loaded}
    if len(tasks) > 1:
        raise LabError(f"runs: incompatible, they train different tasks ({', '.join(sorted(map(str, tasks)))})")
    groups: dict[str, list[dict]] = {}
    for d in loaded:
        groups.setdefault(label_of(d["summary"]), []).append(d)
    return groups


def series(d: dict, metric: str, x: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[metric]) for r in d["rows"] if isinstance(r.get(metric), (int, float))]
    if not pts:
        return np.zeros(0), np.zeros(0)
    s, v = np.array(pts, float).T
    if x == "sequences":
        s = s * d["summary"].get("batch_size", 1)
    return s, v


def aligned(group: list[dict], metric: str, x: str, n: int = 200):
    """Mean and spread (min, max) over seeds on a shared log-spaced grid: each run is interpolated
    in log-x, so runs logged at different cadences line up. Also the union of logged x."""
    ser = [series(d, metric, x) for d in group]
    ser = [(s, v) for s, v in ser if len(s) > 1]
    if not ser:
        return None
    lo = max(max(s[s > 0].min(), 1.0) for s, _ in ser)
    hi = min(s.max() for s, _ in ser)
    if hi <= lo:
        return None
    grid = np.geomspace(lo, hi, n)
    ys = np.array([np.interp(np.log(grid), np.log(np.maximum(s, 1e-9)), v) for s, v in ser])
    return grid, ys.mean(0), ys.min(0), ys.max(0)


def phase_table(groups: dict[str, list[dict]], metric: str, x: str, threshold: float | None,
                baseline: str | None) -> list[dict]:
    rows = []
    for label, group in groups.items():
        mids, firsts, finals = [], [], []
        for d in group:
            s, v = series(d, metric, x)
            ts = detect_transitions(s, v)
            if ts:
                mids.append(max(ts, key=lambda t: abs(t["after"] - t["before"]))["mid"])
            if threshold is not None:
                firsts.append(first_crossing(s, v, threshold))
            if len(v):
                finals.append(v[-1])
        row = {"condition": label, "runs": len(group),
               f"transition_mid ({x})": float(np.mean(mids)) if mids else None,
               "final": float(np.mean(finals)) if finals else None}
        if threshold is not None:
            ok = [f for f in firsts if f is not None]
            row[f"first < {threshold:.4g} ({x})"] = float(np.mean(ok)) if ok and len(ok) == len(firsts) else None
        rows.append(row)
    if baseline:
        key = [k for k in rows[0] if k.startswith("first <")] if threshold is not None else []
        key = key[0] if key else f"transition_mid ({x})"
        base = next((r[key] for r in rows if r["condition"] == baseline), None)
        for r in rows:
            r["delta vs baseline"] = None if r[key] is None or base is None else r[key] - base
    return rows


def plot_metric(groups, metric: str, x: str, path: Path, hlines: dict | None = None) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (label, group) in enumerate(groups.items()):
        a = aligned(group, metric, x)
        if a is None:
            continue
        grid, mean, lo, hi = a
        color = f"C{i % 10}"
        ax.plot(grid, mean, color=color, label=f"{label} (n={len(group)})")
        if len(group) > 1:
            ax.fill_between(grid, lo, hi, color=color, alpha=0.15)
        ts = detect_transitions(grid, mean)
        if ts:
            t = max(ts, key=lambda t: abs(t["after"] - t["before"]))
            ax.axvline(t["mid"], color=color, ls="--", lw=0.8)
    for name, y in (hlines or {}).items():
        ax.axhline(y, color="gray", ls=":", lw=1)
        ax.annotate(name, (0.01, y), xycoords=("axes fraction", "data"), fontsize=8, color="gray")
    ax.set_xscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(rows: list[dict]) -> str:
    keys = list(rows[0]) if rows else []
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def _fmt(v) -> str:
    return "—" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def compare(paths, metrics: list[str] | None = None, baseline: str | None = None, out: str | Path = "compare",
            threshold: float | None = None) -> Path:
    """Write one PNG per metric, table.md and report.html (self-contained) into ``out``."""
    runs = find_runs(paths)
    base_label = None
    if baseline:
        base_runs = find_runs([baseline])
        base_label = label_of(load(base_runs[0])["summary"])
        runs += [r for r in base_runs if r not in runs]
    groups = group_runs(runs)
    first = next(iter(groups.values()))[0]["summary"]
    if not metrics:
        metrics = [first.get("phase", {}).get("metric", "train/loss")]
    batch_sizes = {d["summary"].get("batch_size") for g in groups.values() for d in g}
    x = "sequences" if len(batch_sizes) > 1 else "step"
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LabError(f"--out={out}: exists and is not a folder")
    for m in metrics:
        if not any(len(series(d, m, x)[0]) for g in groups.values() for d in g):
            raise LabError(f"--metric={m}: not logged by these runs")
    out.mkdir(parents=True, exist_ok=True)
    parts, tables = [], []
    for m in metrics:
        png = out / (m.replace("/", "_").replace("@", "_at_") + ".png")
        plot_metric(groups, m, x, png)
        rows = phase_table(groups, m, x, threshold, base_label)
        table = markdown_table(rows)
        tables.append(f"## {m}\n\n{table}\n")
        parts.append((m, png, rows))
    (out / "table.md").write_text("\n".join(tables))
    (out / "report.html").write_text(_html(parts, runs))
    return out


def _html(parts, runs) -> str:
    body = ["<h1>induction-lab comparison</h1>", f"<p>{len(runs)} runs</p>"]
    for metric, png, rows in parts:
        data = base64.b64encode(png.read_bytes()).decode()
        name = html.escape(metric)
        body.append(f"<h2>{name}</h2><img alt='{name}' src='data:image/png;base64,{data}'>")
        keys = list(rows[0]) if rows else []
        body.append("<table><tr>" + "".join(f"<th>{html.escape(k)}</th>" for k in keys) + "</tr>")
        for r in rows:
            body.append("<tr>" + "".join(f"<td>{html.escape(_fmt(r[k]))}</td>" for k in keys) + "</tr>")
        body.append("</table>")
    body.append("<h2>runs</h2><ul>" + "".join(f"<li>{html.escape(str(r))}</li>" for r in runs) + "</ul>")
    style = ("body{font-family:sans-serif;max-width:960px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>comparison</title><style>{style}</style>" \
           f"</head><body>{''.join(body)}</body></html>\n"


def show(run_dir: str | Path) -> str:
    """A one-screen summary of a run."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise LabError(f"run_dir={run_dir}: not a run directory (no config.yaml)")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    s = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    m, t, o = cfg["model"], cfg["task"], cfg["optim"]
    lines = [f"run {run}",
             f"  experiment {cfg.get('experiment')}  condition {s.get('condition', '?')}  seed {cfg.get('seed')}",
             f"  task {t.get('name')}  " + " ".join(f"{k}={v}" for k, v in t.items()
                                                   if k not in ("name", "eval_seed") and v is not None)[:160],
             f"  model {m['n_layers']}L x {m['n_heads']}H, d_model {m['d_model']}, positions {m['positions']}, "
             f"layernorm {m['layernorm']}",
             f"  optim {o['name']} lr {o['lr']}  steps {cfg['trainer']['steps']}  batch {cfg['trainer']['batch_size']}"]
    if s.get("parent"):
        lines.append(f"  forked from {s['parent']['run_dir']} at step {s['parent']['step']}")
    if not s:
        lines.append("  (no summary.json: unfinished; `lab resume` continues it)")
    else:
        lines.append(f"  wall {s['wall_time_s']:.1f} s, {s['steps_per_sec']:.0f} steps/s")
        ph = s.get("phase", {})
        for tr in ph.get("transitions", []):
            lines.append(f"  transition in {ph['metric']}: {tr['before']:.3f} -> {tr['after']:.3f}, "
                         f"onset {tr['onset']:.0f}, mid {tr['mid']:.0f}, end {tr['end']:.0f}")
        if ph.get("threshold") is not None:
            lines.append(f"  {ph['metric']} first below {ph['threshold']:.4g}: {ph.get('first_below')}")
        fin = {k: v for k, v in s.get("final", {}).items() if "/" in k and "L" not in k.split("/")[-1][:1]}
        keys = [k for k in fin if k.endswith(("loss", "acc"))][:10]
        lines.append("  final: " + ", ".join(f"{k}={fin[k]:.3f}" for k in keys))
        if s.get("circuit"):
            lines.append("  " + s["circuit"]["line"])
        lines.append(f"  checkpoints: {s.get('checkpoints')}")
    files = sorted(p.name + ("/" if p.is_dir() else "") for p in run.iterdir())
    lines.append("  files: " + " ".join(files))
    return "\n".join(lines)
