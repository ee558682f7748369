"""What a method supplies to the one trainer, and the registry that finds it by name.

A method module defines `build(config) -> Task`. The trainer does the rest (state, sharding, the loop,
checkpoints, metrics, resume).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from jaxlab.data.sources import Source

METHODS = {
    "ecg_cnn": "jaxlab.methods.ecg_cnn",
    "split_ecg": "jaxlab.methods.split_ecg",
    "fl_vs_splitnn": "jaxlab.methods.fl_vs_splitnn",
}


@dataclasses.dataclass(frozen=True)
class Task:
    """init(rng, example_batch) -> flax variables; loss_fn(params, model_state, batch, rng) ->
    (loss, (model_state, metrics)); eval_fn(params, model_state, batch, rng) -> {name: (B,) values};
    apply_fn(variables, batch) -> outputs (used for FLOP counting); transform maps a numpy batch from
    the source to the model's inputs on the host."""

    name: str
    init: Callable[[jax.Array, dict], dict]
    loss_fn: Callable[..., Any]
    eval_fn: Callable[..., dict]
    apply_fn: Callable[..., Any]
    train_source: Source
    eval_source: Source | None = None
    transform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None
    optimizer: optax.GradientTransformation | None = None  # None: built from config.optimizer
    grad_fn: Callable[..., Any] | None = None  # None: jax.value_and_grad(loss_fn); see make_train_step


def build_task(config) -> Task:
    name = config.method
    if name not in METHODS:
        near = difflib.get_close_matches(name, METHODS, n=3)
        hint = f" Did you mean {', '.join(map(repr, near))}?" if near else ""
        raise ValueError(f"unknown method {name!r}.{hint} Known methods: {sorted(METHODS)}")
    return importlib.import_module(METHODS[name]).build(config)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, *, double_softmax: bool = False):
    """Per-example CE in float32. double_softmax reproduces references that apply CrossEntropyLoss on
    top of a Softmax output layer (the logits are softmax probabilities then)."""
    logits = logits.astype(jax.numpy.float32)
    if double_softmax:
        logits = jax.nn.softmax(logits)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
