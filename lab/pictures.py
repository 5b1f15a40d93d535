"""Attention pictures: every head's pattern on one fixed probe sequence, as one layers x heads grid per step.

The probe is the first sequence of the task's first evaluation set, the same at every step, so the pictures
of a run over training show one head becoming a previous-token head and another an induction head. Rows are
layers (L0 at the top), columns heads (H0 at the left); in each tile the query position runs down and the key
position across; dark is attention near 1. A grid is drawn straight into an image array (no figure), so a
picture at every checkpoint costs a few milliseconds: ``tracking.attention_images=false`` switches them off.
"""

from __future__ import annotations

from pathlib import Path

import jax
import matplotlib
import numpy as np

from lab.model import Transformer

GAP = 2  # pixels between tiles
TILE = 96  # a tile's side in pixels, whatever the sequence length (nearest-neighbour scaling)


def probe_sequence(task) -> dict:
    """The first sequence of the task's first evaluation set, as a batch of one."""
    first = next(iter(task.evals.values()))
    return jax.tree_util.tree_map(lambda a: a[:1], first)


class AttentionPictures:
    """Renders a run's attention grid at given parameters; one compiled forward pass serves every run of a
    program (their models share shapes)."""

    def __init__(self, model: Transformer, task):
        self.layers, self.heads = model.cfg.n_layers, model.cfg.n_heads
        names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(self.layers)]
        probe = probe_sequence(task)
        self.patterns = jax.jit(lambda p: [model.run_with_cache(p, probe, names)[1][n][0] for n in names])

    def grid(self, params) -> np.ndarray:
        """[layers * TILE + gaps, heads * TILE + gaps, 3] uint8: the patterns in grey-to-black on white."""
        pats = [np.asarray(p, np.float32) for p in jax.device_get(self.patterns(params))]  # [heads, T, T] each
        t = pats[0].shape[-1]
        idx = (np.arange(TILE) * t) // TILE  # nearest-neighbour upscaling of a T x T pattern to TILE x TILE
        h = self.layers * TILE + (self.layers - 1) * GAP
        w = self.heads * TILE + (self.heads - 1) * GAP
        img = np.ones((h, w), np.float32)
        for layer, pat in enumerate(pats):
            for head in range(self.heads):
                y, x = layer * (TILE + GAP), head * (TILE + GAP)
                img[y:y + TILE, x:x + TILE] = 1.0 - pat[head][np.ix_(idx, idx)]
        rgb = matplotlib.colormaps["gray"](np.clip(img, 0.0, 1.0))[..., :3]
        return (rgb * 255).astype(np.uint8)

    def save(self, params, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        matplotlib.image.imsave(path, self.grid(params))
        return path
