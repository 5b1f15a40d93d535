"""curves.png: losses and accuracies of a run, with detected transitions marked."""

from __future__ import annotations

import textwrap
from pathlib import Path

from matplotlib.figure import Figure


def figure(rows: int = 1, cols: int = 1, figsize=(8, 5), **subplots):
    """(figure, axes) drawn straight to a file, outside pyplot: the lab never chooses the user's matplotlib
    backend (a notebook that imports it keeps its inline figures) and never leaves a figure open."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, **subplots)


def _series(rows, key):
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and r["step"] > 0]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(rows: list[dict], path: str | Path, title: str = "", watch: str | None = None,
                transitions: list[dict] | None = None, note: str | None = None) -> None:
    """``note``: one line under the plots (the circuit summary's verdict)."""
    keys = sorted({k for r in rows for k in r if "/" in k and not k.startswith("perf/")})
    loss_keys = [k for k in keys if k.endswith("loss")]
    acc_keys = [k for k in keys if k.endswith("acc") or k.endswith("/cla") or k.endswith("/kl")]
    panels = [(loss_keys, "loss"), (acc_keys, "accuracy / KL")]
    if watch in keys and watch not in loss_keys + acc_keys:  # a watched curve of its own kind (Olsson's ICL score)
        panels.append(([watch], watch))
    fig, axes = figure(1, len(panels), figsize=(6 * len(panels), 4.5))
    for ax, (group, label) in zip(axes, panels, strict=True):
        for k in group:
            xs, ys = _series(rows, k)
            if xs:
                ax.plot(xs, ys, label=k, lw=2.0 if k == watch else 1.0)
        ax.set_xscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        for t in transitions or []:
            ax.axvspan(t["onset"], t["end"], color="tab:red", alpha=0.08)
            ax.axvline(t["mid"], color="tab:red", ls="--", lw=1)
        if group:
            ax.legend(fontsize=7, loc="best")
    if watch and transitions:
        axes[0].set_title(f"{watch}: transition midpoint(s) " + ", ".join(f"{t['mid']:.0f}" for t in transitions),
                          fontsize=9)
    fig.suptitle(title)
    if note:
        fig.text(0.5, 0.01, "\n".join(textwrap.wrap(note, 180)[:3]), ha="center", va="bottom", fontsize=8,
                 color="tab:green" if note.startswith("induction circuit") else "tab:red")
    # fixed margins: tight_layout draws the figure once more to measure it, as long as the savefig itself
    fig.subplots_adjust(left=0.06 if len(panels) == 2 else 0.04, right=0.99, bottom=0.2 if note else 0.12, top=0.87,
                        wspace=0.2)
    fig.savefig(path, dpi=110)


def plot_conditions(curves: dict[str, list[tuple[float, float]]], path: str | Path, ylabel: str, xlabel: str = "step",
                    title: str = "", hlines: dict[str, float] | None = None, logx: bool = True) -> None:
    """One curve per condition on shared axes: {label: [(x, y), ...]}."""
    fig, ax = figure(figsize=(8, 5))
    for label, pts in curves.items():
        pts = [p for p in pts if p[0] > 0 or not logx]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, lw=1.5)
    for label, y in (hlines or {}).items():
        ax.axhline(y, color="gray", ls=":", lw=1)
        ax.text(ax.get_xlim()[0], y, f" {label}", va="bottom", fontsize=8, color="gray")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
