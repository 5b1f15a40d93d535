"""Where logged rows go: ``metrics.jsonl`` in the run directory, and a wandb run.

wandb is offline by default (no account, no network: the run lands in ``RUN_DIR/wandb`` and
``wandb sync`` uploads it later), online when the user asks and has a key, or disabled. wandb
must never break a run: if it cannot start, the lab warns once and keeps logging locally.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from lab.errors import check

WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class WandbConfig:
    mode: str = "offline"
    project: str = "induction-lab"
    entity: str | None = None
    group: str | None = None  # default: the experiment name
    job_type: str | None = None  # default: the clamp condition ("none" without clamps), else "train"
    tags: list[str] = field(default_factory=list)
    init_timeout: float = 30.0  # seconds an online start may take before the run falls back to offline

    def validate(self) -> None:
        check(self.mode in WANDB_MODES, "tracking.wandb.mode", self.mode, f"one of {', '.join(WANDB_MODES)}")
        check(self.init_timeout > 0, "tracking.wandb.init_timeout", self.init_timeout, "must be > 0")


@dataclass
class TrackingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    attention_images: bool = True  # every head's attention on a fixed probe at each checkpoint (lab/pictures.py)
    # more steps to draw them at, on request (each becomes a logged row too): tracking.attention_at=[150,175,200]
    attention_at: list[int] = field(default_factory=list)

    def validate(self) -> None:
        self.wandb.validate()
        check(all(isinstance(s, int) and s >= 0 for s in self.attention_at), "tracking.attention_at",
              list(self.attention_at), "a list of steps >= 0")
        check(self.attention_images or not self.attention_at, "tracking.attention_at", list(self.attention_at),
              "needs tracking.attention_images=true")


def _clean(v):
    """JSON-safe scalar: NaN and infinities become strings JSON can hold."""
    v = float(v) if not isinstance(v, (int, str, bool)) else v
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl file (a torn last line from a crash is skipped)."""
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


class Tracker:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors it to wandb.

    In wandb each row is logged at its training step and with ``sequences_seen`` (step x
    ``sequences_per_step``), the x-axis every metric is defined against (``define_metric``), so runs with
    different batch sizes line up in the UI; "Step" stays selectable."""

    def __init__(self, run_dir: Path, cfg: TrackingConfig, config: dict, name: str, group: str,
                 job_type: str, resume: bool = False, metrics_file: str = "metrics.jsonl", wandb_id_suffix: str = "",
                 sequences_per_step: int | None = None):
        self.path = Path(run_dir) / metrics_file
        self._file = open(self.path, "a")
        self.run = None
        self.sequences_per_step = sequences_per_step
        wb = cfg.wandb
        self.run = start_wandb(wb, dir=str(run_dir), group=wb.group or group, job_type=wb.job_type or job_type,
                               name=name, config=config, id=wandb_id(run_dir) + wandb_id_suffix,
                               resume="allow" if resume else None)
        if self.run is not None:
            import wandb

            self._image = wandb.Image
            if sequences_per_step:
                try:
                    self.run.define_metric("sequences_seen")
                    self.run.define_metric("*", step_metric="sequences_seen")
                except Exception as e:  # wandb must never stop a run
                    print(f"warning: wandb define_metric failed ({e}); continuing", file=sys.stderr)

    def log(self, row: dict) -> None:
        row = {k: _clean(v) for k, v in row.items()}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.run is not None:
            try:
                extra = ({"sequences_seen": int(row["step"]) * self.sequences_per_step} if self.sequences_per_step
                         else {})
                self.run.log({**{k: v for k, v in row.items() if k != "step"}, **extra}, step=int(row["step"]))
            except Exception as e:  # wandb must never stop a run; the row is in metrics.jsonl already
                print(f"warning: wandb log failed ({e}); continuing", file=sys.stderr)
                self.run = None

    def image(self, key: str, path: Path, step: int, caption: str = "") -> None:
        """Log the PNG at ``path`` as a wandb image at ``step`` (the row of that step, when it was just logged)."""
        if self.run is not None:
            try:
                self.run.log({key: self._image(str(path), caption=caption)}, step=int(step))
            except Exception as e:  # wandb must never stop a run; the PNG stays in the run directory
                print(f"warning: wandb image failed ({e}); continuing", file=sys.stderr)

    def summary(self, values: dict) -> None:
        if self.run is not None:
            try:
                for k, v in values.items():
                    if isinstance(v, (int, float, str)):
                        self.run.summary[k] = v
            except Exception as e:  # wandb must never stop a run; every value is in summary.json too
                print(f"warning: wandb summary failed ({e}); continuing", file=sys.stderr)

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.close()
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as e:  # wandb must never stop a run; its offline files stay for `wandb sync`
                print(f"warning: wandb finish failed ({e})", file=sys.stderr)
            self.run = None


def start_wandb(wb: WandbConfig, **kwargs):
    """A wandb run in ``wb.mode`` (kwargs: wandb.init's), or None. Online that cannot start (no key, no network, no
    service) falls back to offline; a wandb that cannot start at all warns once and gives None: wandb must never stop
    a run or a comparison."""
    if wb.mode == "disabled":
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    kwargs = dict(project=wb.project, entity=wb.entity, tags=list(wb.tags),
                  reinit="create_new", **kwargs)  # batched runs open several wandb runs in one process
    for mode in [wb.mode] + (["offline"] if wb.mode == "online" else []):
        try:
            import wandb

            settings = wandb.Settings(console="off", quiet=True, init_timeout=wb.init_timeout)
            return wandb.init(mode=mode, settings=settings, **kwargs)
        except Exception as e:  # wandb must never stop a run
            then = "logging offline" if mode == "online" else "logging locally only"
            warnings.warn(f"wandb could not start in {mode} mode ({type(e).__name__}: {_first_line(e)}); {then}",
                          stacklevel=3)
    return None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def wandb_id(run_dir: Path) -> str:
    """A stable wandb run id per run directory, so a resumed run continues the same wandb run."""
    return hashlib.sha1(str(Path(run_dir).absolute()).encode()).hexdigest()[:16]
