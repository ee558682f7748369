"""One RoS-FL round (rosfl.md "Round"), on jaxlab.federated's chain and vmapped client axis.

Every client k starts from the global [head, body, tail]; the server keeps one body replica per client
(SFL-V1), so clients are independent and run as one `jax.vmap`: each runs its local epoch with
`chain.make_chain_step` (its own head/tail optimizers and its body replica's optimizer, all persistent
over rounds, torch-style Adam lr 1e-4, wd 1e-8) through `clients.local_train`. Then optional Laplace
noise on each client's head and tail weights (DC-SFL's `add_noise`, scale `laplace_scale`), equal-weight
averaging of head, body and tail, and DWCS (jaxlab.methods.rosfl.dwcs). The server-side Paillier
encryption of DC-SFL is not simulated (it changes bytes, not values: `round_bytes_formula` counts 4-byte floats).

Bytes of a round (rosfl.md): sum_k steps_k * B * 2 (d_head + d_body) b from the chain's measured
messages, plus 2 K (|W_head| + |W_tail|) b for the head/tail weights each client uploads and downloads
(the body never leaves the server).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlab.federated import chain
from jaxlab.federated import clients as C
from jaxlab.methods.rosfl import dwcs

PyTree = Any


@flax.struct.dataclass
class RosflState:
    """params: global [head, body, tail]; client_opt: per-part optimizer states stacked [K, ...];
    correction: DWCS state; round: the index of the next round."""

    params: list
    client_opt: list
    correction: dwcs.DWCSState
    round: jax.Array


def init(params: Sequence[PyTree], num_clients: int, tx: optax.GradientTransformation,
         correction_tx: optax.GradientTransformation) -> RosflState:
    opt = [tx.init(p) for p in params]
    stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_clients,) + jnp.shape(x)), opt)
    return RosflState(list(params), stacked, dwcs.init(params, correction_tx), jnp.zeros((), jnp.int32))


def param_count(tree: PyTree) -> int:
    return int(sum(np.prod(jnp.shape(x)) for x in jax.tree.leaves(tree)))


def make_round(parts: Sequence[chain.Part], loss_fn, tx: optax.GradientTransformation,
               correction_tx: optax.GradientTransformation, *, mu: float = 1e-4,
               dwcs_parts: Sequence[str] = dwcs.PART_NAMES, laplace_scale: float = 0.0):
    """round(state, data: ClientData [K, S, B, ...] with batches {"x", "y"}, rng) -> (state, metrics).

    dwcs_parts: the parts DWCS corrects (("body",) = the released code; () = no DWCS).
    metrics: loss (mean over clients), per-client loss [K], bytes_<kind> summed over clients and steps,
    bytes_weights (2 K (|head| + |tail|) * 4), drift_<part> = ||w_new - w_old|| of each global part.
    """
    step = chain.make_chain_step(parts, loss_fn, [tx] * len(parts))
    names = dwcs.PART_NAMES

    def client(params, opt_state, batches, step_mask, rng):
        state = {"params": list(params), "opt_state": list(opt_state), "model_state": [{}] * len(parts)}
        state, metrics = C.local_train(step, state, batches, step_mask, rng)
        steps = step_mask.sum()
        metrics = {k: (v * steps if k.startswith("bytes_") else v) for k, v in metrics.items()}
        return state["params"], state["opt_state"], metrics

    def laplace(tree, key):
        leaves, treedef = jax.tree.flatten(tree)
        keys = jax.random.split(key, len(leaves))
        noisy = [x + laplace_scale * jax.random.laplace(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
        return jax.tree.unflatten(treedef, noisy)

    def round_fn(state: RosflState, data: C.ClientData, rng: jax.Array):
        num = data.step_mask.shape[0]
        keys = jax.vmap(lambda k: jax.random.fold_in(rng, k))(jnp.arange(num))
        params, opt, metrics = jax.vmap(client, in_axes=(None, 0, 0, 0, 0))(
            state.params, state.client_opt, data.batches, data.step_mask, keys)
        if laplace_scale > 0:
            noise_keys = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, 1 << 20), 2))(keys)
            params[0] = jax.vmap(laplace)(params[0], noise_keys[:, 0])
            params[2] = jax.vmap(laplace)(params[2], noise_keys[:, 1])
        averaged = [jax.tree.map(lambda x: x.mean(0), p) for p in params]
        corrected, correction = dwcs.apply(averaged, state.correction, state.round, correction_tx, mu=mu,
                                           parts=dwcs_parts, names=names)
        out = {"loss": metrics["loss"].mean(), "client_loss": metrics["loss"]}
        out |= {k: v.sum() for k, v in metrics.items() if k.startswith("bytes_")}
        head_tail = param_count(state.params[0]) + param_count(state.params[2])
        out["bytes_weights"] = jnp.asarray(2 * num * head_tail * 4, jnp.float32)
        for name, new, old in zip(names, corrected, state.params):
            diff = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.sum((a - b) ** 2), new, old))
            out[f"drift_{name}"] = jnp.sqrt(sum(diff))
        return RosflState(corrected, opt, correction, state.round + 1), out

    return round_fn


def round_bytes_formula(examples_per_client: Sequence[int], d_head: int, d_body: int, head_params: int,
                        tail_params: int, float_bytes: int = 4) -> int:
    """rosfl.md: sum_k n_k 2 (d_head + d_body) b + 2 K (|W_head| + |W_tail|) b."""
    k = len(examples_per_client)
    return (sum(examples_per_client) * 2 * (d_head + d_body) * float_bytes
            + 2 * k * (head_params + tail_params) * float_bytes)
