"""Where did a curve change? Transitions between plateaus, measured in log-step.

``detect_transitions(steps, values)`` finds each stretch where a logged curve moves by a
sizeable share of its range, and reports for it the level before and after, the onset,
midpoint and end (10 / 50 / 90 % of the change, interpolated in log-step) and the step of
steepest change. ``first_crossing`` gives threshold times (Singh: first step with loss < 0.4 ln 2).
"""

from __future__ import annotations

import numpy as np


def _smooth(y: np.ndarray, k: int) -> np.ndarray:
    """Running median over k points (odd), edges padded by reflection: robust to eval noise."""
    if k <= 1 or len(y) < k:
        return y.copy()
    h = k // 2
    yp = np.pad(y, h, mode="edge")
    return np.array([np.median(yp[i : i + k]) for i in range(len(y))])


def _cross(x: np.ndarray, y: np.ndarray, level: float, rising: bool) -> float:
    """First x (interpolated) where y passes level in the given direction."""
    s = y - level if rising else level - y
    idx = np.nonzero(s >= 0)[0]
    if len(idx) == 0:
        return float(x[-1])
    i = idx[0]
    if i == 0:
        return float(x[0])
    x0, x1, s0, s1 = x[i - 1], x[i], s[i - 1], s[i]
    return float(x0 + (x1 - x0) * (-s0) / (s1 - s0)) if s1 != s0 else float(x1)


def detect_transitions(steps, values, min_change: float = 0.15, slope: float = 0.2, smooth: int = 3) -> list[dict]:
    """Transitions of a curve, in order of step.

    The curve is median-smoothed and resampled on a uniform log-step grid. A transition is a
    stretch where it moves faster than ``slope`` times its full range per decade of steps, and
    whose total change is at least ``min_change`` of that range. Its ``before``/``after`` levels
    are the medians of the calmer stretches on either side (the plateaus); ``onset``/``mid``/``end``
    are where the curve crosses 10/50/90 % of the way between them (interpolated in log-step);
    ``steepest`` is the step of the largest |dy/dlog step|. Steps <= 0 are dropped (log axis).
    """
    steps = np.asarray(steps, dtype=float)
    y = np.asarray(values, dtype=float)
    ok = (steps > 0) & np.isfinite(y)
    steps, y = steps[ok], y[ok]
    if len(y) < 4:
        return []
    x = np.log10(steps)
    ys = _smooth(y, smooth)
    rng = float(ys.max() - ys.min())
    if rng <= 1e-12 or x[-1] <= x[0]:
        return []
    # evaluation noise, from successive differences (robust): a change must stand well above it
    noise = 1.4826 * float(np.median(np.abs(np.diff(y)))) / np.sqrt(2.0)
    floor = max(min_change * rng, 6.0 * noise)
    grid = np.linspace(x[0], x[-1], 400)
    g = np.interp(grid, x, ys)
    # the rate of change is read off a copy smoothed over ~0.05 decades, so that noise between
    # neighbouring evaluations does not pass for a transition
    dx = grid[1] - grid[0]
    sig = max(0.05 / dx, 1.0)
    k = np.arange(-int(3 * sig), int(3 * sig) + 1)
    kern = np.exp(-0.5 * (k / sig) ** 2)
    kern /= kern.sum()
    gs = np.convolve(np.pad(g, len(k) // 2, mode="edge"), kern, mode="valid")
    rate = np.abs(np.gradient(gs, grid)) / rng  # share of the range per decade
    active = rate > slope
    # regions of fast change, merging gaps shorter than 0.05 decades
    regions, i, n = [], 0, len(grid)
    while i < n:
        if not active[i]:
            i += 1
            continue
        j = i
        while j + 1 < n and active[j + 1]:
            j += 1
        if regions and grid[i] - grid[regions[-1][1]] < 0.05:
            regions[-1][1] = j
        else:
            regions.append([i, j])
        i = j + 1
    out = []
    for r, (a, b) in enumerate(regions):
        lo = regions[r - 1][1] if r else 0
        hi = regions[r + 1][0] if r + 1 < len(regions) else n - 1
        before = float(np.median(g[lo : a + 1]))
        after = float(np.median(g[b : hi + 1]))
        if abs(after - before) < floor:
            continue
        rising = after > before
        seg_x, seg_y = grid[lo : hi + 1], g[lo : hi + 1]
        k = a + int(np.argmax(rate[a : b + 1]))
        out.append({
            "before": before, "after": after,
            "onset": float(10 ** _cross(seg_x, seg_y, before + 0.1 * (after - before), rising)),
            "mid": float(10 ** _cross(seg_x, seg_y, before + 0.5 * (after - before), rising)),
            "end": float(10 ** _cross(seg_x, seg_y, before + 0.9 * (after - before), rising)),
            "steepest": float(10 ** grid[k]),
        })
    return out


def first_crossing(steps, values, threshold: float, below: bool = True) -> float | None:
    """The first logged step at which the curve is below (or above) the threshold, else None."""
    for s, v in zip(steps, values, strict=False):
        if v is not None and np.isfinite(v) and ((v < threshold) if below else (v > threshold)):
            return float(s)
    return None


def main_transition(transitions: list[dict]) -> dict | None:
    """The transition with the largest change (the phase change a run is about), or None."""
    return max(transitions, key=lambda t: abs(t["after"] - t["before"])) if transitions else None


TRANSITION_FIELDS = ("onset", "mid", "end", "steepest", "before", "after")


def flat(phase: dict, prefix: str = "phase/") -> dict:
    """A run's phase summary (summary.json's ``phase``) as flat scalars for a wandb summary: the watched metric,
    the number of transitions, the main one's fields as ``phase/onset`` ... ``phase/after``, every one's as
    ``phase/<i>/<field>`` (in order of step), and the threshold and first step below it where set. A key whose
    value does not exist (no transition, never below) is left out rather than given a placeholder, so a wandb
    table of runs can average each column over the runs that have it."""
    ts = phase.get("transitions", [])
    out = {f"{prefix}metric": phase["metric"], f"{prefix}transitions": len(ts)}
    main = main_transition(ts)
    if main is not None:
        out.update({f"{prefix}{k}": float(main[k]) for k in TRANSITION_FIELDS})
    for i, t in enumerate(ts):
        out.update({f"{prefix}{i}/{k}": float(t[k]) for k in TRANSITION_FIELDS})
    if phase.get("threshold") is not None:
        out[f"{prefix}threshold"] = float(phase["threshold"])
        if phase.get("first_below") is not None:
            out[f"{prefix}first_below"] = float(phase["first_below"])
    return out
