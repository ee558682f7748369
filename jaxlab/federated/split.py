"""Split learning: the client half runs jax.vjp at the cut, the server differentiates its loss with
respect to its params and the cut activation and returns the activation gradient.

    client_apply(client_params, x, rng) -> activation (B, ...)        (what crosses up, with labels)
    server_loss(server_params, activation, labels, rng) -> scalar      (d loss / d activation crosses down)

The halves as the engine takes them (non-trained model state such as BatchNorm statistics, {} if none):
    client_apply(client_params, client_state, x, rng) -> (activation, client_state)
    server_loss(server_params, server_state, activation, labels, rng) -> (loss, server_state)
The client state stays with the client half (relayed and averaged with its weights), the server state
with the server half. (`split_grads` keeps a stateless convenience form for stateless halves.)

Vanilla SplitNN (fl_vs_splitnn.md): clients take turns (lax.scan over clients), client weights are relayed
from one client to the next, one server model and optimizer; each client keeps its own client optimizer
state; `make_splitnn_epoch` returns a pure, un-jitted epoch(state, data, rng) -> (state, metrics): a
trainer step. SplitFed V1: every client trains a client half and its own server replica (vmapped over
the client axis: jaxlab.federated.algorithms.fedavg with the split gradients), both FedAvg'd after the
round. SplitFed V2: one shared server takes
the clients in turn, each client starts from the round's client weights, client halves FedAvg'd.
Byte accounting (b bytes a float, l bytes a label, fl_vs_splitnn.md):
    FL per round = 2*K*|W|*b;  vanilla SplitNN per epoch = sum_k n_k*(2*d*b + l) + 2*K*|W_c|*b.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxlab.federated import clients as C
from jaxlab.federated.aggregators import NormBound, weighted_mean
from jaxlab.federated.algorithms import base as B
from jaxlab.federated.algorithms import fedavg
from jaxlab.train.state import param_count

PyTree = Any
FLOAT_BYTES = 4
LABEL_BYTES = 8  # int64 labels, as in the reference


class SplitGrads(NamedTuple):
    """loss (); client/server param grads; activation (B, ...) and its gradient (B, ...)."""

    loss: jax.Array
    client: PyTree
    server: PyTree
    activation: jax.Array
    activation_grad: jax.Array


def _with_state(client_apply, server_loss):
    """Stateless (client_apply, server_loss) in the stateful form, carrying their states unchanged."""
    return (
        lambda p, s, x, rng: (client_apply(p, x, rng), s),
        lambda p, s, a, y, rng: (server_loss(p, a, y, rng), s),
    )


def split_grads_with_state(
    client_apply, server_loss, client_params, client_state, server_params, server_state, x, y, rng
) -> tuple[SplitGrads, PyTree, PyTree]:
    """One split forward/backward with model state: vjp on the client, value_and_grad (params,
    activation) on the server. Returns the gradients and the new client and server states."""
    c_rng, s_rng = jax.random.split(rng)
    activation, client_vjp, client_state = jax.vjp(
        lambda p: client_apply(p, client_state, x, c_rng), client_params, has_aux=True
    )
    server_fn = jax.value_and_grad(
        lambda p, a: server_loss(p, server_state, a, y, s_rng), argnums=(0, 1), has_aux=True
    )
    (loss, server_state), (server_g, activation_g) = server_fn(server_params, activation)
    (client_g,) = client_vjp(activation_g)
    return SplitGrads(loss, client_g, server_g, activation, activation_g), client_state, server_state


def split_grads(client_apply, server_loss, client_params, server_params, x, y, rng) -> SplitGrads:
    """One split forward/backward: vjp on the client, value_and_grad (params, activation) on the server."""
    client_fn, server_fn = _with_state(client_apply, server_loss)
    g, _, _ = split_grads_with_state(client_fn, server_fn, client_params, {}, server_params, {}, x, y, rng)
    return g


@flax.struct.dataclass
class SplitState:
    """round: () int32 (epochs done); client_params, server_params; client_opt [K, ...] (one per
    client); server_opt; client_state and server_state: the halves' non-trained model state ({} if none)."""

    round: jax.Array
    client_params: PyTree
    server_params: PyTree
    client_opt: PyTree
    server_opt: PyTree
    client_state: PyTree
    server_state: PyTree


def init_splitnn(
    client_params,
    server_params,
    client_tx,
    server_tx,
    num_clients: int,
    *,
    client_state: PyTree = None,
    server_state: PyTree = None,
) -> SplitState:
    """The SplitNN state: every client's optimizer state from client_tx.init, stacked [K, ...]."""
    state = SplitState(
        jnp.zeros((), jnp.int32),
        client_params,
        server_params,
        B.stack(client_tx.init(client_params), num_clients),
        server_tx.init(server_params),
        {} if client_state is None else client_state,
        {} if server_state is None else server_state,
    )
    return B.fresh(state)


def make_splitnn_epoch(
    client_apply,
    server_loss,
    client_tx: optax.GradientTransformation,
    server_tx: optax.GradientTransformation,
    *,
    float_bytes: int = FLOAT_BYTES,
    label_bytes: int = LABEL_BYTES,
    relay: bool = True,
):
    """epoch(state, data: ClientData [K, S, B, ...] with batches {"x", "y"}, rng) -> (state, metrics):
    pure and un-jitted (jit-able, a trainer step).

    Client k (in order 0..K-1) trains its S steps with rng fold_in(rng, k) (step s: fold_in of that, s);
    metrics: mean loss and bytes by kind measured from the arrays that cross: activations, labels (up),
    gradients (down), weights (relay, 2 |W_c| b per client turn). Padded steps (step_mask False) send
    nothing. relay=True is vanilla SplitNN (client k starts from client k-1's weights); relay=False is
    SplitFed V2 (every client starts from the epoch's client weights, the one server trains on the
    clients in turn, and the client halves are averaged weighted by sample count at the end). The client
    state is relayed (or averaged) with the client weights and counted with them in the "weights" bytes.
    """

    def step(carry, batch, rng):
        (cp, cs), (sp, ss), co, so = carry
        g, cs, ss = split_grads_with_state(
            client_apply, server_loss, cp, cs, sp, ss, batch["x"], batch["y"], rng
        )
        cu, co = client_tx.update(g.client, co, cp)
        su, so = server_tx.update(g.server, so, sp)
        sent = {
            "loss": g.loss,
            "activations": jnp.asarray(g.activation.size * float_bytes, jnp.float32),
            "labels": jnp.asarray(batch["y"].size * label_bytes, jnp.float32),
            "gradients": jnp.asarray(g.activation_grad.size * float_bytes, jnp.float32),
        }
        new = (optax.apply_updates(cp, cu), cs), (optax.apply_updates(sp, su), ss), co, so
        return new, sent

    def client_turn(carry, xs):
        client, server, so = carry  # client = (client params, client state)
        co, data, rng = xs
        (client_k, server, co, so), m = C.local_train(
            step, (client, server, co, so), data.batches, data.step_mask, rng
        )
        steps = data.step_mask.sum()
        m = {k: v if k == "loss" else v * steps for k, v in m.items()}
        return (client_k if relay else client, server, so), (co, None if relay else client_k, m)

    def epoch(state: SplitState, data: C.ClientData, rng: jax.Array):
        k = data.step_mask.shape[0]
        rngs = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(k))
        carry = (
            (state.client_params, state.client_state),
            (state.server_params, state.server_state),
            state.server_opt,
        )
        ((cp, cs), (sp, ss), so), (co, clients, m) = jax.lax.scan(
            client_turn, carry, (state.client_opt, data, rngs)
        )
        if not relay:  # SplitFed V2: FedAvg of the client halves (and states), weighted by sample count
            cp, cs = weighted_mean(clients, data.num_samples.astype(jnp.float32), jnp.ones(k, bool))
        metrics = {name: v.sum() for name, v in m.items() if name != "loss"}
        relayed = param_count(cp) + param_count(cs)
        metrics["weights"] = jnp.asarray(2 * k * relayed * float_bytes, jnp.float32)
        metrics["loss"] = m["loss"].mean()
        new = SplitState(state.round + 1, cp, sp, co, so, cs, ss)
        return new, metrics

    return epoch


def splitfed_v1(
    client_apply,
    server_loss,
    client_tx: optax.GradientTransformation,
    *,
    server_tx: optax.GradientTransformation | None = None,
    persist_opt_state: bool = False,
    norm_bound: NormBound | None = None,
    chunk_size: int = 16,
    mesh=None,
) -> B.Algorithm:
    """SplitFed V1 over params {"client": ..., "server": ...} (and model state {"client": ..., "server":
    ...} or {}): per-client server replicas, vmapped, FedAvg'd.

    fedavg.build whose clients compute their gradients with split_grads_with_state (client_tx on both
    halves); the fed server averages both halves weighted by sample count. (SplitFed V2, one shared
    server taking the clients in turn, is make_splitnn_epoch(..., relay=False).)
    """

    def states(model_state):
        return model_state.get("client", {}), model_state.get("server", {})

    def joint_loss(params, model_state, batch, rng):  # what the split gradients are the gradients of
        c_rng, s_rng = jax.random.split(rng)
        cs, ss = states(model_state)
        activation, cs = client_apply(params["client"], cs, batch["x"], c_rng)
        loss, ss = server_loss(params["server"], ss, activation, batch["y"], s_rng)
        return loss, ({"client": cs, "server": ss} if model_state else model_state, {})

    def grad_fn(params, model_state, batch, rng):
        cs, ss = states(model_state)
        g, cs, ss = split_grads_with_state(
            client_apply, server_loss, params["client"], cs, params["server"], ss, batch["x"], batch["y"], rng
        )
        new_state = {"client": cs, "server": ss} if model_state else model_state
        return (g.loss, (new_state, {})), {"client": g.client, "server": g.server}

    return fedavg.build(
        joint_loss,
        client_tx,
        server_tx=server_tx,
        persist_opt_state=persist_opt_state,
        grad_fn=grad_fn,
        norm_bound=norm_bound,
        chunk_size=chunk_size,
        mesh=mesh,
    )


def fl_round_bytes(
    num_clients: int, num_params: int, *, float_bytes: int = FLOAT_BYTES
) -> dict[str, int]:
    """FL (FedAvg) per round: every client downloads and uploads |W| floats; total = 2*K*|W|*b."""
    one_way = num_clients * num_params * float_bytes
    return {"weights_down": one_way, "weights_up": one_way, "total": 2 * one_way}


def splitnn_epoch_bytes(
    client_sizes: Sequence[int],
    cut_floats: int,
    client_params: int,
    *,
    float_bytes: int = FLOAT_BYTES,
    label_bytes: int = LABEL_BYTES,
) -> dict[str, int]:
    """Vanilla SplitNN per epoch: sum_k n_k*(2*d*b + l) + 2*K*|W_c|*b, by kind."""
    n = int(sum(client_sizes))
    out = {
        "activations": n * cut_floats * float_bytes,
        "labels": n * label_bytes,
        "gradients": n * cut_floats * float_bytes,
        "weights": 2 * len(client_sizes) * client_params * float_bytes,
    }
    out["total"] = sum(out.values())
    return out
