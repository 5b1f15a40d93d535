"""TransformerLens baseline for `make bench`: the olsson_repeat model as a HookedTransformer(attn_only=True),
trained with torch on the CPU in a plain loop. Run by bench/run.py with the interpreter of the optional
TransformerLens environment (`make bench-tl-env`); prints one JSON line: {"steps_per_sec": ...}."""

import json
import os
import sys
import time

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    torch.set_num_threads(os.cpu_count())
    vocab, seg, batch = 256, 16, 128
    cfg = HookedTransformerConfig(n_layers=2, d_model=64, n_heads=8, d_head=8, n_ctx=2 * seg, d_vocab=vocab + 1,
                                  attn_only=True, normalization_type="LN", positional_embedding_type="standard",
                                  device="cpu", seed=0)
    model = HookedTransformer(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)

    def step():
        seg_tokens = torch.randint(0, vocab, (batch, seg))
        bos = torch.full((batch, 1), vocab)
        tokens = torch.cat([bos, seg_tokens, seg_tokens[:, :-1]], dim=1)  # BOS + segment twice, 32 tokens
        loss = model(tokens, return_type="loss")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    print(json.dumps({"steps_per_sec": n / (time.perf_counter() - t0), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
