"""Split learning as a chain: per-part vjp gradients equal jax.grad of the unsplit network, what crosses
(no labels or outputs up in the U-shape), bytes measured = formula, the two-part chain = split.py, the
jitted donated step = a hand-written SGD update."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlab.federated import chain as CH
from jaxlab.federated.split import (
    FLOAT_BYTES,
    LABEL_BYTES,
    split_grads,
    split_grads_with_state,
    splitnn_epoch_bytes,
)

B, CLASSES = 4, 5
# floats per example: head's sent output, body's output, the head's kept skip features
HEAD_OUT, BODY_OUT, SKIP = 36, 12, 4


class Head(nn.Module):
    """(B, 6, 6, 2) -> conv + BatchNorm + relu -> 2x2 pool, flattened (B, 36); with keep: also (B, 4)."""

    keep: bool = False

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.BatchNorm(use_running_average=False)(nn.Conv(4, (3, 3), use_bias=False)(x)))
        sent = nn.avg_pool(h, (2, 2), (2, 2)).reshape(x.shape[0], -1)
        return (sent, h.mean(axis=(1, 2))) if self.keep else sent


class Body(nn.Module):
    """(B, 36) -> Dense + BatchNorm + relu + dropout -> Dense (B, 12)."""

    @nn.compact
    def __call__(self, a):
        h = nn.relu(nn.BatchNorm(use_running_average=False)(nn.Dense(16, use_bias=False)(a)))
        return nn.Dense(BODY_OUT)(nn.Dropout(0.5, deterministic=False)(h))


class Tail(nn.Module):
    """(B, 12) [and the kept (B, 4)] -> Dense logits (B, 5)."""

    keep: bool = False

    @nn.compact
    def __call__(self, a):
        if self.keep:
            a = jnp.concatenate([nn.tanh(a[0]), a[1]], axis=-1)
        return nn.Dense(CLASSES)(a)


def flax_part(module, owner, keep_for=None):
    """Part apply for a flax module: mutable collections are the part's state, rng the dropout key."""

    def apply(params, state, x, rng):
        y, new = module.apply(
            {"params": params, **state}, x, mutable=list(state), rngs={"dropout": rng}
        )
        return y, dict(new)

    return CH.Part(apply, owner, keep_for)


def u_modules(keep):
    return [Head(keep), Body(), Tail(keep)]


def u_parts(keep=False):
    head, body, tail = u_modules(keep)
    return [
        flax_part(head, "client", 2 if keep else None),
        flax_part(body, "server"),
        flax_part(tail, "client"),
    ]


def ce_loss(logits, y):
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, {"accuracy": (logits.argmax(-1) == y).mean()}


def data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, 6, 6, 2)).astype(np.float32)
    y = rng.integers(0, CLASSES, B).astype(np.int32)
    return jnp.asarray(x), jnp.asarray(y)


@functools.cache
def init_u(keep=False):
    """params and states of head, body, tail (lists; cached, jitted: fewer compiles)."""
    return jax.jit(lambda x: _init_u(keep, x))(data()[0])


def _init_u(keep, x):
    head, body, tail = u_modules(keep)
    keys = jax.random.split(jax.random.key(0), 3)
    hv = head.init(keys[0], x)
    sent = head.apply(hv, x, mutable=["batch_stats"])[0]
    bv = body.init({"params": keys[1], "dropout": keys[1]}, sent[0] if keep else sent)
    tail_in = jnp.zeros((B, BODY_OUT))
    tv = tail.init(keys[2], (tail_in, jnp.zeros((B, SKIP))) if keep else tail_in)
    variables = [hv, bv, tv]
    params = [v["params"] for v in variables]
    states = [{k: v for k, v in var.items() if k != "params"} for var in variables]
    return params, states


def unsplit(keep, params, states, x, y, rng):
    """The whole network in one function (head, body, tail composed, part i's dropout key fold_in(rng, i)):
    (loss, (logits, new states, accuracy))."""
    head, body, tail = u_modules(keep)
    r = [jax.random.fold_in(rng, i) for i in range(3)]

    def run(module, i, inputs):
        return module.apply(
            {"params": params[i], **states[i]},
            inputs,
            mutable=list(states[i]),
            rngs={"dropout": r[i]},
        )

    h, s0 = run(head, 0, x)
    b, s1 = run(body, 1, h[0] if keep else h)
    logits, s2 = run(tail, 2, (b, h[1]) if keep else b)
    loss, metrics = ce_loss(logits, y)
    return loss, (logits, [dict(s0), dict(s1), dict(s2)], metrics)


@functools.cache
def u_chain(keep):
    """Jitted chain_grads(params, states, x, y, rng) of the U-chain (cached: one compile per variant)."""
    return jax.jit(lambda p, s, x, y, rng: CH.chain_grads(u_parts(keep), ce_loss, p, s, x, y, rng))


@functools.cache
def u_reference(keep):
    """Jitted value_and_grad of the unsplit network wrt all params: (loss, (logits, states, metrics)), grads."""
    return jax.jit(jax.value_and_grad(functools.partial(unsplit, keep), has_aux=True))


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


@pytest.mark.parametrize("keep", [False, True], ids=["plain", "client_skip"])
def test_u_chain_grads_and_states_equal_unsplit(keep):
    params, states = init_u(keep)
    x, y = data()
    rng = jax.random.key(7)
    r = u_chain(keep)(params, states, x, y, rng)
    (loss, (_, ref_states, metrics)), ref_grads = u_reference(keep)(params, states, x, y, rng)
    np.testing.assert_allclose(r.loss, loss, rtol=1e-6)
    np.testing.assert_allclose(r.metrics["accuracy"], metrics["accuracy"])
    for i in range(3):  # head, body, tail
        assert_trees_close(r.grads[i], ref_grads[i])
    assert_trees_close(r.states, ref_states, rtol=1e-6)
    assert set(r.states[0]) == set(r.states[1]) == {"batch_stats"} and r.states[2] == {}
    # the BatchNorm statistics moved (the states are not just passed through)
    assert not np.allclose(r.states[1]["batch_stats"]["BatchNorm_0"]["mean"], 0)


@jax.jit
def u_sides(params, states, x, y, rng):
    """Each side's own computation in the skip U-net: head's sent and kept outputs, body output,
    d loss / d body output (the tail's gradient), logits."""
    head, body, tail = u_modules(True)
    (sent, skip), _ = head.apply({"params": params[0], **states[0]}, x, mutable=["batch_stats"])
    body_out, _ = body.apply(
        {"params": params[1], **states[1]},
        sent,
        mutable=["batch_stats"],
        rngs={"dropout": jax.random.fold_in(rng, 1)},
    )
    tail_loss = lambda b: ce_loss(tail.apply({"params": params[2]}, (b, skip)), y)[0]
    logits = tail.apply({"params": params[2]}, (body_out, skip))
    return sent, skip, body_out, jax.grad(tail_loss)(body_out), logits


def test_u_chain_messages_carry_no_labels_or_outputs():
    params, states = init_u(keep=True)
    x, y = data()
    rng = jax.random.key(3)
    run = lambda labels: u_chain(True)(params, states, x, labels, rng)
    r = run(y)
    sent, skip, body_out, d_body_out, logits = u_sides(params, states, x, y, rng)

    assert [(m.direction, m.kind, m.cut) for m in r.messages] == [
        ("up", "activation", 0),
        ("down", "activation", 1),
        ("up", "gradient", 1),
        ("down", "gradient", 0),
    ]
    for m in r.messages:
        if m.direction == "up":
            for private in (y, logits, skip):  # labels, outputs, the kept skip features
                assert m.array.shape != private.shape
    # the arrays are what each side computes on its own
    np.testing.assert_allclose(r.messages[0].array, sent, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r.messages[1].array, body_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r.messages[2].array, d_body_out, rtol=1e-5, atol=1e-8)

    # the server's forward does not depend on the labels: same inputs, outputs and state for other labels
    other = run((y + 1) % CLASSES)
    assert not np.allclose(
        other.messages[2].array, r.messages[2].array
    )  # labels did change the loss
    for a, b in zip(r.messages[:2], other.messages[:2]):
        np.testing.assert_array_equal(a.array, b.array)
    assert_trees_close(r.states[1], other.states[1], rtol=0, atol=0)


def test_measured_bytes_equal_formula():
    params, states = init_u()
    x, y = data()
    r = u_chain(False)(params, states, x, y, jax.random.key(0))
    measured = CH.message_bytes(r)
    formula = CH.chain_bytes_per_example([HEAD_OUT, BODY_OUT], ["client", "server", "client"])
    assert measured == {k: B * v for k, v in formula.items()}
    # rosfl.md: 2 (d_head + d_body) b per example, no labels
    assert measured == {
        "activation_up": B * HEAD_OUT * 4,
        "activation_down": B * BODY_OUT * 4,
        "gradient_up": B * BODY_OUT * 4,
        "gradient_down": B * HEAD_OUT * 4,
        "labels_up": 0,
        "total": B * 2 * (HEAD_OUT + BODY_OUT) * 4,
    }


def dense_part(width, owner):
    def apply(params, state, x, rng):
        return jnp.tanh(nn.Dense(width).apply({"params": params}, x)), state

    return CH.Part(apply, owner)


def test_same_owner_neighbours_exchange_nothing():
    """5 parts client, client | server, server | client: messages only at cuts 1 and 3."""
    owners = ["client", "client", "server", "server", "client"]
    widths = [7, 6, 5, 4, CLASSES]
    parts = [dense_part(w, o) for w, o in zip(widths, owners)]
    x = jnp.asarray(np.random.default_rng(1).normal(size=(B, 3)), jnp.float32)
    _, y = data()
    ins = [3, *widths[:-1]]
    init = lambda: [
        nn.Dense(w).init(jax.random.key(i), jnp.zeros((1, d)))["params"]
        for i, (w, d) in enumerate(zip(widths, ins))
    ]
    params = jax.jit(init)()
    r = jax.jit(lambda p: CH.chain_grads(parts, ce_loss, p, [{}] * 5, x, y, jax.random.key(0)))(
        params
    )

    def composed(ps):
        h = x
        for p, w in zip(ps, widths):
            h = jnp.tanh(nn.Dense(w).apply({"params": p}, h))
        return ce_loss(h, y)[0]

    assert_trees_close(r.grads, jax.jit(jax.grad(composed))(params))
    assert [(m.direction, m.kind, m.cut) for m in r.messages] == [
        ("up", "activation", 1),
        ("down", "activation", 3),
        ("up", "gradient", 3),
        ("down", "gradient", 1),
    ]
    per_example = CH.chain_bytes_per_example(widths[:-1], owners)
    assert CH.message_bytes(r) == {k: B * v for k, v in per_example.items()}
    assert per_example["total"] == 2 * (6 + 4) * 4


@pytest.mark.parametrize("stateful", [False, True])
def test_two_part_labels_to_server_equals_split(stateful):
    """The N=2 chain [client head, server body+tail+loss] with labels_to="server" is split.py's SplitNN."""
    params, states = init_u()
    if not stateful:
        states = [{}, {"batch_stats": states[1]["batch_stats"]}, {}]
    head, body, tail = u_modules(False)
    x, y = data()
    rng = jax.random.key(5)

    fixed = init_u()[1][0]

    def head_apply(p, s, a, r):
        if not s:  # stateless head: BatchNorm statistics of a fixed state, not returned
            return head.apply({"params": p, **fixed}, a, mutable=["batch_stats"])[0], s
        out, new = head.apply({"params": p, **s}, a, mutable=["batch_stats"])
        return out, dict(new)

    def server_apply(p, s, a, r):  # deterministic: split.py and the chain fold the rng differently
        h, new = body.apply(
            {"params": p["body"], **s},
            a,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(9)},
        )
        return tail.apply({"params": p["tail"]}, h), dict(new)

    def server_loss(p, s, a, labels, r):
        logits, s = server_apply(p, s, a, r)
        return ce_loss(logits, labels)[0], s

    cp, sp = params[0], {"body": params[1], "tail": params[2]}
    chain = [CH.Part(head_apply, "client"), CH.Part(server_apply, "server")]
    run = jax.jit(
        lambda s: CH.chain_grads(chain, ce_loss, [cp, sp], s, x, y, rng, labels_to="server")
    )
    r = run(states[:2])
    if stateful:
        g, cs, ss = jax.jit(split_grads_with_state, static_argnums=(0, 1))(
            head_apply, server_loss, cp, states[0], sp, states[1], x, y, rng
        )
        assert_trees_close(r.states, [cs, ss], rtol=1e-6)
    else:
        g = jax.jit(split_grads, static_argnums=(0, 1))(
            lambda p, a, r: head_apply(p, {}, a, r)[0],
            lambda p, a, labels, r: server_loss(p, states[1], a, labels, r)[0],
            cp,
            sp,
            x,
            y,
            rng,
        )
    np.testing.assert_allclose(r.loss, g.loss, rtol=1e-6)
    assert_trees_close(r.grads, [g.client, g.server])
    assert [(m.direction, m.kind) for m in r.messages] == [
        ("up", "activation"),
        ("up", "labels"),
        ("down", "gradient"),
    ]
    np.testing.assert_allclose(r.messages[0].array, g.activation, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(r.messages[1].array, y)
    np.testing.assert_allclose(r.messages[2].array, g.activation_grad, rtol=1e-5, atol=1e-6)

    epoch = splitnn_epoch_bytes([B], HEAD_OUT, 0)  # one client, B examples; per-example terms
    measured = CH.message_bytes(r)
    assert measured["activation_up"] == epoch["activations"]
    assert measured["labels_up"] == epoch["labels"] == B * LABEL_BYTES
    assert measured["gradient_down"] == epoch["gradients"]
    assert measured["activation_down"] == measured["gradient_up"] == 0
    per_example = CH.chain_bytes_per_example([HEAD_OUT], ["client", "server"], labels_to="server")
    assert per_example["total"] == 2 * HEAD_OUT * FLOAT_BYTES + LABEL_BYTES  # 2 d b + l
    assert measured == {k: B * v for k, v in per_example.items()}


def test_make_chain_step_jitted_donated_equals_unjitted_and_sgd():
    params, states = init_u(keep=True)
    lrs = [0.1, 0.05, 0.2]
    txs = [optax.sgd(lr) for lr in lrs]
    step = CH.make_chain_step(u_parts(keep=True), ce_loss, txs)
    state = CH.init_chain_state(params, txs, states)
    x, y = data()
    batch, rng = {"x": x, "y": y}, jax.random.key(11)

    new, metrics = step(state, batch, rng)
    donated = jax.tree_util.tree_map(jnp.array, state)  # copies: the jitted step consumes its input
    new_jit, metrics_jit = jax.jit(step, donate_argnums=0)(donated, batch, rng)
    assert_trees_close(new_jit, new, rtol=1e-6)
    assert_trees_close(metrics_jit, metrics, rtol=1e-6)

    (loss, (_, ref_states, ref_metrics)), grads = u_reference(True)(params, states, x, y, rng)
    sgd = [
        jax.tree_util.tree_map(lambda p, g, lr=lr: p - lr * g, p, g)
        for p, g, lr in zip(params, grads, lrs)
    ]
    assert_trees_close(new["params"], sgd)
    assert_trees_close(new["model_state"], ref_states, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy"], ref_metrics["accuracy"])
    assert float(metrics["bytes_activation_up"]) == B * HEAD_OUT * 4
    assert float(metrics["bytes_gradient_up"]) == B * BODY_OUT * 4
    assert float(metrics["bytes_labels_up"]) == 0
    assert float(metrics["bytes_total"]) == B * 2 * (HEAD_OUT + BODY_OUT) * 4


def test_server_owned_last_part_needs_labels_to_server():
    parts = u_parts()[:2]  # client head, server body: the server would compute the loss
    params, states = init_u()
    x, y = data()
    with pytest.raises(
        ValueError, match="last part is server-owned.*labels never leave the client"
    ):
        CH.chain_grads(parts, ce_loss, params[:2], states[:2], x, y, jax.random.key(0))
    with pytest.raises(ValueError, match="last part is server-owned"):
        CH.make_chain_step(parts, ce_loss, [optax.sgd(0.1)] * 2)
    with pytest.raises(ValueError, match="last part is server-owned"):
        CH.chain_bytes_per_example([HEAD_OUT], ["client", "server"])
    with pytest.raises(ValueError, match="labels_to='server' but the last part is client-owned"):
        CH.chain_grads(
            u_parts(), ce_loss, params, states, x, y, jax.random.key(0), labels_to="server"
        )


def test_chain_misuse_is_named():
    with pytest.raises(ValueError, match="first part is server-owned"):
        CH.check_owners(["server", "client"])
    with pytest.raises(ValueError, match="owner 'cloud'"):
        CH.Part(lambda p, s, x, r: (x, s), "cloud")
    ident = lambda p, s, x, r: (x, s)
    with pytest.raises(ValueError, match="kept values stay with their owner"):
        CH.check_chain(
            [CH.Part(ident, "client", 1), CH.Part(ident, "server"), CH.Part(ident, "client")]
        )
    with pytest.raises(ValueError, match="keep_for=0"):
        CH.check_chain([CH.Part(ident, "client"), CH.Part(ident, "client", 0)])
    with pytest.raises(ValueError, match="params has 2 entries for 3 parts"):
        CH.chain_grads(
            u_parts(), ce_loss, [{}, {}], [{}] * 3, jnp.zeros(1), jnp.zeros(1), jax.random.key(0)
        )
    with pytest.raises(ValueError, match="must return \\(\\(sent, kept\\), state\\)"):
        CH.chain_grads(
            [CH.Part(ident, "client", 1), CH.Part(ident, "client")],
            lambda o, y: (o.sum(), {}),
            [{}, {}],
            [{}, {}],
            jnp.ones(3),
            jnp.zeros(1),
            jax.random.key(0),
        )


def test_pytree_activation_is_counted_leaf_by_leaf():
    """A client part that sends two arrays: both cross, bytes = all their floats, gradients match."""
    head = CH.Part(lambda p, s, x, r: ((x * p, jnp.sin(x)), s), "client")
    body = CH.Part(lambda p, s, a, r: (a[0] @ p + a[1][:, :2], s), "server")
    tail = CH.Part(lambda p, s, a, r: (a * p, s), "client")
    x = jnp.arange(12.0).reshape(B, 3) / 10
    params = [jnp.full((3,), 0.5), jnp.ones((3, 2)), jnp.array([1.0, -2.0])]
    loss_fn = lambda o, y: ((o**2).sum(), {})
    r = CH.chain_grads([head, body, tail], loss_fn, params, [{}] * 3, x, None, jax.random.key(0))

    def composed(p):
        return loss_fn(((x * p[0]) @ p[1] + jnp.sin(x)[:, :2]) * p[2], None)[0]

    assert_trees_close(r.grads, jax.grad(composed)(params))
    up = r.messages[0]
    assert (up.direction, up.kind) == ("up", "activation") and len(up.array) == 2
    assert CH.message_bytes(r)["activation_up"] == 2 * B * 3 * 4
    assert CH.message_bytes(r)["gradient_down"] == 2 * B * 3 * 4
