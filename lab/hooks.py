"""Named activation sites: read them (a cache) and overwrite them (interventions).

The model calls ``hooks(name, x)`` at every site. What happens there is decided when the
forward pass is traced, so a forward pass with no hooks costs exactly what one without sites
would, and asking for a cache never changes the outputs. Names follow TransformerLens:
``hook_embed``, ``blocks.1.attn.hook_pattern``, ``ln_final.hook_normalized``, ``logits``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable

import jax

Intervention = Callable[[jax.Array], jax.Array]


def expand(patterns: Iterable[str], names: Iterable[str]) -> list[str]:
    """Site names matched by glob patterns (``blocks.*.attn.hook_pattern``), in model order."""
    names = list(names)
    pats = list(patterns)
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)]


class Hooks:
    """What to do at the sites of one forward pass.

    capture: site names whose values go into ``self.cache``.
    interventions: site name -> function applied to the activation (a clamp, an ablation).
    head_uniform: sites with a head axis whose interventions treat every head alike (a clamp on all heads
    with a value that does not depend on the head): the model may hand them one copy of the activation with a
    head axis of 1, which they broadcast. The split inputs (``blocks.L.hook_q_input`` [batch, pos, head,
    d_model]) use it: a clamp on every head's copy then costs one copy, not n_heads.
    The cache holds the value after the intervention, as the rest of the model sees it.
    """

    def __init__(self, capture: Iterable[str] = (), interventions: dict[str, Intervention] | None = None,
                 head_uniform: Iterable[str] = ()):
        self.capture = frozenset(capture)
        self.interventions = dict(interventions or {})
        self.head_uniform = frozenset(head_uniform)
        self.cache: dict[str, jax.Array] = {}

    def wants(self, name: str) -> bool:
        return name in self.capture or name in self.interventions

    def overwrites(self, name: str) -> bool:
        return name in self.interventions

    def narrow(self, name: str) -> bool:
        """Whether the site may be handed one head's copy: only overwritten, alike on every head."""
        return name in self.head_uniform and name not in self.capture

    def __call__(self, name: str, x: jax.Array) -> jax.Array:
        fn = self.interventions.get(name)
        if fn is not None:
            x = fn(x)
        if name in self.capture:
            self.cache[name] = x
        return x


class _NoHooks(Hooks):
    def wants(self, name: str) -> bool:
        return False

    def overwrites(self, name: str) -> bool:
        return False

    def narrow(self, name: str) -> bool:
        return False

    def __call__(self, name: str, x: jax.Array) -> jax.Array:
        return x


NO_HOOKS = _NoHooks()
