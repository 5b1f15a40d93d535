"""`make bench`: throughput figures measured side by side in one process, written to
bench/results.json. Ratios, not timed tests: the machine and its load change absolute numbers.

Sections:
- peak: float32 matmul GFLOP/s of a 2048^2 product, the yardstick of model FLOPs utilisation (MFU);
- models: for olsson_repeat, reddy_bursty and singh_fewshot, steps/s, tokens/s and MFU of one run, and the
  ratio to a minimal hand-written JAX step of the same model and batch (bench/minimal.py), interleaved;
- transformerlens: the olsson_repeat model as a TransformerLens HookedTransformer trained with torch
  (only when the optional environment exists: `make bench-tl-env`);
- vmapped: runs·steps/s and XLA's memory for 1..64 vmapped singh_fewshot runs (and a few olsson_repeat);
- memory: peak resident memory of one default olsson_repeat run (`lab train`, a child process);
- clamps: steady-state steps/s of the demo model with each clamp kind vs no clamp;
- logging: a whole `fit` at the default cadence (evaluators + measures) vs the same steps unlogged;
- demo: wall time from `lab train experiment=demo` to the end of its detected transition, compile included;
- study: Singh's Fig. 5b study (6 conditions x 5 seeds x 18,750 steps) by the lab's one command
  (experiments/singh_clamps.py) and by the authors' icl-dynamics run by run (``--icl``, ``--icl-python``), on one
  feature file, and each preset's step against the unclamped one (bench/singh_study.py);
- positions: the relative-position term's forward and backward (edelman_markov's shapes) by the Music Transformer
  skew, which full rows use, against the per-pair gather a pruned readout's rows use;
- devinterp: the LLC at every checkpoint of a fresh default demo run (4 chains x 200 SGLD steps, 50 burn-in,
  ε = 1e-3) by the lab (one program) and by devinterp (in the optional environment), the same data and settings:
  wall times, their ratio and the agreement (bench/devinterp_side_by_side.py; only with `make bench-tl-env`).
`python bench/run.py SECONDS [SECTION ...] [--runs 1,16,256]` runs some sections only (and other
vmapped run counts); on an accelerator the vmapped section goes up to 256 runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from lab.checkpoint import Checkpointer
from lab.clamp import ClampConfig
from lab.config import load_config
from lab.errors import LabError
from lab.loop import Sink, drive
from lab.runs import Runs

# the clamp and logging sections measure the demo task on the model they always have (2 layers x 2 heads, learned
# positions), so their ratios stay comparable across sessions; the demo itself now has 1 head and Shortformer positions
BASE = ["experiment=demo", "model.n_heads=2", "model.positions=learned", "trainer.steps=1500",
        "tracking.wandb.mode=disabled", "trainer.progress=false", "trainer.steps_per_call=50"]


def steady(tr: Runs, seconds: float = 3.0, state=None):
    """Steps per second of the fused training step (compiled beforehand), and the state to go on from."""
    st = state if state is not None else tr.init_state()
    loop = tr.program if isinstance(tr, Runs) else tr  # a lab program, or the minimal loop (same interface)
    st, _ = loop.scan_fn(st)
    jax.block_until_ready(st)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        st, _ = loop.scan_fn(st)
        jax.block_until_ready(st)  # dispatch is asynchronous: without this the clock only sees the queueing
        n += loop.parts.chunk if isinstance(tr, Runs) else tr.chunk
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
    return Runs(cfg)


def bench_clamps(seconds: float) -> dict:
    ref_dir = Path(tempfile.mkdtemp()) / "ref"
    tr0 = trainer()
    ck = Checkpointer(ref_dir / "checkpoints")
    ck.save(0, tr0.init_run_state().saved())
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


def fit(tr: Runs):
    """A whole run of ``tr`` from step 0, through the lab's host loop, its rows kept nowhere."""
    return drive(tr, tr.init_state(), [Sink(tr.cfg.cadence)], tr.plan)


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
        fit(tr)  # compile everything once
    times = {label: [] for label in trainers}
    for _ in range(3):
        for label, tr in trainers.items():
            t0 = time.perf_counter()
            fit(tr)
            times[label].append(time.perf_counter() - t0)
    base = float(np.median(times["unlogged"]))
    for label, ts in times.items():
        res[label] = {"seconds": float(np.median(ts)), "cost": float(np.median(ts)) / base - 1.0}
        print(f"  {label:42s} {np.median(ts):6.2f} s  (+{100 * (np.median(ts) / base - 1):.1f} %)", file=sys.stderr)
    return res


ROOT = Path(__file__).resolve().parent.parent
MODELS = ("olsson_repeat", "reddy_bursty", "singh_fewshot")
QUIET = ["tracking.wandb.mode=disabled", "trainer.progress=false"]
# olsson_repeat trains with rotary positions since the induction-circuit fix; its benchmark keeps the learned
# absolute positions TransformerLens's "standard" embedding has, so the side-by-side ratio compares like with like
PINS = {"olsson_repeat": ["model.positions=learned"]}


def exp_args(exp: str) -> list[str]:
    return [f"experiment={exp}", *PINS.get(exp, []), *QUIET]


def bench_peak(reps: int = 7) -> float:
    """float32 GFLOP/s of a 2048^2 matmul (median of reps)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (2048, 2048), np.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        ts.append(time.perf_counter() - t0)
    gf = 2 * 2048 ** 3 / float(np.median(ts)) / 1e9
    print(f"  matmul 2048^2: {gf:.0f} GFLOP/s", file=sys.stderr)
    return gf


def step_flops(tr, state) -> float:
    """XLA's FLOP count of one training step of tr (the single-step program)."""
    ca = tr.program.step_fn.lower(state).compile().cost_analysis()
    ca = ca[0] if isinstance(ca, list) else ca
    return float(ca.get("flops", 0.0))


class MinimalLoop:
    """The minimal loop behind steady()'s interface: one jitted step per Python call, chunk calls per round."""

    def __init__(self, init, step, chunk: int):
        (self.params, self.opt_state, self.key), self.step, self.chunk, self.i = init, step, chunk, 0

    def init_state(self):
        return None

    def scan_fn(self, _):
        loss = None
        for _ in range(self.chunk):
            self.params, self.opt_state, loss = self.step(self.params, self.opt_state, self.key, self.i)
            self.i += 1
        return loss, None


def bench_models(seconds: float, peak: float) -> dict:
    from minimal import make_step

    out = {}
    for exp in MODELS:
        cfg, _ = load_config(exp_args(exp))
        tr = Runs(cfg)
        flops = step_flops(tr, tr.init_state())
        minimal = MinimalLoop(*make_step(tr), tr.program.parts.chunk)
        sps = interleaved({"lab": tr, "minimal": minimal}, 2 * seconds)
        tokens = cfg.trainer.batch_size * tr.task.seq_len
        r = {"steps_per_sec": sps["lab"], "tokens_per_sec": sps["lab"] * tokens, "flops_per_step": flops,
             "mfu": flops * sps["lab"] / (peak * 1e9), "minimal_steps_per_sec": sps["minimal"],
             "lab_over_minimal": sps["lab"] / sps["minimal"], "batch": [cfg.trainer.batch_size, tr.task.seq_len]}
        out[exp] = r
        print(f"  {exp:14s} lab {r['steps_per_sec']:7.1f} steps/s ({r['tokens_per_sec']:9.0f} tok/s, "
              f"MFU {100 * r['mfu']:4.1f} %)  minimal JAX {r['minimal_steps_per_sec']:7.1f}  "
              f"lab/minimal x{r['lab_over_minimal']:.2f}", file=sys.stderr)
    return out


def bench_transformerlens(seconds: float) -> dict:
    """The TransformerLens loop in its own environment, bracketed by the lab's olsson_repeat step measured
    just before and just after it (the machine's speed drifts; the ratio uses their mean)."""
    py = ROOT / ".venv-tl" / "bin" / "python"
    if not py.exists():
        print("  skipped: no TransformerLens environment (make bench-tl-env)", file=sys.stderr)
        return {"skipped": "no .venv-tl (make bench-tl-env)"}
    cfg, _ = load_config(exp_args("olsson_repeat"))
    tr = Runs(cfg)
    before, state = steady(tr, seconds)
    p = subprocess.run([str(py), str(ROOT / "bench" / "tl_loop.py"), str(2 * seconds)], capture_output=True, text=True)
    if p.returncode != 0:
        msg = (p.stderr.strip().splitlines() or ["failed"])[-1]
        print(f"  failed: {msg}", file=sys.stderr)
        return {"failed": msg}
    after, _ = steady(tr, seconds, state)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["lab_steps_per_sec"] = (before + after) / 2
    r["lab_over_transformerlens"] = r["lab_steps_per_sec"] / r["steps_per_sec"]
    print(f"  olsson_repeat  TransformerLens {r['steps_per_sec']:.1f} steps/s (torch {r['torch']}); lab "
          f"{before:.1f} before, {after:.1f} after: lab/TL x{r['lab_over_transformerlens']:.2f}", file=sys.stderr)
    return r


def bench_vmapped(seconds: float, peak: float, exp: str, counts, chunk: int) -> dict:
    out = {}
    one = None
    for n in counts:
        cfgs = [load_config([*exp_args(exp), f"seed={s}", f"trainer.steps_per_call={chunk}"])[0]
                for s in range(n)]
        bt = Runs(cfgs)
        state = bt.init_state()
        mem = bt.check_memory(state)
        sps, _ = steady(bt, seconds, state)
        if one is None:
            one = sps
            solo = Runs(cfgs[0])
            flops = step_flops(solo, solo.init_state())
        r = {"runs": n, "runs_steps_per_sec": n * sps, "speedup_vs_one": n * sps / one,
             "xla_memory_gib": mem["bytes"] / 2 ** 30, "mfu": n * sps * flops / (peak * 1e9)}
        out[str(n)] = r
        print(f"  {exp} x{n:3d}: {r['runs_steps_per_sec']:8.1f} runs*steps/s  x{r['speedup_vs_one']:5.2f} of one  "
              f"MFU {100 * r['mfu']:4.1f} %  memory {r['xla_memory_gib']:.3f} GiB", file=sys.stderr)
    return out


def _child(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak resident GiB) of a child process."""
    wrap = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
            "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
            "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)")
    p = subprocess.run([sys.executable, "-c", wrap, *cmd], capture_output=True, text=True, check=True)
    wall, rss, rc = p.stdout.split()
    if rc != "0":
        raise RuntimeError(f"{cmd}: exit {rc}")
    return float(wall), float(rss) / 2 ** 20


def bench_memory() -> dict:
    d = Path(tempfile.mkdtemp()) / "run"
    lab = str(Path(sys.executable).parent / "lab")
    _, rss = _child([lab, "train", *exp_args("olsson_repeat"), "trainer.steps=300", f"run.dir={d}", "--quiet"])
    print(f"  one olsson_repeat run (300 steps): peak resident {rss:.2f} GiB", file=sys.stderr)
    return {"olsson_repeat_peak_rss_gib": rss}


def bench_demo() -> dict:
    d = Path(tempfile.mkdtemp()) / "demo"
    lab = str(Path(sys.executable).parent / "lab")
    env_cache = os.environ.pop("LAB_COMPILATION_CACHE", None)
    os.environ["LAB_COMPILATION_CACHE"] = str(Path(tempfile.mkdtemp()) / "cold")  # compile from scratch
    try:
        wall, _ = _child([lab, "train", "experiment=demo", *QUIET, f"run.dir={d}", "--quiet"])
    finally:
        os.environ.pop("LAB_COMPILATION_CACHE")
        if env_cache is not None:
            os.environ["LAB_COMPILATION_CACHE"] = env_cache
    summary = json.loads((d / "summary.json").read_text())
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    ts = summary["phase"]["transitions"]
    res = {"wall_s": wall}
    if ts:
        end = max(ts, key=lambda t: abs(t["after"] - t["before"]))["end"]
        fit = rows[-1]["perf/elapsed"]
        at = next(r["perf/elapsed"] for r in rows if r["step"] >= end and "perf/elapsed" in r)
        res.update(transition_end_step=end, seconds_to_transition=wall - fit + at)
        print(f"  demo: transition ends at step {end:.0f}, {res['seconds_to_transition']:.1f} s after `lab train` "
              f"started (compilation included); whole run {wall:.1f} s", file=sys.stderr)
    else:
        print(f"  demo: no transition detected; whole run {wall:.1f} s", file=sys.stderr)
    return res


def bench_devinterp() -> dict:
    py = ROOT / ".venv-tl" / "bin" / "python"
    if not (ROOT / ".venv-tl" / ".installed").exists():  # an older .venv-tl may lack devinterp
        print("  skipped: no devinterp environment (make bench-tl-env)", file=sys.stderr)
        return {"skipped": "no .venv-tl/.installed (make bench-tl-env)"}
    from devinterp_side_by_side import side_by_side

    d = Path(tempfile.mkdtemp()) / "demo"
    _child([str(Path(sys.executable).parent / "lab"), "train", "experiment=demo", *QUIET, f"run.dir={d}", "--quiet"])
    try:
        doc = side_by_side(d, chains=4, llc_steps=200, burn_in=50, eps=1e-3, python=str(py),
                           out=d / "llc" / "devinterp")
    except (RuntimeError, LabError) as e:  # the other sections' results are still written
        msg = (str(e).strip().splitlines() or ["failed"])[-1]
        print(f"  failed: {msg}", file=sys.stderr)
        return {"failed": msg}
    rows = doc["checkpoints"]
    res = {"checkpoints": len(rows), "lab_s": doc["lab_s"], "lab_compile_s": doc["lab_compile_s"],
           "devinterp_s": doc["devinterp_s"], "speedup": doc["speedup"], "max_abs_z": max(abs(r["z"]) for r in rows),
           "max_logit_diff": max(r["max_logit_diff"] for r in rows),
           "llc": {str(r["step"]): [r["lab"], r["devinterp"]] for r in rows}}
    print(f"  {len(rows)} checkpoints x 4 chains x 200 steps: lab {doc['lab_s']:.1f} s (compile "
          f"{doc['lab_compile_s']:.1f} s), devinterp {doc['devinterp_s']:.1f} s: x{doc['speedup']:.1f}; "
          f"largest |z| {res['max_abs_z']:.2f}", file=sys.stderr)
    return res


SECTIONS = ("peak", "models", "transformerlens", "vmapped", "memory", "clamps", "logging", "demo", "pictures",
            "positions", "devinterp", "study")


def bench_positions(rounds: int = 7, reps: int = 20) -> dict:
    """The relative-position term (lab.model.relative_scores) forward and backward at edelman_markov's shapes
    (batch 64, 1 head, 100 positions, d_head 16): every query row by the Music Transformer skew (what full rows use)
    against the per-pair gather (what a pruned readout's rows use), each jitted, medians of interleaved rounds."""
    import jax.numpy as jnp

    from lab.model import relative_scores

    b, h, t, dh = 64, 1, 100, 16
    kq, kw, kg = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (b, h, t, dh))
    w = jax.random.normal(kw, (h, t, dh))
    g = jax.random.normal(kg, (b, h, t, t))  # a fixed upstream gradient, so both paths do the same work
    mask = jnp.tril(jnp.ones((t, t), bool))

    def loss(q, w, q_pos):  # the value needs the forward pass (the gradient alone would not: the term is bilinear)
        return jnp.sum(jnp.where(mask, relative_scores(q, w, q_pos, t), 0.0) * g)

    grads = {"skew": jax.jit(jax.value_and_grad(lambda q, w: loss(q, w, None), argnums=(0, 1))),
             "gather": jax.jit(jax.value_and_grad(lambda q, w: loss(q, w, jnp.arange(t)), argnums=(0, 1)))}
    ref_value, ref_grads = grads["skew"](q, w)
    value, got_grads = grads["gather"](q, w)  # the same value and gradients, or the ratio means nothing
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-4)
    for got, want in zip(got_grads, ref_grads, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-3)
    times: dict[str, list[float]] = {k: [] for k in grads}
    for r in range(rounds):
        for name in (("skew", "gather") if r % 2 else ("gather", "skew")):
            f = grads[name]
            t0 = time.perf_counter()
            for _ in range(reps):
                jax.block_until_ready(f(q, w))
            times[name].append(1e3 * (time.perf_counter() - t0) / reps)
    ms = {k: float(np.median(v)) for k, v in times.items()}
    print(f"  relative positions fwd+bwd at 64 x 100 x 16: skew {ms['skew']:.2f} ms, gather {ms['gather']:.2f} ms "
          f"(x{ms['gather'] / ms['skew']:.1f})", file=sys.stderr)
    return {"ms": ms, "gather_over_skew": ms["gather"] / ms["skew"],
            "shape": {"batch": b, "heads": h, "positions": t, "d_head": dh}}


def bench_pictures(rounds: int = 3) -> dict:
    """The default demo as users run it (wandb offline, a warm compilation cache) with and without the attention
    pictures at every checkpoint (tracking.attention_images), whole `lab train` processes, interleaved."""
    lab = str(Path(sys.executable).parent / "lab")
    walls: dict[str, list[float]] = {"on": [], "off": []}
    pictures = 0
    for r in range(rounds + 1):  # round 0 warms the compilation cache for both
        for flag in (("on", "off") if r % 2 else ("off", "on")):
            d = Path(tempfile.mkdtemp()) / "demo"
            wall, _ = _child([lab, "train", "experiment=demo", "trainer.progress=false",
                              f"tracking.attention_images={'true' if flag == 'on' else 'false'}", f"run.dir={d}",
                              "--quiet"])
            if r:
                walls[flag].append(wall)
            if flag == "on":
                pictures = len(list(d.glob("attention/*.png")))
    on, off = float(np.median(walls["on"])), float(np.median(walls["off"]))
    res = {"with_s": on, "without_s": off, "cost": on / off - 1.0, "pictures": pictures,
           "per_picture_ms": picture_ms()}
    print(f"  demo with attention pictures {on:.1f} s, without {off:.1f} s: cost {100 * res['cost']:+.1f} %",
          file=sys.stderr)
    print("  one labelled picture (after the first, which renders the frame): "
          + ", ".join(f"{k} {v:.1f} ms" for k, v in res["per_picture_ms"].items()), file=sys.stderr)
    return res


def picture_ms(reps: int = 20) -> dict[str, float]:
    """Milliseconds to draw and write one attention PNG at a checkpoint (parameters at init: the cost does not
    depend on them): the demo's grid (2 layers x 1 head, 32 positions), a wide one (2 x 8) and the real-text
    experiment's (2 x 4, 128 positions)."""
    from lab.pictures import AttentionPictures

    out = {}
    for label, extra in (("demo 2x1 T32", []), ("2x8 T32", ["model.n_heads=8"]),
                         ("olsson_text 2x4 T128", ["task.seq_len=128", "model.n_heads=4"])):
        tr = trainer(extra=extra)
        pics, params = AttentionPictures(tr.model, tr.task), tr.model.params()
        d = Path(tempfile.mkdtemp())
        pics.save(params, d / "warm.png")
        t0 = time.perf_counter()
        for i in range(reps):
            pics.save(params, d / f"step{i}.png")
        out[label] = 1e3 * (time.perf_counter() - t0) / reps
    return out


def _cpu_ticks() -> list[int] | None:
    """The machine's CPU time counters (user, nice, system, idle, iowait, irq, softirq, steal), or None."""
    try:
        return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None


def _runs(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(v) for v in text.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"--runs={text!r}: a comma-separated list of run counts >= 1, e.g. 1,16,256")
    return counts


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("seconds", nargs="?", type=float, default=3.0, help="measuring time per condition (default 3)")
    p.add_argument("sections", nargs="*", metavar="SECTION",
                   help=f"sections to run (default all): {', '.join(SECTIONS)}")
    p.add_argument("--runs", type=_runs, default=None,
                   help="vmapped singh_fewshot run counts (default 1,2,...,64 on the CPU, 1,2,...,256 on an "
                        "accelerator)")
    p.add_argument("--study-steps", type=int, default=18750, help="steps of each study run (default 18,750)")
    p.add_argument("--study-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="the study's seeds")
    p.add_argument("--icl", default=None, help="a checkout of aadityasingh/icl-dynamics (or ICL_DYNAMICS)")
    p.add_argument("--icl-python", default=None, help="the Python that runs it (or ICL_PYTHON)")
    args = p.parse_args(argv)
    if args.study_steps < 1:
        p.error(f"--study-steps={args.study_steps}: must be >= 1")
    for name in args.sections:
        if name not in SECTIONS:
            p.error(f"SECTION={name!r}: one of {', '.join(SECTIONS)}")
    args.sections = args.sections or list(SECTIONS)
    return args


def main():
    args = parse_args()
    seconds, wanted = args.seconds, args.sections
    accel = jax.default_backend() != "cpu"
    counts = args.runs or ((1, 2, 4, 8, 16, 32, 64, 128, 256) if accel else (1, 2, 4, 8, 16, 32, 64))
    ticks0 = _cpu_ticks()
    out = Path(__file__).parent / "results.json"
    results = json.loads(out.read_text()) if out.exists() and len(wanted) < len(SECTIONS) else {}
    results["machine"] = {"platform": platform.platform(), "backend": jax.default_backend(),
                          "device": str(jax.devices()[0].device_kind), "cpus": os.cpu_count()}
    peak = results.get("peak_gflops")
    if "peak" in wanted or peak is None:
        print("peak:", file=sys.stderr)
        peak = results["peak_gflops"] = bench_peak()
    if "models" in wanted:
        print("models (one run, steady state; minimal JAX step interleaved):", file=sys.stderr)
        results["models"] = bench_models(seconds, peak)
    if "transformerlens" in wanted:
        print("transformerlens (olsson_repeat model, torch CPU):", file=sys.stderr)
        results["transformerlens"] = bench_transformerlens(seconds)
    if "vmapped" in wanted:
        print("vmapped runs (one program):", file=sys.stderr)
        results["vmapped"] = {
            "singh_fewshot": bench_vmapped(seconds, peak, "singh_fewshot", counts, 50),
            "olsson_repeat": bench_vmapped(seconds, peak, "olsson_repeat", (1, 4, 16), 5)}
    if "memory" in wanted:
        print("memory:", file=sys.stderr)
        results["memory"] = bench_memory()
    if "clamps" in wanted:
        print("clamps (demo model, steady-state fused steps):", file=sys.stderr)
        results["clamps"] = bench_clamps(seconds)
    if "logging" in wanted:
        print("logging (demo, whole fit after compilation):", file=sys.stderr)
        results["logging"] = bench_logging()
    if "demo" in wanted:
        print("demo (cold compilation cache):", file=sys.stderr)
        results["demo"] = bench_demo()
    if "pictures" in wanted:
        print("attention pictures (default demo, whole processes, interleaved):", file=sys.stderr)
        results["pictures"] = bench_pictures()
    if "positions" in wanted:
        print("positions (the relative-position term, forward and backward):", file=sys.stderr)
        results["positions"] = bench_positions()
    if "devinterp" in wanted:
        print("devinterp (LLC over every checkpoint of the demo, lab vs devinterp):", file=sys.stderr)
        results["devinterp"] = bench_devinterp()
    if "study" in wanted:
        print("study (Singh Fig. 5b, 6 conditions x seeds: the lab's one command vs the authors' code run by run):",
              file=sys.stderr)
        from singh_study import bench_study
        results["study"] = bench_study(seconds, args.study_steps, args.study_seeds, args.icl, args.icl_python)
    ticks1 = _cpu_ticks()
    if ticks0 and ticks1:
        # time the hypervisor gave this VM's CPUs to others while the bench ran: the noise behind
        # figures that drift between runs (a share of all CPU time, idle included)
        d = [b - a for a, b in zip(ticks0, ticks1, strict=True)]
        results["machine"]["steal_fraction"] = d[7] / max(sum(d), 1)
        print(f"CPU time stolen by the hypervisor during the bench: {100 * d[7] / max(sum(d), 1):.1f} %",
              file=sys.stderr)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
