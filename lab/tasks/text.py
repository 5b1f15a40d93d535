"""Next-token prediction on a corpus of real text (Olsson et al. 2022; docs/science.md §1.6).

The corpus (lab/tasks/corpus.py: the Python standard library's source by default, or a user's text file,
folder, ``.npy`` or nanoGPT ``.bin`` token array) is split by position: the last ``heldout_fraction`` of its
tokens are held out (with the default corpus, whole files the model never trains on), the rest is the
training split.

Training batches are random windows of ``seq_len + 1`` tokens of the training split. The window starts are a
pure function of the step's key (``fold_in(key, t)``, as in every task: resume and fork stay exact); the
tokens are read from the memory-mapped corpus by a host callback (``jax.pure_callback``), so a corpus of any
size trains without being read into memory.

Evaluators:
- ``heldout``: ``eval_size`` fixed windows of the held-out split (starts drawn from ``eval_seed``): the loss,
  the loss by position (``loss_pos{p}``, p = 0, 1, 3, 7, ... and the last) and Olsson's in-context learning
  score ``icl_score`` = loss at a late position minus loss at an early one (Olsson: the 500th and the 50th token
  of 512; here ``icl_late`` and ``icl_early``, by default the same fractions of ``seq_len``). It falls from about
  0 to clearly negative when induction heads form.
- ``repeat``: Olsson's probe for language models: random tokens (drawn from the ``probe_tokens`` most frequent
  ids of the training split, so that every probe token has a trained embedding) in which one segment is copied
  once, at random offsets (lab/tasks/layouts.py; the other tokens are distinct when ``probe_tokens >= seq_len``);
  ``repeated_loss`` is the loss on the second copy, ~0 with an
  induction head, ~ln(probe_tokens) without one. The circuit summary's ablations are scored on it.

Positions: ``loss_pos{p}`` is the loss of predicting token p + 1 from tokens 0..p (p + 1 tokens of context).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from lab.errors import check
from lab.tasks.base import Batch, Task, TaskConfig, check_common, eval_key, standard_metrics, vmap_sequences
from lab.tasks.corpus import TOKENIZERS, Corpus, open_corpus
from lab.tasks.layouts import copy_layout, length_table

OLSSON_CONTEXT, OLSSON_EARLY, OLSSON_LATE = 512, 50, 500  # Olsson's ICL score: token 500 minus token 50 of 512


@dataclass
class TextConfig(TaskConfig):
    name: str = "text"
    path: str = "stdlib"  # a text file, a folder of text files, a .npy / .bin token array, or stdlib
    glob: str = "**/*"  # which files of a folder are the corpus
    tokenizer: str = "byte"  # byte (256 ids) | bpe (trained on the corpus with `tokenizers`) | a saved .json
    bpe_vocab: int = 1024  # the BPE's vocabulary size
    dtype: str = "uint16"  # a .bin array's token type (nanoGPT writes uint16)
    vocab_size: int | None = None  # the model's vocabulary (null: the tokenizer's, or an array's max id + 1)
    cache_dir: str | None = None  # where tokenised text is cached (null: beside the corpus, or the user cache)
    seq_len: int = 64  # context length
    heldout_fraction: float = 0.05  # the corpus's last share of tokens, held out for evaluation
    icl_early: int | None = None  # the ICL score's positions (null: Olsson's 50/512 and 500/512 of seq_len)
    icl_late: int | None = None
    probe_tokens: int = 64  # the repeat evaluator draws from this many of the most frequent training ids

    def positions(self) -> tuple[int, int]:
        """(early, late): the ICL score's positions."""
        T = self.seq_len
        early = self.icl_early if self.icl_early is not None else max(0, round(OLSSON_EARLY * T / OLSSON_CONTEXT) - 1)
        late = self.icl_late if self.icl_late is not None else round(OLSSON_LATE * T / OLSSON_CONTEXT) - 1
        return early, late

    def validate(self) -> None:
        check_common(self)
        check(self.seq_len >= 4, "task.seq_len", self.seq_len, "must be >= 4")
        check(self.tokenizer in TOKENIZERS or str(self.tokenizer).endswith(".json"), "task.tokenizer", self.tokenizer,
              "byte, bpe, or a saved tokenizer's .json file")
        check(self.bpe_vocab >= 258, "task.bpe_vocab", self.bpe_vocab, "must be >= 258 (the 256 bytes and <|doc|>)")
        check(0.0 < self.heldout_fraction < 1.0, "task.heldout_fraction", self.heldout_fraction, "must be in (0, 1)")
        early, late = self.positions()
        check(0 <= early < self.seq_len, "task.icl_early", early, f"must be in [0, task.seq_len={self.seq_len})")
        check(early < late < self.seq_len, "task.icl_late", late,
              f"must be in (task.icl_early={early}, task.seq_len={self.seq_len})")
        check(self.probe_tokens >= 2, "task.probe_tokens", self.probe_tokens, "must be >= 2")


def position_points(seq_len: int) -> list[int]:
    """Where the loss by position is logged: 0, 1, 3, 7, ... (2^k - 1) and the last position."""
    pts = [2 ** k - 1 for k in range(int(math.log2(seq_len)) + 1) if 2 ** k - 1 < seq_len]
    return pts + ([seq_len - 1] if pts[-1] != seq_len - 1 else [])


def icl_score(nll: jax.Array, early: int, late: int) -> jax.Array:
    """Olsson's in-context learning score of per-token losses ``nll`` [B, T]: the mean loss at ``late`` minus the
    mean loss at ``early``."""
    return jnp.mean(nll[:, late]) - jnp.mean(nll[:, early])


class TextTask(Task):
    """Next-token prediction on a corpus. Evaluators: heldout, repeat."""

    key_metric = "heldout/loss"
    watch_metric = "heldout/icl_score"
    # the circuit summary's cause check: ablating the induction heads should cost most of what they save on
    # repeated random tokens (ln(probe_tokens) = 4.2 nats at the default 64 without them)
    mechanism_metric = "repeat/repeated_loss"
    mechanism_min_effect = 1.0

    def __init__(self, cfg: TextConfig, corpus: Corpus | None = None):
        cfg.validate()
        self.cfg = cfg
        self.corpus = corpus or open_corpus(cfg.path, glob=cfg.glob, tokenizer=cfg.tokenizer,
                                            bpe_vocab=cfg.bpe_vocab, cache_dir=cfg.cache_dir, dtype=cfg.dtype,
                                            vocab_size=cfg.vocab_size)
        T = self.seq_len = cfg.seq_len
        n = len(self.corpus.tokens)
        self.n_heldout = int(n * cfg.heldout_fraction)
        self.n_train = n - self.n_heldout
        for part, size in (("training", self.n_train), ("held-out", self.n_heldout)):
            check(size >= T + 1, "task.path", cfg.path,
                  f"its {part} split has {size} tokens, shorter than one window of task.seq_len + 1 = {T + 1}"
                  f" ({n} tokens in all, task.heldout_fraction={cfg.heldout_fraction})")
        self.vocab_size = self.n_outputs = self.corpus.vocab_size
        counts = self.corpus.counts(self.n_train)
        k = min(cfg.probe_tokens, int(np.count_nonzero(counts)))
        check(k >= 2, "task.path", cfg.path, "its training split holds fewer than 2 distinct tokens")
        self.probe_ids = np.sort(np.argsort(-counts, kind="stable")[:k]).astype(np.int32)
        self.info = dict(self.corpus.info, train_tokens=self.n_train, heldout_tokens=self.n_heldout)

    # ---- training windows --------------------------------------------------------------------
    def _read(self, bits: np.ndarray, offset: int, span: int) -> np.ndarray:
        """Windows of seq_len + 1 tokens starting at (random 64-bit ``bits`` mod span) + offset; any leading shape."""
        b = np.asarray(bits).astype(np.uint64)
        starts = ((b[..., 0] << np.uint64(32)) | b[..., 1]) % np.uint64(span)
        idx = starts.astype(np.int64)[..., None] + offset + np.arange(self.seq_len + 1)
        return np.asarray(self.corpus.tokens[idx.reshape(-1)], np.int32).reshape(idx.shape)

    def sample(self, key: jax.Array, batch_size: int) -> Batch:
        T = self.seq_len
        bits = jax.random.bits(key, (batch_size, 2), jnp.uint32)
        span = self.n_train - T  # start in [0, n_train - T - 1]: the window ends inside the training split
        out = jax.ShapeDtypeStruct((batch_size, T + 1), jnp.int32)
        win = jax.pure_callback(lambda b: self._read(b, 0, span), out, bits, vmap_method="expand_dims")
        return self._batch(win)

    @staticmethod
    def _batch(win: jax.Array) -> Batch:
        return {"tokens": win[:, :-1], "targets": win[:, 1:], "loss_mask": jnp.ones(win[:, 1:].shape, jnp.float32),
                "masks": {}}

    # ---- evaluation --------------------------------------------------------------------------
    def heldout_windows(self, n: int, seed: int) -> np.ndarray:
        """``n`` fixed windows [n, seq_len + 1] of the held-out split, starts drawn from ``seed``."""
        bits = np.random.default_rng(seed).integers(0, 2 ** 32, (n, 2), dtype=np.uint64)
        return self._read(bits, self.n_train, self.n_heldout - self.seq_len)

    def repeat_batch(self, key: jax.Array, n: int) -> Batch:
        """Olsson's probe: probe tokens with one segment (length in [2, seq_len // 2]) copied once at random offsets."""
        T, V = self.seq_len, len(self.probe_ids)
        table = length_table(list(range(2, T // 2 + 1)), T // 2 + 1)
        draws = {"tokens": (max(V, T),), "length": (), "bars": (T + 2,)}
        x, masks = jax.jit(lambda k: vmap_sequences(lambda u: copy_layout(u, T, V, table, 0), k, n, draws))(key)
        ids = jnp.asarray(self.probe_ids)[x[:, 1:]]  # the layout's tokens 0..V-1 as probe ids; its BOS slot dropped
        return {"tokens": ids, "targets": jnp.concatenate([ids[:, 1:], ids[:, :1]], axis=1),
                "loss_mask": jnp.ones((n, T), jnp.float32).at[:, -1].set(0.0),
                "masks": {k: jnp.concatenate([v[:, 1:], jnp.zeros((n, 1), bool)], 1).astype(jnp.float32)
                          for k, v in masks.items()}}

    def token_probe(self, key: jax.Array, n: int) -> Batch:
        """Where prefix matching is measured: the repeat evaluator's kind of sequence (frequent tokens)."""
        return {"tokens": self.repeat_batch(key, n)["tokens"]}

    def picture_probe(self) -> Batch:
        """The repeat evaluator's first sequence: natural text repeats little, Olsson's probe shows the heads."""
        return jax.tree_util.tree_map(lambda a: a[:1], self.evals["repeat"])

    def build_evals(self) -> dict[str, Batch]:
        held = self._batch(jnp.asarray(self.heldout_windows(self.cfg.eval_size, self.cfg.eval_seed)))
        repeat = self.repeat_batch(eval_key(self.cfg.eval_seed, "repeat"), self.cfg.eval_size)
        return {"heldout": held, "repeat": repeat}

    def metrics(self, logits, batch):
        """The standard metrics, the loss by position and the ICL score."""
        out = standard_metrics(logits, batch)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        early, late = self.cfg.positions()
        out["icl_score"] = icl_score(nll, early, late)
        for p in position_points(self.seq_len):
            out[f"loss_pos{p}"] = jnp.mean(nll[:, p])
        return out
