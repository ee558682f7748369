"""Federated algorithms, one module each, on the shared shape of `base` (init, round, broadcast, ...).

    from jaxlab.federated.algorithms import fedavg, fedbn, scaffold, plan_round, round_batch
"""

from jaxlab.federated.algorithms import base, fedavg, fedbn, scaffold
from jaxlab.federated.algorithms.base import (
    Algorithm,
    RoundBatch,
    RoundPlan,
    plan_round,
    round_batch,
    server_optimizer,
)

__all__ = [
    "Algorithm",
    "RoundBatch",
    "RoundPlan",
    "base",
    "fedavg",
    "fedbn",
    "plan_round",
    "round_batch",
    "scaffold",
    "server_optimizer",
]
