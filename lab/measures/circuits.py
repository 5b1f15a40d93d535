"""Weight-based circuit measures (Elhage et al. 2021), computed on the host from parameters."""

from __future__ import annotations

import jax
import numpy as np

from lab.model import ACT_FNS, merge_consts


def eigen_share(m: np.ndarray) -> float:
    """Σλ / Σ|λ| over the eigenvalues of a square matrix: 1 for a copying (positive) circuit, -1 for
    its negation."""
    lam = np.linalg.eigvals(np.asarray(m, np.float64))
    den = np.sum(np.abs(lam))
    return float(np.real(np.sum(lam)) / den) if den > 0 else 0.0


def ov_matrix(params: dict, consts: dict, layer: int, head: int) -> np.ndarray:
    """W_V W_O of one head, [d_model, d_model] (identity when the model has no W_O)."""
    a = params["blocks"][str(layer)]["attn"]
    wv = np.asarray(a["W_V"][head])
    wo = np.asarray(a["W_O"][head]) if "W_O" in a else _concat_slot(wv.shape, head, len(a["W_V"]))
    return wv @ wo


def _concat_slot(shape, head, n_heads):
    """Without W_O, head h's output fills slot h of the concatenated residual."""
    d_head = shape[1]
    wo = np.zeros((d_head, d_head * n_heads))
    wo[:, head * d_head:(head + 1) * d_head] = np.eye(d_head)
    return wo


def copying_scores(params: dict, n_outputs: int) -> dict[str, float]:
    """Per head: eigenvalue share of the full OV circuit W_E W_V W_O W_U restricted to the tokens
    that are also outputs (computed as the [d, d] matrix W_V W_O W_U W_E, same non-zero spectrum)."""
    we = np.asarray(params["embed"]["W_E"])[:n_outputs]  # [n, d]
    wu = np.asarray(params["unembed"]["W_U"])  # [d, n]
    if wu.shape[0] != we.shape[1]:
        return {}  # an MLP head sits between the residual and the readout
    out = {}
    for l, blk in sorted(params["blocks"].items(), key=lambda kv: int(kv[0])):
        for h in range(np.asarray(blk["attn"]["W_V"]).shape[0]):
            ov = ov_matrix(params, {}, int(l), h)
            out[f"copying/L{l}H{h}"] = eigen_share(ov @ wu[:, :n_outputs] @ we)
    return out


def composition_scores(params: dict) -> dict[str, float]:
    """For each later head, the largest Q-, K- and V-composition with any head of earlier layers:
    ||W_OV^{h} W_{Q|K|V}^{h'}||_F / (||W_OV^{h}||_F ||W_{Q|K|V}^{h'}||_F)."""
    blocks = sorted(params["blocks"].items(), key=lambda kv: int(kv[0]))
    out = {}
    for l2, b2 in blocks:
        if int(l2) == 0:
            continue
        for h2 in range(np.asarray(b2["attn"]["W_K"]).shape[0]):
            best = {"q": 0.0, "k": 0.0, "v": 0.0}
            for l1, b1 in blocks:
                if int(l1) >= int(l2):
                    break
                for h1 in range(np.asarray(b1["attn"]["W_V"]).shape[0]):
                    ov = ov_matrix(params, {}, int(l1), h1)
                    for kind, name in (("q", "W_Q"), ("k", "W_K"), ("v", "W_V")):
                        if name not in b2["attn"]:
                            continue
                        w = np.asarray(b2["attn"][name][h2])
                        den = np.linalg.norm(ov) * np.linalg.norm(w)
                        if den > 0:
                            best[kind] = max(best[kind], float(np.linalg.norm(ov @ w) / den))
            for kind, v in best.items():
                out[f"{kind}_comp/L{l2}H{h2}"] = v
    return out


def param_norms(params: dict) -> dict[str, float]:
    """Frobenius norm per module: embed, pos_embed, blocks.{l}.attn, blocks.{l}.ln1, ln_final, mlp, unembed."""
    out = {}

    def norm(tree):
        leaves = jax.tree_util.tree_leaves(tree)
        return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in leaves)))

    for k, v in params.items():
        if k == "blocks":
            for l, blk in v.items():
                for part, sub in blk.items():
                    out[f"param_norm/blocks.{l}.{part}"] = norm(sub)
        else:
            out[f"param_norm/{k}"] = norm(v)
    return out


def _heads_as_one(w) -> np.ndarray:
    """A layer's [heads, d_model, d_head] W_Q or W_K as one [d_model, heads * d_head] matrix: the authors' nn.Linear
    of all heads at once, whose query-key product is the sum of the heads' scores."""
    w = np.asarray(w)
    return w.transpose(1, 0, 2).reshape(w.shape[1], -1)


def memory_recall(params: dict, consts: dict, n_tokens: int, triggers=None, wk0_cutoff: int = 64,
                  bigram=None, ff1_tokens=None, act_fn: str = "relu") -> dict[str, float]:
    """Bietti et al.'s associative-memory probes, as their ihead_basic_main.py and ihead_full_main.py compute them
    (``test_wo1``, ``test_wk1``, ``test_wk0``, ``test_ff1``) for a model of 2 or more layers. As theirs, a layer's
    heads act as one linear map (W_V W_O summed over heads; queries and keys concatenated over heads, so a score
    is the sum of the heads'), and LayerNorm and biases are left out. The first three are the fraction of probes
    whose argmax through the memory recovers the intended item:

    - ``memory_recall/wo1``: token j's embedding through layer 1's W_V, W_O and the unembedding gives
      logit argmax j (the output memory: copy the attended token), over every token;
    - ``memory_recall/wk1``: the layer-1 query of token a (W_Q1 x_a) scores highest, among the keys
      W_K1 W_O0 W_V0 x_b, the one with b = a (the induction match: "previous token = a"), over the fixed
      ``triggers`` where given (the authors' fixed_special_toks), else over every token;
    - ``memory_recall/wk0``: the layer-0 query of position t + 1 (its position embedding) scores position t
      highest among the keys of positions 0 .. T-2, unmasked, as theirs (the previous-token memory);
      ``wk0_64``: the same over the first ``wk0_cutoff`` positions.
    - ``memory_recall/ff1_kl`` (a model with a feed-forward layer in block 1, given the task's ``bigram``
      conditional [n, n]): KL(bigram row of a || softmax(W_U mlp1(x_a))) averaged over the tokens
      ``ff1_tokens`` (theirs: every token but the fixed triggers): how well layer 1's feed-forward memory
      alone holds the global bigrams (``act_fn``: the model's nonlinearity). A divergence, lower is better, not a
      fraction.
    """
    p = merge_consts(params, consts)
    if "0" not in p["blocks"] or "1" not in p["blocks"]:
        return {}
    we = np.asarray(p["embed"]["W_E"])[:n_tokens]  # [n, d]
    wu = np.asarray(p["unembed"]["W_U"])
    a0, a1 = p["blocks"]["0"]["attn"], p["blocks"]["1"]["attn"]
    ov = lambda layer: sum(ov_matrix(p, consts, layer, h) for h in range(len(p["blocks"][str(layer)]["attn"]["W_V"])))  # noqa: E731
    out = {}
    if wu.shape[0] == we.shape[1]:
        logits = we @ ov(1) @ wu[:, :n_tokens]  # [n, n]
        out["memory_recall/wo1"] = float(np.mean(np.argmax(logits, 1) == np.arange(n_tokens)))
    toks = we if triggers is None else we[np.asarray(triggers)]
    prev_key = toks @ ov(0)  # [n, d]: what layer 0 writes for "previous token = b"
    q1 = toks @ _heads_as_one(a1["W_Q"])  # [n, h * dh]
    k1 = prev_key @ _heads_as_one(a1["W_K"])
    out["memory_recall/wk1"] = float(np.mean(np.argmax(q1 @ k1.T, 1) == np.arange(len(toks))))
    if "W_pos" in p.get("pos_embed", {}):
        pos = np.asarray(p["pos_embed"]["W_pos"])
        wq0, wk0 = _heads_as_one(a0["W_Q"]), _heads_as_one(a0["W_K"])
        for name, pe in (("wk0", pos), (f"wk0_{wk0_cutoff}", pos[:wk0_cutoff])):
            s = (pe[1:] @ wq0) @ (pe[:-1] @ wk0).T  # [T-1 queries, T-1 keys]
            out[f"memory_recall/{name}"] = float(np.mean(np.argmax(s, 1) == np.arange(len(pe) - 1)))
    mlp = p["blocks"]["1"].get("mlp")
    if mlp is not None and bigram is not None and wu.shape[0] == we.shape[1]:
        used = np.arange(n_tokens) if ff1_tokens is None else np.asarray(ff1_tokens)
        m = {k: np.asarray(v, np.float64) for k, v in mlp.items()}
        pre = we[used] @ m["W_in"] + m.get("b_in", 0.0)
        h = np.asarray(ACT_FNS[act_fn](pre), np.float64) @ m["W_out"] + m.get("b_out", 0.0)  # the model's own
        z = h @ wu + np.asarray(p["unembed"].get("b_U", 0.0))
        logp = (z - z.max(1, keepdims=True)) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
        target = np.asarray(bigram, np.float64)[used]
        with np.errstate(divide="ignore", invalid="ignore"):  # 0 log 0 = 0, as torch's kl_div
            terms = np.where(target > 0, target * (np.log(target) - logp[:, :target.shape[1]]), 0.0)
        out["memory_recall/ff1_kl"] = float(terms.sum() / len(used))
    return out
