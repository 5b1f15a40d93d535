"""devinterp's LLC estimator on lab checkpoints, as TransformerLens models: the peer half of
bench/devinterp_side_by_side.py. Runs with the optional torch environment's interpreter (`make bench-tl-env`:
torch, transformer-lens 2.x, devinterp 2.x), never the lab's; reads what the lab half exported and prints one
JSON document.

    .venv-tl/bin/python bench/devinterp_peer.py EXPORT_DIR

EXPORT_DIR holds ``export.json`` ({"tl_config": HookedTransformerConfig kwargs, "steps": [...], "settings":
{eps, gamma, nbeta, chains, steps, burn_in, batch_size, seed}}) and ``arrays.npz`` (``input_ids`` [N, T + 1], the
sampling set; ``probe`` [P, T] and ``probe_logits.{step}`` [P, T, V], the lab's logits; ``{step}/{weight}``, each
checkpoint's weights by TransformerLens's names; ``grad.{step}/{weight}``, the lab's gradient of the mean
next-token loss on the probe's P sequences).

For each checkpoint: the weights load into ``HookedTransformer`` (the largest logit difference from the lab's on
the probe is reported), then ``devinterp.slt.llc.llc`` samples with SGLD (``sgmcmc_sgld``) at the given ε (lr),
nβ, γ (localization), chains, draws and burn-in, on minibatches of the sampling set, with the lab's loss: next-token
cross-entropy at every position (the model reads input_ids[:, :-1]: its context is T positions). devinterp's
estimate is its own: nβ (mean minibatch loss over every step, burn-in included - devinterp 2's reduction - minus
the mean loss at the checkpoint over ``num_init_loss_batches`` batches).
"""

import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def next_token_loss(model, input_ids):
    """Per-token cross-entropy [batch, T] of the model reading input_ids[:, :-1] (devinterp's loss_fn contract)."""
    logits = model(input_ids[:, :-1], return_type="logits").float()
    logp = torch.log_softmax(logits, dim=-1)
    return -logp.gather(-1, input_ids[:, 1:, None])[..., 0]


def main():
    export = Path(sys.argv[1])
    torch.set_num_threads(os.cpu_count())
    from datasets import Dataset
    from devinterp.slt.llc import llc
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    meta = json.loads((export / "export.json").read_text())
    arrays = np.load(export / "arrays.npz")
    s = meta["settings"]
    data = Dataset.from_dict({"input_ids": arrays["input_ids"].astype(np.int64)}).with_format("torch")
    probe = torch.as_tensor(arrays["probe"].astype(np.int64))
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "checkpoints": []}
    for step in meta["steps"]:
        model = HookedTransformer(HookedTransformerConfig(**meta["tl_config"], device="cpu", seed=0))
        weights = {k.split("/", 1)[1]: torch.as_tensor(arrays[k]) for k in arrays.files if k.startswith(f"{step}/")}
        missing, unexpected = model.load_state_dict(weights, strict=False)
        params = {n for n, _ in model.named_parameters()}
        if unexpected or params & set(missing):
            raise SystemExit(f"step {step}: weights TransformerLens lacks {unexpected}, "
                             f"parameters the lab lacks {sorted(params & set(missing))}")
        with torch.no_grad():
            diff = (model(probe, return_type="logits") - torch.as_tensor(arrays[f"probe_logits.{step}"])).abs().max()
        # the gradient of the mean next-token loss on the probe, against the lab's: largest difference over every
        # weight, relative to the largest gradient entry
        model.zero_grad(set_to_none=True)
        next_token_loss(model, torch.as_tensor(arrays["input_ids"][:8].astype(np.int64))).mean().backward()
        lab_grad = {k.split("/", 1)[1]: arrays[k] for k in arrays.files if k.startswith(f"grad.{step}/")}
        gdiff = max(float(np.abs(p.grad.numpy() - lab_grad[n]).max()) for n, p in model.named_parameters())
        gdiff /= max(float(np.abs(g).max()) for g in lab_grad.values())
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = llc(model, data, {}, lr=s["eps"], n_beta=s["nbeta"], localization=s["gamma"],
                      num_chains=s["chains"], num_draws=s["steps"] - s["burn_in"], num_burnin_steps=s["burn_in"],
                      batch_size=s["batch_size"], init_seed=s["seed"], sampling_method="sgmcmc_sgld",
                      loss_fn=next_token_loss, output_path=Path(tmp) / "samples.zarr", device="cpu")
            per_chain = [float(x) for x in res["llc_per_chain"].values]
            trace = res["loss_trace"].values.tolist()
            init = float(res["init_loss"].values)
        seconds = time.perf_counter() - t0
        # the checkpoint's loss over the whole sampling set (not timed): devinterp's init_loss estimates it from
        # its first num_init_loss_batches minibatches, one error that every chain's estimate shares
        with torch.no_grad():
            ids = torch.as_tensor(arrays["input_ids"].astype(np.int64))
            full = float(torch.cat([next_token_loss(model, ids[i:i + 1024]).mean(1)
                                    for i in range(0, len(ids), 1024)]).mean())
        out["checkpoints"].append({"step": step, "seconds": seconds, "max_logit_diff": float(diff),
                                   "max_grad_diff": gdiff,
                                   "llc": float(np.mean(per_chain)), "chains": per_chain, "init_loss": init,
                                   "set_loss": full, "loss_trace": trace,
                                   # devinterp's own reports, "Chain failed: ..." among them
                                   "warnings": sorted({str(w.message) for w in caught if "Chain" in str(w.message)})})
        print(f"devinterp: step {step}: llc {np.mean(per_chain):.3f} ({out['checkpoints'][-1]['seconds']:.1f} s)",
              file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
