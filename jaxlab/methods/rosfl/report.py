"""The RoS-FL report (issue #14 "Experiments"): CT restoration and segmentation on the config's clients,
every setting a trainer run of `task.build` on one simulation of the clients' scans per seed
(`make_clients` once per seed), with config.report's rounds, training phantoms per client and channels
(`report_config`), for each task of config.report.tasks and seed of config.report.seeds:

    rosfl            RoS-FL, DWCS on config.rosfl.dwcs_parts (all three parts by default)
    rosfl_no_dwcs    RoS-FL without DWCS (rosfl.dwcs_parts=())
    fedavg           FedAvg of the unsplit network on jaxlab.federated's engine (rosfl.algorithm="fedavg")
    splitfed         SplitFed V1: head | body + tail, per-client server replicas (rosfl.algorithm="splitfed")
    local            local-only: each client trains alone (one run per client, K=1, no DWCS); its own
                     test set's scores are reported (every run evaluates all clients' test sets, so PSNR's
                     peak, the test labels' range, is one for all settings)
    centralised      every client's training data pooled as one client (no DWCS), evaluated per client

Tasks: "restoration" (RED-CNN, MSE; PSNR / SSIM / RMSE per client, the degraded FBP input's alongside)
and "segmentation" (the three-part U-Net, BCE + Dice, masks = phantom > data.seg_threshold; Dice / IoU
per client, the thresholded input's alongside). All with the config's rounds, optimizer and batch
(segmentation: config.report.segmentation's rounds and lr; a round = one local epoch; the centralised
round is one epoch over the pooled data). Recorded: final
scores per client as mean ± std over seeds, the finding "restored / segmented better than the degraded
input, per client" checked on every seed, round-to-round drift ||w_t - w_{t-1}|| of each global part
with and without DWCS (mean over seeds), bytes per round by message kind for every setting (RoS-FL's
measured by the chain's accounting in its runs; the baselines' from the engine's formulas on the same
cut shapes: `setting_bytes`), and example outputs of seed config.report.seeds[0] (report.png).

    jaxlab report --config rosfl:tiny --workdir /tmp/rosfl_report
"""

from __future__ import annotations

import copy
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.federated import chain
from jaxlab.federated.split import fl_round_bytes
from jaxlab.methods.rosfl import task
from jaxlab.report import Finding, findings_table, markdown_table, mean_std, pyplot, save_figure, write_report
from jaxlab.train.metrics import read_metrics
from jaxlab.train.state import param_count

SETTINGS = ("rosfl", "rosfl_no_dwcs", "fedavg", "splitfed", "local", "centralised")
NAMES = {"rosfl": "RoS-FL (DWCS)", "rosfl_no_dwcs": "RoS-FL, no DWCS", "fedavg": "FedAvg (unsplit)",
         "splitfed": "SplitFed V1", "local": "local only", "centralised": "centralised", "input": "degraded input"}
PICTURED = ("rosfl", "rosfl_no_dwcs", "fedavg", "centralised")
METRICS = {"restoration": ("psnr", "ssim", "rmse"), "segmentation": ("dice", "iou")}
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "rmse": False, "dice": True, "iou": True}
DIGITS = {"psnr": 2, "ssim": 3, "rmse": 3, "dice": 3, "iou": 3}
BYTE_COLUMNS = ("activation_up", "activation_down", "gradient_up", "gradient_down", "labels_up", "weights_up",
                "weights_down", "data_up")


def report_config(config):
    """config with config.report's rounds, train_per_client and features in train.steps,
    data.train_per_client and model.features."""
    c = copy.deepcopy(config)
    c.train.steps = int(config.report.rounds)
    c.data.train_per_client = int(config.report.train_per_client)
    c.model.features = int(config.report.features)
    return c


def task_config(config, task_name: str, seed: int):
    """config for one task and seed: segmentation trains the U-Net (rosfl.task, model.name) for
    config.report.segmentation's rounds at its Adam lr."""
    c = copy.deepcopy(config)
    c.seed = int(seed)
    c.rosfl.task = task_name
    if task_name == "segmentation":
        c.model.name = "unet"
        c.train.steps = int(config.report.segmentation.rounds)
        c.optimizer.lr = float(config.report.segmentation.lr)
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


def scores(row: dict, names, suffix: str, prefix: str = "") -> dict[str, float]:
    return {m: float(row[f"{prefix}{m}{suffix}"]) for m in names}


def run_all(config, clients: task.ClientSet, workdir: Path) -> dict:
    """One task and seed. {"per_client": {setting: [scores per client]}, "drift": {setting: {part: [per
    round]}}, "bytes": RoS-FL's measured bytes per round by kind, "runs": {setting: (config, workdir,
    method)} for the pictured settings}."""
    num, names = len(clients.train), METRICS[config.rosfl.task]
    runs = {"rosfl": (run_config(config), clients),
            "rosfl_no_dwcs": (run_config(config, dwcs_parts=()), clients),
            "fedavg": (run_config(config, algorithm="fedavg"), clients),
            "splitfed": (run_config(config, algorithm="splitfed"), clients),
            "centralised": (run_config(config, dwcs_parts=()), subset(clients, pooled(clients), clients.test))}
    per_client, drift, done, measured = {}, {}, {}, {}
    for name, (c, cs) in runs.items():
        row, train_rows, method = train_run(c, cs, workdir / name)
        per_client[name] = [scores(row, names, f"_c{k}") for k in range(num)]
        if name == "rosfl":
            per_client["input"] = [scores(row, names, f"_c{k}", "input_") for k in range(num)]
            last = train_rows[-1]
            measured = {k: float(last[f"bytes_{k}"]) for k in chain.BYTE_KINDS} | {
                "weights_up": float(last["bytes_weights"]) / 2, "weights_down": float(last["bytes_weights"]) / 2}
        if name.startswith("rosfl"):
            drift[name] = {p: [r[f"drift_{p}"] for r in train_rows] for p in ("head", "body", "tail")}
        done[name] = (c, workdir / name, method)
    per_client["local"] = []
    for k in range(num):
        row, _, _ = train_run(run_config(config, dwcs_parts=()),
                              subset(clients, [clients.train[k]], clients.test), workdir / f"local{k}")
        per_client["local"].append(scores(row, names, f"_c{k}"))
    return {"per_client": per_client, "drift": drift, "bytes": measured, "runs": done}


def setting_bytes(config, clients: task.ClientSet, rosfl_measured: dict[str, float],
                  float_bytes: int = 4) -> dict[str, dict[str, float]]:
    """Bytes per round by kind (BYTE_COLUMNS) for every setting, n_k training examples per client, one
    local epoch a round:
    - RoS-FL (with or without DWCS): `rosfl_measured`, the chain's message accounting in the run
      (activations and gradients at both cuts; head / tail weights up and down; no labels);
    - FedAvg: jaxlab.federated.split.fl_round_bytes (K |W| b each way);
    - SplitFed V1 (the engine's split accounting, split.make_splitnn_epoch's kinds): per example the
      head's whole output (activation plus what the U-shape keeps on the client: RED-CNN's input image,
      U-Net's skips) up, its gradient down, the label image up (b a pixel), and the head weights up and
      down (the server replicas are averaged on the server);
    - local only: nothing; centralised: every training pair (x, y) once (data_up; not per round)."""
    parts, init_params, _ = task.model_parts(config, config.data.image_size)
    params = jax.eval_shape(init_params, jax.random.key(0))
    size, k = config.data.image_size, len(clients.train)
    n = sum(len(t["x"]) for t in clients.train)
    x = jax.ShapeDtypeStruct((1, size, size, 1), jnp.float32)
    head_out = jax.eval_shape(lambda p, x: parts[0].apply(p, {}, x, None)[0], params[0], x)
    sent = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(head_out))
    fed = fl_round_bytes(k, param_count(params))
    zero = dict.fromkeys(BYTE_COLUMNS, 0.0)
    pixels = n * size * size * float_bytes
    head_weights = k * param_count(params[0]) * float_bytes
    return {"rosfl": zero | rosfl_measured, "rosfl_no_dwcs": zero | rosfl_measured,
            "fedavg": zero | {"weights_up": float(fed["weights_up"]), "weights_down": float(fed["weights_down"])},
            "splitfed": zero | {"activation_up": float(n * sent * float_bytes),
                                "gradient_down": float(n * sent * float_bytes), "labels_up": float(pixels),
                                "weights_up": float(head_weights), "weights_down": float(head_weights)},
            "local": dict(zero), "centralised": zero | {"data_up": float(2 * pixels)}}


def examples(runs: dict, clients: task.ClientSet, segmentation: bool) -> dict[str, np.ndarray]:
    """One test image per client (S, S) for "input", "label" and each pictured setting's output (the
    predicted mask, logit > 0, for segmentation)."""
    from jaxlab.train.loop import restore_for_eval

    x = np.stack([t["x"][0] for t in clients.test])
    out = {"input": x[..., 0], "label": np.stack([t["y"][0] for t in clients.test])[..., 0]}
    if segmentation:
        out["label"] = (out["label"] > runs["rosfl"][0].data.seg_threshold).astype(np.float32)
    for name in PICTURED:
        config, workdir, method = runs[name]
        _, state = restore_for_eval(config, workdir, method)
        y = np.asarray(method.apply_fn(state, {"x": x}))[..., 0]
        out[name] = (y > 0).astype(np.float32) if segmentation else y
    return out


def plot_examples(images: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    """Rows: (task, client); columns: input, label, settings; one grey scale per row (the label's
    range; the input's for segmentation rows, whose labels are 0/1 masks)."""
    rows = [(t, k) for t in images for k in range(len(images[t]["label"]))]
    names = list(next(iter(images.values())))
    fig, axes = pyplot().subplots(len(rows), len(names), figsize=(1.8 * len(names), 1.8 * len(rows)),
                                  squeeze=False)
    for i, (t, k) in enumerate(rows):
        ref = images[t]["label"][k]
        lo, hi = float(ref.min()), float(ref.max())
        for j, name in enumerate(names):
            img = images[t][name][k]
            vmin, vmax = ((float(img.min()), float(img.max())) if t == "segmentation" and name == "input"
                          else (lo, hi))
            axes[i, j].imshow(img, cmap="gray", vmin=vmin, vmax=vmax)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title(NAMES.get(name, name), fontsize=8)
            if j == 0:
                axes[i, j].set_ylabel(f"{t[:4]}. c{k + 1}", fontsize=8)
    save_figure(fig, path)


def per_seed(result: dict, setting: str, k: int, metric: str) -> list[float]:
    """Client k's `metric` under `setting`, one value per seed."""
    return [seed["per_client"][setting][k][metric] for seed in result["seeds"]]


def check_findings(task_name: str, result: dict) -> list[Finding]:
    """Per client: RoS-FL's output scores better than the degraded input's on every seed (PSNR for
    restoration, Dice for segmentation), with the smallest gain over seeds."""
    metric = METRICS[task_name][0]
    num = len(result["seeds"][0]["per_client"]["rosfl"])
    out = []
    for k in range(num):
        gains = np.subtract(per_seed(result, "rosfl", k, metric), per_seed(result, "input", k, metric))
        what = "restored images" if task_name == "restoration" else "segmentations"
        out.append(Finding(f"client {k + 1}: {what} better than the degraded input ({metric})",
                           f"RoS-FL - input: {mean_std(gains, digits=DIGITS[metric])} "
                           f"(min {gains.min():.{DIGITS[metric]}f}) over {len(gains)} seeds", bool(np.all(gains > 0))))
    return out


def format_task(task_name: str, result: dict) -> list[str]:
    seeds = result["seeds"]
    num = len(seeds[0]["per_client"]["rosfl"])
    lines = [f"## {task_name.capitalize()} (seeds {[seed['seed'] for seed in seeds]})", ""]
    if "rounds" in result:
        lines += [f"{result['rounds']} rounds of one local epoch, Adam lr {result['lr']:g}.", ""]
    for metric in METRICS[task_name]:
        rows = []
        for s in ("input", *SETTINGS):
            cells = [mean_std(per_seed(result, s, k, metric), digits=DIGITS[metric]) for k in range(num)]
            means = np.mean([per_seed(result, s, k, metric) for k in range(num)], axis=0)
            rows.append([NAMES[s], *cells, mean_std(means, digits=DIGITS[metric])])
        better = "higher" if HIGHER_IS_BETTER[metric] else "lower"
        lines += [f"Final test {metric.upper()} per client ({better} is better; mean ± std over seeds):", "",
                  markdown_table(["setting"] + [f"client {k + 1}" for k in range(num)] + ["mean"], rows), ""]
    lines += [findings_table(result["findings"], ("finding", "here", "holds")), ""]
    drift = {s: {p: np.mean([seed["drift"][s][p] for seed in seeds], 0) for p in seeds[0]["drift"][s]}
             for s in seeds[0]["drift"]}
    drows = [[NAMES[s], p, ", ".join(f"{v:.3f}" for v in drift[s][p])] for s in drift for p in drift[s]]
    lines += ["Round-to-round drift ||w_t - w_{t-1}|| of the global parts (rounds 1, 2, ..., last; mean over "
              "seeds):", "", markdown_table(["setting", "part", "drift per round"], drows), ""]
    brows = [[NAMES[s], *(f"{result['bytes'][s][c]:,.0f}" for c in BYTE_COLUMNS),
              f"{sum(result['bytes'][s].values()):,.0f}"] for s in SETTINGS]
    lines += ["Bytes per round by message kind (centralised: the pooled data, once; RoS-FL measured in its "
              "runs, the baselines from the engine's formulas):", "",
              markdown_table(["setting", *BYTE_COLUMNS, "total"], brows), ""]
    return lines


def format_report(result: dict) -> str:
    first = next(iter(result["tasks"].values()))
    num = len(first["seeds"][0]["per_client"]["rosfl"])
    lines = ["# RoS-FL report", "", f"{num} clients (HyperFed protocols 1-{num}, fan beam, rescaled); "
             f"seeds {result['seeds']}.", ""]
    for task_name, task_result in result["tasks"].items():
        lines += format_task(task_name, task_result)
    lines += ["Example outputs (seed %d): report.png (rows: task and client; one test image each)." %
              result["seeds"][0], ""]
    return "\n".join(lines)


def report(config, workdir: str | Path) -> dict:
    """Runs every seed, task and setting (module docstring) under workdir/<task>/seed<s>/<setting>;
    writes report.md / .json / .png after each task of each seed (the tables then hold the seeds done so
    far: each task's table says its seeds)."""
    workdir = Path(workdir)
    config = report_config(config)
    seeds = [int(s) for s in config.report.seeds]
    for task_name in config.report.tasks:
        if task_name not in task.TASKS:
            raise ValueError(f"config.report.tasks: {task_name!r} is not one of {task.TASKS}")
    tasks = {t: {"seeds": []} for t in config.report.tasks}
    images = {}
    for seed in seeds:
        for task_name in config.report.tasks:
            c = task_config(config, task_name, seed)
            clients = task.make_clients(c)
            out = run_all(c, clients, workdir / task_name / f"seed{seed}")
            if seed == seeds[0]:
                images[task_name] = examples(out["runs"], clients, task_name == "segmentation")
                tasks[task_name]["bytes"] = setting_bytes(c, clients, out["bytes"])
            tasks[task_name].update(rounds=int(c.train.steps), lr=float(c.optimizer.lr))
            tasks[task_name]["seeds"].append({"seed": seed, "per_client": out["per_client"], "drift": out["drift"]})
            tasks[task_name]["findings"] = check_findings(task_name, tasks[task_name])
            done = {t: v for t, v in tasks.items() if v["seeds"]}
            result = {"tasks": done, "seeds": seeds[: seeds.index(seed) + 1],
                      "clients": [{"sino_shape": list(g.sino_shape), "I0": d}
                                  for g, d in zip(clients.geometries, clients.doses)]}
            write_report(workdir, result, format_report(result),
                         lambda path: plot_examples({t: images[t] for t in done}, path), echo=False)
    print(format_report(result), flush=True)
    return result
