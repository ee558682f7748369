"""Split learning of the ECG 1D CNN and its privacy leakage (Abuadbba et al. 2020, split_ecg.md).

Training: the ECG CNN of jaxlab.methods.ecg_cnn, run split at the cut through the one trainer: the client
half runs jax.vjp, the server takes value_and_grad of its loss with respect to its params and the cut
activation and returns d loss / d activation (jaxlab.federated.split.split_grads). Split and whole
training give the same parameters from the same initialisation and batch order.

Report (`jaxlab report --config split_ecg:tiny`; split_ecg/report.py, re-exported here): trains every
setting of config.report.settings (client conv layers, Laplace DP epsilon), then measures on test beats
the accuracy, the top-filter distance correlation between AvgPool(4)(x) and each activation channel, and
the DTW distance of the most-leaking (lowest-DTW) filter, and checks the paper's trends: more client
layers or a smaller epsilon give lower dCor, higher DTW and lower accuracy.
"""

from __future__ import annotations

from jaxlab.federated.split import split_grads
from jaxlab.methods import ecg_cnn
from jaxlab.methods.split_ecg.report import (  # noqa: F401  (the report's names, found here by name)
    TRENDS,
    check_trends,
    format_report,
    measure_leakage,
    plot_report,
    report,
    setting_config,
)


def build(config):
    parts = ecg_cnn.ECGParts(config)

    def server_loss(server_params, activation, labels, rng):
        logits = parts.server_logits(server_params, activation)
        return parts.per_example_loss(logits, labels).mean()

    def grad_fn(params, model_state, batch, rng):
        g = split_grads(parts.client_apply, server_loss, params["client"], params["server"],
                        batch["signal"], batch["label"], rng)
        return (g.loss, (model_state, {})), {"client": g.client, "server": g.server}

    return ecg_cnn.build(config, name="split_ecg", grad_fn=grad_fn)
