"""The train state: a pytree of named parts, everything a run needs to continue exactly.

    State(step, parts={"generator": Part(params, opt_state, collections), "teacher": Part.frozen(params), ...},
          extra={...})

A Part is one trainable (or frozen) piece: its parameters, its optimizer state (None when frozen: a
teacher snapshot, a frozen pretrained network) and its mutable collections (BatchNorm "batch_stats",
... ; {} if none). `extra` holds method-owned arrays that are not parts (a federated algorithm's
per-client state and server state, counters). Randomness is not state: a step's key is
fold_in(key(seed), step), a pure function of the config and the step.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

PyTree = Any


@flax.struct.dataclass
class Part:
    """params: float32 trainables; opt_state: its optimizer's state (None = frozen); collections: the
    mutable non-trained variables of its model ({} if none)."""

    params: PyTree
    opt_state: PyTree = None
    collections: PyTree = flax.struct.field(default_factory=dict)

    @classmethod
    def create(cls, params: PyTree, tx, collections: PyTree | None = None) -> Part:
        return cls(params, tx.init(params), {} if collections is None else collections)

    @classmethod
    def frozen(cls, params: PyTree, collections: PyTree | None = None) -> Part:
        return cls(params, None, {} if collections is None else collections)

    @property
    def is_frozen(self) -> bool:
        return self.opt_state is None


@flax.struct.dataclass
class State:
    """step: int32 scalar, counted over the whole run (all stages); parts: {name: Part}; extra: any
    other method-owned pytree of arrays ({} if none)."""

    step: jax.Array
    parts: dict[str, Part]
    extra: PyTree = flax.struct.field(default_factory=dict)

    @classmethod
    def create(cls, parts: dict[str, Part], extra: PyTree | None = None) -> State:
        return cls(jnp.zeros((), jnp.int32), dict(parts), {} if extra is None else extra)

    def replace_parts(self, **parts: Part) -> State:
        return self.replace(parts={**self.parts, **parts})

    @property
    def params(self) -> dict[str, PyTree]:
        """{part name: params} of every Part."""
        return {name: p.params for name, p in self.parts.items() if isinstance(p, Part)}


def split_variables(variables: dict) -> tuple[PyTree, PyTree]:
    """Flax variables -> (params, every other collection)."""
    variables = dict(variables)
    params = variables.pop("params", {})
    return params, variables


def param_count(tree: PyTree) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))
