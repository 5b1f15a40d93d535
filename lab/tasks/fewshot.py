"""Few-shot relabelling (Chan et al. 2022; Singh et al. 2024; docs/science.md §1.2).

Each context holds the query class and ``n_distractors`` distractor classes, each ``shots`` times,
shuffled, as (item, label) pairs, then the query item: T = 2 * shots * (1 + n_distractors) + 1.
Per sequence a label set (a combination of 1 + n_distractors labels out of n_labels) is drawn and
its labels are given to the context classes in random order; the target is the query's label.

Features are a fixed array [classes, exemplars, dim]: synthetic (prototype + noise) by default,
or a user's ``.npy`` / ``.h5`` / ``.hdf5`` file (the first dataset of an HDF5 file).

Choices where the papers are silent:
- The query class is the first of the 1 + n_distractors distinct classes drawn without
  replacement from the Zipf(alpha) law over the training classes (so it is Zipf-distributed);
  ``test_classes`` draws held-out classes uniformly.
- Held-out classes must number at least 1 + n_distractors, and there must be at least two
  exemplars per class (``test_exemplars`` uses exemplars 1..E-1).
- ``n_heldout_label_sets = 0`` is allowed; the ``relabel`` evaluator is then left out.
- Number of label sets is capped at 1,000,000.
"""

from __future__ import annotations

import itertools
import math
import os
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
    check_common,
    choice_from,
    permutation_from,
    randint_from,
    sample_evaluators,
    vmap_sequences,
    zipf_logits,
)

MAX_LABEL_SETS = 1_000_000
FEATURE_SUFFIXES = (".npy", ".h5", ".hdf5")


def _first_h5_dataset(f):
    found = []

    def visit(name, obj):
        if not found and hasattr(obj, "shape") and hasattr(obj, "dtype"):
            found.append(name)

    f.visititems(visit)
    return found[0] if found else None


def feature_file_shape(path: str) -> tuple[int, ...]:
    """Shape of the array in a features file; ConfigError on task.features_path if unreadable."""
    field = "task.features_path"
    check(os.path.isfile(path), field, path, "no such file")
    suffix = os.path.splitext(path)[1].lower()
    check(suffix in FEATURE_SUFFIXES, field, path, "must be a .npy, .h5 or .hdf5 file")
    try:
        if suffix == ".npy":
            return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)
        import h5py

        with h5py.File(path, "r") as f:
            name = _first_h5_dataset(f)
            check(name is not None, field, path, "the HDF5 file holds no dataset")
            return tuple(f[name].shape)
    except ConfigError:
        raise
    except Exception as e:  # unreadable / corrupt file
        raise ConfigError(field, path, f"cannot read the array: {e}") from e


def load_features(path: str) -> np.ndarray:
    """The features array [classes, exemplars, dim] of a .npy or .h5/.hdf5 file, as float32."""
    field = "task.features_path"
    suffix = os.path.splitext(path)[1].lower()
    try:
        if suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            import h5py

            with h5py.File(path, "r") as f:
                arr = f[_first_h5_dataset(f)][()]
        arr = np.asarray(arr, dtype=np.float32)
    except Exception as e:
        raise ConfigError(field, path, f"cannot read a numeric array: {e}") from e
    check(bool(np.all(np.isfinite(arr))), field, path, "the features must be finite numbers")
    return arr


@dataclass
class FewshotConfig(TaskConfig):
    name: str = "fewshot"
    n_classes: int = 150  # total classes (synthetic features)
    n_train_classes: int = 50  # classes 0..n_train_classes-1 are used in training
    n_exemplars: int = 5  # exemplars per class (synthetic); training uses exemplar 0 only
    feature_dim: int = 512  # synthetic feature width
    noise: float = 0.5  # synthetic exemplar = prototype + noise * N(0, I/dim)
    features_path: str | None = None  # .npy / .h5 / .hdf5 array [classes, exemplars, dim]
    n_labels: int = 5
    n_distractors: int = 1
    shots: int = 1  # appearances of each context class
    n_heldout_label_sets: int = 2
    alpha: float = 0.0  # Zipf exponent over the training classes
    data_seed: int = 0

    def validate(self) -> None:
        check_common(self)
        m = 1 + self.n_distractors
        check(self.n_distractors >= 0, "task.n_distractors", self.n_distractors, "must be >= 0")
        check(self.shots >= 1, "task.shots", self.shots, "must be a positive integer")
        check(self.n_labels >= m, "task.n_labels", self.n_labels, f"must be >= 1 + task.n_distractors = {m}")
        n_sets = math.comb(self.n_labels, m)
        check(
            n_sets <= MAX_LABEL_SETS,
            "task.n_labels",
            self.n_labels,
            f"gives C(n_labels, {m}) = {n_sets} label sets, more than {MAX_LABEL_SETS}",
        )
        check(
            0 <= self.n_heldout_label_sets < n_sets,
            "task.n_heldout_label_sets",
            self.n_heldout_label_sets,
            f"must be in [0, {n_sets}) (there are C({self.n_labels}, {m}) = {n_sets} label sets)",
        )
        check(
            self.n_train_classes >= m,
            "task.n_train_classes",
            self.n_train_classes,
            f"must be >= 1 + task.n_distractors = {m} (distinct classes per context)",
        )
        check(
            math.isfinite(self.alpha) and self.alpha >= 0, "task.alpha", self.alpha, "must be a number >= 0"
        )
        if self.features_path:
            shape = feature_file_shape(self.features_path)
            field, path = "task.features_path", self.features_path
            check(
                len(shape) == 3,
                field,
                path,
                f"must hold an array [classes, exemplars, dim], got shape {shape}",
            )
            check(
                shape[0] >= self.n_train_classes + m,
                field,
                path,
                f"has {shape[0]} classes; needs at least task.n_train_classes + 1 + task.n_distractors"
                f" = {self.n_train_classes + m}",
            )
            check(shape[1] >= 2, field, path, f"has {shape[1]} exemplars per class; needs at least 2")
            check(shape[2] >= 1, field, path, "has feature width 0")
        else:
            check(self.feature_dim >= 1, "task.feature_dim", self.feature_dim, "must be a positive integer")
            check(self.n_exemplars >= 2, "task.n_exemplars", self.n_exemplars, "must be >= 2")
            check(
                self.n_classes >= self.n_train_classes + m,
                "task.n_classes",
                self.n_classes,
                f"must be >= task.n_train_classes + 1 + task.n_distractors = {self.n_train_classes + m}",
            )
            check(
                math.isfinite(self.noise) and self.noise >= 0,
                "task.noise",
                self.noise,
                "must be a number >= 0",
            )


class FewshotTask(Task):
    """Singh's few-shot relabelling task. Evaluators: train, relabel, test_exemplars, test_classes."""

    classification = True
    key_metric = "train/acc"
    watch_metric = "train/loss"
    data_fields = ("alpha",)  # the Zipf exponent of the training classes: batched runs may hold it as data

    def __init__(self, cfg: FewshotConfig):
        cfg.validate()
        self.cfg = cfg
        rng = np.random.default_rng(cfg.data_seed)
        if cfg.features_path:
            feats = load_features(cfg.features_path)
        else:
            C, E, F = cfg.n_classes, cfg.n_exemplars, cfg.feature_dim
            protos = rng.normal(size=(C, 1, F)) / math.sqrt(F)
            feats = protos + cfg.noise * rng.normal(size=(C, E, F)) / math.sqrt(F)
        self.features = jnp.asarray(feats, jnp.float32)  # [C, E, F]
        self.n_classes, self.n_exemplars, self.feature_dim = (int(s) for s in feats.shape)
        self.m = 1 + cfg.n_distractors
        self.n_ctx = cfg.shots * self.m
        combos = np.array(list(itertools.combinations(range(cfg.n_labels), self.m)), np.int32)
        combos = combos[np.random.default_rng([cfg.data_seed, 1]).permutation(len(combos))]
        self.label_sets = jnp.asarray(combos)  # [n_sets, m], permuted once with data_seed
        n_sets = len(combos)
        # Per evaluator: (class logits [C] (-inf: not drawn), label-set table [n_sets] (allowed set
        # indices first), number of allowed sets, exemplar range [lo, hi)). Same shapes for all, so
        # the evaluators share one traced sampler.
        n_train, C, E, h = cfg.n_train_classes, self.n_classes, self.n_exemplars, cfg.n_heldout_label_sets
        train_logits = self.train_logits(cfg.alpha)
        test_logits = np.where(np.arange(C) >= n_train, 0.0, -np.inf).astype(np.float32)
        order = np.arange(n_sets, dtype=np.int32)
        heldout_first = np.concatenate([order[n_sets - h :], order[: n_sets - h]])
        self.settings = {
            "train": (train_logits, order, n_sets - h, 0, 1),
            "relabel": (train_logits, heldout_first, h, 0, 1),
            "test_exemplars": (train_logits, order, n_sets - h, 1, E),
            "test_classes": (test_logits, order, n_sets - h, 0, E),
        }
        if h == 0:
            del self.settings["relabel"]
        # settings whose class law is the training one (-inf beyond the training classes) draw over those alone
        self.drawn = {name: n_train if np.isneginf(st[0][n_train:]).all() else None
                      for name, st in self.settings.items()}
        self.evaluators = list(self.settings)
        self.draws = {
            "classes": (C,),
            "set": (),
            "labels": (self.m,),
            "slots": (self.n_ctx,),
            "exemplars": (self.n_ctx + 1,),
        }
        T = 2 * self.n_ctx + 1
        self.seq_len = T
        self.vocab_size = cfg.n_labels
        self.n_outputs = cfg.n_labels
        self.query_positions = (T - 1,)
        self.label_positions = tuple(range(1, T - 1, 2))
        self.item_positions = tuple(range(0, T, 2))
        self.feature_positions = self.item_positions

    def _sequence(self, u, setting):
        """One sequence from its uniform draws ``u`` (shapes ``self.draws``, or ``draws_for`` a setting whose
        classes are the first k)."""
        class_logits, set_table, n_allowed, ex_lo, ex_hi = setting
        cfg = self.cfg
        m, n_ctx = self.m, self.n_ctx
        k = u["classes"].shape[0]  # the classes are drawn from the first k (every one whose logit is finite)
        cls_m = choice_from(u["classes"], class_logits[:k], m)  # m distinct classes; the first is the query's
        set_idx = jnp.asarray(set_table)[randint_from(u["set"], 0, n_allowed)]
        labels_m = self.label_sets[set_idx][permutation_from(u["labels"])]  # class j gets labels_m[j]
        slots = jnp.repeat(jnp.arange(m, dtype=jnp.int32), cfg.shots)[permutation_from(u["slots"])]
        pattern = jnp.concatenate([slots, jnp.zeros(1, jnp.int32)])  # the query is class index 0
        cls = cls_m[pattern].astype(jnp.int32)
        labels = labels_m[pattern].astype(jnp.int32)
        ex = randint_from(u["exemplars"], ex_lo, ex_hi)
        items = self.features[cls, ex]  # [n_ctx+1, F]
        T = self.seq_len
        ctx_labels = labels[:n_ctx]
        batch = {
            "tokens": jnp.zeros(T, jnp.int32).at[1::2].set(ctx_labels),
            "features": jnp.zeros((T, self.feature_dim), jnp.float32).at[0::2].set(items),
            "is_feature": jnp.arange(T) % 2 == 0,
            "targets": jnp.zeros(T, jnp.int32).at[T - 1].set(labels[n_ctx]),
            "loss_mask": jnp.zeros(T, jnp.float32).at[T - 1].set(1.0),
            "masks": {},
            "context_labels": jnp.zeros(cfg.n_labels, jnp.float32).at[ctx_labels].set(1.0),
            "query_match": jnp.zeros(T, jnp.float32)
            .at[1::2]
            .set((cls[:n_ctx] == cls[n_ctx]).astype(jnp.float32)),
        }
        info = {"classes": cls, "exemplars": ex, "labels": labels, "label_set": set_idx}
        return batch, info

    def draws_for(self, drawn: int | None) -> dict:
        """The uniform draws of a sequence whose classes come from the first ``drawn`` classes (None: from all).
        The training law's classes are the first n_train_classes: drawing uniforms for those alone makes a
        training batch of the authors' 1,623-class feature file some 8x cheaper (the PRNG's work was most of a
        step's sampling). The evaluation sets draw over every class, as they always have."""
        return self.draws if drawn is None else {**self.draws, "classes": (drawn,)}

    def sample_setting(self, key: jax.Array, batch_size: int, setting, drawn: int | None = None):
        """Like ``sample_with_info`` for an explicit setting (a value of ``self.settings``); ``drawn``: as
        ``draws_for``."""
        return vmap_sequences(self._sequence, key, batch_size, self.draws_for(drawn), setting)

    def sample_with_info(self, key: jax.Array, batch_size: int, evaluator: str = "train"):
        """A batch and ``info``: ``classes``/``exemplars``/``labels`` [B, n_ctx+1] (context then
        query) and ``label_set`` [B] (row of ``self.label_sets``)."""
        if evaluator not in self.settings:
            raise ValueError(f"evaluator {evaluator!r}: one of {', '.join(self.settings)}")
        return self.sample_setting(key, batch_size, self.settings[evaluator], self.drawn[evaluator])

    def sample_settings(self, key: jax.Array, batch_size: int) -> dict:
        """``{evaluator: sample_with_info(...)}`` for every evaluator, as one vmap: one compilation."""
        keys = {name: jax.random.fold_in(key, i) for i, name in enumerate(self.settings)}
        return sample_evaluators(lambda k, s: self.sample_setting(k, batch_size, s), keys, self.settings)

    def train_logits(self, alpha: float) -> np.ndarray:
        """Class logits [C] of the training law: Zipf(alpha) over the training classes, -inf elsewhere."""
        logits = np.full(self.n_classes, -np.inf, np.float32)
        logits[: self.cfg.n_train_classes] = np.asarray(zipf_logits(self.cfg.n_train_classes, alpha))
        return logits

    def sample(self, key: jax.Array, batch_size: int, data: dict | None = None) -> Batch:
        if not data:
            return self.sample_with_info(key, batch_size)[0]
        setting = (data["train_logits"], *self.settings["train"][1:])
        return self.sample_setting(key, batch_size, setting, self.drawn["train"])[0]  # run_data: the same support

    def run_data(self, values: dict) -> dict:
        """A batched run's data: the training class law its alpha makes (what ``sample`` reads)."""
        return {"train_logits": jnp.asarray(self.train_logits(values.get("alpha", self.cfg.alpha)))}

    def build_evals(self) -> dict[str, Batch]:
        size = self.cfg.eval_size
        return build_eval_sets(
            lambda k, s: self.sample_setting(k, size, s)[0], self.settings, self.cfg.eval_seed
        )
