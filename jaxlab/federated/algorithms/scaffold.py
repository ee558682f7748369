"""SCAFFOLD (Karimireddy et al. 2020), option II control variates, on the vmapped client axis.

Client i (control c_i, server control c, global x), K_i local SGD steps at lr:
    y <- y - lr (g_i(y) - c_i + c)
    c_i+ = c_i - c + (x - y) / (K_i lr)                       (option II)
    sends dy = y - x and dc = c_i+ - c_i
Server (S = accepted clients of the round, N = all clients):
    x <- x + server_lr * mean_S(dy),   c <- c + |S| / N * mean_S(dc)
Means are uniform over S as in the paper (uniform_weights=False weighs dy by sample count); the model
state (BatchNorm statistics) is averaged like dy. Controls start at zero.
"""

from __future__ import annotations

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
class ScaffoldState:
    """round: () int32; params, model_state: global; control: the server's c (like params);
    clients: [K, ...] {"control": c_i}."""

    round: jax.Array
    params: PyTree
    model_state: PyTree
    control: PyTree
    clients: PyTree


def client_update_fn(grad_fn: B.GradFn, lr: float):
    """client_update(message {"params", "model_state", "control"}, {"control": c_i}, data, rng) ->
    ({"control": c_i+}, out) with out.update = {"params": dy, "control": dc, "model_state": ds}."""
    tx = optax.sgd(lr)

    def client_update(message, client_state, data: C.ClientData, rng):
        x, c, s_g = message["params"], message["control"], message["model_state"]
        c_i = client_state["control"]

        def corrected(params, model_state, batch, step_rng):
            out, g = grad_fn(params, model_state, batch, step_rng)
            return out, jax.tree_util.tree_map(lambda g_, ci, c_: g_ - ci + c_, g, c_i, c)

        y, s, _, metrics = B.local_train(corrected, tx, x, s_g, tx.init(x), data, rng)
        steps = jnp.maximum(data.step_mask.sum(), 1).astype(jnp.float32)
        c_new = jax.tree_util.tree_map(lambda ci, c_, x_, y_: ci - c_ + (x_ - y_) / (steps * lr), c_i, c, x, y)
        update = {"params": B.tree_sub(y, x), "control": B.tree_sub(c_new, c_i), "model_state": B.tree_sub(s, s_g)}
        return {"control": c_new}, C.ClientOutput(update, data.num_samples.astype(jnp.float32), metrics)

    return client_update


def server_update(
    state: ScaffoldState,
    result: C.ClientsResult,
    num_clients: int,
    *,
    server_lr: float,
    uniform_weights: bool,
    aggregator: Aggregator,
) -> tuple[ScaffoldState, jax.Array]:
    """x += server_lr aggregate(dy); c += |S|/N mean(dc); state += aggregate(ds). Returns the new state
    and whether the aggregates and the new global state are finite."""
    accepted, update = result.accepted, result.outputs.update
    weights = jnp.ones_like(result.outputs.weight) if uniform_weights else result.outputs.weight
    dy = aggregator(update["params"], weights, accepted)
    ds = aggregator(update["model_state"], weights, accepted)
    dc = weighted_mean(update["control"], jnp.ones_like(weights), accepted)
    frac = accepted.sum() / num_clients
    params = jax.tree_util.tree_map(lambda x, d: x + server_lr * d, state.params, dy)
    control = jax.tree_util.tree_map(lambda c, d: c + frac * d, state.control, dc)
    model_state = B.tree_add(state.model_state, ds)
    new = state.replace(params=params, model_state=model_state, control=control, clients=result.client_states)
    return new, B.all_finite(dy, ds, dc, params, model_state, control)


def build(
    loss_fn: B.LossFn,
    lr: float,
    *,
    server_lr: float = 1.0,
    uniform_weights: bool = True,
    aggregator: Aggregator = weighted_mean,
    grad_fn: B.GradFn | None = None,
    norm_bound: NormBound | None = None,
    chunk_size: int = 16,
    mesh: Mesh | None = None,
) -> B.Algorithm:
    """SCAFFOLD with client SGD at lr and the global step server_lr (module doc).

    loss_fn(params, model_state, batch, rng) -> (loss, (model_state, metrics)); grad_fn, norm_bound,
    chunk_size, mesh as in fedavg.build."""
    if lr <= 0:
        raise ValueError(f"SCAFFOLD client lr must be > 0, got {lr}")
    C.check_chunking(chunk_size, mesh)
    client_update = client_update_fn(grad_fn or B.value_and_grad(loss_fn), lr)

    def init(params: PyTree, model_state: PyTree, num_clients: int, rng: jax.Array | None = None) -> ScaffoldState:
        del rng  # SCAFFOLD draws nothing at init
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        state = ScaffoldState(jnp.zeros((), jnp.int32), params, {} if model_state is None else model_state,
                              zeros, {"control": B.stack(zeros, num_clients)})
        return B.fresh(state)

    def broadcast(state: ScaffoldState) -> PyTree:
        return {"params": state.params, "model_state": state.model_state, "control": state.control}

    def round_fn(state: ScaffoldState, batch: B.RoundBatch, rng: jax.Array):
        result = C.run_clients(
            client_update, broadcast(state), state.clients, batch.data, batch.client_ids, batch.stays, rng,
            chunk_size=chunk_size, mesh=mesh, bound=norm_bound,
        )
        num_clients = batch.data.step_mask.shape[0]
        new, finite = server_update(state, result, num_clients, server_lr=server_lr,
                                    uniform_weights=uniform_weights, aggregator=aggregator)
        metrics = {**B.client_metrics(result.outputs, result.accepted), **result.metrics, "finite": finite}
        return B.keep_if_finite(finite, new, state), metrics

    def evaluation_params(state: ScaffoldState) -> tuple[PyTree, PyTree]:
        return state.params, state.model_state

    def client_params(state: ScaffoldState, k: int | jax.Array) -> tuple[PyTree, PyTree]:
        del k  # no private parameters: every client evaluates the global model
        return state.params, state.model_state

    return B.Algorithm(init, round_fn, broadcast, evaluation_params, client_params, client_update)
