"""`make bench`: throughput figures measured side by side in one process, written to
bench/results.json. Ratios, not timed tests: the machine and its load change absolute numbers.

Sections (more come with the throughput issue):
- clamps: steady-state steps/s of the demo model with each clamp kind vs no clamp;
- logging: a whole `fit` at the default cadence (evaluators + measures) vs the same steps unlogged.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from lab.checkpoint import Checkpointer
from lab.clamp import ClampConfig
from lab.config import load_config
from lab.train import Trainer

BASE = ["experiment=demo", "tracking.wandb.mode=disabled", "trainer.progress=false", "trainer.steps_per_call=50"]


def steady(tr: Trainer, seconds: float = 3.0, state=None):
    """Steps per second of the fused training step (compiled beforehand), and the state to go on from."""
    st = state if state is not None else tr.init_state()
    st, _ = tr.scan_fn(st)
    jax.block_until_ready(st)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        st, _ = tr.scan_fn(st)
        jax.block_until_ready(st)  # dispatch is asynchronous: without this the clock only sees the queueing
        n += tr.chunk
    return n / (time.perf_counter() - t0), st


def interleaved(trainers: dict, seconds: float, rounds: int = 5) -> dict[str, float]:
    """Median steps/s of each trainer over rounds that visit them in turn, so drifts in the machine's
    speed hit every condition alike."""
    states = {k: None for k in trainers}
    runs = {k: [] for k in trainers}
    names = list(trainers)
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:  # rotate: no condition always goes first
            sps, states[k] = steady(trainers[k], seconds / rounds, states[k])
            runs[k].append(sps)
    return {k: float(np.median(v)) for k, v in runs.items()}


def trainer(clamps=None, extra=()):
    cfg, _ = load_config(BASE + list(extra))
    cfg.clamps = clamps or {}
    return Trainer(cfg)


def bench_clamps(seconds: float) -> dict:
    ref_dir = Path(tempfile.mkdtemp()) / "ref"
    tr0 = trainer()
    ck = Checkpointer(ref_dir / "checkpoints")
    ck.save(0, tr0.init_state())
    ck.close()
    kinds = {
        "zero (attn_out)": ClampConfig(site="blocks.0.hook_attn_out", value="zero"),
        "previous_token (pattern)": ClampConfig(site="blocks.0.attn.hook_pattern", heads=[0], value="previous_token"),
        "induction (pattern)": ClampConfig(site="blocks.1.attn.hook_pattern", heads=[0], value="induction"),
        "ablate (v)": ClampConfig(site="blocks.1.attn.hook_v", heads=[1], value="ablate"),
        "ablate + preserve patterns": ClampConfig(site="blocks.0.attn.hook_v", heads=[1], value="ablate",
                                                  preserve="patterns"),
        "perfect_copy": ClampConfig(site="blocks.1.attn.hook_pattern", heads=[0], value="perfect_copy"),
        "windowed zero (closed)": ClampConfig(site="blocks.0.hook_attn_out", value="zero", windows=[[10**9, -1]]),
        "reference": ClampConfig(site="blocks.0.attn.hook_pattern", value="reference", reference_dir=str(ref_dir),
                                 reference_step=0),
        "frozen": ClampConfig(site="blocks.0.hook_attn_out", value="frozen", windows=[[0, -1]]),
    }
    trainers = {"none": tr0, **{name: trainer({"c": c}) for name, c in kinds.items()}}
    sps = interleaved(trainers, seconds)
    out = {}
    for name, v in sps.items():
        out[name] = {"steps_per_sec": v, "ratio": v / sps["none"]}
        print(f"  clamp {name:28s} {v:8.1f} steps/s  x{v / sps['none']:.2f}", file=sys.stderr)
    return out


def bench_logging() -> dict:
    """A whole 1500-step demo fit after compilation: unlogged, at the library's default cadence
    (a row every 100 steps: evaluators + measures), and at the demo's denser one (+20 log-spaced)."""
    res = {}
    setups = (("unlogged", ["trainer.eval_every=0", "trainer.eval_log_points=0", "measures.names=[none]"]),
              ("default cadence (every 100)", ["trainer.eval_log_points=0"]),
              ("demo cadence (every 100 + 20 log-spaced)", []))
    no_ckpt = ["checkpoint.every=0", "checkpoint.log_points=0"]
    trainers = {label: trainer(extra=[*no_ckpt, *extra]) for label, extra in setups}
    for tr in trainers.values():
        tr.fit(tr.init_state())  # compile everything once
    times = {label: [] for label in trainers}
    for _ in range(3):
        for label, tr in trainers.items():
            t0 = time.perf_counter()
            tr.fit(tr.init_state())
            times[label].append(time.perf_counter() - t0)
    base = float(np.median(times["unlogged"]))
    for label, ts in times.items():
        res[label] = {"seconds": float(np.median(ts)), "cost": float(np.median(ts)) / base - 1.0}
        print(f"  {label:42s} {np.median(ts):6.2f} s  (+{100 * (np.median(ts) / base - 1):.1f} %)", file=sys.stderr)
    return res


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    results = {"machine": {"platform": platform.platform(), "device": str(jax.devices()[0].device_kind),
                           "cpus": __import__("os").cpu_count()}}
    print("clamps (demo model, steady-state fused steps):", file=sys.stderr)
    results["clamps"] = bench_clamps(seconds)
    print("logging (demo, whole fit after compilation):", file=sys.stderr)
    results["logging"] = bench_logging()
    out = Path(__file__).parent / "results.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
