"""Attention pictures: every head's pattern on one fixed probe sequence, as one labelled layers x heads grid per step.

The probe is the task's ``picture_probe()`` (by default the first sequence of its first evaluation set), the same
at every step, so the pictures of a run over training show one head becoming a previous-token head and another an
induction head. Each tile is titled with its head (``L1H0``: layers and heads from 0), the query position runs
down and the key position across, a colour bar gives the scale (white 0, black 1), and on token tasks with a
circuit summary the probe's repeated tokens are marked beside the axes: an orange bar left of the rows of the
queries that repeat an earlier token, a blue bar under the columns of the keys an induction head should attend to
(the token after that earlier occurrence). A previous-token head is the dark sub-diagonal; an induction head is
dark where the orange rows meet the blue columns, one position past the diagonal of the first copy.

Drawing a labelled figure at every checkpoint would cost a matplotlib render each time, so the frame (titles,
axes, ticks, marks, colour bar) is rendered once per process and grid shape, and each picture only fills the
tiles' pixels and writes the PNG, on a thread of its own while training goes on (``AttentionPictures.submit``;
``bench/run.py``'s ``pictures`` section measures the cost). The PNG's text chunk
``induction-lab`` holds the layout as JSON (each tile's pixel box by head name, the colour bar's box, the marks),
so a reader (or a test) can find every head's tile. ``tracking.attention_images=false`` switches pictures off.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import jax
import matplotlib
import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lab.model import Transformer

CMAP = "Greys"  # attention 0 white, 1 black
QUERY_MARK, KEY_MARK = "#e66101", "#0571b0"  # repeated queries (orange), their induction targets (blue)
DPI = 100
METADATA_KEY = "induction-lab"


def probe_sequence(task) -> dict:
    """The sequence the pictures show, as a batch of one: the task's ``picture_probe``."""
    return task.picture_probe()


def repeat_marks(task, probe: dict) -> dict[str, list[int]]:
    """On a token task with a circuit summary: the query positions whose token occurred earlier in the probe
    (``queries``) and the key positions right after those earlier occurrences (``keys``, where an induction head
    attends); empty lists elsewhere (a task whose tokens are not what its heads match on)."""
    if task.mechanism_metric is None or "tokens" not in probe:
        return {"queries": [], "keys": []}
    from lab.measures.attention import induction_targets

    tgt = np.asarray(induction_targets(jax.numpy.asarray(probe["tokens"][:1])))[0]  # [q, k]
    return {"queries": np.flatnonzero(tgt.any(1)).tolist(), "keys": np.flatnonzero(tgt.any(0)).tolist()}


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs [(first, last), ...] of sorted positions."""
    out: list[tuple[int, int]] = []
    for p in positions:
        if out and p == out[-1][1] + 1:
            out[-1] = (out[-1][0], p)
        else:
            out.append((p, p))
    return out


def _ticks(t: int) -> list[int]:
    step = max(1, int(np.ceil(t / 4 / 8.0)) * 8) if t > 16 else max(1, t // 4)
    return sorted(set(list(range(0, t, step)) + [t - 1]))


class Frame:
    """The grid's frame, rendered once: an RGB image with every tile blank, and each tile's pixel box."""

    def __init__(self, layers: int, heads: int, t: int, marks: dict[str, list[int]]):
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # drawn once per process and shape: imported
        from matplotlib.figure import Figure  # where first needed, so a process that draws nothing never pays
        from matplotlib.lines import Line2D

        tile_in = max(1.1, min(t, 160) / DPI)
        legend = bool(marks["queries"])
        width = max(heads * (tile_in + 0.3) + 1.3, 3.8 if legend else 0.0)
        height = layers * (tile_in + 0.45) + 0.5 + (0.35 if legend else 0.0)
        fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(layers, heads, squeeze=False)
        blended = matplotlib.transforms.blended_transform_factory
        image = None
        for layer in range(layers):
            for head in range(heads):
                ax = axes[layer][head]
                image = ax.imshow(np.zeros((t, t)), cmap=CMAP, vmin=0.0, vmax=1.0, interpolation="nearest")
                ax.set_title(f"L{layer}H{head}", fontsize=9, pad=3)
                ax.set_xticks(_ticks(t))
                ax.set_yticks(_ticks(t))
                ax.tick_params(labelsize=6, length=2, pad=5)
                if head > 0:
                    ax.set_yticklabels([])
                if layer < layers - 1:
                    ax.set_xticklabels([])
                for sp in ax.spines.values():
                    sp.set_linewidth(0.6)
                for first, last in _runs(marks["queries"]):
                    ax.plot([-0.035, -0.035], [first - 0.5, last + 0.5], transform=blended(ax.transAxes, ax.transData),
                            color=QUERY_MARK, lw=2.5, clip_on=False, solid_capstyle="butt")
                for first, last in _runs(marks["keys"]):
                    ax.plot([first - 0.5, last + 0.5], [-0.035, -0.035], transform=blended(ax.transData, ax.transAxes),
                            color=KEY_MARK, lw=2.5, clip_on=False, solid_capstyle="butt")
            axes[layer][0].set_ylabel("query position", fontsize=7)
        for head in range(heads):
            axes[-1][head].set_xlabel("key position", fontsize=7)
        bar = fig.colorbar(image, ax=axes, shrink=0.8, aspect=30)
        bar.set_label("attention", fontsize=7)
        bar.ax.tick_params(labelsize=6)
        if legend:
            fig.legend(handles=[Line2D([], [], color=QUERY_MARK, lw=2.5, label="queries repeating an earlier token"),
                                Line2D([], [], color=KEY_MARK, lw=2.5,
                                       label="keys right after that earlier token (induction targets)")],
                       loc="outside lower left", fontsize=6.5, frameon=False, ncols=1 if heads < 4 else 2)
        fig.canvas.draw()
        self.rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
        height = self.rgb.shape[0]

        def box(ax) -> list[int]:  # [x0, y0, x1, y1) in image pixels, inside the tile's frame lines
            b = ax.get_window_extent()
            return [int(np.ceil(b.x0)) + 1, int(np.ceil(height - b.y1)) + 1, int(np.floor(b.x1)) - 1,
                    int(np.floor(height - b.y0)) - 1]

        self.tiles = {f"L{layer}H{head}": box(axes[layer][head]) for layer in range(layers) for head in range(heads)}
        self.colorbar = box(bar.ax)
        self.metadata = json.dumps({"tiles": self.tiles, "colorbar": self.colorbar, "positions": t, "cmap": CMAP,
                                    "marks": marks})


@lru_cache(maxsize=1)
def _writer() -> ThreadPoolExecutor:
    """The one thread that fills and writes pictures for every run of the process, in the order submitted (the
    frame's render included: it is cached, so it must be made once, by one thread)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="lab-pictures")


@lru_cache(maxsize=16)
def frame_for(layers: int, heads: int, t: int, queries: tuple[int, ...], keys: tuple[int, ...]) -> Frame:
    """One frame per grid shape and marks in a process (every run of a sweep, every test, shares it)."""
    return Frame(layers, heads, t, {"queries": list(queries), "keys": list(keys)})


class AttentionPictures:
    """Renders a run's attention grid at given parameters; one compiled forward pass and one frame serve every
    run of a program (their models share shapes)."""

    def __init__(self, model: Transformer, task):
        self.layers, self.heads = model.cfg.n_layers, model.cfg.n_heads
        names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(self.layers)]
        probe = probe_sequence(task)
        self.positions = int(np.shape(probe["tokens"] if "tokens" in probe else probe["targets"])[-1])
        self.marks = repeat_marks(task, probe)
        self.patterns = jax.jit(lambda p: [model.run_with_cache(p, probe, names)[1][n][0] for n in names])
        lut = matplotlib.colormaps[CMAP](np.linspace(0.0, 1.0, 256))[:, :3]
        self._lut = (lut * 255).round().astype(np.uint8)  # attention quantised to 256 levels -> RGB

    @property
    def frame(self) -> Frame:
        """Rendered at the first picture, not at construction: a run with no checkpoint draws nothing."""
        return frame_for(self.layers, self.heads, self.positions, tuple(self.marks["queries"]),
                         tuple(self.marks["keys"]))

    def grid(self, params) -> np.ndarray:
        """[height, width, 3] uint8: the frame with every tile filled by its head's pattern [query, key]."""
        return self.fill([np.asarray(p, np.float32) for p in jax.device_get(self.patterns(params))])

    def fill(self, pats: list[np.ndarray]) -> np.ndarray:
        """The frame with the tiles filled from each layer's patterns ([heads, T, T] per layer)."""
        frame = self.frame
        img = frame.rgb.copy()
        t = pats[0].shape[-1]
        for layer, pat in enumerate(pats):
            for head in range(self.heads):
                x0, y0, x1, y1 = frame.tiles[f"L{layer}H{head}"]
                rows = ((np.arange(y1 - y0) + 0.5) * t / (y1 - y0)).astype(np.int64)  # nearest neighbour
                cols = ((np.arange(x1 - x0) + 0.5) * t / (x1 - x0)).astype(np.int64)
                level = np.clip(pat[head][np.ix_(rows, cols)], 0.0, 1.0) * 255.0
                img[y0:y1, x0:x1] = self._lut[level.round().astype(np.uint8)]
        return img

    def save(self, params, path: Path) -> Path:
        """Draw and write the picture now."""
        return self._write(self.patterns(params), path)

    def submit(self, params, path: Path) -> Future:
        """Draw and write the picture on the pictures' thread; the patterns are dispatched here, from the
        parameters as they are now (training may go on and donate them). The future's result is the path."""
        return _writer().submit(self._write, self.patterns(params), path)

    def _write(self, patterns, path: Path) -> Path:
        img = self.fill([np.asarray(p, np.float32) for p in jax.device_get(patterns)])
        path.parent.mkdir(parents=True, exist_ok=True)
        info = PngInfo()
        info.add_text(METADATA_KEY, self.frame.metadata)
        Image.fromarray(img).save(path, pnginfo=info, compress_level=1)
        return path


def layout(path: Path) -> dict:
    """The layout an attention PNG carries: {"tiles": {"L0H0": [x0, y0, x1, y1], ...}, "colorbar": [...],
    "positions": T, "cmap": ..., "marks": {"queries": [...], "keys": [...]}}."""
    with Image.open(path) as im:
        return json.loads(im.text[METADATA_KEY])
