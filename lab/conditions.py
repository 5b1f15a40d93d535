"""Run one experiment under several conditions (clamps, windows, seeds).

Each condition is a list of config overrides on top of a base; each (condition, seed) is an
ordinary run with its own run directory under ``root``, so ``lab compare ROOT`` (lab.comparison)
puts them side by side from the directories alone.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

from lab.batch import condition_label, train_batch
from lab.clamp import ClampConfig
from lab.config import load_config
from lab.errors import LabError
from lab.run import train_run

# Singh et al. 2024, Fig. 5b, as the authors ran it (ih_paper_runs.sh): each condition is one preset of
# configs/clamp/fig5b/ (where they keep one active layer-1 head, L1H3, it adds `single_head`, which ablates the
# others: --opto_ablate_heads $REST_HEADS), so the six conditions are one batch.
SINGH_FIG5B = {name: [f"clamp=fig5b/{name}"] for name in
               ("none", "prev_token", "layer0", "perfect_match", "perfect_copy", "layer0_copy")}


def run_conditions(base: list[str], conditions: dict[str, list[str]], seeds=(0,), root: str | Path = "runs/cmp",
                   quiet: bool = False, batched: bool = False) -> dict[str, list[Path]]:
    """Train every (condition, seed); skip those whose run directory already has a summary.

    ``batched``: the runs train as vmapped programs (lab.batch), into the same ``root/<condition>-s<seed>``
    directories, each written as if its run had trained alone: every (condition, seed) as one program when none
    has trained yet and each condition is one clamp preset named like it (``clamp=fig5b/prev_token`` for
    ``prev_token``: one compilation, one progress bar); otherwise each condition's seeds as one program."""
    root = Path(root)
    presets = {label: _preset(extra) for label, extra in conditions.items()}
    fresh = not any((root / f"{label}-s{seed}").exists() for label in conditions for seed in seeds)
    if batched and fresh and len(conditions) * len(seeds) > 1 and all(
            p is not None and condition_label(p) == label for label, p in presets.items()):
        overrides = [*base, f"conditions=[{','.join(presets.values())}]",
                     f"trainer.seeds=[{','.join(map(str, seeds))}]", f"run.dir={root}"]
        cfg, node = load_config(overrides)
        train_batch(cfg, node, overrides, quiet=quiet, beside=True)
        return {label: [root / f"{label}-s{seed}" for seed in seeds] for label in conditions}
    out: dict[str, list[Path]] = {}
    for label, extra in conditions.items():
        todo = []
        for seed in seeds:
            run_dir = root / f"{label}-s{seed}"
            if not (run_dir / "summary.json").exists():
                if run_dir.exists():
                    shutil.rmtree(run_dir)  # an unfinished run of this script: start it again
                todo.append(seed)
            out.setdefault(label, []).append(run_dir)
        if batched and len(todo) > 1:
            overrides = [*base, *extra, f"trainer.seeds=[{','.join(map(str, todo))}]", f"run.dir={root}"]
            cfg, node = load_config(overrides)
            train_batch(cfg, node, overrides, quiet=quiet, name=label)
            continue
        for seed in todo:
            overrides = [*base, *extra, f"seed={seed}", f"run.dir={root / f'{label}-s{seed}'}"]
            cfg, node = load_config(overrides)
            train_run(cfg, node, quiet=quiet, overrides=overrides)
    return out


def _preset(extra: list[str]) -> str | None:
    """The one clamp preset a condition's overrides pick (``clamp=fig5b/layer0``), or None when they do more."""
    if len(extra) == 1 and extra[0].startswith("clamp=") and "[" not in extra[0]:
        return extra[0].removeprefix("clamp=")
    return None


def _override_value(v) -> str:
    """A clamp field's value in Hydra's override grammar (strings quoted: slices such as 1:-1 hold colons)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_override_value(x) for x in v) + "]"
    if isinstance(v, str):
        return "'" + v + "'"
    return "null" if v is None else repr(v)


def probe_overrides(probes: dict[str, str], base: list[str]) -> list[str]:
    """``+measures.clamps.NAME={...}`` overrides that evaluate a run with a clamp preset's clamp switched on
    (Singh's progress measure by clamp), so a probe is defined once, by its preset in configs/clamp/.
    ``probes``: {probe name: preset}; each preset must hold one clamp (a probe is one clamp added to the
    run's own). ``base``: the run's overrides (the preset is composed against the same experiment)."""
    default = asdict(ClampConfig())
    out = []
    for name, preset in probes.items():
        cfg, _ = load_config([*base, f"clamp={preset}"])
        if len(cfg.clamps) != 1:
            raise LabError(f"probes.{name}={preset}: a probe is one clamp, and preset {preset} holds "
                           f"{len(cfg.clamps)} ({', '.join(cfg.clamps)})")
        spec = asdict(next(iter(cfg.clamps.values())))
        fields = ",".join(f"{k}:{_override_value(v)}" for k, v in spec.items() if v != default[k])
        out.append(f"+measures.clamps.{name}={{{fields}}}")
    return out
