"""curves.png: losses and accuracies of a run, with detected transitions marked."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _series(rows, key):
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and r["step"] > 0]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(rows: list[dict], path: str | Path, title: str = "", watch: str | None = None,
                transitions: list[dict] | None = None) -> None:
    keys = sorted({k for r in rows for k in r if "/" in k and not k.startswith("perf/")})
    loss_keys = [k for k in keys if k.endswith("loss")]
    acc_keys = [k for k in keys if k.endswith("acc") or k.endswith("/cla") or k.endswith("/kl")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, group, label in ((axes[0], loss_keys, "loss"), (axes[1], acc_keys, "accuracy / KL")):
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
