"""Runs one of Bietti's transformer-birth scripts on the CPU, unchanged: their code calls ``.cuda()`` on every
tensor and module, which this runner makes a no-op before executing the script with the given arguments. With
``save_dir=`` their script writes its config with ``json.dump(dict(cfg))``, which current omegaconf's nested
configs refuse; the runner teaches json to write an omegaconf node as plain data (nothing else changes).

``--fast-data`` (before SCRIPT) replaces their data sampler, ``ihead_data.Dataset.gen_batch``, by a vectorised
one that draws the same distribution (fixed triggers, outputs uniform per sequence, bigram steps from their
``cond``, x_0 from their ``marginal``; the same ``outs`` counters), with a different random stream. Theirs
draws every token with a Python ``rng.choice``: about 4 s per batch of 512 x 256 per core here, where the
authors ran 60 worker processes; on 2 cores the data alone would take over an hour per 1000 steps.

``--torch-seed N`` (before SCRIPT) seeds torch's generator before their script runs: ihead_full_main.py has no
seed argument and would otherwise draw its initial weights unseeded.

Usage (cwd = the checkout, which holds data/meta.pkl):
  PYTHON bench/bietti_cpu_runner.py [--fast-data] [--torch-seed N] SCRIPT.py [ARGS...]
"""

import json
import runpy
import sys

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

_default = json.JSONEncoder.default


def _omegaconf_as_data(self, o):
    if isinstance(o, (DictConfig, ListConfig)):
        return OmegaConf.to_container(o)
    return _default(self, o)


json.JSONEncoder.default = _omegaconf_as_data
sys.path.insert(0, ".")  # their modules (ihead_data, ...) live in the checkout, the working directory

torch.Tensor.cuda = lambda self, *a, **k: self  # the CPU stands in for the GPU
torch.nn.Module.cuda = lambda self, *a, **k: self
torch.set_num_threads(max(1, torch.get_num_threads()))



def fast_gen_batch(self, rng, batch_size):
    """Their gen_batch's distribution, vectorised over the batch (the README setting only)."""
    import numpy as np

    assert self.idxs is not None and not self.show_latents and self.output_counter and not self.no_repeat
    assert self.train_test is None and not self.bigram_outs, "--fast-data covers the README setting only"
    B, T1, V, k = batch_size, self.seq_length + 1, self.num_tokens, len(self.idxs)
    trig_of = np.full(V, -1)
    trig_of[np.asarray(self.idxs)] = np.arange(k)
    outs = rng.integers(0, V, size=(B, k))  # rng.choice(pool), pool = every token
    cdf_m = np.cumsum(self.marginal)
    cdf_c = np.cumsum(np.asarray(self.cond), axis=1)
    rows = np.arange(B)
    x = np.empty((B, T1), dtype=np.int64)
    counts = np.zeros((B, k), dtype=np.int64)
    o = np.zeros((B, T1), dtype=np.int64)
    x[:, 0] = np.minimum(np.searchsorted(cdf_m, rng.random(B) * cdf_m[-1], side="right"), V - 1)
    for t in range(T1 - 1):
        last = x[:, t]
        ti = trig_of[last]
        is_t = ti >= 0
        tj = np.maximum(ti, 0)
        counts[rows[is_t], tj[is_t]] += 1
        o[:, t] = np.where(is_t, counts[rows, tj], 0)
        c = cdf_c[last]
        nxt = np.minimum((c <= (rng.random(B) * c[:, -1])[:, None]).sum(1), V - 1)
        x[:, t + 1] = np.where(is_t, outs[rows, tj], nxt)
    return x, o  # the last position's counter stays 0, as theirs


argv = sys.argv[1:]
while argv and argv[0].startswith("--"):
    if argv[0] == "--fast-data":
        import ihead_data

        ihead_data.Dataset.gen_batch = fast_gen_batch
        argv = argv[1:]
    elif argv[0] == "--torch-seed":
        torch.manual_seed(int(argv[1]))
        argv = argv[2:]
    else:
        raise SystemExit(f"bietti_cpu_runner: unknown option {argv[0]}")
script, args = argv[0], argv[1:]
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
