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
    row_aware: sites whose interventions also take ``rows``, the query positions an activation holds when the
    model computes only some (the readout positions of a classification loss, ``Transformer.apply``'s
    ``readout``): called ``fn(x, rows)`` there. The clamps' interventions are; a plain function of the
    activation is not, and the model then computes every position of its site.
    The cache holds the value after the intervention, as the rest of the model sees it.
    """

    def __init__(self, capture: Iterable[str] = (), interventions: dict[str, Intervention] | None = None,
                 head_uniform: Iterable[str] = (), row_aware: Iterable[str] = ()):
        self.capture = frozenset(capture)
        self.interventions = dict(interventions or {})
        self.head_uniform = frozenset(head_uniform)
        self.row_aware = frozenset(row_aware)
        self.cache: dict[str, jax.Array] = {}

    def wants(self, name: str) -> bool:
        return name in self.capture or name in self.interventions

    def overwrites(self, name: str) -> bool:
        return name in self.interventions

    def narrow(self, name: str) -> bool:
        """Whether the site may be handed one head's copy: only overwritten, alike on every head."""
        return name in self.head_uniform and name not in self.capture

    def allows_rows(self, name: str) -> bool:
        """Whether the site may hold some query positions only: nothing reads it, and what overwrites it takes
        ``rows``."""
        return name not in self.capture and (name not in self.interventions or name in self.row_aware)

    def __call__(self, name: str, x: jax.Array, rows: tuple[int, ...] | None = None) -> jax.Array:
        """The activation at a site after its intervention; ``rows``: the query positions x holds, when not all."""
        fn = self.interventions.get(name)
        if fn is not None:
            x = fn(x) if rows is None else fn(x, rows)
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

    def allows_rows(self, name: str) -> bool:
        return True

    def __call__(self, name: str, x: jax.Array, rows: tuple[int, ...] | None = None) -> jax.Array:
        return x


NO_HOOKS = _NoHooks()
