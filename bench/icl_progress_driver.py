"""Run by bench/singh_progress_side_by_side.py with the icl-dynamics environment's Python, inside the checkout.

Computes the authors' Fig. 10 progress measures (ih_paper_appendix_plots.ipynb, "Figure 10") at every checkpoint
of one of their runs, through their own code: the checkpoint evaluated with --opto_ablate_heads (all layer-1
heads but 1:3) plus --opto_prev_token_heads 0:2 ("pt_attn") or --opto_induction_heads 1:3 ("match"), and with
the ablation alone ("orig"), on every training sequence (each ordered pair of training classes, each training
label pair in both orders, either class as the query), as their notebook builds it. Prints one JSON line.

Usage (cwd = the checkout): PYTHON bench/icl_progress_driver.py RUN_FOLDER [BATCH]
"""

import argparse
import json
import os
import sys
from copy import deepcopy

run_folder = sys.argv[1]
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
sys.argv = sys.argv[:1]  # their get_opts_from_json_file parses the command line too
sys.path.insert(0, os.getcwd())

import equinox as eqx  # noqa: E402
import ih_paper_plot_utils  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import main  # noqa: E402
import main_utils  # noqa: E402
import opto  # noqa: E402

opts = main_utils.get_opts_from_json_file(os.path.join(run_folder, "config.json"))
data = main_utils.get_data_from_opts(opts)
splits = main_utils.get_splits_from_opts(opts, data.shape)
model = main_utils.get_model_from_opts(opts, (data.shape[-1],))
fwd_train = opto.make_fn_from_opts(opts)

# every training sequence: ordered class pairs (distinct) x label pairs in both orders, either class the query
classes = splits["class"]["train"]
n = classes.shape[0]
a, b = jnp.meshgrid(classes, classes, indexing="ij")
pairs = jnp.stack([a.reshape(-1), b.reshape(-1)], 1)
pairs = pairs[pairs[:, 0] != pairs[:, 1]]
labels = splits["relabeling"]["train"]
labels = jnp.concatenate([labels, labels[:, ::-1]], 0)
cls = jnp.repeat(pairs, labels.shape[0], axis=0)
lab = jnp.tile(labels, (pairs.shape[0], 1))
seq_cls = jnp.concatenate([jnp.concatenate([cls, cls[:, :1]], 1), jnp.concatenate([cls, cls[:, 1:2]], 1)], 0)
seq_lab = jnp.concatenate([jnp.concatenate([lab, lab[:, :1]], 1), jnp.concatenate([lab, lab[:, 1:2]], 1)], 0)
examples = data[seq_cls, 0]

parser = argparse.ArgumentParser()
opto.add_args_to_parser(parser)
default = parser.parse_args(args=[])
rest = [f"1:{h}" for h in range(8) if h != 3]
fns = {}
for name, extra in {"orig": {}, "pt_attn": {"opto_prev_token_heads": ["0:2"]},
                    "match": {"opto_induction_heads": ["1:3"]}}.items():
    o = deepcopy(default)
    o.opto_ablate_heads = rest
    for k, v in extra.items():
        setattr(o, k, v)
    fns[name] = main.make_batched_fn(ih_paper_plot_utils.make_forward_fn(o, default_fn=fwd_train), batch_size=batch)

opt_state = main_utils.get_optimizer_from_opts(opts).init(eqx.filter(model, eqx.is_array))
fmt = {"iter": -1, "seeds": {k: jax.random.PRNGKey(0) for k in ("eval_model_seed", "train_data_seed",
                                                                   "train_model_seed")},
       "opt_state": opt_state, "model": model}
out = {}
ckpts = sorted(os.listdir(os.path.join(run_folder, "checkpoints")), key=lambda f: int(f.split(".")[0]))
for f in ckpts:
    ckpt = eqx.tree_deserialise_leaves(os.path.join(run_folder, "checkpoints", f), fmt)
    it = int(f.split(".")[0])
    out[it] = {k: float(jnp.mean(fn(ckpt["model"], examples, seq_lab, key=jax.random.PRNGKey(0))["loss"]))
               for k, fn in fns.items()}
    print(it, out[it], file=sys.stderr)
print(json.dumps({"n_sequences": int(examples.shape[0]), "n_train_classes": int(n), "measures": out}))
