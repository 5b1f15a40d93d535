"""The tasks, by name: the lab's own are registered here as any plug-in's are (lab/plugins.py);
``make_task(cfg)`` builds the registered task ``cfg.name`` from its config."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from omegaconf import DictConfig, OmegaConf

from lab import plugins
from lab.errors import ConfigError
from lab.tasks.base import Batch, Task, TaskConfig
from lab.tasks.bigram import BigramConfig, BigramTask
from lab.tasks.bursty import BurstyConfig, BurstyTask
from lab.tasks.fewshot import FewshotConfig, FewshotTask
from lab.tasks.markov import MarkovConfig, MarkovTask
from lab.tasks.repeat import RepeatConfig, RepeatTask
from lab.tasks.text import TextConfig, TextTask

for _cfg, _task in ((BurstyConfig, BurstyTask), (FewshotConfig, FewshotTask), (BigramConfig, BigramTask),
                    (MarkovConfig, MarkovTask), (RepeatConfig, RepeatTask), (TextConfig, TextTask)):
    plugins.register_task(_cfg.name, _cfg, _task)


def _to_plain(cfg):
    """A dataclass instance or a plain dict from a config (dataclass, mapping or OmegaConf node)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_object(cfg)
    return cfg


def make_task(cfg) -> Task:
    """The task named ``cfg.name``, built from ``cfg`` (its config dataclass, a mapping or a DictConfig)."""
    cfg = _to_plain(cfg)
    name = cfg.get("name") if isinstance(cfg, Mapping) else getattr(cfg, "name", None)
    entry = plugins.tasks.get(name)
    if entry is None:
        raise ConfigError("task.name", name, "one of " + ", ".join(plugins.tasks.names()))
    config_cls, task_cls = entry.config, entry.task
    if not isinstance(cfg, config_cls):
        values = dict(cfg) if isinstance(cfg, Mapping) else dataclasses.asdict(cfg)
        fields = {f.name for f in dataclasses.fields(config_cls)}
        for k in values:
            if k not in fields:
                raise ConfigError(
                    f"task.{k}", values[k], f"not a field of the {name} task: " + ", ".join(sorted(fields))
                )
        cfg = config_cls(**values)
    return task_cls(cfg)


__all__ = [
    "make_task",
    "Batch",
    "Task",
    "TaskConfig",
    "BurstyConfig",
    "BurstyTask",
    "FewshotConfig",
    "FewshotTask",
    "BigramConfig",
    "BigramTask",
    "MarkovConfig",
    "MarkovTask",
    "RepeatConfig",
    "RepeatTask",
    "TextConfig",
    "TextTask",
]
