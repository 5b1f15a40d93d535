"""Run one experiment under several conditions (clamps, windows, seeds).

Each condition is a list of config overrides on top of a base; each (condition, seed) is an
ordinary run with its own run directory under ``root``, so ``lab compare ROOT`` (lab.comparison)
puts them side by side from the directories alone.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

from lab.batch import train_batch
from lab.clamp import ClampConfig
from lab.config import load_config
from lab.errors import LabError
from lab.run import train_run

# Singh et al. 2024, Fig. 5b, as the authors ran it (ih_paper_runs.sh): each condition's clamp presets. Where
# they keep one active layer-1 head (L1H3), `single_head` ablates the others (--opto_ablate_heads $REST_HEADS).
SINGH_FIG5B = {
    "none": ["clamp=single_head"],
    "prev_token": ["clamp=[prev_token,single_head]"],
    "layer0": ["clamp=[layer0,single_head]"],
    "perfect_match": ["clamp=[perfect_match,single_head]"],
    "perfect_copy": ["clamp=perfect_copy"],
    "layer0_copy": ["clamp=layer0_copy"],
}


def run_conditions(base: list[str], conditions: dict[str, list[str]], seeds=(0,), root: str | Path = "runs/cmp",
                   quiet: bool = False, batched: bool = False) -> dict[str, list[Path]]:
    """Train every (condition, seed); skip those whose run directory already has a summary.

    ``batched``: each condition's seeds train as one vmapped program (lab.batch), into the same
    ``root/<condition>-s<seed>`` directories, each written as if its run had trained alone."""
    root = Path(root)
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
