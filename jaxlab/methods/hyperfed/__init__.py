"""HyperFed (Yang et al., arXiv 2206.03709; IEEE TNNLS 2023): hypernetwork-based personalised federated
CT imaging. Spec: shared/papers/hyperfed.md; official code: Zi-YuanYang/HyperFed (models/hyperfed_LEARN.py,
models/hyperfed_RED.py, train.py, datasets.py).

Here: the hypernetwork (jaxlab.models.hypernet: protocol normalisation, 7-256-512-2K with dropout 0.5)
and the unrolled LEARN network with FiLM and the bounded step size (jaxlab.models.learn), the FiLM RED-CNN
(`film_red`), five clients with their own scaled fan-beam scanners and the round on jaxlab.federated's
FedAvg engine with the hypernetwork private (`task`), the report (`report`) and the bench (`bench`).

Inferred (not in the spec or code): the tiny geometry scaling (task docstring); the hypernetwork input is
the client's table row (the normalisation and step bound are defined on 256-pixel protocols); the FedBN
baseline keeps a per-client FiLM vector (the imaging network has no BatchNorm); FedAvg's FiLM vector
starts at gamma = 1, beta = 0; the held-out sixth protocol (task.HELD_OUT_PROTOCOL) is ours.
"""

from jaxlab.methods.hyperfed.bench import bench
from jaxlab.methods.hyperfed.report import report
from jaxlab.methods.hyperfed.task import (ALGORITHMS, HELD_OUT_PROTOCOL, PROTOCOLS, ClientSet, HyperFedModel, build,
                                          make_algorithm, make_clients, make_model, private_keys, reconstruct,
                                          scaled_geometry)

__all__ = ["ALGORITHMS", "HELD_OUT_PROTOCOL", "PROTOCOLS", "ClientSet", "HyperFedModel", "bench", "build",
           "make_algorithm", "make_clients", "make_model", "private_keys", "reconstruct", "report",
           "scaled_geometry"]
