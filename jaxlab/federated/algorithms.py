"""Federated algorithms as (init, apply) pairs over the vmapped client axis (jaxlab.federated.clients).

    alg = fedavg(loss_fn, optax.sgd(0.1), server_tx=server_optimizer("fedadam", lr=1e-2))
    state = alg.init(params, num_clients)
    plan = plan_round(seed, r, num_clients, per_round, dropout_prob=0.1)
    state, metrics = alg.apply(state, data, plan)

loss_fn(params, batch, rng) -> scalar loss. Clients return params deltas (w_local - w_global); the server
aggregates them (weighted by sample count by default) and applies -delta as a pseudo-gradient through a
server optimizer: sgd(1.0) = plain FedAvg, sgd with momentum = FedAvgM, adam = FedAdam (Reddi et al.).

Models with non-trained state (BatchNorm running statistics) pass stateful=True and
loss_fn(params, model_state, batch, rng) -> (loss, model_state), and give alg.init the initial
model_state. The state is broadcast with the params, updated by local training, and the server sets it
to the aggregate (sample-weighted mean) of the clients' states: FedAvg of a PyTorch state_dict with its
buffers. It does not go through the server optimizer.
FedProx adds mu/2 ||w - w_global||^2 to the client loss. SCAFFOLD (Karimireddy et al., option II) keeps
a control variate per client in the stacked client state and one on the server.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jaxlab.federated import clients as C
from jaxlab.federated.aggregators import Aggregator, weighted_mean
from jaxlab.federated.im2col import with_conv_impl

PyTree = Any
GradFn = Callable[..., tuple[tuple[jax.Array, PyTree], PyTree]]  # (p, state, batch, rng) -> ((loss, state), grads)
LossFn = Callable[[PyTree, dict[str, jax.Array], jax.Array], jax.Array]
StatefulLossFn = Callable[[PyTree, PyTree, dict[str, jax.Array], jax.Array], tuple[jax.Array, PyTree]]


class ServerState(NamedTuple):
    """params; opt_state (server optimizer); control (SCAFFOLD's c, else {}); client_states [K, ...]; round;
    model_state (non-trained model state such as BatchNorm statistics, {} if none)."""

    params: PyTree
    opt_state: PyTree
    control: PyTree
    client_states: PyTree
    round: int
    model_state: PyTree = {}


class RoundPlan(NamedTuple):
    """client_ids [M] int32 (sorted), stays [M] bool (False = dropped), key: the round's RNG key."""

    client_ids: np.ndarray
    stays: np.ndarray
    key: jax.Array


class Algorithm(NamedTuple):
    init: Callable[..., ServerState]  # init(params, num_clients, model_state=None)
    apply: Callable[
        [ServerState, C.ClientData, RoundPlan], tuple[ServerState, dict[str, jax.Array]]
    ]
    client_update: Callable[..., tuple[PyTree, C.ClientOutput]]
    broadcast: Callable[[ServerState], PyTree]


def plan_round(
    seed: int,
    round_index: int,
    num_clients: int,
    per_round: int | None = None,
    *,
    dropout_prob: float = 0.0,
    dropped: Sequence[int] = (),
) -> RoundPlan:
    """Sampled clients, who drops, and the round key: all a function of (seed, round_index)."""
    ids = C.sample_clients(seed, round_index, num_clients, per_round or num_clients)
    stays = C.dropout_mask(seed, round_index, ids, prob=dropout_prob, dropped=dropped)
    return RoundPlan(ids, stays, C.round_key(seed, round_index))


def server_optimizer(
    name: str = "sgd",
    lr: float = 1.0,
    *,
    momentum: float = 0.9,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-3,
) -> optax.GradientTransformation:
    """sgd (plain FedAvg at lr=1), fedavgm (sgd + momentum), fedadam (adam; eps = Reddi et al.'s tau)."""
    if name == "sgd":
        return optax.sgd(lr)
    if name == "fedavgm":
        return optax.sgd(lr, momentum=momentum)
    if name == "fedadam":
        return optax.adam(lr, b1=b1, b2=b2, eps=eps)
    raise ValueError(f"unknown server optimizer {name!r}; valid: ['fedadam', 'fedavgm', 'sgd']")


def _sub(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.subtract, a, b)


def _add(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.add, a, b)


def _sq_norm(tree: PyTree) -> jax.Array:
    return sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree))


def _stack(tree: PyTree, num_clients: int) -> PyTree:
    return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (num_clients, *x.shape)), tree)


def _sgd_step(grad_fn: GradFn, tx: optax.GradientTransformation):
    """step((params, model_state, opt_state), batch, rng) for local_train, with
    grad_fn(params, model_state, batch, rng) -> ((loss, model_state), grads)."""

    def step(carry, batch, rng):
        params, model_state, opt_state = carry
        (loss, model_state), grads = grad_fn(params, model_state, batch, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), model_state, opt_state), {"loss": loss}

    return step


def with_state(loss_fn: LossFn) -> StatefulLossFn:
    """A stateless loss_fn(params, batch, rng) as the stateful form, carrying the state unchanged."""
    return lambda params, model_state, batch, rng: (loss_fn(params, batch, rng), model_state)


def local_update(
    loss_fn: LossFn,
    client_tx: optax.GradientTransformation,
    *,
    mu: float = 0.0,
    persist_opt_state: bool = False,
    stateful: bool = False,
) -> Callable[..., tuple[PyTree, C.ClientOutput]]:
    """FedAvg / FedProx client: local steps on loss + mu/2 ||w - w_g||^2;
    update = {"params": w - w_g, "model_state": s - s_g}.

    With persist_opt_state the client optimizer state lives in the client state across rounds (the
    fl_vs_splitnn reference); otherwise it is re-initialised every round and the client state is {}.
    stateful: loss_fn(params, model_state, batch, rng) -> (loss, model_state) (see the module doc).
    """
    stateful_loss = loss_fn if stateful else with_state(loss_fn)

    def make_grad_fn(w_g: PyTree) -> GradFn:
        def loss(p, s, batch, r):
            value, s = stateful_loss(p, s, batch, r)
            return value + 0.5 * mu * _sq_norm(_sub(p, w_g)), s

        return jax.value_and_grad(loss, has_aux=True)

    return local_update_from_grads(make_grad_fn, client_tx, persist_opt_state=persist_opt_state)


def local_update_from_grads(
    make_grad_fn: Callable[[PyTree], GradFn],
    client_tx: optax.GradientTransformation,
    *,
    persist_opt_state: bool = False,
) -> Callable[..., tuple[PyTree, C.ClientOutput]]:
    """A FedAvg-style client from make_grad_fn(w_global) -> grad_fn(params, model_state, batch, rng)
    -> ((loss, model_state), grads).

    Used by local_update (joint value_and_grad) and by SplitFed (gradients through the cut).
    """

    def client_update(broadcast, client_state, data: C.ClientData, rng):
        w_g, s_g = broadcast["params"], broadcast["model_state"]
        opt_state = client_state["opt"] if persist_opt_state else client_tx.init(w_g)
        step = _sgd_step(make_grad_fn(w_g), client_tx)
        (w, s, opt_state), metrics = C.local_train(
            step, (w_g, s_g, opt_state), data.batches, data.step_mask, rng
        )
        new_state = {"opt": opt_state} if persist_opt_state else {}
        weight = data.num_samples.astype(jnp.float32)
        update = {"params": _sub(w, w_g), "model_state": _sub(s, s_g)}
        return new_state, C.ClientOutput(update, weight, metrics)

    return client_update


def scaffold_update(loss_fn: LossFn, lr: float) -> Callable[..., tuple[PyTree, C.ClientOutput]]:
    """SCAFFOLD client (option II): y <- y - lr (g(y) - c_i + c); c_i+ = c_i - c + (x - y) / (steps * lr).

    update = {"params": y - x, "control": c_i+ - c_i}; client state = {"control": c_i}.
    """
    grad_fn = jax.value_and_grad(with_state(loss_fn), has_aux=True)

    def client_update(broadcast, client_state, data: C.ClientData, rng):
        x, c = broadcast["params"], broadcast["control"]
        c_i = client_state["control"]

        def corrected(p, s, batch, r):
            aux, g = grad_fn(p, s, batch, r)
            return aux, jax.tree_util.tree_map(lambda g_, ci, c_: g_ - ci + c_, g, c_i, c)

        step = _sgd_step(corrected, optax.sgd(lr))
        (y, _, _), metrics = C.local_train(
            step, (x, {}, optax.sgd(lr).init(x)), data.batches, data.step_mask, rng
        )
        steps = jnp.maximum(data.step_mask.sum(), 1).astype(jnp.float32)
        c_new = jax.tree_util.tree_map(
            lambda ci, c_, x_, y_: ci - c_ + (x_ - y_) / (steps * lr), c_i, c, x, y
        )
        update = {"params": _sub(y, x), "control": _sub(c_new, c_i)}
        return {"control": c_new}, C.ClientOutput(
            update, data.num_samples.astype(jnp.float32), metrics
        )

    return client_update


def _server_step(server_tx: optax.GradientTransformation):
    @jax.jit
    def step(params, opt_state, delta, any_accepted):
        pseudo_grad = jax.tree_util.tree_map(jnp.negative, delta)
        updates, new_opt = server_tx.update(pseudo_grad, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        return C.tree_where(any_accepted, new_params, params), C.tree_where(
            any_accepted, new_opt, opt_state
        )

    return step


def _client_metrics(outputs: C.ClientOutput, accepted: jax.Array) -> dict[str, jax.Array]:
    """Client metrics averaged (uniformly) over accepted clients."""
    n = jnp.maximum(accepted.sum(), 1)
    return {k: jnp.where(accepted, v, 0.0).sum() / n for k, v in outputs.metrics.items()}


def make_algorithm(
    client_update,
    init_client_state,
    server_tx,
    aggregator,
    *,
    uniform_weights: bool = False,
    scaffold: bool = False,
    chunk_size: int = 16,
    mesh: Mesh | None = None,
    conv_impl: str = "im2col",
) -> Algorithm:
    """(init, apply) from a client function, its initial per-client state fn(params) -> state, a server
    optimizer and an aggregator; scaffold=True adds the server control variate update.

    conv_impl (see jaxlab.federated.im2col): the returned Algorithm.client_update is the wrapped client
    function, so a per-client loop over it computes exactly what the vmapped round does."""
    client_update = with_conv_impl(client_update, conv_impl)
    round_fn = C.make_round(client_update, chunk_size=chunk_size, mesh=mesh, conv_impl="lax")
    server_step = _server_step(server_tx)

    def init(params, num_clients: int, model_state: PyTree = None) -> ServerState:
        control = jax.tree_util.tree_map(jnp.zeros_like, params) if scaffold else {}
        if scaffold and model_state:
            raise ValueError("SCAFFOLD here is stateless: model_state (e.g. BatchNorm statistics) is not supported")
        return ServerState(
            params,
            server_tx.init(params),
            control,
            _stack(init_client_state(params), num_clients),
            0,
            {} if model_state is None else model_state,
        )

    def broadcast(state: ServerState) -> PyTree:
        return {"params": state.params, "control": state.control, "model_state": state.model_state}

    def apply(state: ServerState, data: C.ClientData, plan: RoundPlan):
        client_states, out, accepted, metrics = round_fn(
            broadcast(state),
            state.client_states,
            data,
            jnp.asarray(plan.client_ids),
            jnp.asarray(plan.stays),
            plan.key,
        )
        weights = jnp.ones_like(out.weight) if uniform_weights else out.weight
        delta = aggregator(out.update["params"], weights, accepted)
        params, opt_state = server_step(state.params, state.opt_state, delta, accepted.any())
        model_state = state.model_state
        if model_state:  # the aggregate of the clients' states (FedAvg of buffers), no server optimizer
            ds = aggregator(out.update["model_state"], weights, accepted)
            model_state = C.tree_where(accepted.any(), _add(model_state, ds), model_state)
        control = state.control
        if scaffold:  # c <- c + |S|/N mean_S(dc), over the accepted clients S
            num_clients = jax.tree_util.tree_leaves(data.step_mask)[0].shape[0]
            dc = weighted_mean(out.update["control"], jnp.ones_like(out.weight), accepted)
            frac = accepted.sum() / num_clients
            control = jax.tree_util.tree_map(lambda c, d: c + frac * d, control, dc)
        metrics = {**metrics, **_client_metrics(out, accepted)}
        new = ServerState(params, opt_state, control, client_states, state.round + 1, model_state)
        return new, metrics

    return Algorithm(init, apply, client_update, broadcast)


def fedavg(
    loss_fn: LossFn,
    client_tx: optax.GradientTransformation,
    *,
    server_tx: optax.GradientTransformation | None = None,
    aggregator: Aggregator = weighted_mean,
    mu: float = 0.0,
    persist_opt_state: bool = False,
    stateful: bool = False,
    chunk_size: int = 16,
    mesh: Mesh | None = None,
    conv_impl: str = "im2col",
) -> Algorithm:
    """FedAvg (mu = 0) or FedProx (mu > 0), sample-weighted, with a server optimizer (default sgd(1.0)).
    stateful: loss_fn(params, model_state, batch, rng) -> (loss, model_state), states FedAvg'd."""
    if mu < 0:
        raise ValueError(f"FedProx mu must be >= 0, got {mu}")
    update = local_update(
        loss_fn, client_tx, mu=mu, persist_opt_state=persist_opt_state, stateful=stateful
    )
    init_state = (lambda p: {"opt": client_tx.init(p)}) if persist_opt_state else (lambda p: {})
    return make_algorithm(
        update,
        init_state,
        server_tx or server_optimizer(),
        aggregator,
        uniform_weights=False,
        scaffold=False,
        chunk_size=chunk_size,
        mesh=mesh,
        conv_impl=conv_impl,
    )


def fedprox(
    loss_fn: LossFn, client_tx: optax.GradientTransformation, *, mu: float = 0.01, **kw
) -> Algorithm:
    """FedProx: FedAvg with the proximal term mu/2 ||w - w_g||^2 in every client's loss."""
    return fedavg(loss_fn, client_tx, mu=mu, **kw)


def scaffold(
    loss_fn: LossFn,
    lr: float,
    *,
    server_lr: float = 1.0,
    uniform_weights: bool = True,
    aggregator: Aggregator = weighted_mean,
    chunk_size: int = 16,
    mesh: Mesh | None = None,
    conv_impl: str = "im2col",
) -> Algorithm:
    """SCAFFOLD with client SGD at lr and a global step server_lr; controls start at zero."""
    init_state = lambda p: {"control": jax.tree_util.tree_map(jnp.zeros_like, p)}
    return make_algorithm(
        scaffold_update(loss_fn, lr),
        init_state,
        optax.sgd(server_lr),
        aggregator,
        uniform_weights=uniform_weights,
        scaffold=True,
        chunk_size=chunk_size,
        mesh=mesh,
        conv_impl=conv_impl,
    )
