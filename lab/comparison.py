"""Put runs side by side: curves grouped by condition (mean and spread over seeds), detected
transitions, and a table of phase-change steps against a baseline; PNG files and one
self-contained HTML report (every image inlined, no script: it opens offline, anywhere), with each
condition's attention grids over training. With ``wandb``, the same as a wandb run of job_type
``compare`` in the runs' group. Also ``show``: a one-screen summary of one run.
"""

from __future__ import annotations

import base64
import html
import json
import sys
from pathlib import Path

import numpy as np
import yaml

from lab.config import Config
from lab.errors import LabError
from lab.measures.phase import detect_transitions, first_crossing, main_transition
from lab.plots import figure
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
    cfg = (yaml.safe_load((run / "config.yaml").read_text()) or {}) if (run / "config.yaml").is_file() else {}
    # the run's own phase-detector smoothing (the config's default where it names none), so that compare finds the
    # transitions its summary.json reports
    return {"dir": run, "summary": summary, "rows": read_metrics(run / "metrics.jsonl"),
            "smooth": int(cfg.get("watch_smooth", Config.watch_smooth))}


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
            ts = detect_transitions(s, v, smooth=d["smooth"])
            if ts:
                mids.append(main_transition(ts)["mid"])
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
    fig, ax = figure(figsize=(8, 5))
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
            t = main_transition(ts)
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


def markdown_table(rows: list[dict]) -> str:
    keys = list(rows[0]) if rows else []
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def _fmt(v) -> str:
    return "—" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def attention_strip(group: list[dict], most: int = 8) -> tuple[Path | None, list[tuple[int, Path]]]:
    """The attention grids (``RUN_DIR/attention/stepNNNNNNN.png``, drawn at checkpoints) of the group's first run
    that has them: at most ``most``, the first and last steps and the checkpoints nearest to evenly spaced steps
    between (checkpoints crowd the start, log-spaced; the birth is usually late)."""
    for d in group:
        pngs = sorted((int(p.stem[4:]), p) for p in (d["dir"] / "attention").glob("step*.png") if p.stem[4:].isdigit())
        if pngs:
            at = np.array([st for st, _ in pngs], float)
            want = np.linspace(at[0], at[-1], min(most, len(pngs)))
            keep = sorted({int(np.argmin(np.abs(at - w))) for w in want})
            return d["dir"], [pngs[i] for i in keep]
    return None, []


def compare(paths, metrics: list[str] | None = None, baseline: str | None = None, out: str | Path = "compare",
            threshold: float | None = None, wandb_mode: str | None = None) -> Path:
    """Write one PNG per metric, table.md and report.html (self-contained) into ``out``; with ``wandb_mode``
    (offline | online) also a wandb run of job_type ``compare`` under ``out/wandb``."""
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
    if wandb_mode is not None and wandb_mode not in ("online", "offline"):
        raise LabError(f"--wandb={wandb_mode}: one of online, offline")
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
    strips = {label: attention_strip(group) for label, group in groups.items()}
    (out / "report.html").write_text(_html(parts, groups, strips))
    if wandb_mode is not None:
        log_comparison(out, groups, parts, strips, wandb_mode)
    return out


def _img(path: Path, alt: str) -> str:
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}'>"


def _html_table(keys: list[str], rows: list[list]) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(k)}</th>" for k in keys) + "</tr>"
    return "<table>" + head + "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>"
                                      for r in rows) + "</table>"


def _run_rows(groups) -> list[list]:
    """One row per run: condition, seed, the transition's midpoint, the circuit summary's verdict, directory."""
    rows = []
    for label, group in groups.items():
        for d in group:
            s = d["summary"]
            main = main_transition(s.get("phase", {}).get("transitions") or [])
            circuit = (s.get("circuit") or {}).get("line", "—")
            as_trained = (s.get("circuit_as_trained") or {}).get("line", "— (no clamps)")
            rows.append([label, s.get("seed"), main and main["mid"], circuit, as_trained, str(d["dir"])])
    return rows


RUN_KEYS = ["condition", "seed", "transition mid (step)", "circuit (without clamps)", "circuit (as trained)", "run"]


def _html(parts, groups, strips) -> str:
    n = sum(len(g) for g in groups.values())
    body = ["<h1>induction-lab comparison</h1>", f"<p>{n} runs in {len(groups)} conditions</p>"]
    for metric, png, rows in parts:
        body.append(f"<h2>{html.escape(metric)}</h2>" + _img(png, metric))
        keys = list(rows[0]) if rows else []
        body.append(_html_table(keys, [[r[k] for k in keys] for r in rows]))
    if any(steps for _, steps in strips.values()):
        body.append("<h2>Attention over training</h2><p>Every head's pattern on the run's fixed probe sequence, "
                    "layers by rows, heads by columns (query down, key across), at its checkpoints.</p>")
        for label, (run, steps) in strips.items():
            if not steps:
                continue
            body.append(f"<h3>{html.escape(label)} <small>({html.escape(str(run))})</small></h3><div class='strip'>")
            body += [f"<figure>{_img(p, f'{label} step {st}')}<figcaption>step {st:,}</figcaption></figure>"
                     for st, p in steps]
            body.append("</div>")
    body.append("<h2>Runs</h2>" + _html_table(RUN_KEYS, _run_rows(groups)))
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto;padding:0 1em}table{border-collapse:collapse;"
             "margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}"
             ".strip{display:flex;flex-wrap:wrap;gap:8px}.strip figure{margin:0;flex:0 0 auto;width:180px}"
             "figcaption{font-size:80%;text-align:center}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>comparison</title><style>{style}</style>" \
           f"</head><body>{''.join(body)}</body></html>\n"


def log_comparison(out: Path, groups, parts, strips, mode: str) -> None:
    """The comparison as a wandb run of job_type ``compare`` in the runs' group (their experiment, the one wandb
    group they were logged to; "compare" when they come from several) and project: per metric the phase table as
    a wandb Table (``phase_table/<metric>``) and its figure (``figure/<metric>``), each condition's attention grids
    (``attention/<condition>``), and the runs as a Table (``runs``) with their directories. wandb failing only
    warns: the comparison is in ``out`` already."""
    from lab.tracking import WandbConfig, start_wandb

    first = next(iter(groups.values()))[0]  # the runs' project and entity, as their config.yaml records them
    saved = (yaml.safe_load((first["dir"] / "config.yaml").read_text()) or {}).get("tracking", {}).get("wandb", {})
    wb = WandbConfig(mode=mode, **{k: saved[k] for k in ("project", "entity") if saved.get(k)})
    experiments = {d["summary"].get("experiment") for g in groups.values() for d in g}
    # the wandb group the runs were logged to: their tracking.wandb.group, else their experiment
    group = saved.get("group") or (experiments.pop() if len(experiments) == 1 else "compare")
    run = start_wandb(wb, dir=str(out.absolute()), group=group, job_type="compare", name=f"compare {group}",
                      config={"runs": [str(d["dir"].absolute()) for g in groups.values() for d in g],
                              "conditions": list(groups), "metrics": [m for m, _, _ in parts]})
    if run is None:
        return
    try:
        import wandb

        logged = {}
        for metric, png, rows in parts:
            keys = list(rows[0]) if rows else []
            logged[f"phase_table/{metric}"] = wandb.Table(columns=keys, data=[[r[k] for k in keys] for r in rows])
            logged[f"figure/{metric}"] = wandb.Image(str(png), caption=metric)
        for label, (_, steps) in strips.items():
            if steps:
                logged[f"attention/{label}"] = [wandb.Image(str(p), caption=f"step {st}") for st, p in steps]
        logged["runs"] = wandb.Table(columns=RUN_KEYS, data=_run_rows(groups))
        run.log(logged)
        run.finish()
    except Exception as e:  # wandb must never stop a comparison; everything is in `out`
        print(f"warning: wandb comparison failed ({e}); report.html and table.md are in {out}", file=sys.stderr)


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
            clamped = s.get("circuit_as_trained")
            lines.append("  " + ("without clamps: " if clamped else "") + s["circuit"]["line"])
            if clamped:
                lines.append("  " + clamped["line"])
        lines.append(f"  checkpoints: {s.get('checkpoints')}")
    files = sorted(p.name + ("/" if p.is_dir() else "") for p in run.iterdir())
    lines.append("  files: " + " ".join(files))
    return "\n".join(lines)
