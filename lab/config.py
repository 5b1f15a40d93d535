"""Typed configs: dataclass schemas in Hydra's ConfigStore, composed from ``configs/``.

``load_config(overrides)`` composes ``configs/config.yaml`` with command-line overrides
(``experiment=reddy_bursty seed=3 trainer.steps=20000``), checks every field against its schema
and every value against what is allowed, and returns the typed ``Config``. Anything wrong
raises ``LabError`` with one line naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import MISSING, DictConfig, OmegaConf

from lab import plugins
from lab.cadence import CadenceConfig
from lab.checkpoint import CheckpointConfig
from lab.clamp import ClampConfig
from lab.errors import LabError, check
from lab.loop import TrainerConfig
from lab.measures import MeasuresConfig
from lab.model import ModelConfig
from lab.optim import OptimConfig
from lab.tasks import make_task  # noqa: F401  (registers the lab's tasks)
from lab.tracking import TrackingConfig, WandbConfig


@dataclass
class RunConfig:
    dir: str | None = None  # the run directory; default runs/<experiment>/<name>
    root: str = "runs"
    name: str | None = None  # default: <task>-s<seed>-<date>-<time>


@dataclass
class Config:
    experiment: str = "default"
    seed: int = 0
    task: Any = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    measures: MeasuresConfig = field(default_factory=MeasuresConfig)
    cadence: CadenceConfig = field(default_factory=CadenceConfig)
    # by name; `clamp=PRESET` fills it, `+clamps.NAME={site: ..., value: ...}` adds one. Checked
    # against ClampConfig in to_config (a typed dict would refuse a whole clamp given on the command line).
    clamps: dict[str, Any] = field(default_factory=dict)
    # clamp presets (configs/clamp/NAME) trained side by side with every seed, as one vmapped program
    conditions: list[str] = field(default_factory=list)
    # task fields batched runs take as data, each with its values: `+task_values.p_C=[0,0.4,0.8]`
    # (only the task's `data_fields`, e.g. bursty's p_B, p_C, alpha, eps: numbers in the sampler, not shapes)
    task_values: dict[str, Any] = field(default_factory=dict)
    watch: str | None = None  # metric whose transitions are detected (default: the task's)
    watch_threshold: float | None = None  # also report the first step the watched metric is below this
    # the phase detector's running median over this many evaluations (odd): a noisy watched metric (the text task's ICL
    # score, a difference of two single-position losses) needs more than 3 so that its noise is not read as change
    watch_smooth: int = 3
    # registered evaluators (lab.plugins.register_evaluator) run beside the task's own, as NAME/<metric>
    evaluators: list[str] = field(default_factory=list)

    def validate(self) -> None:
        check(self.seed >= 0, "seed", self.seed, "must be >= 0")
        check(self.watch_smooth >= 1 and self.watch_smooth % 2 == 1, "watch_smooth", self.watch_smooth,
              "an odd number of evaluations >= 1")
        entry = plugins.tasks.get(getattr(self.task, "name", None))
        fields = entry.task.data_fields if entry is not None else ()
        for name in self.evaluators:
            check(name in plugins.evaluators, "evaluators", list(self.evaluators),
                  f"registered evaluators: {', '.join(plugins.evaluators.names()) or 'none'}")
        check(len(set(self.evaluators)) == len(self.evaluators), "evaluators", list(self.evaluators),
              "each evaluator once")
        for name, values in self.task_values.items():
            check(name in fields, f"task_values.{name}", values,
                  f"a data field of task {self.task.name}: {', '.join(fields) or 'it has none'}")
            ok = isinstance(values, (list, tuple)) and len(values) >= 1 and len(set(values)) == len(values)
            check(ok and all(isinstance(v, (int, float)) for v in values), f"task_values.{name}", values,
                  "a non-empty list of distinct numbers")
        for part in (self.task, self.model, self.optim, self.trainer, self.checkpoint, self.tracking, self.measures,
                     self.cadence):
            part.validate()
        late = [s for s in self.tracking.attention_at if s > self.trainer.steps]
        check(not late, "tracking.attention_at", list(self.tracking.attention_at),
              f"steps <= trainer.steps={self.trainer.steps} (not {late})")


def _register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="lab_schema", node=Config)
    # a clamp preset's clamps are typed like this (their defaults list pulls it in), so any field of a chosen
    # preset takes a plain override: clamp=layer0 clamps.layer0.gradient=stop
    cs.store(name="clamp_spec", node=ClampConfig)
    # each task's schema (task/NAME_schema) is stored when the task is registered (lab.plugins.register_task)


_register()


config_dir = plugins.config_dir  # the lab's configs/ (plug-ins' folders follow it on the search path)


def one_line(e: Exception) -> str:
    """Hydra/OmegaConf errors span several lines; keep the message and the key it names."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    key = getattr(e, "full_key", None)
    cause = e.__cause__ or e.__context__
    if cause is not None and key is None:
        key = getattr(cause, "full_key", None)
        if cause is not None and str(cause).strip():
            inner = str(cause).strip().splitlines()[0]
            if inner not in msg:
                msg = f"{msg}: {inner}"
    if key and key not in msg:
        msg = f"{key}: {msg}"
    return msg


def _check_overrides(overrides) -> None:
    """Name the choices when a config group override picks an option that does not exist, and the
    fields when an override names a field that does not exist."""
    groups: dict[str, set[str]] = {}
    for d in plugins.all_config_dirs():
        for p in d.iterdir():
            if p.is_dir():
                # options in sub-folders too (clamp=fig5b/prev_token: Singh's Fig. 5b conditions)
                groups.setdefault(p.name, set()).update(f.relative_to(p).with_suffix("").as_posix()
                                                        for f in p.rglob("*.yaml"))
    groups.setdefault("task", set()).update(plugins.tasks.names())  # a task with no YAML: its dataclass
    groups = {k: sorted(v) for k, v in groups.items()}
    for ov in overrides:
        key, sep, value = ov.lstrip("+~").partition("=")
        if not sep or key not in groups:
            continue
        for v in value.strip("[]").split(",") if value.startswith("[") else [value]:
            if v.strip() not in groups[key] and v.strip() not in ("null", ""):
                raise LabError(f"{key}={value}: unknown {key} {v.strip()!r}; one of {', '.join(groups[key])}")


# Hydra's and OmegaConf's wording for the two commonest mistakes (hydra-core 1.3, omegaconf 2.3). The lab reads
# them here and nowhere else; tests/test_cli.py::test_hydra_wording_is_what_hydra_message_reads fails if it changes.
_UNKNOWN_KEY = re.compile(r"Could not override '([\w.]+)'.*Key '(\w+)' not in '(\w+)'")
_WRONG_TYPE = re.compile(r"Error merging override (\S+?)=(.*?): Value '.*' (?:of type '\w+' could not be converted "
                         r"to (\w+)|is not a valid (bool))")


def hydra_message(msg: str) -> str:
    """A Hydra/OmegaConf composition error (one line) in the lab's words: the field, the value or the known
    fields, what is allowed. Anything else comes back unchanged."""
    m = _UNKNOWN_KEY.search(msg)
    if m:
        full, _, cls_name = m.groups()
        schemas = (Config, RunConfig, ClampConfig, MeasuresConfig, CadenceConfig, ModelConfig, OptimConfig,
                   TrainerConfig, CheckpointConfig, TrackingConfig, WandbConfig)
        classes = {c.__name__: c for c in schemas}
        classes.update({e.config.__name__: e.config for e in plugins.tasks.values()})
        cls = classes.get(cls_name)
        allowed = f"; fields: {', '.join(f.name for f in fields(cls))}" if cls else ""
        return f"{full}: unknown field{allowed}"
    m = _WRONG_TYPE.search(msg)
    if m:
        key, value, kind = m.group(1).lstrip("+~"), m.group(2), (m.group(3) or m.group(4)).lower()
        allowed = {"integer": "an integer", "float": "a number", "bool": "true or false", "boolean": "true or false"}
        return f"{key}={value}: must be {allowed.get(kind, kind)}"
    return msg


def _chosen(overrides, group: str) -> bool:
    return any(o.lstrip("+~").partition("=")[0] == group for o in overrides)


def with_experiment(overrides, default: str = "none") -> list[str]:
    """The overrides with an experiment chosen: a task chosen without one trains with the lab's default model,
    optimiser and trainer (``experiment=none``), not the demo's settings, which are made for the demo's task.
    (Runs recorded before this rule composed such overrides with the demo: ``default="demo"`` re-composes
    them as they were.)"""
    out = list(overrides)
    if _chosen(out, "task") and not _chosen(out, "experiment"):
        out = [f"experiment={default}", *out]
    return out


def _quoted(text: str) -> str:
    """A string as Hydra's override grammar reads it back verbatim (commas, brackets, quotes, any letter)."""
    return "'" + text.replace("'", "\\'") + "'"  # a backslash is literal unless it precedes a quote


def search_path_overrides(overrides) -> list[str]:
    """The overrides as Hydra composes them: an experiment chosen (``with_experiment``), and plug-ins' config
    folders on the search path, after any the user put there with ``hydra.searchpath=[...]``."""
    out = with_experiment(overrides)
    extra = [f"file://{d}" for d in plugins.all_config_dirs()[1:]]
    if extra:
        given = [o for o in out if o.partition("=")[0] == "hydra.searchpath"]
        mine = []
        if given:
            try:
                mine = list(OverridesParser.create().parse_override(given[-1]).value())
            except Exception as e:  # hydra's grammar errors span lines
                raise LabError(f"{given[-1]}: {one_line(e)}") from None
        out = [o for o in out if o not in given]
        out.append("hydra.searchpath=[" + ",".join(_quoted(str(p)) for p in [*mine, *extra]) + "]")
    return out


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The composed config as an OmegaConf node (schemas checked, values not yet)."""
    _check_overrides(overrides)
    GlobalHydra.instance().clear()
    try:
        with hydra.initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name="lab"):
            cfg = hydra.compose(config_name="config", overrides=search_path_overrides(overrides))
    except Exception as e:  # hydra and omegaconf raise several types; all are bad input here
        raise LabError(hydra_message(one_line(e))) from e
    finally:
        GlobalHydra.instance().clear()
    return cfg


def _refuse_targets(node, path: str = "") -> None:
    """The lab instantiates nothing named in a config: a `_target_` anywhere is refused, so a config
    (or a run directory's config.yaml) can never make the lab import or call arbitrary code."""
    if isinstance(node, DictConfig):
        for k in node.keys():
            name = f"{path}.{k}" if path else str(k)
            if str(k) == "_target_":
                raise LabError(f"{name}: the lab instantiates nothing from configs; remove it")
            _refuse_targets(node._get_node(k), name)


def _refuse_unknown(node, path: str = "") -> None:
    """A field that its schema lacks. Hydra lets `+trainer.stepz=10` add one, and converting to the dataclass
    would then drop it silently; dict-typed fields (clamps, task_values, measures.clamps) take any name."""
    cls = OmegaConf.get_type(node)
    if not (isinstance(node, DictConfig) and dataclasses.is_dataclass(cls)):
        return
    names = [f.name for f in dataclasses.fields(cls)]
    for k in node.keys():
        name = f"{path}.{k}" if path else str(k)
        if str(k) not in names:
            raise LabError(f"{name}: unknown field; fields: {', '.join(names)}")
        _refuse_unknown(node._get_node(k), name)


def to_config(node: DictConfig, validate: bool = True) -> Config:
    """The typed config of a composed node; ``validate``: also check every value (else the schema only)."""
    _refuse_targets(node)
    _refuse_unknown(node)
    try:
        cfg = OmegaConf.to_object(node)
    except Exception as e:
        raise LabError(one_line(e)) from e
    if not isinstance(cfg, Config):
        raise LabError("config: not a lab config (missing the lab_schema default)")
    cfg.clamps = {str(name): _clamp_config(str(name), spec) for name, spec in (cfg.clamps or {}).items()}
    cfg.measures.clamps = {str(n): _clamp_config(str(n), s) for n, s in (cfg.measures.clamps or {}).items()}
    for n, c in cfg.measures.clamps.items():
        if c.value == "frozen":
            raise LabError(f"measures.clamps.{n}.value=frozen: a probe clamp has no window of its own to freeze at; "
                           "use value=reference with a checkpoint of this run")
    if validate:
        cfg.validate()
    return cfg


def _clamp_config(name: str, spec) -> ClampConfig:
    """A clamp given as a mapping, checked field by field against ClampConfig."""
    if isinstance(spec, ClampConfig):
        return spec
    if not isinstance(spec, dict):
        raise LabError(f"clamps.{name}={spec!r}: a mapping of clamp fields, e.g. {{site: ..., value: ...}}")
    fields = [f.name for f in dataclasses.fields(ClampConfig)]
    for k in spec:
        if k not in fields:
            raise LabError(f"clamps.{name}.{k}: unknown field; fields: {', '.join(fields)}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ClampConfig), spec))
    except Exception as e:
        raise LabError(f"clamps.{name}.{one_line(e)}") from e


def load_config(overrides: list[str] | tuple[str, ...] = ()) -> tuple[Config, DictConfig]:
    """The typed, validated config and its OmegaConf node (for writing config.yaml)."""
    node = compose(overrides)
    return to_config(node), node


# fields older run directories may hold that the lab no longer has (what replaced them): dropped on reading a
# run's config.yaml, so runs saved before a change still resume, replay and load
RETIRED = {("measures", "llc_n"): "measures.llc_nbeta (nβ itself; default devinterp's b / ln b)"}


def from_yaml(path: str | Path) -> tuple[Config, DictConfig]:
    """A run's saved config.yaml, checked against the schemas again (retired fields dropped: RETIRED)."""
    try:
        raw = OmegaConf.load(path)
        for section, key in RETIRED:
            if section in raw and key in raw[section]:
                raw[section].pop(key)
        schema = OmegaConf.structured(Config)
        name = raw.get("task", {}).get("name")
        schema.task = OmegaConf.structured(plugins.tasks[name].config)
        node = OmegaConf.merge(schema, raw)
    except LabError:
        raise
    except Exception as e:
        raise LabError(f"{path}: {one_line(e)}") from e
    return to_config(node), node
