"""Adaptive logging cadence: log densely while a watched measure moves, sparsely otherwise.

After each evaluation the trainer tells the cadence the watched value. If it changed by more
than ``threshold`` (relative to its size) per ``base_every`` steps, the next evaluation comes
``dense_every`` steps later instead of at the next scheduled step, until ``settle`` evaluations
in a row are calm. So a transition is resolved without logging the whole run densely.
"""

from __future__ import annotations

from dataclasses import dataclass

from lab.errors import check


@dataclass
class CadenceConfig:
    adaptive: bool = False  # densify logging (and checkpoints, with checkpoint_dense) while `watch` moves
    dense_every: int = 10  # steps between evaluations while moving
    base_every: int = 100  # the step scale the threshold refers to
    threshold: float = 0.05  # relative change per base_every steps that counts as moving
    settle: int = 3  # calm evaluations in a row that end a dense stretch
    checkpoint_dense: bool = True  # also checkpoint at the dense evaluations

    def validate(self) -> None:
        check(self.dense_every >= 1, "cadence.dense_every", self.dense_every, "must be >= 1")
        check(self.base_every >= 1, "cadence.base_every", self.base_every, "must be >= 1")
        check(self.threshold > 0, "cadence.threshold", self.threshold, "must be > 0")
        check(self.settle >= 1, "cadence.settle", self.settle, "must be >= 1")


class AdaptiveCadence:
    def __init__(self, cfg: CadenceConfig):
        self.cfg = cfg
        self.last: tuple[int, float] | None = None
        self.calm = cfg.settle
        self.dense = False

    def observe(self, step: int, value: float) -> None:
        if self.last is not None and step > self.last[0]:
            s0, v0 = self.last
            scale = max(abs(v0), abs(value), 1e-8)
            rate = abs(value - v0) / scale * self.cfg.base_every / (step - s0)
            if rate > self.cfg.threshold:
                self.dense, self.calm = True, 0
            else:
                self.calm += 1
                if self.calm >= self.cfg.settle:
                    self.dense = False
        self.last = (step, value)

    def next_stop(self, step: int, scheduled: int) -> int:
        """The next evaluation step: the scheduled one, or sooner while the watched value moves."""
        if self.cfg.adaptive and self.dense:
            return min(scheduled, step + self.cfg.dense_every)
        return scheduled
