"""The LLC of a run's checkpoints by the lab and by devinterp, side by side on the same data and settings.

    .venv/bin/python bench/devinterp_side_by_side.py RUN_DIR [--steps 500,3000] [--chains 8] [--llc-steps 200]
        [--burn-in 0] [--eps 1e-3] [--gamma 100] [--nbeta B] [--batch-size 64] [--seed 0]
        [--python .venv-tl/bin/python] [--out DIR]

The lab half (this process) restores the checkpoints, draws one fixed sampling set from the run's task (enough
sequences that devinterp's one pass over it never repeats a minibatch: chains' steps x batch; the lab's chains
draw rows with replacement), and estimates the LLC of every checkpoint with
``lab.measures.llc.estimate`` (SGLD, checkpoints x chains in one jitted program, as ``lab llc`` runs them) on
minibatches of that set. It exports the checkpoints as TransformerLens weights (lab/transformerlens.py) with the
same set, and bench/devinterp_peer.py, in the optional torch environment, estimates them with devinterp's ``llc``
(sgmcmc_sgld, the same ε, nβ, γ, chains, steps and batch size, the same next-token loss).

What is compared, per checkpoint: each tool's mean over chains and its standard error, and z = (lab - devinterp) /
sqrt(se_lab² + se_devinterp²); both averaged over the draws after ``--burn-in`` (default 0: devinterp 2 averages
every step, burn-in included, so 0 makes its own estimate the compared one; with a burn-in its per-step trace is
averaged after it, as the lab does). The estimators differ in two ways that change no expectation: the lab pairs
each step's loss with the checkpoint's loss on the same minibatch, devinterp subtracts the checkpoint's mean loss
over 32 minibatches; the lab's chains draw their own minibatches, devinterp's share one order. devinterp's
init_loss is one estimate that all its chains share, so its error (reported per checkpoint as ``init_offset``: nβ x
its difference from the checkpoint's loss on the whole sampling set) moves every chain alike and is not in
devinterp's spread over chains; the lab's pairing has no such term. And the wall time of each (the lab's compile
included; devinterp's from its ``llc`` call, model building and loading excluded), with their ratio. Writes
side_by_side.json and llc_side_by_side.png to --out.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # figures to files, whatever the display

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import matplotlib.pyplot as plt  # noqa: E402  (a script: matplotlib.use("Agg") above)

from lab.devinterp import json_safe, load_checkpoints  # noqa: E402
from lab.errors import LabError  # noqa: E402
from lab.measures.llc import LLCSettings, default_nbeta, estimate, map_chains  # noqa: E402
from lab.transformerlens import tl_config, tl_state_dict  # noqa: E402

PEER = Path(__file__).resolve().parent / "devinterp_peer.py"
DEFAULT_PYTHON = ROOT / ".venv-tl" / "bin" / "python"


def sampling_set(trainer, n: int, key) -> np.ndarray:
    """n sequences of the run's task as token ids [n, T + 1] (inputs then the last target), for a task whose loss is
    next-token prediction at every position; anything else is refused (devinterp's loss reads input ids only)."""
    batch = jax.device_get(trainer.task.sample(key, n))
    if "features" in batch or not np.all(batch["loss_mask"] == 1) or not np.array_equal(
            batch["tokens"][:, 1:], batch["targets"][:, :-1]):
        raise LabError(f"task.name={trainer.cfg.task.name}: the devinterp comparison needs a task whose loss is "
                       "next-token prediction at every position (repeat, markov)")
    return np.concatenate([batch["tokens"], batch["targets"][:, -1:]], axis=1).astype(np.int32)


def lab_llc(trainer, stacked, ids: np.ndarray, s: LLCSettings, batch_size: int, seed: int) -> dict:
    """The lab's estimate at every checkpoint on minibatches of ``ids``: per checkpoint, each chain's estimate and
    per-step loss traces, and the wall time of compile and run."""
    data = jnp.asarray(ids)

    def sample(k):
        x = data[jax.random.randint(k, (batch_size,), 0, data.shape[0])]
        return {"tokens": x[:, :-1], "targets": x[:, 1:], "loss_mask": jnp.ones(x[:, 1:].shape, jnp.float32)}

    fn = jax.jit(lambda P, K: map_chains(lambda a: estimate(trainer.program.loss, a[0], sample, a[1], s), (P, K)))
    n = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    t0 = time.perf_counter()
    compiled = fn.lower(stacked, keys).compile()
    t1 = time.perf_counter()
    res = jax.device_get(jax.block_until_ready(compiled(stacked, keys)))
    t2 = time.perf_counter()
    return {"chains": np.asarray(res["llc"]), "loss": np.asarray(res["loss"]), "ref": np.asarray(res["ref"]),
            "compile_s": t1 - t0, "run_s": t2 - t1}


def export(out: Path, trainer, steps, stacked, ids: np.ndarray, s: LLCSettings, batch_size: int, seed: int) -> None:
    """What devinterp_peer.py reads: export.json and arrays.npz (see its doc)."""
    arrays = {"input_ids": ids, "probe": ids[:8, :-1]}
    x = jnp.asarray(ids[:8])
    probe = {"tokens": x[:, :-1], "targets": x[:, 1:], "loss_mask": jnp.ones(x[:, 1:].shape, jnp.float32)}
    grad = jax.jit(jax.grad(trainer.program.loss))
    for j, step in enumerate(steps):
        params = jax.tree_util.tree_map(lambda x, j=j: x[j], stacked)
        arrays[f"probe_logits.{step}"] = np.asarray(trainer.model.apply(params, probe), np.float32)
        arrays |= {f"{step}/{k}": v for k, v in tl_state_dict(trainer.model, params).items()}
        # the loss's gradient on the probe: the SGLD drift both samplers follow
        arrays |= {f"grad.{step}/{k}": v for k, v in tl_state_dict(trainer.model, grad(params, probe)).items()}
    meta = {"tl_config": tl_config(trainer.model), "steps": list(steps),
            "settings": {"eps": s.eps, "gamma": s.gamma, "nbeta": s.nbeta, "chains": s.chains, "steps": s.steps,
                         "burn_in": s.burn_in, "batch_size": batch_size, "seed": seed}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "export.json").write_text(json.dumps(meta, indent=1))
    np.savez(out / "arrays.npz", **arrays)


def run_peer(python: str, export_dir: Path) -> dict:
    proc = subprocess.run([python, str(PEER), str(export_dir)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"devinterp_peer.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(x: np.ndarray) -> tuple[float, float]:
    """(mean, standard error over chains)."""
    return float(np.mean(x)), float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def side_by_side(run_dir: Path, steps: list[int] | None = None, *, chains: int = 8, llc_steps: int = 200,
                 burn_in: int = 0, eps: float = 1e-3, gamma: float = 100.0, nbeta: float | None = None,
                 batch_size: int | None = None, seed: int = 0, python: str = str(DEFAULT_PYTHON),
                 out: Path | None = None) -> dict:
    """Both estimates at every checkpoint (or ``steps``); see the module doc. Returns what side_by_side.json holds."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "llc" / "devinterp"
    if not Path(python).is_file():
        raise LabError(f"--python={python}: no such interpreter; `make bench-tl-env` builds .venv-tl")
    trainer, steps, stacked = load_checkpoints(run_dir, steps)
    tl_config(trainer.model)  # an unexportable model is refused before any sampling
    if trainer.cfg.model.freeze:  # devinterp would move what the lab holds fixed
        raise LabError(f"model.freeze={list(trainer.cfg.model.freeze)}: the devinterp comparison needs every "
                       "parameter free (devinterp samples them all)")
    b = batch_size or trainer.cfg.trainer.batch_size
    s = LLCSettings(nbeta=nbeta or default_nbeta(b), eps=eps, gamma=gamma, chains=chains, steps=llc_steps,
                    burn_in=burn_in)
    ids = sampling_set(trainer, llc_steps * b, jax.random.PRNGKey(seed + 1))
    lab = lab_llc(trainer, stacked, ids, s, b, seed)
    export(out / "export", trainer, steps, stacked, ids, s, b, seed)
    peer = run_peer(python, out / "export")
    rows = []
    for j, (step, theirs) in enumerate(zip(steps, peer["checkpoints"], strict=True)):
        trace = np.asarray(theirs["loss_trace"])  # [chain, step]: devinterp's mean minibatch loss per step
        dv_chains = s.nbeta * (trace[:, burn_in:].mean(axis=1) - theirs["init_loss"])
        (lm, ls), (dm, ds) = summarise(lab["chains"][j]), summarise(dv_chains)
        rows.append({"step": step, "lab": lm, "lab_se": ls, "lab_chains": lab["chains"][j].tolist(),
                     "devinterp": dm, "devinterp_se": ds, "devinterp_chains": dv_chains.tolist(),
                     "devinterp_own": theirs["llc"], "z": (lm - dm) / max(np.hypot(ls, ds), 1e-12),
                     # nβ x the error of devinterp's init_loss against the checkpoint's loss on the whole set
                     "init_offset": s.nbeta * (theirs["init_loss"] - theirs["set_loss"]),
                     "max_logit_diff": theirs["max_logit_diff"], "max_grad_diff": theirs["max_grad_diff"],
                     "devinterp_s": theirs["seconds"],
                     "devinterp_warnings": theirs["warnings"]})
    lab_s = lab["compile_s"] + lab["run_s"]
    dv_s = sum(r["devinterp_s"] for r in rows)
    doc = {"run_dir": str(run_dir), "settings": {**s.__dict__, "batch_size": b, "seed": seed,
                                                  "sampling_set": int(ids.shape[0])},
           "torch": peer["torch"], "torch_threads": peer["threads"], "jax": jax.__version__,
           "lab_compile_s": lab["compile_s"], "lab_run_s": lab["run_s"], "lab_s": lab_s, "devinterp_s": dv_s,
           "speedup": dv_s / lab_s, "checkpoints": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "side_by_side.json").write_text(json.dumps(json_safe(doc), indent=1))
    plot(doc, out / "llc_side_by_side.png")
    return doc


def plot(doc: dict, path: Path) -> None:
    rows = doc["checkpoints"]
    x = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, colour in (("lab", "C0"), ("devinterp", "C1")):
        ax.errorbar(x, [r[name] for r in rows], yerr=[2 * r[f"{name}_se"] for r in rows], marker="o", ms=3,
                    capsize=2, color=colour, label=f"{name} ({doc[f'{name}_s']:.0f} s)")
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel("LLC (mean over chains ± 2 se)")
    s = doc["settings"]
    ax.set_title(f"SGLD ε={s['eps']:g} nβ={s['nbeta']:.1f} γ={s['gamma']:g}, {s['chains']} chains x {s['steps']} "
                 f"steps: {doc['speedup']:.1f}x", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--steps", default="all", help="checkpoint steps, comma-separated, or all")
    ap.add_argument("--chains", type=int, default=8)
    ap.add_argument("--llc-steps", type=int, default=200, help="SGLD steps per chain")
    ap.add_argument("--burn-in", type=int, default=0)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--gamma", type=float, default=100.0)
    ap.add_argument("--nbeta", type=float, default=None, help="default b / ln b")
    ap.add_argument("--batch-size", type=int, default=None, help="default the run's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--python", default=str(DEFAULT_PYTHON), help="the torch environment (make bench-tl-env)")
    ap.add_argument("--out", type=Path, default=None, help="default RUN_DIR/llc/devinterp")
    a = ap.parse_args()
    steps = None if a.steps == "all" else [int(x) for x in a.steps.split(",")]
    try:
        doc = side_by_side(a.run_dir, steps, chains=a.chains, llc_steps=a.llc_steps, burn_in=a.burn_in, eps=a.eps,
                           gamma=a.gamma, nbeta=a.nbeta, batch_size=a.batch_size, seed=a.seed, python=a.python,
                           out=a.out)
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{'step':>6} {'lab':>14} {'devinterp':>14} {'z':>6} {'init offset':>11} {'logit diff':>10} "
          f"{'grad diff':>9}")
    for r in doc["checkpoints"]:
        print(f"{r['step']:>6} {r['lab']:>8.3f} ±{r['lab_se']:.3f} {r['devinterp']:>8.3f} ±{r['devinterp_se']:.3f} "
              f"{r['z']:>6.2f} {r['init_offset']:>11.3f} {r['max_logit_diff']:>10.1e} {r['max_grad_diff']:>9.1e}")
    print(f"lab {doc['lab_s']:.1f} s (compile {doc['lab_compile_s']:.1f} s), devinterp {doc['devinterp_s']:.1f} s: "
          f"{doc['speedup']:.1f}x")
    for r in doc["checkpoints"]:
        for w in r["devinterp_warnings"]:
            print(f"devinterp at step {r['step']}: {w}")


if __name__ == "__main__":
    main()
