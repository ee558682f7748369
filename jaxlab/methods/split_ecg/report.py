"""The split ECG leakage report (`jaxlab report --config split_ecg:tiny`, split_ecg.md).

Trains every setting of config.report.settings (client conv layers, Laplace DP epsilon), then measures on
test beats the accuracy, the top-filter distance correlation between AvgPool(4)(x) and each activation
channel, and the DTW distance of the most-leaking (lowest-DTW) filter, and checks the paper's trends:
more client layers or a smaller epsilon give lower dCor, higher DTW and lower accuracy.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab import report as R
from jaxlab.federated.leakage import leakage_report
from jaxlab.methods import ecg_cnn

TRENDS = (
    ("client layers", "conv"),
    ("DP epsilon", "dp"),
)
ACCURACY_SLACK = 0.005  # accuracy "falls" unless it rises by more than this (half a percentage point)


def measure_leakage(config, params, signals: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-channel dCor and DTW (means over beats) of the cut activations of `signals` (B, 128, 1):
    {"dcor": (C,), "dtw": (C,)}."""
    parts = ecg_cnn.ECGParts(config)
    activation = jax.jit(parts.client_apply)(params["client"], jnp.asarray(signals),
                                             jax.random.PRNGKey(seed))
    leakage = jax.jit(leakage_report)(jnp.asarray(signals[..., 0]), activation)
    return {k: np.asarray(v) for k, v in leakage.items()}


def setting_config(config, n_convs: int, epsilon: float):
    """A copy of config for one setting: split_ecg with n_convs client conv layers and Laplace DP at
    epsilon (0 = no DP)."""
    c = copy.deepcopy(config)
    c.method = "split_ecg"
    c.model.n_convs = int(n_convs)
    c.model.dp_epsilon = float(epsilon)
    return c


def check_trends(rows: list[dict]) -> list[dict]:
    """For each family of rows (conv layers ascending, DP epsilon descending, in the order given),
    compares the first and last setting: leakage falls (top_dcor down, min_dtw up) and accuracy does not
    rise by more than ACCURACY_SLACK. A family with fewer than two rows is skipped. Returns one dict per
    family: {"trend", "dcor_falls", "dtw_rises", "accuracy_falls"}."""
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
            "accuracy_falls": last["accuracy"] <= first["accuracy"] + ACCURACY_SLACK,
        })
    return out


def report(config, workdir: str | Path) -> dict:
    """Trains each setting under workdir/<setting> (resumable), measures leakage, writes report.md,
    report.json and report.png. Returns {"rows": [...], "trends": [...], "leakage_beats": count}."""
    from jaxlab import methods
    from jaxlab.train.loop import evaluate_state, restore_for_eval, train

    workdir = Path(workdir)
    test = ecg_cnn.ecg_sources(config)[1]
    count = min(int(config.report.leakage_beats), len(test))
    signals = ecg_cnn.ecg_transform(test.get(np.arange(count)))["signal"]
    rows = []
    for name, n_convs, epsilon in config.report.settings:
        family = "dp" if epsilon > 0 else "conv"
        c = setting_config(config, n_convs, epsilon)
        run_dir = workdir / name.replace(" ", "_").replace("=", "")
        method = methods.build(c)
        train(c, run_dir, method)
        run, state = restore_for_eval(c, run_dir, method)
        leak = measure_leakage(c, state.parts["model"].params, signals, seed=config.seed)
        rows.append({
            "setting": name, "family": family, "n_convs": int(n_convs), "epsilon": float(epsilon),
            "accuracy": evaluate_state(run, state)["accuracy"],
            "top_dcor": float(leak["dcor"].max()), "min_dtw": float(leak["dtw"].min()),
            "dcor_sorted": sorted(leak["dcor"].tolist(), reverse=True),
        })
    result = {"rows": rows, "trends": check_trends(rows), "leakage_beats": count}
    R.write_report(workdir, result, format_report(result), lambda path: plot_report(rows, path))
    return result


def format_report(result: dict) -> str:
    """Markdown: a table of the settings (accuracy %, top-filter dCor, most-leaking filter DTW) and a
    table of the trends with yes / NO."""
    settings = R.markdown_table(
        ["setting", "test acc %", "top-filter dCor", "most-leaking filter DTW"],
        [[r["setting"], f"{100 * r['accuracy']:.2f}", f"{r['top_dcor']:.3f}", f"{r['min_dtw']:.3f}"]
         for r in result["rows"]])
    trends = R.markdown_table(
        ["trend", "dCor falls", "DTW rises", "accuracy falls"],
        [[t["trend"], R.yes_no(t["dcor_falls"]), R.yes_no(t["dtw_rises"]), R.yes_no(t["accuracy_falls"])]
         for t in result["trends"]])
    return f"Split ECG leakage ({result['leakage_beats']} test beats)\n\n{settings}\n\n{trends}\n"


def plot_report(rows: list[dict], path: Path) -> None:
    """Three bar panels (test accuracy, top-filter dCor, most-leaking filter DTW), one bar per setting:
    blue for client-layer settings, red for DP settings."""
    fig, axes = R.subplots(3, figsize=(13, 3.4))
    names = [r["setting"] for r in rows]
    colors = ["C0" if r["family"] == "conv" else "C3" for r in rows]
    for ax, key, title in zip(axes, ("accuracy", "top_dcor", "min_dtw"),
                              ("test accuracy", "top-filter dCor", "most-leaking filter DTW")):
        R.plot_bars(ax, names, [r[key] for r in rows], colors=colors, title=title)
    R.save_figure(fig, path)
