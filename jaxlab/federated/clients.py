"""The client axis: per-client data, state and RNG stacked on a leading axis; a round = vmap over it.

Data: `stack_client_data` lays every client's examples out as batches [clients, max_steps, batch, ...]
with a step mask [clients, max_steps] (clients with fewer steps are padded; a masked step leaves the
client's state unchanged). A client's last partial batch is filled with its own earlier examples.

A client function has the signature
    client_update(broadcast, client_state, data, rng) -> (client_state, ClientOutput)
where `broadcast` is what the server sends (same for all clients), `client_state` the client's own
persistent state (one slice of the stacked per-client state), `data` one client's slice of ClientData.
`run_clients` runs it for the sampled clients of a round as a pure (un-jitted, jit-able) function:
gather the sampled clients, vmap over chunks of `chunk_size` clients (lax.map over chunks, so memory is
bounded by the chunk), optionally sharded over a Mesh axis "clients", reject non-finite updates (and,
with a norm bound, clip or reject outliers), and scatter accepted client states back.
RNG: the round's key `rng` (the trainer's fold_in(key(seed), step)); client c's key is fold_in(rng, c),
so with rng = round_key(seed, r) it is fold_in(fold_in(key(seed), r), c) = client_rng(seed, r, c).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlab.federated import aggregators as A

PyTree = Any
CLIENT_AXIS = "clients"
log = logging.getLogger("jaxlab.federated")


class ClientData(NamedTuple):
    """batches: {name: [K, S, B, ...]}; step_mask: [K, S] bool; num_samples: [K] int32 (examples held)."""

    batches: dict[str, jax.Array]
    step_mask: jax.Array
    num_samples: jax.Array


class ClientOutput(NamedTuple):
    """What one client returns: update pytree (e.g. params delta), aggregation weight (), metrics {name: ()}."""

    update: PyTree
    weight: jax.Array
    metrics: dict[str, jax.Array]


def _client_steps(n: int, batch_size: int, epochs: int, rng: np.random.Generator) -> np.ndarray:
    """(steps, batch_size) example indices into one client's data: `epochs` shuffled passes, last batch filled."""
    per_epoch = -(-n // batch_size)
    rows = []
    for _ in range(epochs):
        order = rng.permutation(n)
        fill = np.resize(order, per_epoch * batch_size)  # wraps around the client's own examples
        rows.append(fill.reshape(per_epoch, batch_size))
    return np.concatenate(rows)


def stack_client_data(
    arrays: Mapping[str, np.ndarray],
    parts: Sequence[np.ndarray],
    batch_size: int,
    *,
    epochs: int = 1,
    seed: int = 0,
    max_steps: int | None = None,
) -> ClientData:
    """Per-client local epochs as padded batches [K, S, B, ...] with S = max over clients of steps.

    arrays: {name: (N, ...)}; parts: K index arrays into N (from jaxlab.federated.partition). Client k's
    steps are ceil(n_k / B) * epochs; with max_steps set, every client's steps are cut to it.
    """
    if any(len(p) == 0 for p in parts):
        raise ValueError(
            "every client needs at least one example; see partition(..., min_size=...)"
        )
    steps = [
        _client_steps(len(p), batch_size, epochs, np.random.default_rng([seed, k]))
        for k, p in enumerate(parts)
    ]
    if max_steps is not None:
        steps = [s[:max_steps] for s in steps]
    s_max = max(len(s) for s in steps)
    index = np.zeros((len(parts), s_max, batch_size), np.int64)
    mask = np.zeros((len(parts), s_max), bool)
    for k, (p, s) in enumerate(zip(parts, steps)):
        index[k, : len(s)] = np.asarray(p)[s]
        index[k, len(s) :] = index[k, 0]  # padded steps repeat a real batch; they are masked
        mask[k, : len(s)] = True
    batches = {name: jnp.asarray(np.asarray(a)[index]) for name, a in arrays.items()}
    sizes = jnp.asarray([len(p) for p in parts], jnp.int32)
    return ClientData(batches, jnp.asarray(mask), sizes)


def tree_where(cond: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    """Leafwise where(cond, new, old); cond is a scalar or broadcasts against each leaf's leading axes."""

    def pick(a, b):
        c = jnp.reshape(cond, cond.shape + (1,) * (a.ndim - cond.ndim))
        return jnp.where(c, a, b)

    return jax.tree_util.tree_map(pick, new, old)


def local_train(
    step_fn: Callable[
        [PyTree, dict[str, jax.Array], jax.Array], tuple[PyTree, dict[str, jax.Array]]
    ],
    state: PyTree,
    batches: dict[str, jax.Array],
    step_mask: jax.Array,
    rng: jax.Array,
) -> tuple[PyTree, dict[str, jax.Array]]:
    """lax.scan of step_fn(state, batch, rng) over [S, B, ...] batches; masked steps keep the state.

    Returns the final state and the metrics averaged over the unmasked steps.
    """

    def body(state, xs):
        i, batch, keep = xs
        new, metrics = step_fn(state, batch, jax.random.fold_in(rng, i))
        metrics = jax.tree_util.tree_map(lambda m: jnp.where(keep, m, 0.0), metrics)
        return tree_where(keep, new, state), metrics

    steps = jnp.arange(step_mask.shape[0])
    state, metrics = jax.lax.scan(body, state, (steps, batches, step_mask))
    count = jnp.maximum(step_mask.sum(), 1)
    return state, jax.tree_util.tree_map(lambda m: m.sum(0) / count, metrics)


def round_key(seed: int, round_index: int | jax.Array) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), round_index)


def client_rng(seed: int, round_index: int | jax.Array, client_id: int | jax.Array) -> jax.Array:
    """fold_in(fold_in(key(seed), round), client_id)."""
    return jax.random.fold_in(round_key(seed, round_index), client_id)


def sample_clients(seed: int, round_index: int, num_clients: int, per_round: int) -> np.ndarray:
    """Sorted ids of the per_round clients of this round, without replacement, a function of (seed, round)."""
    if not 1 <= per_round <= num_clients:
        raise ValueError(f"clients per round must be in 1..{num_clients}, got {per_round}")
    rng = np.random.default_rng([seed, round_index, 0x5A])
    return np.sort(rng.choice(num_clients, per_round, replace=False)).astype(np.int32)


def dropout_mask(
    seed: int,
    round_index: int,
    client_ids: np.ndarray,
    *,
    prob: float = 0.0,
    dropped: Sequence[int] = (),
) -> np.ndarray:
    """(M,) bool, True = the client stays; it drops with probability prob (a function of seed, round) or if listed."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {prob}")
    rng = np.random.default_rng([seed, round_index, 0xD0])
    stays = rng.random(len(client_ids)) >= prob
    return stays & ~np.isin(client_ids, np.asarray(dropped, dtype=np.int64))


def finite_mask(stacked: PyTree) -> jax.Array:
    """(M,) bool: True where every leaf of client m's slice is finite."""
    leaves = jax.tree_util.tree_leaves(stacked)
    per_leaf = [jnp.isfinite(x.reshape(x.shape[0], -1)).all(1) for x in leaves]
    return jnp.stack(per_leaf).all(0) if per_leaf else jnp.ones((0,), bool)


def _log_clients(message: str, client_ids: np.ndarray, flags: np.ndarray) -> None:
    """Host side of run_clients' warnings: names the flagged clients."""
    ids = np.asarray(client_ids)[np.asarray(flags)]
    if ids.size:
        log.warning(message, ids.tolist())


def _constrain(tree: PyTree, mesh: Mesh | None, axis: int) -> PyTree:
    if mesh is None:
        return tree
    spec = PartitionSpec(*([None] * axis), CLIENT_AXIS)
    return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, spec))


def _chunked_vmap(fn, broadcast, xs, num: int, chunk_size: int, mesh: Mesh | None):
    """vmap fn over the leading axis (length num, a multiple of chunk_size) of xs, chunk by chunk (lax.map)."""
    chunks = jax.tree_util.tree_map(
        lambda x: x.reshape(num // chunk_size, chunk_size, *x.shape[1:]), xs
    )
    chunks = _constrain(chunks, mesh, 1)
    batched = jax.vmap(fn, in_axes=(None, 0, 0, 0))
    out = jax.lax.map(lambda c: _constrain(batched(broadcast, *c), mesh, 0), chunks)
    return jax.tree_util.tree_map(lambda x: x.reshape(num, *x.shape[2:]), out)


def check_chunking(chunk_size: int, mesh: Mesh | None) -> None:
    """Raises unless chunk_size >= 1 and, with a mesh, divides by its "clients" axis."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if mesh is not None:
        if CLIENT_AXIS not in mesh.shape:
            raise ValueError(f"the mesh needs an axis {CLIENT_AXIS!r}; it has {tuple(mesh.shape)}")
        if chunk_size % mesh.shape[CLIENT_AXIS]:
            raise ValueError(
                f"chunk_size {chunk_size} must divide by mesh axis 'clients' = {mesh.shape[CLIENT_AXIS]}"
            )


class ClientsResult(NamedTuple):
    """client_states [K, ...] (accepted clients' new states written back); outputs [M, ...] (updates
    clipped where the norm bound clips); accepted [M] bool; metrics {name: () int32} (client counts)."""

    client_states: PyTree
    outputs: ClientOutput
    accepted: jax.Array
    metrics: dict[str, jax.Array]


def run_clients(
    client_update: Callable[..., tuple[PyTree, ClientOutput]],
    broadcast: PyTree,
    client_states: PyTree,
    data: ClientData,
    client_ids: jax.Array,
    stays: jax.Array,
    rng: jax.Array,
    *,
    chunk_size: int = 16,
    mesh: Mesh | None = None,
    bound: A.NormBound | None = None,
) -> ClientsResult:
    """The client half of a round, pure and un-jitted (jit-able; shapes fixed by M, so rounds with the
    same number of sampled clients reuse one compilation).

    broadcast: what the server sends; client_states [K, ...]; data: ClientData [K, ...]; client_ids [M]
    int32; stays [M] bool (False = dropped); rng: the round key (client c gets fold_in(rng, c)).
    Clients run chunk_size at a time (M is padded to a multiple of the chunk with copies of the first
    client, masked out); with a mesh each chunk's client axis is sharded over mesh axis "clients".
    accepted = stays & finite(update and new state) & (within the norm bound, in "reject" mode); only
    accepted clients' states are written back. Rejected (and clipped) clients are named in a warning on
    the jaxlab.federated logger. The bound applies to update["params"] when the update has that key
    (else to the whole update).
    """
    m = client_ids.shape[0]
    if m == 0:
        raise ValueError("a round needs at least one sampled client (client_ids is empty)")
    chunk = min(chunk_size, m) if mesh is None else chunk_size
    num = -(-m // chunk) * chunk
    ids = jnp.pad(client_ids, (0, num - m), constant_values=client_ids[0])
    take = lambda x: jnp.take(x, ids, axis=0)
    rngs = jax.vmap(lambda c: jax.random.fold_in(rng, c))(ids)
    xs = (jax.tree_util.tree_map(take, client_states), jax.tree_util.tree_map(take, data), rngs)
    new_states, outputs = _chunked_vmap(client_update, broadcast, xs, num, chunk, mesh)
    new_states, outputs = jax.tree_util.tree_map(lambda x: x[:m], (new_states, outputs))
    finite = finite_mask((outputs.update, new_states))
    jax.debug.callback(
        functools.partial(_log_clients, "clients %s returned a non-finite update or state this round: "
                          "rejected (not aggregated, their state kept)"),
        client_ids, stays & ~finite,
    )
    accepted = stays & finite
    clipped = rejected_norm = jnp.zeros_like(accepted)
    if bound is not None:
        bounded_key = "params" if isinstance(outputs.update, dict) and "params" in outputs.update else None
        part = outputs.update[bounded_key] if bounded_key else outputs.update
        part, clipped, rejected_norm = A.bound_norms(part, accepted, bound)
        update = {**outputs.update, bounded_key: part} if bounded_key else part
        outputs = outputs._replace(update=update)
        action = "clipped to it" if bound.mode == "clip" else "rejected (not aggregated, their state kept)"
        jax.debug.callback(
            functools.partial(_log_clients, f"clients %s sent an update of norm above {bound.max_norm:g}: "
                              f"{action}"),
            client_ids, clipped | rejected_norm,
        )
        accepted = accepted & ~rejected_norm
    old = jax.tree_util.tree_map(lambda x: jnp.take(x, client_ids, axis=0), client_states)
    kept = tree_where(accepted, new_states, old)
    client_states = jax.tree_util.tree_map(
        lambda full, k: full.at[client_ids].set(k), client_states, kept
    )
    count = lambda v: v.sum().astype(jnp.int32)
    metrics = {
        "clients_sampled": jnp.asarray(m, jnp.int32),
        "clients_dropped": count(~stays),
        "clients_rejected": count(stays & ~accepted),
        "clients_rejected_nonfinite": count(stays & ~finite),
        "clients_rejected_norm": count(rejected_norm),
        "clients_clipped": count(clipped),
        "clients_accepted": count(accepted),
    }
    return ClientsResult(client_states, outputs, accepted, metrics)
