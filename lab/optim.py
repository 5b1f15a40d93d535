"""Optimisers from optax, as the papers used them."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import optax

from lab.errors import check

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class OptimConfig:
    name: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0  # sgd
    nesterov: bool = False  # sgd
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    # adamw: decoupled decay (lr-scaled). sgd: multiplicative decay w <- w * (1 - weight_decay) every step,
    # independent of the learning rate, as in Reddy's code. adam: ignored unless 0.
    weight_decay: float = 0.0
    # sgd only: how weight_decay acts. multiplicative (Reddy's code); l2: PyTorch's torch.optim.SGD, the decay
    # added to the gradient before momentum, g <- g + weight_decay * w (Bietti's code)
    sgd_decay: str = "multiplicative"
    schedule: str = "constant"
    warmup_steps: int = 0
    end_lr_frac: float = 0.0  # cosine / linear decay ends at lr * end_lr_frac
    clip_norm: float | None = None  # clip the global gradient norm
    # several learning rates trained side by side as one vmapped program (lab.batch), one run dir each
    lrs: list[float] | None = None

    def validate(self) -> None:
        check(self.name in OPTIMIZERS, "optim.name", self.name, f"one of {', '.join(OPTIMIZERS)}")
        check(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        check(0 <= self.momentum < 1, "optim.momentum", self.momentum, "must be in [0, 1)")
        check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        check(self.sgd_decay in ("multiplicative", "l2"), "optim.sgd_decay", self.sgd_decay,
              "one of multiplicative, l2")
        check(self.name != "adam" or self.weight_decay == 0, "optim.weight_decay", self.weight_decay,
              "must be 0 with optim.name=adam (use adamw)")
        check(self.schedule in SCHEDULES, "optim.schedule", self.schedule, f"one of {', '.join(SCHEDULES)}")
        check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "must be >= 0")
        check(self.clip_norm is None or self.clip_norm > 0, "optim.clip_norm", self.clip_norm, "must be > 0 or null")
        if self.lrs is not None:
            check(len(self.lrs) >= 1 and all(float(x) > 0 for x in self.lrs), "optim.lrs", self.lrs,
                  "a non-empty list of learning rates > 0")
            check(len(set(self.lrs)) == len(self.lrs), "optim.lrs", self.lrs, "learning rates must be distinct")


def learning_rate(cfg: OptimConfig, total_steps: int, peak=None):
    """The schedule of cfg; ``peak`` replaces cfg.lr (a traced per-run value when runs are batched)."""
    top = cfg.lr if peak is None else peak
    decay = max(total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "constant":
        main = optax.constant_schedule(top)
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(top, decay, alpha=cfg.end_lr_frac)
    else:
        main = optax.linear_schedule(top, top * cfg.end_lr_frac, decay)
    if cfg.warmup_steps:
        warm = optax.linear_schedule(0.0, top, cfg.warmup_steps)
        return optax.join_schedules([warm, main], [cfg.warmup_steps])
    return main


def make_optimizer(cfg: OptimConfig, total_steps: int, frozen_mask=None, lr=None) -> optax.GradientTransformation:
    """The optimiser of cfg. ``lr``: a learning rate that replaces cfg.lr, possibly traced: batched runs
    build their optimiser inside the step with their own rate, so rates are data, not programs."""
    lr = learning_rate(cfg, total_steps, lr)
    if cfg.name == "sgd":
        base = optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov)
        if cfg.weight_decay and cfg.sgd_decay == "l2":
            # before the momentum trace: g + wd * w, as torch.optim.SGD
            base = optax.chain(optax.add_decayed_weights(cfg.weight_decay), base)
        elif cfg.weight_decay:
            # after the -lr scaling: adding -wd * w to the update gives w <- w (1 - wd)
            base = optax.chain(base, optax.add_decayed_weights(-cfg.weight_decay))
    elif cfg.name == "adam":
        base = optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    else:
        base = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.clip_norm:
        base = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), base)
    if frozen_mask is not None:
        labels = jax.tree_util.tree_map(lambda f: "frozen" if f else "train", frozen_mask)
        base = optax.multi_transform({"train": base, "frozen": optax.set_to_zero()}, labels)
    return base
