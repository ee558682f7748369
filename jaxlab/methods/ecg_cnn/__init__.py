"""The ECG 1D CNN beat classifier of split_ecg.md trained whole (the default experiment, and the
smallest method: a loss, an eval function and data, handed to jaxlab.train.supervised).

`model.dp_epsilon > 0` adds the paper's Laplace mechanism at the cut, at train and test time.
jaxlab.methods.split_ecg trains the same model split at the cut (client vjp, server value_and_grad).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlab.data.sources import get_source
from jaxlab.federated.privacy import laplace_mechanism
from jaxlab.losses import softmax_cross_entropy
from jaxlab.train.supervised import supervised
from jaxlab.models.cnn1d import ECGClient, ECGServer, ECGSplitCNN


class ECGParts:
    """The client and server halves as pure functions of their own parameter subtrees."""

    def __init__(self, config):
        m = config.model
        self.client = ECGClient(m.n_convs)
        self.server = ECGServer(m.num_classes)
        self.whole = ECGSplitCNN(n_convs=m.n_convs, num_classes=m.num_classes)
        self.epsilon = float(m.dp_epsilon)
        self.double_softmax = m.double_softmax

    def client_apply(self, client_params, signal, rng):
        """(B, 128, 1) -> cut activation (B, 32, 16), Laplace-noised when dp_epsilon > 0."""
        activation = self.client.apply({"params": client_params}, signal)
        return laplace_mechanism(activation, self.epsilon, rng) if self.epsilon > 0 else activation

    def server_logits(self, server_params, activation):
        return self.server.apply({"params": server_params}, activation)

    def per_example_loss(self, logits, labels):
        return softmax_cross_entropy(logits, labels, double_softmax=self.double_softmax)

    def logits(self, params, signal, rng):
        client_rng, _ = jax.random.split(rng)  # the client's key, as jaxlab.federated.split.split_grads
        return self.server_logits(params["server"], self.client_apply(params["client"], signal, client_rng))


def ecg_sources(config):
    data = config.data
    options = dict(data.options)
    return tuple(get_source(data.source, split, seed=data.seed, data_dir=data.data_dir,
                            features=("signal", "label"), **options) for split in ("train", "test"))


def ecg_transform(batch):
    signal = batch["signal"]
    if signal.ndim == 2:  # user files often store beats as (N, 128)
        signal = signal[..., None]
    return {"signal": signal.astype("float32"), "label": batch["label"].astype("int32")}


def build(config, *, name: str = "ecg_cnn", grad_fn=None):
    """The supervised method; split_ecg passes its grad_fn (gradients through the cut) and name."""
    parts = ECGParts(config)
    train_source, eval_source = ecg_sources(config)

    def init(rng, batch):
        return parts.whole.init(rng, batch["signal"])

    def loss_fn(params, model_state, batch, rng):
        logits = parts.logits(params, batch["signal"], rng)
        loss = parts.per_example_loss(logits, batch["label"]).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return loss, (model_state, {"accuracy": accuracy})

    def eval_fn(params, model_state, batch, rng):
        logits = parts.logits(params, batch["signal"], rng)
        return {
            "loss": parts.per_example_loss(logits, batch["label"]),
            "accuracy": (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32),
        }

    def apply_fn(variables, batch):
        return parts.logits(variables["params"], batch["signal"], jax.random.PRNGKey(0))

    return supervised(config, name=name, init=init, loss_fn=loss_fn, eval_fn=eval_fn, apply_fn=apply_fn,
                      train_source=train_source, eval_source=eval_source, transform=ecg_transform,
                      grad_fn=grad_fn)
