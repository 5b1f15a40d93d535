"""Bigram sequences with triggers (Bietti et al. 2023; docs/science.md §1.3).

A global unigram law pi_u and bigram law pi_b over the vocabulary: synthetic (rows of pi_b drawn
from Dirichlet(dirichlet), pi_u its stationary law; with ``zipf`` > 0 the rows are drawn around a Zipf law
instead, Dirichlet(dirichlet * V * z) with z_k proportional to (k + 1)^-zipf, so that pi_u is close to z and the
frequent tokens are as frequent as a text's most common characters) or estimated from a user's text file
(characters; pi_u = character frequencies, pi_b = bigram counts with add-one smoothing; the
vocabulary is the sorted set of distinct characters, ``task.alphabet``), or read from the authors'
``data/meta.pkl`` (``stats_path``: their tiny-Shakespeare counts, unsmoothed, as their code uses them).

Per sequence each trigger gets an output token, drawn uniformly over the vocabulary (``output_law:
uniform``, as the authors' code does: ihead_data.py draws ``rng.choice(pool)``) or from pi_u
(``unigram``); x_0 ~ pi_u; after a trigger
comes its output, otherwise x_{t+1} ~ pi_b[x_t]. tokens = x[:-1], targets = x[1:].
Masks: ``icl`` = positions holding a trigger that already occurred earlier in the sequence
(its successor is predictable from context only); ``global`` = positions not holding a trigger.
"""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from lab.errors import ConfigError, check
from lab.tasks.base import (
    Batch,
    Task,
    TaskConfig,
    build_eval_sets,
    cdf_table,
    check_common,
    choice_from,
    inverse_cdf_from,
    vmap_sequences,
)


def read_text(path: str) -> str:
    """The text of a UTF-8 file; ConfigError on task.text_path if it cannot be read."""
    check(os.path.isfile(path), "task.text_path", path, "no such file")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("task.text_path", path, f"cannot read it as UTF-8 text: {e}") from e


def text_stats(text: str) -> tuple[str, np.ndarray, np.ndarray]:
    """(alphabet, pi_u [V], pi_b [V, V]) of a text: character frequencies and add-one bigrams."""
    alphabet, ids = np.unique(np.array(list(text)), return_inverse=True)
    V = len(alphabet)
    ids = ids.reshape(-1)
    pi_u = np.bincount(ids, minlength=V).astype(np.float64)
    pi_u /= pi_u.sum()
    counts = np.bincount(ids[:-1] * V + ids[1:], minlength=V * V).reshape(V, V).astype(np.float64) + 1.0
    pi_b = counts / counts.sum(axis=1, keepdims=True)
    return "".join(alphabet.tolist()), pi_u, pi_b


class _DataOnly(pickle.Unpickler):
    """Unpickles plain data (dicts, strings, numbers, tuples) and refuses every class: a stats file is data,
    and a pickle that names a class could run code."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it names {module}.{name}; only plain dicts, strings and numbers are read")


def meta_stats(path: str) -> tuple[str, np.ndarray, np.ndarray]:
    """(alphabet, pi_u, pi_b) from the authors' ``data/meta.pkl`` (albietz/transformer-birth: ``itos``, and
    character ``unigrams`` and ``bigrams`` counts), normalised as their ihead_data.py does: no smoothing
    (a character never followed by another gets a uniform row, where theirs would divide by zero)."""
    field = "task.stats_path"
    check(os.path.isfile(path), field, path, "no such file")
    try:
        with open(path, "rb") as f:
            meta = _DataOnly(f).load()
        itos = meta["itos"]
        V = len(itos)
        stoi = {itos[i]: i for i in range(V)}
        pi_u = np.zeros(V)
        for ch, n in meta["unigrams"].items():
            pi_u[stoi[ch]] = n
        counts = np.zeros((V, V))
        for (a, b), n in meta["bigrams"].items():
            counts[stoi[a], stoi[b]] += n
    except ConfigError:
        raise
    except Exception as e:  # not a pickle, a pickle of something else, a missing key
        raise ConfigError(field, path, f"not a meta.pkl of unigram and bigram counts ({type(e).__name__}: {e})") from e
    check(pi_u.sum() > 0 and V >= 2, field, path, "holds no character counts")
    rows = counts.sum(axis=1, keepdims=True)
    pi_b = np.where(rows > 0, counts / np.maximum(rows, 1e-300), 1.0 / V)
    return "".join(itos[i] for i in range(V)), pi_u / pi_u.sum(), pi_b


def stationary(P: np.ndarray) -> np.ndarray:
    """Stationary law pi (pi P = pi) of a row-stochastic matrix, solving pi (I - P + J) = 1."""
    V = P.shape[0]
    pi = np.linalg.solve((np.eye(V) - P + np.ones((V, V))).T, np.ones(V))
    pi = np.clip(pi, 0.0, None)
    return pi / pi.sum()


@dataclass
class BigramConfig(TaskConfig):
    name: str = "bigram"
    vocab_size: int = 65  # synthetic vocabulary (a text file sets its own)
    seq_len: int = 256
    n_triggers: int = 5
    trigger_mode: str = "frequent"  # "frequent": the n most probable tokens; "sampled": per sequence
    loss_on: str = "all"  # "all" positions, or "triggers": the icl positions only
    output_law: str = "uniform"  # each trigger's output per sequence: uniform over the vocabulary | unigram (pi_u)
    text_path: str | None = None  # estimate pi_u, pi_b from this text's characters
    stats_path: str | None = None  # pi_u, pi_b from the authors' data/meta.pkl (character counts, unsmoothed)
    dirichlet: float = 0.5  # synthetic rows pi_b[i] ~ Dirichlet(dirichlet) (times V * z when zipf > 0)
    # synthetic rows drawn around a Zipf law z_k ~ (k + 1)^-zipf (0: the symmetric Dirichlet). Why it matters: with
    # fixed frequent triggers, how often a trigger occurs sets how much signal the induction head gets
    zipf: float = 0.0
    data_seed: int = 0

    def validate(self) -> None:
        check_common(self)
        check(self.seq_len >= 1, "task.seq_len", self.seq_len, "must be a positive integer")
        check(self.n_triggers >= 1, "task.n_triggers", self.n_triggers, "must be a positive integer")
        check(
            self.trigger_mode in ("frequent", "sampled"),
            "task.trigger_mode",
            self.trigger_mode,
            "one of frequent, sampled",
        )
        check(self.loss_on in ("all", "triggers"), "task.loss_on", self.loss_on, "one of all, triggers")
        check(self.output_law in ("uniform", "unigram"), "task.output_law", self.output_law, "one of uniform, unigram")
        check(not (self.text_path and self.stats_path), "task.stats_path", self.stats_path,
              "give task.text_path or task.stats_path, not both")
        if self.stats_path:
            alphabet, _, _ = meta_stats(self.stats_path)
            check(len(alphabet) > self.n_triggers, "task.stats_path", self.stats_path,
                  f"has {len(alphabet)} characters; needs at least task.n_triggers + 1 = {self.n_triggers + 1}")
        elif self.text_path:
            text = read_text(self.text_path)
            n_distinct = len(set(text))
            check(
                len(text) >= 2 and n_distinct > self.n_triggers,
                "task.text_path",
                self.text_path,
                f"too short: needs at least task.n_triggers + 1 = {self.n_triggers + 1} distinct characters"
                f" (has {n_distinct} in {len(text)} characters)",
            )
        else:
            check(self.vocab_size >= 2, "task.vocab_size", self.vocab_size, "must be >= 2")
            check(
                self.n_triggers < self.vocab_size,
                "task.n_triggers",
                self.n_triggers,
                f"must be < task.vocab_size={self.vocab_size}",
            )
            check(
                math.isfinite(self.dirichlet) and self.dirichlet > 0,
                "task.dirichlet",
                self.dirichlet,
                "must be a number > 0",
            )
            check(math.isfinite(self.zipf) and self.zipf >= 0, "task.zipf", self.zipf, "must be a number >= 0")


class BigramTask(Task):
    """Bietti's bigram-with-triggers task. Evaluator: test."""

    key_metric = "test/icl_acc"
    watch_metric = "test/icl_loss"
    # the circuit summary: the output token after a repeated trigger is predictable from context alone
    mechanism_metric = "test/icl_loss"
    auto_measures = ("memory_recall",)
    mechanism_min_effect = 0.5

    def circuit_positions(self, batch):
        """Bietti's induction head is needed only at the triggers: its previous-token head at the position
        right after a trigger (the output token attends to its trigger: the authors' score probe), its
        induction head at the repeated triggers (the icl positions: the token after the trigger's earlier
        occurrence). Elsewhere the bigram law predicts, and nothing need attend anywhere in particular."""
        trig = 1.0 - batch["masks"]["global"]  # [b, t]: x_t is a trigger
        after = jnp.concatenate([jnp.zeros_like(trig[:, :1]), trig[:, :-1]], axis=1)
        return after, batch["masks"]["icl"]

    def __init__(self, cfg: BigramConfig):
        cfg.validate()
        self.cfg = cfg
        if cfg.stats_path:
            self.alphabet, pi_u, pi_b = meta_stats(cfg.stats_path)
        elif cfg.text_path:
            self.alphabet, pi_u, pi_b = text_stats(read_text(cfg.text_path))
        else:
            rng = np.random.default_rng(cfg.data_seed)
            V = cfg.vocab_size
            if cfg.zipf > 0:
                z = np.arange(1, V + 1, dtype=np.float64) ** -cfg.zipf
                concentration = cfg.dirichlet * V * z / z.sum()
            else:
                concentration = np.full(V, cfg.dirichlet)  # the symmetric law, drawn as before
            pi_b = rng.dirichlet(concentration, size=V)
            pi_b = np.maximum(pi_b, 0.0)
            pi_b /= pi_b.sum(axis=1, keepdims=True)
            pi_u = stationary(pi_b)
            self.alphabet = None
        V = len(pi_u)
        self.pi_u = jnp.asarray(pi_u, jnp.float32)
        self.pi_b = jnp.asarray(pi_b, jnp.float32)
        with np.errstate(divide="ignore"):
            self.log_pi_u = jnp.asarray(np.log(pi_u), jnp.float32)
        self.cdf_u, self.cdf_b = cdf_table(pi_u), cdf_table(pi_b)  # inverse-CDF sampling
        # the n most probable tokens (ties: lower id first)
        self.frequent_triggers = jnp.asarray(np.argsort(-pi_u, kind="stable")[: cfg.n_triggers], jnp.int32)
        self.seq_len = cfg.seq_len
        self.vocab_size = V
        self.n_outputs = V

    def memory_tables(self) -> dict:
        """The bigram law ff1 stores, and the fixed triggers when they are fixed (the authors' wk1 runs over
        those)."""
        out = {"bigram_law": np.asarray(self.pi_b)}
        if self.cfg.trigger_mode == "frequent":
            out["triggers"] = np.asarray(self.frequent_triggers)
        return out

    def _draws(self) -> dict[str, tuple[int, ...]]:
        V, n = self.vocab_size, self.cfg.n_triggers
        return {"triggers": (V,), "outputs": (n,), "x0": (), "steps": (self.cfg.seq_len,)}

    def _sequence(self, u):
        """One sequence from its uniform draws ``u`` (shapes ``self._draws()``)."""
        cfg = self.cfg
        V, n = self.vocab_size, cfg.n_triggers
        if cfg.trigger_mode == "frequent":
            triggers = self.frequent_triggers
        else:
            triggers = choice_from(u["triggers"], self.log_pi_u, n)
        if cfg.output_law == "uniform":
            outputs = jnp.minimum((u["outputs"] * V).astype(jnp.int32), V - 1)
        else:
            outputs = inverse_cdf_from(u["outputs"], self.cdf_u)
        trig_index = jnp.full(V, -1, jnp.int32).at[triggers].set(jnp.arange(n, dtype=jnp.int32))
        x0 = inverse_cdf_from(u["x0"], self.cdf_u)

        def step(carry, u_t):
            x, seen = carry
            ti = trig_index[x]
            is_trig = ti >= 0
            nxt = jnp.where(is_trig, outputs[jnp.maximum(ti, 0)], inverse_cdf_from(u_t, self.cdf_b[x]))
            icl = is_trig & seen[x]
            return (nxt, seen.at[x].set(True)), (x, nxt, icl, is_trig)

        _, (xs, nxts, icl, is_trig) = jax.lax.scan(step, (x0, jnp.zeros(V, bool)), u["steps"])
        icl = icl.astype(jnp.float32)
        batch = {
            "tokens": xs,
            "targets": nxts,
            "loss_mask": icl if cfg.loss_on == "triggers" else jnp.ones(cfg.seq_len, jnp.float32),
            # icl: the output after a trigger's second and later occurrences (only the context tells it);
            # outputs: after every occurrence, the first included (the authors' full-model acc_end_test);
            # global: every other position (the bigram law's)
            "masks": {"icl": icl, "outputs": is_trig.astype(jnp.float32), "global": (~is_trig).astype(jnp.float32)},
        }
        return batch, {"triggers": triggers, "outputs": outputs}

    def sample_with_info(self, key: jax.Array, batch_size: int):
        """A batch and ``info``: ``triggers`` [B, n_triggers] and their ``outputs`` [B, n_triggers]."""
        return vmap_sequences(self._sequence, key, batch_size, self._draws())

    def sample(self, key: jax.Array, batch_size: int) -> Batch:
        return self.sample_with_info(key, batch_size)[0]

    def build_evals(self) -> dict[str, Batch]:
        size = self.cfg.eval_size
        return build_eval_sets(lambda k, _: self.sample(k, size), {"test": ()}, self.cfg.eval_seed)
