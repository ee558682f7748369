"""Tiny methods that exercise the trainer contract beyond one model: a two-optimizer adversarial run
(alternating discriminator / generator updates, plus a frozen part) and a two-stage run whose second
stage changes the state's layout (a frozen snapshot of stage 1's encoder appears). Used by the tests
and by the subprocess SIGKILL-resume tests (python -m tests.toy_methods <kind> <workdir> <steps>)."""

from __future__ import annotations

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlab.config import base_config
from jaxlab.data.sources import ArraySource
from jaxlab.train.method import Method, Stage
from jaxlab.train.optim import part_optimizer
from jaxlab.train.state import Part, State
from jaxlab.train.step import alternate, make_train_step


def toy_config(steps: int = 20, **train):
    c = base_config()
    c.method = "toy"
    c.data.update(batch_size=16, eval_batch_size=64)
    c.optimizer.update(name="adam", lr=1e-2)
    c.optimizer.generator = {"lr": 5e-3}
    c.train.update(steps=steps, log_every=5, eval_every=10, checkpoint_every=5, progress=False,
                   async_checkpoints=False)
    c.train.update(**train)
    return c


def _data(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(3.0, 0.5, (n, 2)).astype(np.float32)
    return ArraySource({"x": x, "y": (x.sum(-1) > 6.0).astype(np.int32)}, name="toy")


def gan(config) -> Method:
    """Generator z (4) -> x (2); discriminator x -> logit; a frozen random "critic" that neither trains."""
    gen, disc = nn.Dense(2), nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(1)])
    txs = {n: part_optimizer(config.optimizer, n, config.train.steps) for n in ("generator", "discriminator")}

    def init_state(rng, batch):
        kg, kd, kc = jax.random.split(rng, 3)
        return State.create({
            "generator": Part.create(gen.init(kg, jnp.zeros((1, 4)))["params"], txs["generator"]),
            "discriminator": Part.create(disc.init(kd, jnp.zeros((1, 2)))["params"], txs["discriminator"]),
            "critic": Part.frozen(disc.init(kc, jnp.zeros((1, 2)))["params"]),
        })

    def fake(params, batch, rng):
        return gen.apply({"params": params["generator"]}, jax.random.normal(rng, (batch["x"].shape[0], 4)))

    def d_loss(params, collections, batch, rng):
        real = disc.apply({"params": params["discriminator"]}, batch["x"])
        fake_logit = disc.apply({"params": params["discriminator"]}, fake(params, batch, rng))
        loss = optax.sigmoid_binary_cross_entropy(real, 1.0).mean() + optax.sigmoid_binary_cross_entropy(
            fake_logit, 0.0).mean()
        return loss, (collections, {})

    def g_loss(params, collections, batch, rng):
        logit = disc.apply({"params": params["discriminator"]}, fake(params, batch, rng))
        critic = disc.apply({"params": params["critic"]}, fake(params, batch, rng)).mean()
        return optax.sigmoid_binary_cross_entropy(logit, 1.0).mean(), (collections, {"critic": critic})

    d_step = make_train_step(d_loss, txs, trains=("discriminator",))
    g_step = make_train_step(g_loss, txs, trains=("generator",))

    def eval_step(state, batch, rng):
        x = fake(state.params, batch, rng)
        return {"fake_mean_error": jnp.abs(x.mean(-1) - 3.0)}

    return Method(name="toy_gan", init_state=init_state, train_step=alternate(d_step, g_step),
                  train_source=_data(), eval_source=_data(64, 1), eval_step=eval_step)


def two_stage(config) -> Method:
    """Stage "pretrain" fits encoder + decoder to reconstruct x; stage "finetune" trains encoder + head
    to classify, with a frozen "snapshot" of the pretrained encoder (created by the stage's enter, so the
    state's layout changes between the stages) pulling the encoder towards it."""
    enc, dec, head = nn.Dense(8), nn.Dense(2), nn.Dense(2)
    steps = config.train.steps
    txs = {n: part_optimizer(config.optimizer, n, steps) for n in ("encoder", "decoder", "head")}

    def init_state(rng, batch):
        ke, kd, kh = jax.random.split(rng, 3)
        return State.create({
            "encoder": Part.create(enc.init(ke, jnp.zeros((1, 2)))["params"], txs["encoder"]),
            "decoder": Part.create(dec.init(kd, jnp.zeros((1, 8)))["params"], txs["decoder"]),
            "head": Part.create(head.init(kh, jnp.zeros((1, 8)))["params"], txs["head"]),
        })

    def features(params, x):
        return jnp.tanh(enc.apply({"params": params}, x - 3.0))

    def recon_loss(params, collections, batch, rng):
        x = batch["x"]
        out = dec.apply({"params": params["decoder"]}, features(params["encoder"], x))
        return jnp.mean((out - (x - 3.0)) ** 2), (collections, {})

    def cls_loss(params, collections, batch, rng):
        logits = head.apply({"params": params["head"]}, features(params["encoder"], batch["x"]))
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
        pull = sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree_util.tree_leaves(params["encoder"]),
                                                          jax.tree_util.tree_leaves(params["snapshot"])))
        return ce + 1e-3 * pull, (collections, {})

    def snapshot(state, rng):
        return state.replace_parts(snapshot=Part.frozen(state.parts["encoder"].params))

    def eval_step(state, batch, rng):
        p = state.params
        x = batch["x"]
        logits = head.apply({"params": p["head"]}, features(p["encoder"], x))
        return {"accuracy": (logits.argmax(-1) == batch["y"]).astype(jnp.float32)}

    stages = (
        Stage("pretrain", steps // 2, make_train_step(recon_loss, txs, trains=("encoder", "decoder")),
              trains=("encoder", "decoder")),
        Stage("finetune", steps - steps // 2, make_train_step(cls_loss, txs, trains=("encoder", "head")),
              enter=snapshot, trains=("encoder", "head")),
    )
    return Method(name="toy_two_stage", init_state=init_state, train_step=stages[0].train_step,
                  train_source=_data(), eval_source=_data(64, 1), eval_step=eval_step, stages=stages)


METHODS = {"gan": gan, "two_stage": two_stage}

if __name__ == "__main__":  # python -m tests.toy_methods <kind> <workdir> <steps>
    from jaxlab.train.loop import train

    kind, workdir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    config = toy_config(steps, checkpoint_every=20)
    train(config, workdir, METHODS[kind](config))
