"""Credit assignment (PLwF): an optax GradientTransformation over the pair (new-task gradient g_n,
distillation gradient g_o) that removes their conflict by projection, then sums them.

The pair travels as ONE paired tree shaped like the parameters, every leaf stacked on a leading axis of 2:
leaf[0] is g_n's, leaf[1] is g_o's (`pair_grads(g_n, g_o)` builds it; jax.jacrev of the two-vector
(new-task loss, distillation loss) returns exactly this). The update's output is a plain tree shaped like
the parameters, so `optax.chain(credit_assignment(...), optax.adam(...))` is the part's optimizer.

    mode "global":    d = <g_n, g_o> over all leaves; if d < 0: g_n <- g_n - d / ||g_o||^2 * g_o
    mode "per_layer": the same test and projection per layer (the leaves of one module, e.g. a Dense's
                      kernel and bias, grouped by their path without the last name)
    mode "sum":       no projection (the ablation): g_n + g_o
`project` "new" (default, the spec: the new-task gradient gives way to the distillation gradient), "old"
(the distillation gradient is projected off g_n instead) or "both" (PCGrad's symmetric form, each
projected off the other's original). A zero g_o (the first task) leaves g_n untouched.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxlab.train.optim import path_name

MODES = ("global", "per_layer", "sum")
PROJECTS = ("new", "old", "both")


def pair_grads(g_new, g_old):
    """Two trees shaped like the parameters -> one paired tree, every leaf (2, *leaf.shape)."""
    return jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), g_new, g_old)


def unpair(paired):
    """A paired tree -> (g_new, g_old)."""
    return (jax.tree_util.tree_map(lambda x: x[0], paired), jax.tree_util.tree_map(lambda x: x[1], paired))


def layer_of(path) -> str:
    """A leaf's layer: its '/'-joined path without the last name ('backbone/dense_0/kernel' ->
    'backbone/dense_0'); a top-level leaf is its own layer."""
    name = path_name(path)
    return name.rsplit("/", 1)[0] if "/" in name else name


def _project(a_leaves, b_leaves, groups: list[int], n_groups: int):
    """a - min(<a, b>_g, 0) / ||b||_g^2 * b per group g of leaves (groups[i] = leaf i's group)."""
    dots = [jnp.zeros((), jnp.float32) for _ in range(n_groups)]
    norms = [jnp.zeros((), jnp.float32) for _ in range(n_groups)]
    for a, b, g in zip(a_leaves, b_leaves, groups):
        dots[g] = dots[g] + jnp.vdot(a, b).astype(jnp.float32)
        norms[g] = norms[g] + jnp.vdot(b, b).astype(jnp.float32)
    coefs = [jnp.where((d < 0) & (n > 0), d / jnp.where(n > 0, n, 1.0), 0.0) for d, n in zip(dots, norms)]
    return [a - coefs[g].astype(a.dtype) * b for a, b, g in zip(a_leaves, b_leaves, groups)]


def conflict_free(g_new, g_old, mode: str = "global", project: str = "new"):
    """(g_n', g_o') after the projection of the module docstring, as two trees shaped like the inputs."""
    if mode not in MODES:
        raise ValueError(f"credit assignment mode {mode!r} is not one of {MODES}")
    if project not in PROJECTS:
        raise ValueError(f"credit assignment project={project!r} is not one of {PROJECTS}")
    if mode == "sum":
        return g_new, g_old
    flat_new, treedef = jax.tree_util.tree_flatten_with_path(g_new)
    paths = [p for p, _ in flat_new]
    a = [x for _, x in flat_new]
    b = jax.tree_util.tree_leaves(g_old)
    if mode == "global":
        groups, n_groups = [0] * len(a), 1
    else:
        names = [layer_of(p) for p in paths]
        index = {n: i for i, n in enumerate(dict.fromkeys(names))}
        groups, n_groups = [index[n] for n in names], len(index)
    new, old = a, b
    if project in ("new", "both"):
        new = _project(a, b, groups, n_groups)
    if project in ("old", "both"):
        old = _project(b, a, groups, n_groups)
    unflatten = jax.tree_util.tree_structure(g_new).unflatten
    return unflatten(new), unflatten(old)


class CreditAssignmentState(NamedTuple):
    """Stateless; kept as a NamedTuple in optax's manner."""


def credit_assignment(mode: str = "global", project: str = "new") -> optax.GradientTransformation:
    """The transformation of the module docstring: paired tree in, g_n' + g_o' out (shaped like params)."""
    conflict_free(jnp.zeros(()), jnp.zeros(()), mode, project)  # names a bad mode / project here

    def init(params):
        del params
        return CreditAssignmentState()

    def update(paired, state, params=None):
        del params
        g_new, g_old = unpair(paired)
        g_new, g_old = conflict_free(g_new, g_old, mode, project)
        return jax.tree_util.tree_map(jnp.add, g_new, g_old), state

    return optax.GradientTransformation(init, update)


def cosine(g_new, g_old) -> jax.Array:
    """Global cosine similarity of two gradient trees (a metric: < 0 means they conflict)."""
    dot = sum(jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(g_new), jax.tree_util.tree_leaves(g_old)))
    norm = optax.global_norm(g_new) * optax.global_norm(g_old)
    return jnp.where(norm > 0, dot / jnp.where(norm > 0, norm, 1.0), 0.0)
