"""The ECG 1D CNN beat classifier of split_ecg.md in its non-split form (the default experiment).

The split, leakage and DP forms build on the same ECGSplitCNN in jaxlab.methods.split_ecg.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxlab.data.sources import get_source
from jaxlab.methods.base import Task, softmax_cross_entropy
from jaxlab.models.cnn1d import ECGSplitCNN


def build(config) -> Task:
    model = ECGSplitCNN(n_convs=config.model.n_convs, num_classes=config.model.num_classes)
    double_softmax = config.model.double_softmax
    data = config.data
    options = dict(data.options)
    train_source = get_source(data.source, "train", seed=data.seed, data_dir=data.data_dir, **options)
    eval_source = get_source(data.source, "test", seed=data.seed, data_dir=data.data_dir, **options)

    def init(rng, batch):
        return model.init(rng, batch["signal"])

    def loss_fn(params, model_state, batch, rng):
        logits = model.apply({"params": params}, batch["signal"])
        loss = softmax_cross_entropy(logits, batch["label"], double_softmax=double_softmax).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return loss, (model_state, {"accuracy": accuracy})

    def eval_fn(params, model_state, batch):
        logits = model.apply({"params": params}, batch["signal"])
        return {
            "loss": softmax_cross_entropy(logits, batch["label"], double_softmax=double_softmax),
            "accuracy": (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32),
        }

    def apply_fn(variables, batch):
        return model.apply(variables, batch["signal"])

    def transform(batch):
        signal = batch["signal"]
        if signal.ndim == 2:  # user files often store beats as (N, 128)
            signal = signal[..., None]
        return {"signal": signal.astype("float32"), "label": batch["label"].astype("int32")}

    return Task(
        name="ecg_cnn", init=init, loss_fn=loss_fn, eval_fn=eval_fn, apply_fn=apply_fn,
        train_source=train_source, eval_source=eval_source, transform=transform,
    )
