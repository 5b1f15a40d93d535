"""The lab's `experiment=bietti_full` model and Bietti's full Transformer (transformer-birth, ihead_full_model.py)
compute the same function: the lab's weights, copied into their PyTorch module, give the same logits.

The lab draws its model (random weights, LayerNorm gains and biases perturbed so none is trivial) and a batch of
tokens, writes them to an .npz, and runs this file again with a Python that has torch (--python), which copies each
weight into their ``Transformer(ModelArgs(...))`` under their name (``tok_embeddings``, ``layers.i.attention.wq``,
``attention_norm``, ``ff_norm``, ``ff.w1``, ``ff.w2``, ``norm``, ``output``) and returns its logits. Prints the
largest difference; exits 1 above --tol. Overrides after the flags change the lab's side only: with
model.parallel_attn_mlp=false (the MLP after the attention, TransformerLens's default) the check fails.

Run:  .venv/bin/python bench/bietti_forward_check.py --tb PATH/transformer-birth --python PATH/venv/bin/python
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def their_logits(tb: str, npz: str, out: str) -> None:
    """Runs under their Python (torch): load the lab's weights into their module, write its logits."""
    import torch

    sys.path.insert(0, tb)
    from ihead_full_model import ModelArgs, Transformer

    w = dict(np.load(npz))
    n_layers, h = int(w["n_layers"]), int(w["n_heads"])
    V, d = w["W_E"].shape
    model = Transformer(ModelArgs(vocab_size=V, n_layers=n_layers, dim=d, n_heads=h, max_length=len(w["W_pos"])))
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    sd = {"tok_embeddings.weight": t(w["W_E"]), "pos_embeddings.weight": t(w["W_pos"]),
          "norm.weight": t(w["ln_final.w"]), "norm.bias": t(w["ln_final.b"]), "output.weight": t(w["W_U"].T)}
    for i in range(n_layers):
        for n in "qkv":  # [h, d, dh] -> nn.Linear's [h * dh, d]
            a = w[f"{i}.W_{n.upper()}"]
            sd[f"layers.{i}.attention.w{n}.weight"] = t(a.transpose(1, 0, 2).reshape(d, -1).T)
        sd[f"layers.{i}.attention.wo.weight"] = t(w[f"{i}.W_O"].reshape(-1, d).T)  # [h, dh, d] -> [d, h * dh]
        for theirs, ours in (("attention_norm", "ln1"), ("ff_norm", "ln2")):
            sd[f"layers.{i}.{theirs}.weight"] = t(w[f"{i}.{ours}.w"])
            sd[f"layers.{i}.{theirs}.bias"] = t(w[f"{i}.{ours}.b"])
        sd[f"layers.{i}.ff.w1.weight"], sd[f"layers.{i}.ff.w2.weight"] = t(w[f"{i}.W_in"].T), t(w[f"{i}.W_out"].T)
    model.load_state_dict(sd, strict=True)  # every weight of theirs set, none left over
    with torch.no_grad():
        np.save(out, model(torch.from_numpy(w["tokens"]).long()).numpy())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tb", required=True, type=Path, help="a working tree of albietz/transformer-birth")
    ap.add_argument("--python", required=True, help="a Python with torch, numpy, omegaconf")
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("overrides", nargs="*", help="lab overrides (model.parallel_attn_mlp=false must fail the check)")
    args = ap.parse_args()
    import jax

    from lab.config import load_config
    from lab.model import build_model
    from lab.tasks import make_task

    cfg, _ = load_config(["experiment=bietti_full", *args.overrides])
    task = make_task(cfg.task)
    model = build_model(cfg.model, task, seed=0)
    p = model.params()
    leaves, tree = jax.tree_util.tree_flatten(p)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    p = jax.tree_util.tree_unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys,
                                                                                                 strict=True)])
    p["unembed"]["b_U"] = p["unembed"]["b_U"] * 0  # theirs has no output bias (the lab's is frozen at 0)
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(2), (4, task.seq_len), 0, task.vocab_size))
    ours = np.asarray(model.apply(p, {"tokens": tokens}))
    w = {"n_layers": cfg.model.n_layers, "n_heads": cfg.model.n_heads, "tokens": tokens,
         "W_E": p["embed"]["W_E"], "W_pos": p["pos_embed"]["W_pos"], "W_U": p["unembed"]["W_U"],
         "ln_final.w": p["ln_final"]["w"], "ln_final.b": p["ln_final"]["b"]}
    for i, blk in p["blocks"].items():
        w.update({f"{i}.W_{n}": blk["attn"][f"W_{n}"] for n in "QKVO"})
        w.update({f"{i}.W_in": blk["mlp"]["W_in"], f"{i}.W_out": blk["mlp"]["W_out"]})
        w.update({f"{i}.{ln}.{x}": blk[ln][x] for ln in ("ln1", "ln2") for x in "wb"})
    with tempfile.TemporaryDirectory() as tmp:
        npz, out = f"{tmp}/weights.npz", f"{tmp}/logits.npy"
        np.savez(npz, **{k: np.asarray(v) for k, v in w.items()})
        subprocess.run([args.python, __file__, "--torch-side", str(args.tb.absolute()), npz, out], check=True)
        theirs = np.load(out)
    diff = float(np.abs(ours - theirs).max())
    print(f"logits {ours.shape}: largest |lab - transformer-birth| = {diff:.2e} (logit scale {np.abs(ours).max():.1f})")
    sys.exit(0 if diff <= args.tol else 1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--torch-side":
        their_logits(*sys.argv[2:5])
    else:
        main()
