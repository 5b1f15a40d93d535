"""Bursty in-context classification (Reddy 2023; docs/science.md §1.1).

A sequence is ``x_1 l_1 x_2 l_2 ... x_N l_N x_q`` (T = 2N+1): items at the even positions
0, 2, ..., 2N-2, their labels at the odd positions, the query item at position 2N. The target
is the query's label, scored at position 2N only.

Class ids in ``info["classes"]`` (see ``BurstyTask.sample_with_classes``): known classes are
0..K-1; the novel classes of a sequence are numbered K, K+1, ... (fresh means drawn for that
sequence only).

Choices where the paper is silent:
- ``B = 0`` forces ``p_B = 0`` (``task.p_B`` is the effective value). Novel-class sequences are
  always bursty; with ``B = 0`` they (and the ``ic``/``ic_flip`` evaluators) use bursts of 1.
- With ``encoding="reddy"`` ``tokens`` still hold the label ids at label positions (0 elsewhere),
  though every position feeds the model through ``features`` (``is_feature`` all True).
- Novel classes get independent uniform labels, so two novel classes may share a label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from lab.errors import check
from lab.tasks.base import (
    Batch,
    Task,
    TaskConfig,
    build_eval_sets,
    cdf_table,
    check_common,
    choice_from,
    inverse_cdf_from,
    normal_from,
    permutation_from,
    randint_from,
    sample_evaluators,
    vmap_sequences,
    zipf_logits,
)

N_POS_SLOTS = 65  # one-hot position slots of the "reddy" encoding


@dataclass
class BurstyConfig(TaskConfig):
    name: str = "bursty"
    K: int = 256  # classes (a multiple of L)
    L: int = 32  # labels
    N: int = 8  # item-label pairs in the context
    D: int = 63  # item dimension
    eps: float = 0.1  # within-class noise
    B: int = 1  # burstiness: copies of each context class (divides N; 0 = never bursty)
    p_B: float = 1.0  # probability that a known-class sequence is bursty
    p_C: float = 0.8  # probability that a sequence uses novel classes
    alpha: float = 0.0  # Zipf exponent over the K classes
    encoding: str = "embed"  # "embed": items as features, labels as tokens; "reddy": 128-d tokens
    data_seed: int = 0  # class means and label vectors

    def validate(self) -> None:
        check_common(self)
        check(self.L >= 1, "task.L", self.L, "must be a positive integer")
        check(self.K >= 1, "task.K", self.K, "must be a positive integer")
        check(self.K % self.L == 0, "task.K", self.K, f"must be a multiple of task.L={self.L}")
        check(self.N >= 1, "task.N", self.N, "must be a positive integer")
        check(self.D >= 1, "task.D", self.D, "must be a positive integer")
        check(math.isfinite(self.eps) and self.eps >= 0, "task.eps", self.eps, "must be a number >= 0")
        check(0 <= self.B <= self.N, "task.B", self.B, f"must be in [0, task.N={self.N}]")
        check(self.B == 0 or self.N % self.B == 0, "task.B", self.B, f"must be 0 or divide task.N={self.N}")
        check(
            self.N // max(self.B, 1) <= self.K,
            "task.K",
            self.K,
            f"must be >= N/B = {self.N // max(self.B, 1)} (distinct classes in a bursty context)",
        )
        check(0.0 <= self.p_B <= 1.0, "task.p_B", self.p_B, "must be a probability in [0, 1]")
        check(0.0 <= self.p_C <= 1.0, "task.p_C", self.p_C, "must be a probability in [0, 1]")
        check(
            math.isfinite(self.alpha) and self.alpha >= 0, "task.alpha", self.alpha, "must be a number >= 0"
        )
        check(self.encoding in ("embed", "reddy"), "task.encoding", self.encoding, "one of embed, reddy")
        if self.encoding == "reddy":
            check(
                2 * self.N + 1 <= N_POS_SLOTS,
                "task.N",
                self.N,
                f"must have 2N+1 <= {N_POS_SLOTS} position slots with encoding=reddy (N <= 32)",
            )


class BurstyTask(Task):
    """Reddy's bursty classification task. Evaluators: train, ic, ic_flip, iw."""

    classification = True
    key_metric = "ic/acc"
    watch_metric = "ic/acc"
    # the training mixture, numbers in the sampler (not shapes): batched runs may hold them as data
    data_fields = ("p_B", "p_C", "alpha", "eps")

    def __init__(self, cfg: BurstyConfig):
        cfg.validate()
        self.cfg = cfg
        K, L, N, D = cfg.K, cfg.L, cfg.N, cfg.D
        rng = np.random.default_rng(cfg.data_seed)
        self.means = jnp.asarray(rng.normal(size=(K, D)) / math.sqrt(D), jnp.float32)
        self.label_vecs = jnp.asarray(rng.normal(size=(L, D)) / math.sqrt(D), jnp.float32)
        self.law = self._law(cfg.alpha, cfg.eps)
        self.p_B = 0.0 if cfg.B == 0 else float(cfg.p_B)  # effective
        self.burst = max(cfg.B, 1)  # burst size of bursty and novel sequences
        self.seq_len = 2 * N + 1
        self.vocab_size = L
        self.n_outputs = L
        self.feature_dim = D if cfg.encoding == "embed" else N_POS_SLOTS + D
        self.query_positions = (2 * N,)
        self.label_positions = tuple(range(1, 2 * N, 2))
        self.item_positions = tuple(range(0, 2 * N + 1, 2))
        self.feature_positions = self.item_positions if cfg.encoding == "embed" else None  # reddy: every position
        self.draws = {  # uniform numbers per sequence
            "novel": (),
            "bursty": (),
            "slots": (N,),
            "query": (),
            "chosen": (K,),
            "iid": (N + 1,),
            "novel_means": (N, D),
            "novel_labels": (N,),
            "eta": (N + 1, D),
            "offset": (),
        }
        # evaluator -> setting (p_B, p_C, label shift, burst size); see ``sample_setting``
        self.settings = {
            "train": (self.p_B, float(cfg.p_C), 0, self.burst),
            "ic": (1.0, 1.0, 0, self.burst),
            "ic_flip": (1.0, 0.0, 1, self.burst),
            "iw": (0.0, 0.0, 0, self.burst),
        }

    # ------------------------------------------------------------------ sampling
    def _sequence(self, u, setting, law):
        """One sequence from its uniform draws ``u`` (shapes ``self.draws``), ``setting`` (see
        ``sample_setting``) and ``law`` (see ``self.law``)."""
        p_B, p_C, shift, burst = setting  # numbers, possibly traced
        zipf, zipf_cdf, eps, norm = law
        cfg = self.cfg
        K, L, N, D = cfg.K, cfg.L, cfg.N, cfg.D
        nc = N // burst  # distinct classes in a bursty context
        T = 2 * N + 1
        novel = u["novel"] < p_C
        bursty = u["bursty"] < p_B
        # Burst pattern shared by the bursty and novel variants: context slot -> class index.
        slots = (jnp.arange(N, dtype=jnp.int32) // burst)[permutation_from(u["slots"])]
        q_idx = randint_from(u["query"], 0, nc)
        pattern = jnp.concatenate([slots, q_idx[None]])  # [N+1]
        # Bursty over known classes: nc distinct classes drawn without replacement from Zipf.
        chosen = choice_from(u["chosen"], zipf, min(N, K))  # the first nc are used
        cls_bursty = chosen[pattern]
        # Non-bursty: i.i.d. Zipf (inverse CDF).
        cls_iid = inverse_cdf_from(u["iid"], zipf_cdf)
        # Novel classes: fresh means and labels, numbered K, K+1, ...
        novel_means = normal_from(u["novel_means"]) / math.sqrt(D)
        novel_labels = randint_from(u["novel_labels"], 0, L)
        cls_novel = K + pattern
        cls = jnp.where(novel, cls_novel, jnp.where(bursty, cls_bursty, cls_iid)).astype(jnp.int32)

        is_novel = cls >= K
        known = jnp.clip(cls, 0, K - 1)
        nov = jnp.clip(cls - K, 0, N - 1)
        mu = jnp.where(is_novel[:, None], novel_means[nov], self.means[known])
        labels = ((jnp.where(is_novel, novel_labels[nov], known % L) + shift) % L).astype(jnp.int32)
        eta = normal_from(u["eta"]) / math.sqrt(D)
        items = ((mu + eps * eta) / norm).astype(jnp.float32)

        ctx_labels = labels[:N]
        tokens = jnp.zeros(T, jnp.int32).at[1::2].set(ctx_labels)
        content = jnp.zeros((T, D), jnp.float32).at[0::2].set(items)
        offset = jnp.int32(0)
        if cfg.encoding == "embed":
            features = content
            is_feature = jnp.arange(T) % 2 == 0
        else:
            content = content.at[1::2].set(self.label_vecs[ctx_labels])
            offset = randint_from(u["offset"], 0, N_POS_SLOTS - T + 1)
            pos = jax.nn.one_hot(offset + jnp.arange(T), N_POS_SLOTS, dtype=jnp.float32)
            features = jnp.concatenate([pos, content], axis=-1)
            is_feature = jnp.ones(T, bool)
        batch = {
            "tokens": tokens,
            "features": features,
            "is_feature": is_feature,
            "targets": jnp.zeros(T, jnp.int32).at[2 * N].set(labels[N]),
            "loss_mask": jnp.zeros(T, jnp.float32).at[2 * N].set(1.0),
            "masks": {},
            "context_labels": jnp.zeros(L, jnp.float32).at[ctx_labels].set(1.0),
            "query_match": jnp.zeros(T, jnp.float32).at[1::2].set((cls[:N] == cls[N]).astype(jnp.float32)),
        }
        info = {"classes": cls, "labels": labels, "novel": novel, "bursty": bursty & ~novel, "offset": offset}
        return batch, info

    def sample_with_classes(self, key: jax.Array, batch_size: int, evaluator: str = "train"):
        """A batch and ``info``: ``classes`` [B, N+1] (context then query; novel ones >= K),
        ``labels`` [B, N+1] (as given, after any flip), ``novel``/``bursty`` [B] flags, ``offset`` [B]."""
        return self.sample_setting(key, batch_size, self.settings[evaluator])

    def sample_setting(self, key: jax.Array, batch_size: int, setting, law=None):
        """Like ``sample_with_classes`` for an explicit setting ``(p_B, p_C, label shift, burst)``:
        the probabilities of bursty and novel-class sequences, the shift added (mod L) to every label,
        and the burst size (>= 1, divides N). Settings may be traced (vmap over them). ``law``: the
        class law and item noise (default: the config's, ``self.law``)."""
        return vmap_sequences(self._sequence, key, batch_size, self.draws, setting,
                              self.law if law is None else law)

    def _law(self, alpha: float, eps: float) -> tuple:
        """What the sampler reads besides the setting: the class law (Zipf logits, inverse-CDF table) and the
        item noise (eps, and sqrt(1 + eps^2), which keeps the items' norm)."""
        zipf = zipf_logits(self.cfg.K, alpha)
        cdf = cdf_table(np.exp(np.asarray(zipf, np.float64)))
        return zipf, cdf, jnp.float32(eps), jnp.float32(math.sqrt(1.0 + eps**2))

    def run_data(self, values: dict) -> dict:
        """A batched run's data: p_B and p_C as numbers; for alpha and eps the law they make, computed here
        on the host as a solo run's is, so both draw the same classes."""
        data = {k: jnp.float32(v) for k, v in values.items() if k in ("p_B", "p_C")}
        if "alpha" in values or "eps" in values:
            data["law"] = self._law(values.get("alpha", self.cfg.alpha), values.get("eps", self.cfg.eps))
        return data

    def sample_settings(self, key: jax.Array, batch_size: int, settings: dict | None = None) -> dict:
        """``{name: sample_setting(key_name, batch_size, setting)}`` for several settings (default:
        the evaluators'), as one vmap: one compilation for all of them."""
        settings = self.settings if settings is None else settings
        keys = {name: jax.random.fold_in(key, i) for i, name in enumerate(settings)}
        return sample_evaluators(lambda k, s: self.sample_setting(k, batch_size, s), keys, settings)

    def sample(self, key: jax.Array, batch_size: int, data: dict | None = None) -> Batch:
        if not data:
            return self.sample_with_classes(key, batch_size)[0]
        p_B = 0.0 if self.cfg.B == 0 else data.get("p_B", self.p_B)  # B = 0 forces p_B = 0, as in __init__
        setting = (p_B, data.get("p_C", float(self.cfg.p_C)), 0, self.burst)
        return self.sample_setting(key, batch_size, setting, data.get("law"))[0]

    def build_evals(self) -> dict[str, Batch]:
        size = self.cfg.eval_size
        return build_eval_sets(
            lambda k, s: self.sample_setting(k, size, s)[0], self.settings, self.cfg.eval_seed
        )
