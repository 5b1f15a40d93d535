"""Run one experiment under several conditions (clamps, windows, seeds).

Each condition is a list of config overrides on top of a base; each (condition, seed) is an
ordinary run with its own run directory under ``root``, so ``lab compare ROOT`` (lab.compare)
puts them side by side from the directories alone.
"""

from __future__ import annotations

from pathlib import Path

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
    import shutil

    from lab.batch import train_batch
    from lab.config import load_config
    from lab.run import train_run

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
