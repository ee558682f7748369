"""Split learning as a chain of N parts, each owned by the client or the server.

    parts = [Part(head, "client"), Part(body, "server"), Part(tail, "client")]   # U-shaped (RoS-FL)
    part.apply(params, state, x, rng) -> (y, state)       state: non-trained collections ({} if none)
    loss_fn(outputs, labels) -> (loss (), metrics {name: ()})   computed by the owner of the last part

Forward part by part, backward with one jax.vjp per part (no joint value_and_grad): every owner
differentiates only its own parts, and what crosses between owners is recorded as a `Message`:
at each boundary where the owner changes, the activation goes forward (direction "up" client->server,
"down" server->client) and d loss / d activation comes back the other way. Consecutive parts with the
same owner exchange nothing. Part i runs with rng fold_in(rng, i).

U-shaped split (rosfl.md, "Per batch on the wire"): head activation up, body output down, d loss /
d body-output up, d loss / d head-activation down; labels and outputs never leave the client, so by
default (`labels_to="client"`) the last part must be client-owned. The vanilla two-part SplitNN
(split.py, fl_vs_splitnn.md) is the N=2 chain [client head, server rest] with `labels_to="server"`:
the server computes the loss and the labels go up (LABEL_BYTES per label).

Client-held skips (RoS-FL's U-Net variant keeps the encoder's skip features on the client; RED-CNN's
tail adds the client's own input image): `Part(apply, owner, keep_for=j)` makes the part return
((sent, kept), state); only `sent` moves on (and crosses, if the owner changes), `kept` stays with the
owner and part j (same owner, later) receives x = (incoming, kept). The gradient of `kept` flows back
locally, the gradient message carries d loss / d sent only.

Bytes (per example, b bytes a float, l a label, d_i floats at cut i): at each owner change,
d_i * b forward and d_i * b back; U-shape: 2 (d_head + d_body) b, no labels (rosfl.md); vanilla
SplitNN: 2 d b + l (fl_vs_splitnn.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxlab.federated.split import FLOAT_BYTES, LABEL_BYTES

PyTree = Any
OWNERS = ("client", "server")
BYTE_KINDS = ("activation_up", "activation_down", "gradient_up", "gradient_down", "labels_up")


@dataclasses.dataclass(frozen=True)
class Part:
    """One piece of the chain: apply(params, state, x, rng) -> (y, state), run by `owner`.

    keep_for: index of a later part of the same owner that receives something this part keeps
    (a client-held skip); then apply returns ((y, kept), state) and only y moves on.
    """

    apply: Callable[..., tuple[Any, PyTree]]
    owner: str
    keep_for: int | None = None

    def __post_init__(self):
        if self.owner not in OWNERS:
            raise ValueError(f"Part owner {self.owner!r} is not one of {OWNERS}")


@flax.struct.dataclass
class Message:
    """What crossed an owner boundary: direction "up" (client->server) or "down"; kind "activation",
    "gradient" or "labels"; the array (B, ...) (a pytree of them if a part outputs one); cut i =
    the boundary after part i (labels: the last part's index, they go to the loss)."""

    direction: str = flax.struct.field(pytree_node=False)
    kind: str = flax.struct.field(pytree_node=False)
    array: jax.Array
    cut: int = flax.struct.field(pytree_node=False)


class ChainResult(NamedTuple):
    """loss (); metrics {name: ()} from loss_fn; grads[i] and states[i] of part i; messages in the
    order they are sent (activations forward, labels, gradients backward)."""

    loss: jax.Array
    metrics: dict[str, jax.Array]
    grads: list[PyTree]
    states: list[PyTree]
    messages: tuple[Message, ...]


def _direction(sender: str, receiver: str) -> str:
    return "up" if (sender, receiver) == ("client", "server") else "down"


def check_owners(owners: Sequence[str], labels_to: str = "client") -> None:
    """Raises ValueError unless the input starts on the client and the loss runs where the labels are."""
    if not owners:
        raise ValueError("a chain needs at least one part")
    if labels_to not in OWNERS:
        raise ValueError(f"labels_to={labels_to!r} is not one of {OWNERS}")
    bad = [o for o in owners if o not in OWNERS]
    if bad:
        raise ValueError(f"owners {bad} are not in {OWNERS}")
    if owners[0] != "client":
        raise ValueError(
            "the first part is server-owned: the input is the client's data and would have to be sent"
            " up; start the chain with a client-owned part"
        )
    if owners[-1] == "server" and labels_to == "client":
        raise ValueError(
            "the last part is server-owned, so the server would compute the loss and need the labels,"
            " but labels never leave the client (labels_to='client'): end the chain with a"
            " client-owned part (U-shaped split) or pass labels_to='server' (vanilla SplitNN, labels"
            " sent up)"
        )
    if owners[-1] == "client" and labels_to == "server":
        raise ValueError(
            "labels_to='server' but the last part is client-owned: the client computes the loss with"
            " its own labels, nothing to send; use labels_to='client'"
        )


def check_chain(parts: Sequence[Part], labels_to: str = "client") -> dict[int, int]:
    """Validates owners and keep_for links; returns {receiving part: keeping part}."""
    check_owners([p.owner for p in parts], labels_to)
    sources: dict[int, int] = {}
    for i, part in enumerate(parts):
        j = part.keep_for
        if j is None:
            continue
        if not i < j < len(parts):
            raise ValueError(
                f"part {i} has keep_for={j}: it must name a later part (< {len(parts)})"
            )
        if parts[j].owner != part.owner:
            raise ValueError(
                f"part {i} ({part.owner}) keeps a value for part {j} ({parts[j].owner}): kept values"
                " stay with their owner"
            )
        if j in sources:
            raise ValueError(
                f"parts {sources[j]} and {i} both keep a value for part {j}; one at most"
            )
        sources[j] = i
    return sources


def _split_kept(out, i: int):
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError(
            f"part {i} has keep_for set, so its apply must return ((sent, kept), state); got output"
            f" of type {type(out).__name__}"
        )
    return out


def _part_vjp(part: Part, params, state, inputs, rng, i: int):
    """(output, vjp, new state) of one part; part 0's vjp is wrt its params only (the input is data)."""
    if i == 0:
        return jax.vjp(lambda p: part.apply(p, state, inputs, rng), params, has_aux=True)
    return jax.vjp(lambda p, a: part.apply(p, state, a, rng), params, inputs, has_aux=True)


def chain_grads(
    parts: Sequence[Part],
    loss_fn: Callable[[Any, Any], tuple[jax.Array, dict[str, jax.Array]]],
    params: Sequence[PyTree],
    states: Sequence[PyTree],
    x: jax.Array,
    labels: jax.Array,
    rng: jax.Array,
    *,
    labels_to: str = "client",
) -> ChainResult:
    """One split forward/backward over the chain: x (B, ...) into part 0, loss_fn on the last output.

    Each part is differentiated by its own jax.vjp (part 0 with respect to its params only: the input
    never needs a gradient); the messages at owner changes are recorded in ChainResult.messages.
    """
    sources = check_chain(parts, labels_to)
    n = len(parts)
    for name, seq in (("params", params), ("states", states)):
        if len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries for {n} parts")

    vjps, new_states, messages, kept = [], [], [], {}
    h = x
    for i, part in enumerate(parts):
        inputs = (h, kept.pop(i)) if i in sources else h
        out, vjp, state = _part_vjp(
            part, params[i], states[i], inputs, jax.random.fold_in(rng, i), i
        )
        if part.keep_for is not None:
            h, kept[part.keep_for] = _split_kept(out, i)
        else:
            h = out
        vjps.append(vjp)
        new_states.append(state)
        if i + 1 < n and part.owner != parts[i + 1].owner:
            messages.append(Message(_direction(part.owner, parts[i + 1].owner), "activation", h, i))

    if labels_to == "server":
        messages.append(Message("up", "labels", labels, n - 1))
    loss, loss_vjp, metrics = jax.vjp(lambda o: loss_fn(o, labels), h, has_aux=True)
    if jnp.shape(loss) != ():
        raise ValueError(f"loss_fn must return a scalar loss, got shape {jnp.shape(loss)}")
    (g,) = loss_vjp(jnp.ones_like(loss))

    grads, kept_grads = [None] * n, {}
    for i in reversed(range(n)):
        if i + 1 < n and parts[i].owner != parts[i + 1].owner:
            messages.append(
                Message(_direction(parts[i + 1].owner, parts[i].owner), "gradient", g, i)
            )
        cotangent = (g, kept_grads.pop(i)) if parts[i].keep_for is not None else g
        if i == 0:
            (grads[0],) = vjps[0](cotangent)
            continue
        grads[i], g = vjps[i](cotangent)
        if i in sources:
            g, kept_grads[sources[i]] = g
    return ChainResult(loss, metrics, grads, new_states, tuple(messages))


def message_bytes(
    result: ChainResult, *, float_bytes: int | None = None, label_bytes: int = LABEL_BYTES
) -> dict[str, int]:
    """Bytes that crossed, by kind (BYTE_KINDS) and "total", measured from the messages' arrays.

    Activations and gradients: elements x float_bytes (None: each array's own dtype size); labels:
    elements x label_bytes (8: int64 labels, as the papers' reference code sends them).
    """
    out = dict.fromkeys(BYTE_KINDS, 0)
    for m in result.messages:
        key = "labels_up" if m.kind == "labels" else f"{m.kind}_{m.direction}"
        for leaf in jax.tree_util.tree_leaves(m.array):
            if m.kind == "labels":
                per = label_bytes
            else:
                per = jnp.dtype(leaf.dtype).itemsize if float_bytes is None else float_bytes
            out[key] += int(jnp.size(leaf)) * per
    out["total"] = sum(out.values())
    return out


def chain_bytes_per_example(
    cut_sizes: Sequence[int],
    owners: Sequence[str],
    *,
    labels_to: str = "client",
    float_bytes: int = FLOAT_BYTES,
    label_bytes: int = LABEL_BYTES,
    labels_per_example: int = 1,
) -> dict[str, int]:
    """Closed form of message_bytes for one example, by kind and "total".

    cut_sizes[i]: floats per example of part i's output (the sent part), i < len(owners) - 1.
    At each owner change d_i * b goes forward and d_i * b back; labels_to="server" adds
    labels_per_example * l up. U-shape: 2 (d_head + d_body) b; SplitNN: 2 d b + l.
    """
    check_owners(owners, labels_to)
    if len(cut_sizes) != len(owners) - 1:
        raise ValueError(
            f"cut_sizes has {len(cut_sizes)} entries; {len(owners)} parts have {len(owners) - 1} cuts"
        )
    out = dict.fromkeys(BYTE_KINDS, 0)
    for i, d in enumerate(cut_sizes):
        sender, receiver = owners[i], owners[i + 1]
        if sender != receiver:
            out[f"activation_{_direction(sender, receiver)}"] += d * float_bytes
            out[f"gradient_{_direction(receiver, sender)}"] += d * float_bytes
    if labels_to == "server":
        out["labels_up"] = labels_per_example * label_bytes
    out["total"] = sum(out.values())
    return out


def init_chain_state(
    params: Sequence[PyTree],
    txs: Sequence[optax.GradientTransformation],
    model_states: Sequence[PyTree] | None = None,
) -> dict[str, list]:
    """{"params": [...], "opt_state": [tx_i.init(params_i)], "model_state": [... or {}]}, one per part."""
    if len(txs) != len(params):
        raise ValueError(f"{len(txs)} optimizers for {len(params)} parts")
    model_states = [{} for _ in params] if model_states is None else list(model_states)
    if len(model_states) != len(params):
        raise ValueError(f"model_states has {len(model_states)} entries for {len(params)} parts")
    return {
        "params": list(params),
        "opt_state": [tx.init(p) for tx, p in zip(txs, params)],
        "model_state": model_states,
    }


def make_chain_step(
    parts: Sequence[Part],
    loss_fn: Callable[[Any, Any], tuple[jax.Array, dict[str, jax.Array]]],
    txs: Sequence[optax.GradientTransformation],
    *,
    labels_to: str = "client",
    float_bytes: int | None = None,
    label_bytes: int = LABEL_BYTES,
) -> Callable[[dict, dict, jax.Array], tuple[dict, dict[str, jax.Array]]]:
    """Pure, un-jitted step(state, batch {"x": (B, ...), "y": (B, ...)}, rng) -> (state, metrics).

    state: init_chain_state's {"params", "opt_state", "model_state"} lists; part i's optimizer txs[i]
    updates part i's params from its own chain_grads gradients. metrics: loss, loss_fn's metrics and
    "bytes_<kind>" for every kind of message_bytes (float32 scalars).
    """
    check_chain(parts, labels_to)
    if len(txs) != len(parts):
        raise ValueError(f"{len(txs)} optimizers for {len(parts)} parts")

    def step(state, batch, rng):
        r = chain_grads(
            parts,
            loss_fn,
            state["params"],
            state["model_state"],
            batch["x"],
            batch["y"],
            rng,
            labels_to=labels_to,
        )
        params, opt_state = [], []
        for tx, p, o, g in zip(txs, state["params"], state["opt_state"], r.grads):
            updates, o = tx.update(g, o, p)
            params.append(optax.apply_updates(p, updates))
            opt_state.append(o)
        sent = message_bytes(r, float_bytes=float_bytes, label_bytes=label_bytes)
        metrics = {
            **r.metrics,
            "loss": r.loss,
            **{f"bytes_{k}": jnp.asarray(v, jnp.float32) for k, v in sent.items()},
        }
        return {"params": params, "opt_state": opt_state, "model_state": list(r.states)}, metrics

    return step
