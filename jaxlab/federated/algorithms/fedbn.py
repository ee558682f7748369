"""FedBN (Li et al. 2021): FedAvg in which every client keeps its BatchNorm layers (scale, bias and
running statistics) private; everything else is averaged.

It is fedavg.build with private= the BatchNorm layers: a parameter (or statistic) is private when a
module on its path is named "BatchNorm..." (flax's default names BatchNorm_0, BatchNorm_1, ...; pass
`is_private` for other names). Evaluate per client: alg.client_params(state, k).
"""

from __future__ import annotations

from collections.abc import Callable

import optax

from jaxlab.federated.algorithms import base as B
from jaxlab.federated.algorithms import fedavg


def is_batchnorm(path: B.Path) -> bool:
    """True for a path through a module named BatchNorm* (flax's default BatchNorm names)."""
    return any(part.startswith("BatchNorm") for part in path)


def build(
    loss_fn: B.LossFn,
    client_tx: optax.GradientTransformation,
    *,
    is_private: Callable[[B.Path], bool] = is_batchnorm,
    **fedavg_options,
) -> B.Algorithm:
    """FedBN: fedavg.build(loss_fn, client_tx, private=is_private, **fedavg_options)."""
    if "private" in fedavg_options:
        raise ValueError("fedbn.build sets private= itself; pass is_private= to change which layers are local")
    return fedavg.build(loss_fn, client_tx, private=is_private, **fedavg_options)
