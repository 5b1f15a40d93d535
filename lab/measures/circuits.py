"""Weight-based circuit measures (Elhage et al. 2021), computed on the host from parameters."""

from __future__ import annotations

import numpy as np


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
    import jax

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


def memory_recall(params: dict, consts: dict, n_tokens: int) -> dict[str, float]:
    """Bietti et al.'s associative-memory probes, for head 0 of a 2-layer model. Each is the fraction of
    probes whose argmax through the memory recovers the intended item:

    - ``recall/L1_ov``: token j's embedding through layer 1's value-output circuit and the unembedding
      gives logit argmax j (the output memory: copy the attended token);
    - ``recall/L1_qk``: the query of token i (layer 1) scores highest the key that carries "previous
      token = i" (layer 0's value-output of token i): the induction match;
    - ``recall/L0_qk``: the query at position t (layer 0, position embedding) scores position t - 1
      highest: the previous-token memory.
    """
    from lab.model import merge_consts

    p = merge_consts(params, consts)
    if "0" not in p["blocks"] or "1" not in p["blocks"]:
        return {}
    we = np.asarray(p["embed"]["W_E"])[:n_tokens]  # [n, d]
    wu = np.asarray(p["unembed"]["W_U"])
    a0, a1 = p["blocks"]["0"]["attn"], p["blocks"]["1"]["attn"]
    out = {}
    if wu.shape[0] == we.shape[1]:
        ov1 = ov_matrix(p, consts, 1, 0)
        logits = we @ ov1 @ wu[:, :n_tokens]  # [n, n]
        out["recall/L1_ov"] = float(np.mean(np.argmax(logits, 1) == np.arange(n_tokens)))
    wo0 = np.asarray(a0["W_O"][0]) if "W_O" in a0 else np.eye(np.asarray(a0["W_V"]).shape[-1])
    prev_key = we @ np.asarray(a0["W_V"][0]) @ wo0  # [n, d]: what layer 0 writes for "previous token = j"
    q1 = we @ np.asarray(a1["W_Q"][0])  # [n, dh]
    k1 = prev_key @ np.asarray(a1["W_K"][0])
    out["recall/L1_qk"] = float(np.mean(np.argmax(q1 @ k1.T, 1) == np.arange(n_tokens)))
    if "W_pos" in p.get("pos_embed", {}):
        pos = np.asarray(p["pos_embed"]["W_pos"])
        q0, k0 = pos @ np.asarray(a0["W_Q"][0]), pos @ np.asarray(a0["W_K"][0])
        s = q0 @ k0.T
        t = pos.shape[0]
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        out["recall/L0_qk"] = float(np.mean(np.argmax(s[1:], 1) == np.arange(t - 1)))
    return out
