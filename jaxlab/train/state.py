"""The train state: everything a run needs to continue exactly, as one pytree of arrays."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """step: int32 scalar; params: float32 trainables; opt_state: optimizer pytree; model_state: mutable
    collections (batch_stats, ...), {} if none. Randomness is not state: a step's key is
    fold_in(key(seed), step), a pure function of the config and the step."""

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    model_state: PyTree

    @classmethod
    def create(cls, params: PyTree, model_state: PyTree, tx) -> TrainState:
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            model_state=model_state,
        )


def split_variables(variables: dict) -> tuple[PyTree, PyTree]:
    """Flax variables -> (params, every other collection)."""
    variables = dict(variables)
    params = variables.pop("params", {})
    return params, variables


def param_count(tree: PyTree) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))
