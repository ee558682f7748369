"""The shape every federated algorithm shares, and the pieces they reuse.

An algorithm (fedjax's init + apply, on the vmapped client axis of jaxlab.federated.clients):

    alg = fedavg.build(loss_fn, client_tx, ...)
    state = alg.init(params, model_state, num_clients, rng)   # a pytree of arrays (flax.struct.dataclass)
    state, metrics = alg.round(state, batch, rng)              # pure, un-jitted, jit-able: a train step
    alg.broadcast(state)            # the server message (what every sampled client downloads)
    alg.evaluation_params(state)    # (params, model_state) of the global model
    alg.client_params(state, k)     # (params, model_state) of client k, its private part merged

batch = RoundBatch(data: ClientData [K, ...], client_ids [M] int32, stays [M] bool); `plan_round` gives
the ids and stays on the host as a pure function of (seed, round). rng is the round's key; client c
trains with fold_in(rng, c).

Client loss, everywhere (the trainer's supervised signature):
    loss_fn(params, model_state, batch, rng) -> (loss, (model_state, metrics))
metrics a dict of scalars (may be empty); model_state the non-trained collections ({} if none).

Private parameters (`private=`): a predicate on a parameter's path (tuple of dict keys, e.g.
("BatchNorm_0", "scale")) or a collection of top-level parameter keys. Private leaves never leave the
client: they live stacked [K, ...] in the client state, are merged into the shared parameters for the
client's loss, are absent from the server message and from the aggregate. Model state (BatchNorm
statistics) follows the same predicate on its path without the collection name (("batch_stats",
"BatchNorm_0", "mean") is tested as ("BatchNorm_0", "mean")). Trees split by pruning dict keys, so the
shared and private parts are plain nested dicts holding only their own leaves.

Metrics of a round: scalars only: client metrics (loss, ...) averaged uniformly over accepted clients,
client counts (jaxlab.federated.clients.run_clients) and "finite": False when the aggregate or the new
global state is non-finite, in which case the round leaves the state unchanged except for the round
counter (as the trainer's step counter advances past a non-finite step).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlab.federated import clients as C

PyTree = Any
Path = tuple[str, ...]
Predicate = Callable[[Path], bool]
LossFn = Callable[..., tuple[jax.Array, tuple[PyTree, dict[str, jax.Array]]]]
GradFn = Callable[..., tuple[tuple[jax.Array, tuple[PyTree, dict[str, jax.Array]]], PyTree]]


# --- the round's batch ---------------------------------------------------------------------------------


class RoundPlan(NamedTuple):
    """Host-side plan of a round: client_ids [M] int32 (sorted), stays [M] bool (False = dropped)."""

    client_ids: np.ndarray
    stays: np.ndarray


class RoundBatch(NamedTuple):
    """A round's batch: every client's data [K, ...], the sampled ids [M] int32 and who stays [M] bool."""

    data: C.ClientData
    client_ids: jax.Array
    stays: jax.Array


def plan_round(
    seed: int,
    round_index: int,
    num_clients: int,
    per_round: int | None = None,
    dropout_prob: float = 0.0,
    dropped: Sequence[int] = (),
) -> RoundPlan:
    """Sampled clients (per_round of num_clients, all by default) and who drops: numpy, a pure function
    of (seed, round_index)."""
    ids = C.sample_clients(seed, round_index, num_clients, per_round or num_clients)
    stays = C.dropout_mask(seed, round_index, ids, prob=dropout_prob, dropped=dropped)
    return RoundPlan(ids, stays)


def round_batch(data: C.ClientData, plan: RoundPlan) -> RoundBatch:
    """The RoundBatch of `plan` over `data` (ids as int32, stays as bool arrays)."""
    return RoundBatch(data, jnp.asarray(plan.client_ids, jnp.int32), jnp.asarray(plan.stays, bool))


# --- the algorithm ---------------------------------------------------------------------------------------


class Algorithm(NamedTuple):
    """Functions only (static config); the state is what init returns.

    init(params, model_state, num_clients, rng) -> state; round(state, batch, rng) -> (state, metrics);
    broadcast(state) -> message; evaluation_params(state) -> (params, model_state);
    client_params(state, k) -> (params, model_state); client_update(message, client_state, data, rng)
    -> (client_state, ClientOutput) for one client (what the round vmaps; for per-client references).
    """

    init: Callable[..., Any]
    round: Callable[..., tuple[Any, dict[str, jax.Array]]]
    broadcast: Callable[[Any], PyTree]
    evaluation_params: Callable[[Any], tuple[PyTree, PyTree]]
    client_params: Callable[[Any, Any], tuple[PyTree, PyTree]]
    client_update: Callable[..., tuple[PyTree, C.ClientOutput]]


def server_optimizer(
    name: str = "sgd",
    lr: float = 1.0,
    *,
    momentum: float = 0.9,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-3,
) -> optax.GradientTransformation:
    """sgd (plain FedAvg at lr=1), fedavgm (sgd + momentum), fedadam (adam; eps = Reddi et al.'s tau).

    The server applies it to the pseudo-gradient -aggregate (Reddi et al. 2021)."""
    if name == "sgd":
        return optax.sgd(lr)
    if name == "fedavgm":
        return optax.sgd(lr, momentum=momentum)
    if name == "fedadam":
        return optax.adam(lr, b1=b1, b2=b2, eps=eps)
    raise ValueError(f"unknown server optimizer {name!r}; valid: ['fedadam', 'fedavgm', 'sgd']")


# --- tree helpers ----------------------------------------------------------------------------------------


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.subtract, a, b)


def tree_add(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.add, a, b)


def all_finite(*trees: PyTree) -> jax.Array:
    """() bool: every leaf of every tree is finite (integer leaves count as finite)."""
    leaves = [x for t in trees for x in jax.tree_util.tree_leaves(t)]
    checks = [jnp.isfinite(x).all() for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(checks).all() if checks else jnp.asarray(True)


def fresh(tree: PyTree) -> PyTree:
    """A copy of every leaf: a state that the trainer donates must not alias the caller's arrays."""
    return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tree)


def stack(tree: PyTree, num_clients: int) -> PyTree:
    """tree broadcast to [num_clients, ...] (every client starts from the same value)."""
    return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (num_clients, *jnp.shape(x))), tree)


def take(tree: PyTree, k: int | jax.Array) -> PyTree:
    """Client k's slice of a stacked [K, ...] tree."""
    return jax.tree_util.tree_map(lambda x: x[k], tree)


# --- private parameters ------------------------------------------------------------------------------------


def private_predicate(private: Predicate | Collection[str] | None) -> Predicate | None:
    """A path predicate from `private=`: a callable as is, a collection of top-level keys, or None."""
    if private is None or callable(private):
        return private
    if isinstance(private, str):
        raise TypeError(f"private= takes a collection of top-level keys, got the string {private!r}; "
                        f"write {{{private!r}}}")
    keys = frozenset(private)
    return lambda path: bool(path) and path[0] in keys


def split_tree(tree: PyTree, predicate: Predicate | None, path: Path = ()) -> tuple[PyTree, PyTree]:
    """(shared, private) nested dicts: each leaf goes to private if predicate(path) holds for its dict
    path. Dicts are split key by key; any other node (a leaf, a list, ...) goes whole to one side.
    Keys with nothing on a side are dropped from it (empty subtrees stay on the shared side)."""
    if predicate is None:
        return tree, {}
    if not isinstance(tree, Mapping):
        return ({}, tree) if predicate(path) else (tree, {})
    shared, private = {}, {}
    for key, value in tree.items():
        if not jax.tree_util.tree_leaves(value):  # an empty subtree keeps its place on the shared side
            shared[key] = value
            continue
        s, p = split_tree(value, predicate, (*path, str(key)))
        if jax.tree_util.tree_leaves(s):
            shared[key] = s
        if jax.tree_util.tree_leaves(p):
            private[key] = p
    return shared, private


def merge_trees(shared: PyTree, private: PyTree) -> PyTree:
    """Inverse of split_tree: the nested dicts merged key by key (a key on both sides must be a dict)."""
    if not isinstance(private, Mapping) or not private:
        return shared
    if not isinstance(shared, Mapping):
        raise ValueError(f"cannot merge private keys {sorted(private)} into a non-dict {type(shared).__name__}")
    out = dict(shared)
    for key, value in private.items():
        if key in out:
            if not (isinstance(out[key], Mapping) and isinstance(value, Mapping)):
                raise ValueError(f"key {key!r} is both shared and private")
            out[key] = merge_trees(out[key], value)
        else:
            out[key] = value
    return out


def split_state(model_state: PyTree, predicate: Predicate | None) -> tuple[PyTree, PyTree]:
    """split_tree of model state {collection: tree}, the predicate applied to paths without the collection."""
    if predicate is None or not isinstance(model_state, Mapping):
        return model_state, {}
    shared, private = {}, {}
    for collection, tree in model_state.items():
        s, p = split_tree(tree, predicate)
        shared[collection] = s
        if jax.tree_util.tree_leaves(p):
            private[collection] = p
    return shared, private


class Private(NamedTuple):
    """Static config of the private-parameter mechanism (see the module doc)."""

    predicate: Predicate | None
    init_private: Callable[[jax.Array], PyTree] | None = None

    def split(self, params: PyTree, model_state: PyTree) -> tuple[tuple[PyTree, PyTree], tuple[PyTree, PyTree]]:
        """((shared params, shared model state), (private params, private model state))."""
        w_s, w_p = split_tree(params, self.predicate)
        s_s, s_p = split_state(model_state, self.predicate)
        return (w_s, s_s), (w_p, s_p)

    def init_clients(self, params: PyTree, model_state: PyTree, num_clients: int, rng: jax.Array) -> PyTree:
        """Stacked [K, ...] {"params", "model_state"} private parts: the initial ones for every client,
        or with init_private, the private part of init_private(fold_in(rng, k)) for client k."""
        _, (w_p, s_p) = self.split(params, model_state)
        if self.init_private is None:
            return {"params": stack(w_p, num_clients), "model_state": stack(s_p, num_clients)}

        def one(k):
            return split_tree(self.init_private(jax.random.fold_in(rng, k)), self.predicate)[1]

        per_client = jax.vmap(one)(jnp.arange(num_clients))
        want, got = jax.tree_util.tree_structure(w_p), jax.tree_util.tree_structure(take(per_client, 0))
        if want != got:
            raise ValueError(f"init_private's private part has structure {got}, the params' private part {want}")
        return {"params": per_client, "model_state": stack(s_p, num_clients)}


# --- local training ----------------------------------------------------------------------------------------


def check_loss_output(out: Any) -> None:
    """Raises a ValueError naming the expected form unless out = (loss, (model_state, metrics dict))."""
    ok = isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], tuple) and len(out[1]) == 2
    if not ok or not isinstance(out[1][1], Mapping):
        raise ValueError("loss_fn must return (loss, (model_state, metrics)) with metrics a dict of scalars "
                         f"(the trainer's signature); got {jax.tree_util.tree_structure(out)}")


def value_and_grad(loss_fn: LossFn) -> GradFn:
    """grad_fn(params, model_state, batch, rng) -> ((loss, (model_state, metrics)), grads)."""

    def checked(params, model_state, batch, rng):
        out = loss_fn(params, model_state, batch, rng)
        check_loss_output(out)
        return out

    return jax.value_and_grad(checked, has_aux=True)


def local_train(
    grad_fn: GradFn,
    tx: optax.GradientTransformation,
    params: PyTree,
    model_state: PyTree,
    opt_state: PyTree,
    data: C.ClientData,
    rng: jax.Array,
) -> tuple[PyTree, PyTree, PyTree, dict[str, jax.Array]]:
    """A client's local steps (one per unmasked step of data, step s with rng fold_in(rng, s)):
    grads from grad_fn, then tx. Returns (params, model_state, opt_state, metrics averaged over steps,
    with "loss")."""

    def step(carry, batch, step_rng):
        p, s, o = carry
        (loss, (s, metrics)), grads = grad_fn(p, s, batch, step_rng)
        updates, o = tx.update(grads, o, p)
        return (optax.apply_updates(p, updates), s, o), {**metrics, "loss": loss}

    (params, model_state, opt_state), metrics = C.local_train(
        step, (params, model_state, opt_state), data.batches, data.step_mask, rng
    )
    return params, model_state, opt_state, metrics


# --- the server side of a round ----------------------------------------------------------------------------


def client_metrics(outputs: C.ClientOutput, accepted: jax.Array) -> dict[str, jax.Array]:
    """Client metrics averaged uniformly over accepted clients (0 if none)."""
    n = jnp.maximum(accepted.sum(), 1)
    return {k: jnp.where(accepted, v, 0.0).sum() / n for k, v in outputs.metrics.items()}


def keep_if_finite(finite: jax.Array, new: Any, old: Any) -> Any:
    """new where finite, else old, leaf by leaf, for every field but the round counter (which advances)."""
    kept = C.tree_where(finite, new.replace(round=old.round), old)
    return kept.replace(round=old.round + 1)
