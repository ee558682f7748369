"""Device mesh and shardings: batch split on the `data` axis, state replicated, room for a `model` axis."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA, MODEL = "data", "model"


def make_mesh(data: int = -1, model: int = 1, devices=None) -> Mesh:
    """A (data, model) mesh over the first data*model devices; data=-1 takes all that remain."""
    devices = list(devices if devices is not None else jax.devices())
    if model < 1 or len(devices) % model:
        raise ValueError(f"mesh.model={model} must divide the {len(devices)} devices")
    if data == -1:
        data = len(devices) // model
    if data < 1 or data * model > len(devices):
        raise ValueError(f"mesh data={data} x model={model} needs more than the {len(devices)} devices")
    return Mesh(np.array(devices[: data * model]).reshape(data, model), (DATA, MODEL))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
