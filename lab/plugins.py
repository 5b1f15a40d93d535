"""Plug-ins: tasks, progress measures, clamp values and evaluators from the user's own code.

The lab's own tasks, measures and clamp values are registered here exactly as a user's are, so a plug-in
is a first-class citizen: ``task=mytask`` on the command line, ``measures.names=[mine]``, ``value: mine`` in
any clamp spec, ``evaluators=[mine]``. Two ways in, both from code the user chose to run (a config never
names code: ``_target_`` stays refused, lab/config.py):

- from Python, before training: ``lab.register_task(...)``, ``lab.register_measure(...)``,
  ``lab.register_clamp_value(...)``, ``lab.register_evaluator(...)``, ``lab.register_configs(folder)``;
- from an installed package: an entry point in the group ``induction_lab`` naming a function of no
  arguments that makes those calls (``[project.entry-points.induction_lab] mine = "mypkg:register"``).
  The lab loads every such entry point the first time it looks a name up, so ``lab train task=mytask``
  works in any process once the package is installed (examples/noisy_copy is one).

A plug-in's package may bring its own Hydra config groups (``task/``, ``experiment/``, ``clamp/``, ...):
``register_configs(folder)`` (or ``register_task(..., configs=folder)``) puts the folder on the search path
after the lab's ``configs/``. A task registered without a ``task/NAME.yaml`` of its own gets its config
dataclass as the group option, so ``task=NAME task.field=3`` works with no YAML at all.

Every registration is checked when it is made, and a bad one is refused in one line naming the plug-in and
what it lacks. Runs record which package provided each plug-in they use (``overrides.json``), so a replay,
fork or resume in an environment without it says which package to install.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import entry_points, packages_distributions
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore

from lab.errors import LabError

ENTRY_POINT_GROUP = "induction_lab"
BUILTIN = "lab"  # the package of the lab's own entries (their top-level module)


class PluginError(LabError):
    """A plug-in that cannot be registered or loaded (exit code 2, one line naming it)."""


# ---- the entries -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskPlugin:
    """A task: its config dataclass (a ``lab.tasks.TaskConfig`` whose ``name`` defaults to the task's name)
    and its class (a ``lab.tasks.Task`` built from that config: ``sample``, ``build_evals``, metrics...)."""

    name: str
    config: type
    task: type
    package: str


@dataclass(frozen=True)
class MeasurePlugin:
    """A progress measure: ``fn(params, model, task)`` -> a number, a [n_layers, n_heads] array
    (``per_head``: logged as ``NAME/L{l}H{h}``) or a dict of numbers (``NAME/KEY``); jitted unless ``jit``
    is False (host code reading numpy arrays). ``auto``: part of ``measures.names=[auto]`` for every task."""

    name: str
    fn: Callable
    per_head: bool
    jit: bool
    auto: bool
    package: str


@dataclass(frozen=True)
class ClampValuePlugin:
    """A clamp value: ``fn(x, inputs)`` -> the value the clamp writes, shaped like the site's activation ``x``
    ([batch, ...]); ``inputs`` is a ``lab.clamp.ClampInputs`` (the batch, the parameters, the clamp's spec
    with its ``args``, the task and the model). ``sites``: the site kinds it may act on (e.g.
    ``("hook_pattern",)``), None for any. Windows, strength, head and position masks and gradient modes
    apply to it as to the lab's own values."""

    name: str
    fn: Callable
    sites: tuple[str, ...] | None
    package: str


@dataclass(frozen=True)
class EvaluatorPlugin:
    """An evaluator over a task: ``build(task)`` -> a fixed evaluation batch (a pure function of the task's
    config: the same sequences every time), scored by ``metrics(logits, batch)`` (default: the task's
    own metrics) and logged as ``NAME/<metric>`` at every evaluation (``evaluators=[NAME]``)."""

    name: str
    build: Callable
    metrics: Callable | None
    package: str


class Registry:
    """The entries of one kind by name. Looking a name up loads the lab's own entries and the installed
    packages' entry points first (once per process)."""

    def __init__(self, kind: str, field: str):
        self.kind, self.field = kind, field  # field: how a config names one (in error lines)
        self._entries: dict[str, Any] = {}
        self._reserved: set[str] = set()  # names of the lab's own that are not entries (built into their module)

    def reserve(self, names) -> None:
        """Names the lab uses for its own (built-in measures, clamp values with machinery of their own, auto)."""
        self._reserved |= set(names)

    def add(self, entry) -> None:
        # the lab's own names first, so that a plug-in cannot shadow one; not the entry points: a plug-in's
        # module may be registering in the middle of its own import (e.g. unpickled in a launcher's worker)
        _import_builtins()
        self._refuse_reserved(entry)
        old = self._entries.get(entry.name)
        if old is not None and old.package != entry.package and not _same(old, entry):
            raise PluginError(f"{self.kind} {entry.name!r} (package {entry.package}): the name is taken by package "
                              f"{old.package}; choose another name")
        # the same package again (a module re-run in a notebook), or the very same objects: replaced
        self._entries[entry.name] = entry if old is None or old.package == entry.package else old

    def _refuse_reserved(self, entry) -> None:
        if entry.name in self._reserved:
            raise PluginError(f"{self.kind} {entry.name!r} (package {entry.package}): the name is the lab's own; "
                              "choose another name")

    def __contains__(self, name) -> bool:
        load()
        return name in self._entries

    def __getitem__(self, name: str):
        load()
        if name not in self._entries:
            raise LabError(f"{self.field}={name!r}: unknown {self.kind}; one of {', '.join(self._entries)}")
        return self._entries[name]

    def get(self, name: str, default=None):
        load()
        return self._entries.get(name, default)

    def names(self) -> list[str]:
        load()
        return list(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self):
        load()
        return list(self._entries.items())

    def values(self):
        load()
        return list(self._entries.values())

    def __len__(self) -> int:
        load()
        return len(self._entries)


tasks = Registry("task", "task.name")
measures = Registry("measure", "measures.names")
clamp_values = Registry("clamp value", "value")
evaluators = Registry("evaluator", "evaluators")
config_dirs: list[Path] = []  # plug-ins' config folders, searched after the lab's configs/

_loaded = False  # every entry point has loaded (a failure leaves it False: the next lookup says it again)
_busy = False  # loading now (registrations made meanwhile need not wait for it)
_loading: list[str] = []  # the distribution whose entry point is registering, while it runs
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # what a config override can spell


def _same(a, b) -> bool:
    """The same plug-in registered twice (through its entry point and by importing it): same objects."""
    return dataclasses.replace(a, package="") == dataclasses.replace(b, package="")


# ---- registration ------------------------------------------------------------------------------------
def _package(obj) -> str:
    """Who registers ``obj``: the distribution of the entry point being loaded, else the top-level module
    that defines it (``lab`` for the lab's own)."""
    if _loading:
        return _loading[-1]
    top = (getattr(obj, "__module__", None) or "__main__").split(".")[0]
    if top == BUILTIN:
        return BUILTIN
    return _distributions().get(top, [top])[0]  # an installed package by its distribution's name


def _import_builtins() -> None:
    """The lab's modules register their entries (and reserve their names) on import; they import this module,
    so this one imports them here rather than at its top. (A module in the middle of its import is returned
    as it is: no recursion.)"""
    for module in ("lab.tasks", "lab.clamp", "lab.measures"):
        import_module(module)


@functools.cache
def _distributions() -> dict[str, list[str]]:
    return packages_distributions()


def _check_name(kind: str, name) -> None:
    if not (isinstance(name, str) and NAME.fullmatch(name)):
        raise PluginError(f"{kind} {name!r}: a name must be a Python identifier in ASCII (letters, digits, _)")


def _check_callable(kind: str, name: str, fn, what: str, n_args: int) -> None:
    if not callable(fn):
        raise PluginError(f"{kind} {name!r}: {what} must be a function, got {type(fn).__name__}")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin without a signature: trust it
    try:
        sig.bind(*range(n_args))
    except TypeError:
        raise PluginError(f"{kind} {name!r}: {what} must take {n_args} positional arguments; "
                          f"it is {getattr(fn, '__name__', 'it')}{sig}") from None


def register_task(name: str, config: type, task: type, *, configs: str | Path | None = None) -> None:
    """Register a task: ``config``, a dataclass subclassing ``lab.tasks.TaskConfig`` with ``name`` defaulting
    to ``name``; ``task``, a ``lab.tasks.Task`` subclass built as ``task(config_instance)`` that implements
    ``sample(key, batch_size)`` and ``build_evals()``. ``configs``: a folder of the package's own config
    groups (``task/NAME.yaml``, ``experiment/*.yaml``...), put on the search path."""
    # lab.tasks registers the lab's tasks through this function, so it is imported here, not above
    from lab.tasks.base import Task, TaskConfig

    _check_name("task", name)
    if not (isinstance(config, type) and dataclasses.is_dataclass(config) and issubclass(config, TaskConfig)):
        raise PluginError(f"task {name!r}: its config must be a dataclass subclassing lab.tasks.TaskConfig, "
                          f"got {config!r}")
    default = {f.name: f.default for f in dataclasses.fields(config)}.get("name")
    if default != name:
        raise PluginError(f"task {name!r}: its config {config.__name__}.name must default to {name!r} "
                          f"(it is {default!r})")
    if not (isinstance(task, type) and issubclass(task, Task)):
        raise PluginError(f"task {name!r}: its class must subclass lab.tasks.Task, got {task!r}")
    missing = [m for m in ("sample", "build_evals") if getattr(task, m) is getattr(Task, m)]
    if missing:
        raise PluginError(f"task {name!r}: {task.__name__} does not implement {', '.join(missing)}")
    for attr in ("key_metric", "watch_metric"):
        value = getattr(task, attr)
        if not (isinstance(value, str) and "/" in value):
            raise PluginError(f"task {name!r}: {task.__name__}.{attr} must name a metric as "
                              f"'<evaluator>/<metric>', got {value!r}")
    bad = [f for f in task.data_fields if f not in {x.name for x in dataclasses.fields(config)}]
    if bad:
        raise PluginError(f"task {name!r}: data_fields {bad} are not fields of {config.__name__}")
    package = _package(task)
    tasks.add(TaskPlugin(name, config, task, package))
    if configs is not None:
        register_configs(configs)
    cs = ConfigStore.instance()
    cs.store(group="task", name=f"{name}_schema", node=config)  # what task/NAME.yaml's defaults name
    if not any((d / "task" / f"{name}.yaml").is_file() for d in (config_dir(), *config_dirs)):
        cs.store(group="task", name=name, node=config)  # `task=NAME` with no YAML of its own


def register_measure(name: str, fn: Callable, *, per_head: bool = False, jit: bool = True,
                     auto: bool = False) -> None:
    """Register a progress measure ``fn(params, model, task)`` (see ``MeasurePlugin``), logged live at every
    evaluation, in ``lab replay`` and in wandb when ``measures.names`` names it (or ``auto`` and names is
    ``[auto]``)."""
    _check_name("measure", name)
    _check_callable("measure", name, fn, "fn", 3)
    measures.add(MeasurePlugin(name, fn, bool(per_head), bool(jit), bool(auto), _package(fn)))


def register_clamp_value(name: str, fn: Callable, *, sites: tuple[str, ...] | list[str] | None = None) -> None:
    """Register a clamp value ``fn(x, inputs)`` (see ``ClampValuePlugin``), usable as ``value: NAME`` in any
    clamp spec; its own settings go in the spec's ``args`` mapping."""
    _check_name("clamp value", name)
    _check_callable("clamp value", name, fn, "fn", 2)
    if sites is not None:
        sites = tuple(sites)
        if not sites or not all(isinstance(s, str) and s.startswith("hook_") for s in sites):
            raise PluginError(f"clamp value {name!r}: sites must be site kinds such as 'hook_pattern' or "
                              f"'hook_z', got {list(sites)}")
    clamp_values.add(ClampValuePlugin(name, fn, sites, _package(fn)))


def register_evaluator(name: str, build: Callable, *, metrics: Callable | None = None) -> None:
    """Register an evaluator ``build(task)`` -> a fixed batch, scored by ``metrics(logits, batch)`` (default
    the task's metrics), logged as ``NAME/<metric>`` when ``evaluators`` names it."""
    _check_name("evaluator", name)
    _check_callable("evaluator", name, build, "build", 1)
    if metrics is not None:
        _check_callable("evaluator", name, metrics, "metrics", 2)
    evaluators.add(EvaluatorPlugin(name, build, metrics, _package(build)))


def register_configs(folder: str | Path) -> None:
    """Put a folder of config groups (``task/``, ``experiment/``, ``clamp/``, ``model/``...) on the search
    path, after the lab's own ``configs/``."""
    path = Path(folder).absolute()
    if not path.is_dir():
        raise PluginError(f"configs={folder}: not a folder (a plug-in's config groups live in one)")
    if path not in config_dirs:
        config_dirs.append(path)


def config_dir() -> Path:
    """The lab's own ``configs/`` (or $LAB_CONFIG_DIR)."""
    env = os.environ.get("LAB_CONFIG_DIR")
    if env:
        return Path(env).absolute()
    return Path(__file__).resolve().parent.parent / "configs"


def all_config_dirs() -> list[Path]:
    """Where config groups are found: the lab's ``configs/``, then each plug-in's folder."""
    load()
    return [config_dir(), *config_dirs]


# ---- loading ------------------------------------------------------------------------------------------
def load() -> None:
    """Register the lab's own entries and every installed package's entry points (once per process)."""
    global _loaded, _busy
    if _loaded or _busy:
        return
    _busy = True
    try:
        _import_builtins()
        for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else ep.value.split(":")[0].split(".")[0]
            _loading.append(dist)
            try:
                ep.load()()
            except PluginError:
                raise
            except Exception as e:
                raise PluginError(f"plug-in {ep.name} ({ep.value}, package {dist}) failed to load: "
                                  f"{type(e).__name__}: {e}") from e
            finally:
                _loading.pop()
        for registry in (tasks, measures, clamp_values, evaluators):  # a name registered before its module
            for entry in registry._entries.values():  # reserved it (an import cycle's order) is caught here
                registry._refuse_reserved(entry)
        _loaded = True
    finally:
        _busy = False


# ---- what a run uses --------------------------------------------------------------------------------
def used_by(cfg) -> dict[str, dict[str, str]]:
    """The plug-ins from outside the lab that a run's config uses, by kind and name -> package (recorded in
    the run's overrides.json so that an environment without them can say what to install)."""
    out: dict[str, dict[str, str]] = {}

    def note(kind: str, registry: Registry, name: str) -> None:
        e = registry.get(name)
        if e is not None and e.package != BUILTIN:
            out.setdefault(kind, {})[name] = e.package

    note("task", tasks, cfg.task.name)
    for spec in [*cfg.clamps.values(), *cfg.measures.clamps.values()]:
        note("clamp_value", clamp_values, spec.value)
    names = list(cfg.measures.names)
    if "auto" in names:  # what auto adds: the task's own measures and those registered auto=True
        task = tasks.get(cfg.task.name)
        names += [*(task.task.auto_measures if task is not None else ()), *(m.name for m in measures.values()
                                                                             if m.auto)]
    for n in names:
        note("measure", measures, n)
    for n in cfg.evaluators:
        note("evaluator", evaluators, n)
    return out


def missing(recorded: dict[str, dict[str, str]]) -> str | None:
    """One line naming the packages a run's recorded plug-ins come from that this environment lacks."""
    regs = {"task": tasks, "clamp_value": clamp_values, "measure": measures, "evaluator": evaluators}
    lacking = {}
    for kind, names in (recorded or {}).items():
        for name, package in names.items():
            if kind in regs and name not in regs[kind]:
                lacking.setdefault(package, []).append(f"{kind.replace('_', ' ')} {name}")
    if not lacking:
        return None
    parts = [f"package {p} ({', '.join(w)})" for p, w in lacking.items()]
    return ("this run uses plug-ins this environment lacks: " + "; ".join(parts) +
            ": install the package (its entry points register them) or import it and register them first")
