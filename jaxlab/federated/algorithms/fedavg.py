"""FedAvg (McMahan et al. 2017) with a server optimizer (FedAvgM, FedAdam: Reddi et al. 2021) and
FedProx's proximal term (Li et al. 2020), on the vmapped client axis.

    alg = fedavg.build(loss_fn, optax.sgd(0.1), server_tx=server_optimizer("fedadam", lr=1e-2), mu=0.01)
    state = alg.init(params, model_state, num_clients, rng)
    state, metrics = alg.round(state, round_batch(data, plan_round(seed, r, num_clients, 10)), rng)

Client k: from w = (w_g, its private part), local steps of client_tx on
    grad loss_fn(w) + mu (w_shared - w_g)          (FedProx; mu = 0 is FedAvg)
and returns the deltas of its shared params and shared model state (w_shared - w_g, s_shared - s_g),
weighted by its number of examples. Server: delta = aggregator(deltas), applied as the pseudo-gradient
-delta through server_tx (sgd(1.0) = plain FedAvg: w_g + delta; momentum = FedAvgM; adam = FedAdam).
The model state (BatchNorm statistics) goes to s_g + aggregate(state deltas), the FedAvg of a PyTorch
state_dict's buffers, without the server optimizer. With persist_opt_state the client optimizer state
lives in the client state across rounds (the fl_vs_splitnn reference); otherwise it restarts each round.
Private parameters (base module doc) are trained locally and never aggregated.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxlab.federated import clients as C
from jaxlab.federated.aggregators import Aggregator, NormBound, weighted_mean
from jaxlab.federated.algorithms import base as B

PyTree = Any


@flax.struct.dataclass
class FedAvgState:
    """round: () int32; params / model_state: the global shared parts; opt_state: the server
    optimizer's; clients: [K, ...] {"params", "model_state": private parts, "opt": client optimizer
    state (persist_opt_state only)}."""

    round: jax.Array
    params: PyTree
    model_state: PyTree
    opt_state: PyTree
    clients: PyTree


def proximal(grad_fn: B.GradFn, anchor: PyTree, mu: float, predicate: B.Predicate | None) -> B.GradFn:
    """grad_fn with FedProx's mu (w_shared - anchor) added to the shared parameters' gradients."""
    if mu == 0:
        return grad_fn

    def fn(params, model_state, batch, rng):
        out, grads = grad_fn(params, model_state, batch, rng)
        g_shared, g_private = B.split_tree(grads, predicate)
        w_shared, _ = B.split_tree(params, predicate)
        g_shared = jax.tree_util.tree_map(lambda g, w, a: g + mu * (w - a), g_shared, w_shared, anchor)
        return out, B.merge_trees(g_shared, g_private)

    return fn


def client_update_fn(
    grad_fn: B.GradFn,
    client_tx: optax.GradientTransformation,
    *,
    mu: float,
    persist_opt_state: bool,
    private: B.Private,
) -> Callable[..., tuple[PyTree, C.ClientOutput]]:
    """client_update(message {"params", "model_state"}, client_state, data, rng) -> (client_state, out)
    with out.update = {"params": shared delta, "model_state": shared state delta}, out.weight = n_k."""

    def client_update(message, client_state, data: C.ClientData, rng):
        w_g, s_g = message["params"], message["model_state"]
        w = B.merge_trees(w_g, client_state["params"])
        s = B.merge_trees(s_g, client_state["model_state"])
        opt = client_state["opt"] if persist_opt_state else client_tx.init(w)
        grads = proximal(grad_fn, w_g, mu, private.predicate)
        w, s, opt, metrics = B.local_train(grads, client_tx, w, s, opt, data, rng)
        (w_shared, s_shared), (w_private, s_private) = private.split(w, s)
        new_state = {"params": w_private, "model_state": s_private}
        if persist_opt_state:
            new_state["opt"] = opt
        update = {"params": B.tree_sub(w_shared, w_g), "model_state": B.tree_sub(s_shared, s_g)}
        return new_state, C.ClientOutput(update, data.num_samples.astype(jnp.float32), metrics)

    return client_update


def server_update(
    state: FedAvgState,
    result: C.ClientsResult,
    server_tx: optax.GradientTransformation,
    aggregator: Aggregator,
) -> tuple[FedAvgState, jax.Array]:
    """New global state from the clients' result, and whether the aggregate and new state are finite.
    With no accepted client the global parts stay as they are (the server optimizer does not step)."""
    weights, accepted = result.outputs.weight, result.accepted
    delta = aggregator(result.outputs.update["params"], weights, accepted)
    state_delta = aggregator(result.outputs.update["model_state"], weights, accepted)
    pseudo_grad = jax.tree_util.tree_map(jnp.negative, delta)
    updates, opt_state = server_tx.update(pseudo_grad, state.opt_state, state.params)
    stepped = (optax.apply_updates(state.params, updates), B.tree_add(state.model_state, state_delta), opt_state)
    old = (state.params, state.model_state, state.opt_state)
    params, model_state, opt_state = C.tree_where(accepted.any(), stepped, old)
    new = state.replace(params=params, model_state=model_state, opt_state=opt_state, clients=result.client_states)
    return new, B.all_finite(delta, state_delta, params, model_state, opt_state)


def build(
    loss_fn: B.LossFn,
    client_tx: optax.GradientTransformation,
    *,
    server_tx: optax.GradientTransformation | None = None,
    aggregator: Aggregator = weighted_mean,
    mu: float = 0.0,
    persist_opt_state: bool = False,
    private: B.Predicate | Collection[str] | None = None,
    init_private: Callable[[jax.Array], PyTree] | None = None,
    grad_fn: B.GradFn | None = None,
    norm_bound: NormBound | None = None,
    chunk_size: int = 16,
    mesh: Mesh | None = None,
) -> B.Algorithm:
    """FedAvg / FedAvgM / FedAdam (server_tx, default sgd(1.0)) / FedProx (mu > 0) as an Algorithm.

    loss_fn(params, model_state, batch, rng) -> (loss, (model_state, metrics)). grad_fn (same
    signature as the trainer's: -> ((loss, (model_state, metrics)), grads)) replaces
    jax.value_and_grad(loss_fn) for clients that compute gradients their own way (DP-SGD, split
    learning). private / init_private: per-client private parameters (base module doc). norm_bound:
    jaxlab.federated.aggregators.norm_bound(max_norm, "clip" | "reject") on each client's params delta.
    chunk_size clients run at a time; with a mesh the client axis is sharded over its "clients" axis.
    """
    if mu < 0:
        raise ValueError(f"FedProx mu must be >= 0, got {mu}")
    C.check_chunking(chunk_size, mesh)
    server_tx = server_tx or B.server_optimizer()
    priv = B.Private(B.private_predicate(private), init_private)
    if init_private is not None and priv.predicate is None:
        raise ValueError("init_private needs private= (which parameters are private)")
    client_update = client_update_fn(
        grad_fn or B.value_and_grad(loss_fn), client_tx, mu=mu, persist_opt_state=persist_opt_state, private=priv
    )

    def init(params: PyTree, model_state: PyTree, num_clients: int, rng: jax.Array | None = None) -> FedAvgState:
        model_state = {} if model_state is None else model_state
        if init_private is not None and rng is None:
            raise ValueError("init_private draws each client's private parameters from rng: pass rng to init")
        (w_shared, s_shared), (w_private, _) = priv.split(params, model_state)
        clients = priv.init_clients(params, model_state, num_clients, rng)
        if persist_opt_state:
            clients["opt"] = B.stack(client_tx.init(B.merge_trees(w_shared, w_private)), num_clients)
        state = FedAvgState(jnp.zeros((), jnp.int32), w_shared, s_shared, server_tx.init(w_shared), clients)
        return B.fresh(state)

    def broadcast(state: FedAvgState) -> PyTree:
        return {"params": state.params, "model_state": state.model_state}

    def round_fn(state: FedAvgState, batch: B.RoundBatch, rng: jax.Array):
        result = C.run_clients(
            client_update, broadcast(state), state.clients, batch.data, batch.client_ids, batch.stays, rng,
            chunk_size=chunk_size, mesh=mesh, bound=norm_bound,
        )
        new, finite = server_update(state, result, server_tx, aggregator)
        metrics = {**B.client_metrics(result.outputs, result.accepted), **result.metrics, "finite": finite}
        return B.keep_if_finite(finite, new, state), metrics

    def evaluation_params(state: FedAvgState) -> tuple[PyTree, PyTree]:
        if priv.predicate is not None:
            raise ValueError("this algorithm has private parameters: there is no global model to evaluate; "
                             "evaluate each client's model, client_params(state, k)")
        return state.params, state.model_state

    def client_params(state: FedAvgState, k: int | jax.Array) -> tuple[PyTree, PyTree]:
        return (B.merge_trees(state.params, B.take(state.clients["params"], k)),
                B.merge_trees(state.model_state, B.take(state.clients["model_state"], k)))

    return B.Algorithm(init, round_fn, broadcast, evaluation_params, client_params, client_update)
