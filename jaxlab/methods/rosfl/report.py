"""The RoS-FL report (issue #14 "Experiments"): CT restoration on the config's clients, every setting a
trainer run of `task.build` on one simulation of the clients' scans (`make_clients` once), with
config.report's rounds, training phantoms per client and channels (`report_config`):

    rosfl            RoS-FL, DWCS on config.rosfl.dwcs_parts (all three parts by default)
    rosfl_no_dwcs    RoS-FL without DWCS (rosfl.dwcs_parts=())
    fedavg           FedAvg of the unsplit network on jaxlab.federated's engine (rosfl.algorithm="fedavg")
    splitfed         SplitFed V1: head | body + tail, per-client server replicas (rosfl.algorithm="splitfed")
    local            local-only: each client trains alone (one run per client, K=1, no DWCS); its own
                     test set's scores are reported (every run evaluates all clients' test sets, so PSNR's
                     peak, the test labels' range, is one for all settings)
    centralised      every client's training data pooled as one client (no DWCS), evaluated per client

All with the config's rounds, optimizer and batch (a round = one local epoch; the centralised round is
one epoch over the pooled data). Recorded: final PSNR / SSIM / RMSE per client (and the degraded
input's), round-to-round drift ||w_t - w_{t-1}|| of each global part with and without DWCS, and example
reconstructions (report.png: one test image per client: input, label, and each federated / centralised
setting's output). Not in it: seeds beyond config.seed, the segmentation variant.

    jaxlab report --config rosfl:tiny --workdir /tmp/rosfl_report
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from jaxlab.benchmarking import markdown_table
from jaxlab.methods.rosfl import task
from jaxlab.report import _pyplot, save_figure, write_report
from jaxlab.train.metrics import read_metrics

SETTINGS = ("rosfl", "rosfl_no_dwcs", "fedavg", "splitfed", "local", "centralised")
NAMES = {"rosfl": "RoS-FL (DWCS)", "rosfl_no_dwcs": "RoS-FL, no DWCS", "fedavg": "FedAvg (unsplit)",
         "splitfed": "SplitFed V1",
         "local": "local only", "centralised": "centralised", "input": "degraded input"}
PICTURED = ("rosfl", "rosfl_no_dwcs", "fedavg", "centralised")


def report_config(config):
    """config with config.report's rounds, train_per_client and features in train.steps,
    data.train_per_client and model.features."""
    c = copy.deepcopy(config)
    c.train.steps = int(config.report.rounds)
    c.data.train_per_client = int(config.report.train_per_client)
    c.model.features = int(config.report.features)
    return c


def run_config(config, **rosfl):
    """The trainer config of a report run: evaluated once at the end, one checkpoint, rosfl overrides."""
    c = copy.deepcopy(config)
    c.rosfl.update(**rosfl)
    steps = int(config.train.steps)
    c.train.update(eval_every=steps, checkpoint_every=steps, best_metric="", progress=False)
    return c


def subset(clients: task.ClientSet, train: list, test: list) -> task.ClientSet:
    """A ClientSet with the given train / test lists (geometries and doses kept for the record)."""
    return task.ClientSet(train, test, clients.geometries, clients.doses)


def pooled(clients: task.ClientSet) -> list[dict[str, np.ndarray]]:
    """All clients' training data as one client's."""
    return [{k: np.concatenate([t[k] for t in clients.train]) for k in clients.train[0]}]


def train_run(config, clients: task.ClientSet, workdir: Path):
    """Trains (or resumes) one run; returns (its eval row, its train rows, the method)."""
    from jaxlab.train.loop import train

    method = task.build(config, clients)
    train(config, workdir, method)
    rows = read_metrics(workdir)
    return [r for r in rows if r["split"] == "eval"][-1], [r for r in rows if r["split"] == "train"], method


def scores(row: dict, suffix: str, prefix: str = "") -> dict[str, float]:
    return {m: row[f"{prefix}{m}{suffix}"] for m in ("psnr", "ssim", "rmse")}


def run_all(config, clients: task.ClientSet, workdir: Path) -> dict:
    """{"per_client": {setting: [scores per client]}, "drift": {setting: {part: [per round]}}, "runs":
    {setting: (config, workdir, method)} for the pictured settings}."""
    num = len(clients.train)
    runs = {"rosfl": (run_config(config), clients),
            "rosfl_no_dwcs": (run_config(config, dwcs_parts=()), clients),
            "fedavg": (run_config(config, algorithm="fedavg"), clients),
            "splitfed": (run_config(config, algorithm="splitfed"), clients),
            "centralised": (run_config(config, dwcs_parts=()), subset(clients, pooled(clients), clients.test))}
    per_client, drift, done = {}, {}, {}
    for name, (c, cs) in runs.items():
        row, train_rows, method = train_run(c, cs, workdir / name)
        per_client[name] = [scores(row, f"_c{k}") for k in range(num)]
        if name == "rosfl":
            per_client["input"] = [scores(row, f"_c{k}", "input_") for k in range(num)]
        if name.startswith("rosfl"):
            drift[name] = {p: [r[f"drift_{p}"] for r in train_rows] for p in ("head", "body", "tail")}
        done[name] = (c, workdir / name, method)
    per_client["local"] = []
    for k in range(num):
        row, _, _ = train_run(run_config(config, dwcs_parts=()),
                              subset(clients, [clients.train[k]], clients.test), workdir / f"local{k}")
        per_client["local"].append(scores(row, f"_c{k}"))
    return {"per_client": per_client, "drift": drift, "runs": done}


def examples(runs: dict, clients: task.ClientSet) -> dict[str, np.ndarray]:
    """One test image per client (S, S) for "input", "label" and each pictured setting's output."""
    from jaxlab.train.loop import restore_for_eval

    x = np.stack([t["x"][0] for t in clients.test])
    out = {"input": x[..., 0], "label": np.stack([t["y"][0] for t in clients.test])[..., 0]}
    for name in PICTURED:
        config, workdir, method = runs[name]
        _, state = restore_for_eval(config, workdir, method)
        out[name] = np.asarray(method.apply_fn(state, {"x": x}))[..., 0]
    return out


def plot_examples(images: dict[str, np.ndarray], path: Path) -> None:
    """Rows: clients; columns: input, label, settings; one grey scale per row (the label's range)."""
    names = list(images)
    num = len(images["label"])
    fig, axes = _pyplot().subplots(num, len(names), figsize=(2.0 * len(names), 2.0 * num), squeeze=False)
    for k in range(num):
        lo, hi = float(images["label"][k].min()), float(images["label"][k].max())
        for j, name in enumerate(names):
            axes[k, j].imshow(images[name][k], cmap="gray", vmin=lo, vmax=hi)
            axes[k, j].set_xticks([])
            axes[k, j].set_yticks([])
            if k == 0:
                axes[k, j].set_title(NAMES.get(name, name), fontsize=8)
    save_figure(fig, path)


def format_report(result: dict) -> str:
    per_client, drift = result["per_client"], result["drift"]
    num = len(per_client["rosfl"])
    settings = ["input", *SETTINGS]

    def cell(s, k, m):
        return f"{per_client[s][k][m]:.{3 if m != 'psnr' else 2}f}"

    lines = ["# RoS-FL report", "", f"{num} clients (HyperFed protocols 1-{num}, fan beam, rescaled); "
             f"{result['rounds']} rounds; seed {result['seed']}. Final test scores per client "
             "(PSNR dB / SSIM / RMSE).", ""]
    rows = [[NAMES[s]] + [" / ".join(cell(s, k, m) for m in ("psnr", "ssim", "rmse")) for k in range(num)]
            + [f"{np.mean([per_client[s][k]['psnr'] for k in range(num)]):.2f}"] for s in settings]
    lines += [markdown_table(["setting"] + [f"client {k + 1}" for k in range(num)] + ["mean PSNR"], rows), ""]
    lines += ["Round-to-round drift ||w_t - w_{t-1}|| of the global parts (rounds 1, 2, ..., last):", ""]
    drows = [[NAMES[s], p, ", ".join(f"{v:.3f}" for v in drift[s][p])] for s in drift for p in drift[s]]
    lines += [markdown_table(["setting", "part", "drift per round"], drows), ""]
    lines += ["Example reconstructions: report.png (rows: clients; one test image each).", ""]
    return "\n".join(lines)


def report(config, workdir: str | Path) -> dict:
    """Runs every setting (module docstring) under workdir/<setting>, writes report.md / .json / .png."""
    if config.rosfl.task != "restoration":
        raise ValueError(f"the RoS-FL report covers rosfl.task='restoration', not {config.rosfl.task!r}")
    workdir = Path(workdir)
    config = report_config(config)
    clients = task.make_clients(config)
    out = run_all(config, clients, workdir)
    images = examples(out["runs"], clients)
    result = {"per_client": out["per_client"], "drift": out["drift"], "rounds": int(config.train.steps),
              "seed": int(config.seed), "clients": [{"sino_shape": list(g.sino_shape), "I0": d}
                                                   for g, d in zip(clients.geometries, clients.doses)]}
    write_report(workdir, result, format_report(result), lambda path: plot_examples(images, path))
    return result
