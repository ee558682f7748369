"""Split learning of the ECG 1D CNN and its privacy leakage (Abuadbba et al. 2020, split_ecg.md).

Training: the ECG CNN of jaxlab.methods.ecg_cnn, run split at the cut through the one trainer: the client
half runs jax.vjp, the server takes value_and_grad of its loss with respect to its params and the cut
activation and returns d loss / d activation (jaxlab.federated.split.split_grads). Split and whole
training give the same parameters from the same initialisation and batch order.

Report (`jaxlab report --config split_ecg:tiny`): trains every setting of config.report.settings (client
conv layers, Laplace DP epsilon), then measures on test beats the accuracy, the top-filter distance
correlation between AvgPool(4)(x) and each activation channel, and the DTW distance of the most-leaking
(lowest-DTW) filter, and checks the paper's trends: more client layers or a smaller epsilon give lower
dCor, higher DTW and lower accuracy.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.federated.leakage import leakage_report
from jaxlab.federated.split import split_grads
from jaxlab.methods import ecg_cnn
from jaxlab.methods.base import Task


def build(config) -> Task:
    task = ecg_cnn.build(config)
    parts = ecg_cnn.ECGParts(config)

    def server_loss(server_params, activation, labels, rng):
        logits = parts.server_logits(server_params, activation)
        return parts.per_example_loss(logits, labels).mean()

    def grad_fn(params, model_state, batch, rng):
        g = split_grads(parts.client_apply, server_loss, params["client"], params["server"],
                        batch["signal"], batch["label"], rng)
        return (g.loss, (model_state, {})), {"client": g.client, "server": g.server}

    return dataclasses.replace(task, name="split_ecg", grad_fn=grad_fn)


def measure_leakage(config, params, signals: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-channel dCor and DTW (means over beats) of the cut activations of `signals` (B, 128, 1)."""
    parts = ecg_cnn.ECGParts(config)
    activation = jax.jit(parts.client_apply)(params["client"], jnp.asarray(signals), jax.random.PRNGKey(seed))
    report = jax.jit(leakage_report)(jnp.asarray(signals[..., 0]), activation)
    return {k: np.asarray(v) for k, v in report.items()}


def setting_config(config, n_convs: int, epsilon: float):
    c = copy.deepcopy(config)
    c.method = "split_ecg"
    c.model.n_convs = int(n_convs)
    c.model.dp_epsilon = float(epsilon)
    return c


TRENDS = (
    ("client layers", "conv"),
    ("DP epsilon", "dp"),
)


def check_trends(rows: list[dict]) -> list[dict]:
    """For each family (conv layers ascending, DP epsilon descending), compares the first and last
    setting: leakage falls (dCor down, DTW up) and accuracy does not rise."""
    out = []
    for label, family in TRENDS:
        series = [r for r in rows if r["family"] == family]
        if len(series) < 2:
            continue
        first, last = series[0], series[-1]
        out.append({
            "trend": f"{label}: {first['setting']} -> {last['setting']}",
            "dcor_falls": last["top_dcor"] < first["top_dcor"],
            "dtw_rises": last["min_dtw"] > first["min_dtw"],
            "accuracy_falls": last["accuracy"] <= first["accuracy"] + 0.005,
        })
    return out


def report(config, workdir: str | Path) -> dict:
    """Trains each setting under workdir/<setting> (resumable), measures leakage, writes report.md,
    report.json and report.png. Returns {"rows": [...], "trends": [...]}."""
    from jaxlab.train.loop import evaluate, restore_for_eval, train

    workdir = Path(workdir)
    test = ecg_cnn.ecg_sources(config)[1]
    count = min(int(config.report.leakage_beats), len(test))
    signals = ecg_cnn.ecg_transform(test.get(np.arange(count)))["signal"]
    rows = []
    for name, n_convs, epsilon in config.report.settings:
        family = "dp" if epsilon > 0 else "conv"
        c = setting_config(config, n_convs, epsilon)
        run_dir = workdir / name.replace(" ", "_").replace("=", "")
        train(c, run_dir)
        _, state = restore_for_eval(c, run_dir)
        leak = measure_leakage(c, state.params, signals, seed=config.seed)
        rows.append({
            "setting": name, "family": family, "n_convs": int(n_convs), "epsilon": float(epsilon),
            "accuracy": evaluate(c, run_dir)["accuracy"],
            "top_dcor": float(leak["dcor"].max()), "min_dtw": float(leak["dtw"].min()),
            "dcor_sorted": sorted(leak["dcor"].tolist(), reverse=True),
        })
    trends = check_trends(rows)
    result = {"rows": rows, "trends": trends, "leakage_beats": count}
    (workdir / "report.json").write_text(json.dumps(result, indent=2))
    (workdir / "report.md").write_text(format_report(result))
    plot_report(rows, workdir / "report.png")
    print(format_report(result), flush=True)
    return result


def format_report(result: dict) -> str:
    lines = [f"Split ECG leakage ({result['leakage_beats']} test beats)", "",
             "| setting | test acc % | top-filter dCor | most-leaking filter DTW |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['setting']} | {100 * r['accuracy']:.2f} | {r['top_dcor']:.3f} | {r['min_dtw']:.3f} |")
    lines += ["", "| trend | dCor falls | DTW rises | accuracy falls |", "|---|---|---|---|"]
    for t in result["trends"]:
        yes = lambda b: "yes" if b else "NO"
        lines.append(f"| {t['trend']} | {yes(t['dcor_falls'])} | {yes(t['dtw_rises'])} | {yes(t['accuracy_falls'])} |")
    return "\n".join(lines) + "\n"


def plot_report(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    names = [r["setting"] for r in rows]
    for ax, key, title in zip(axes, ("accuracy", "top_dcor", "min_dtw"),
                              ("test accuracy", "top-filter dCor", "most-leaking filter DTW")):
        ax.bar(names, [r[key] for r in rows], color=["C0" if r["family"] == "conv" else "C3" for r in rows])
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
