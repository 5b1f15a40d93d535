"""induction-lab: watch induction heads form.

The Python API (lab/api.py): ``lab.train(*overrides)``, ``lab.load(run_dir)`` (a ``lab.Run``: config,
metrics, steps, params, cache, phase, fork, replay) and ``lab.compare(paths, ...)``; a researcher's own
task, measure, clamp value and evaluator: ``lab.register_task(...)`` and the like (lab/plugins.py). They load
on first use,
so ``import lab`` (and the ``lab`` command) stays light.

Importing the lab turns on JAX's persistent compilation cache (``$LAB_COMPILATION_CACHE``, default
``~/.cache/induction-lab/jax``; ``LAB_COMPILATION_CACHE=0`` turns it off), so a program compiled once
-- the demo's step, a sweep's shared shapes -- loads in milliseconds the next time, in any process.
"""

import os


def _compilation_cache() -> None:
    where = os.environ.get("LAB_COMPILATION_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                                 "induction-lab", "jax"))
    if where in ("0", ""):
        return
    try:
        import jax

        jax.config.update("jax_compilation_cache_dir", where)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    except Exception:  # an old or unusual jax: run without the cache
        pass


_compilation_cache()


_API = ("Run", "compare", "load", "train")
# your own task, measure, clamp value and evaluator (lab/plugins.py)
_PLUGINS = ("register_task", "register_measure", "register_clamp_value", "register_evaluator", "register_configs")
__all__ = list(_API + _PLUGINS)


def __getattr__(name: str):
    if name in _API:
        from lab import api

        return getattr(api, name)
    if name in _PLUGINS:
        from lab import plugins

        return getattr(plugins, name)
    raise AttributeError(f"module 'lab' has no attribute {name!r}")
