"""The HyperFed report (issue #15 "Experiments"): CT reconstruction on the config's five clients, every
setting a trainer run of `task.build` on one simulation of the clients' scans, config.report.rounds
rounds each:

    hyperfed   HyperFed: private hypernetwork per client, everything else averaged
    fedavg     FedAvg without a hypernetwork (one learned FiLM vector, averaged)
    fedbn      FedBN-style personalisation (a private FiLM vector per client)
    local      local-only: every client trains the HyperFed model alone (nothing aggregated)

Recorded: final test PSNR / SSIM / RMSE per client (and the FBP input's, the same low-dose data), and
example reconstructions (report.png: one test image per client). Held-out sixth protocol
(task.HELD_OUT_PROTOCOL, never trained on): its test scans reconstructed by the shared imaging network
modulated by each client's hypernetwork given the new protocol vector (HyperFed; and by each client's
FiLM vector for FedBN, by each local model), by FedAvg's global model, and by FBP; and the step size
each client's hypernetwork gives (mean over blocks) for its own protocol and for the new one. Not in it: seeds
beyond config.seed, fine-tuning a hypernetwork for the new scanner, the RED-CNN variant (model.name =
"red_cnn" runs the same report with it).

    jaxlab report --config hyperfed:tiny --workdir /tmp/hyperfed_report
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab import metrics
from jaxlab.benchmarking import markdown_table
from jaxlab.methods.hyperfed import task
from jaxlab.models import hypernet as H
from jaxlab.models import learn as L
from jaxlab.report import pyplot, save_figure, write_report
from jaxlab.train.metrics import read_metrics

SETTINGS = ("hyperfed", "fedavg", "fedbn", "local")
NAMES = {"hyperfed": "HyperFed", "fedavg": "FedAvg (no hypernetwork)", "fedbn": "FedBN-style (private FiLM)",
         "local": "local only", "input": "FBP (input)"}


def run_config(config, algorithm: str):
    """The trainer config of one report run: config.report.rounds rounds, evaluated and checkpointed
    once at the end."""
    c = copy.deepcopy(config)
    c.hyperfed.algorithm = algorithm
    steps = int(config.report.rounds)
    c.train.update(steps=steps, eval_every=steps, checkpoint_every=steps, best_metric="", progress=False)
    return c


def train_run(config, clients: task.ClientSet, workdir: Path):
    """Trains (or resumes) one run; returns (its last eval row, its restored state, the method)."""
    from jaxlab.train.loop import restore_for_eval, train

    method = task.build(config, clients)
    train(config, workdir, method)
    row = [r for r in read_metrics(workdir) if r["split"] == "eval"][-1]
    return row, restore_for_eval(config, workdir, method)[1]


def scores(row: dict, suffix: str, prefix: str = "") -> dict[str, float]:
    return {m: row[f"{prefix}{m}{suffix}"] for m in ("psnr", "ssim", "rmse")}


def image_scores(out: np.ndarray, label: np.ndarray, peak: float) -> dict[str, float]:
    """PSNR (of the mean MSE), SSIM (mean) and RMSE of (N, S, S, 1) reconstructions, as eval_finish."""
    mse = float(np.mean(metrics.mse(jnp.asarray(out), jnp.asarray(label))))
    return {"psnr": float(10 * np.log10(peak**2 / max(mse, 1e-20))), "rmse": float(np.sqrt(mse)),
            "ssim": float(np.mean(metrics.ssim(jnp.asarray(out), jnp.asarray(label), peak)))}


def held_out(config, state, algorithm: str, heldout: task.ClientSet, peak: float) -> list[dict[str, float]]:
    """Scores on the held-out scanner's test scans of each trained client's model (its private parts,
    given the new protocol vector) or, for FedAvg, of the one global model."""
    model = task.make_model(config, algorithm)
    alg = task.make_algorithm(model, heldout.geometry, algorithm, config)
    num = int(config.hyperfed.num_clients)
    per_client = task.client_stack(alg, state.extra, num)
    test = dict(heldout.test[0], client=np.zeros(len(heldout.test[0]["x"]), np.int32))
    run = jax.jit(functools.partial(task.reconstruct, model))
    models = range(1 if algorithm == "fedavg" else num)
    return [image_scores(np.asarray(run(jax.tree.map(lambda a: a[j:j + 1], per_client), heldout.geometry, test)),
                         test["y"], peak) for j in models]


def step_sizes(config, state, algorithm: str, clients: task.ClientSet) -> list[dict[str, float]]:
    """Per client j (its hypernetwork and imaging network): the step size lambda, averaged over the
    blocks, it gives for its own protocol ("own") and for the held-out one ("held_out"), and the
    protocols' bounds f . w + b (jaxlab.models.learn.step_size)."""
    model = task.make_model(config, algorithm)
    alg = task.make_algorithm(model, clients.geometry, algorithm, config)
    protocols = clients.protocols
    per_client = task.client_stack(alg, state.extra, len(protocols))
    k = model.num_modulations()
    hyper = H.HyperNet(k, dropout=model.dropout)
    features = {name: jnp.asarray(np.stack([H.protocol_features(*p)])) for name, p in
                (("held_out", task.HELD_OUT_PROTOCOL),)}
    out = []
    for j, protocol in enumerate(protocols):
        params = jax.tree.map(lambda a: a[j], per_client)
        row = {}
        for name, f in (("own", jnp.asarray(np.stack([H.protocol_features(*protocol)]))),
                        ("held_out", features["held_out"])):
            gamma, beta = hyper.apply({"params": params["hypernet"]}, f)
            w_fed = params["imaging"]["blocks"]["weight_fed"][:, 0]
            lam = jax.vmap(lambda w: L.step_size(w, gamma[:, 0], beta[:, 0], f))(w_fed)
            row[name] = float(jnp.mean(lam))
            row[f"bound_{name}"] = float(L.step_bound(f)[0])
        out.append(row)
    return out


def run_all(config, clients: task.ClientSet, heldout: task.ClientSet, workdir: Path) -> dict:
    num = len(clients.train)
    peak = float(np.ptp(np.concatenate([t["y"] for t in clients.test])))
    per_client, unseen, states, steps = {}, {}, {}, {}
    for name in SETTINGS:
        c = run_config(config, name)
        row, state = train_run(c, clients, workdir / name)
        per_client[name] = [scores(row, f"_c{k}") for k in range(num)]
        if name == "hyperfed":
            per_client["input"] = [scores(row, f"_c{k}", "input_") for k in range(num)]
        unseen[name] = held_out(c, state, name, heldout, peak)
        if name in ("hyperfed", "local") and c.model.name == "learn":
            steps[name] = step_sizes(c, state, name, clients)
        states[name] = (c, state)
    unseen["input"] = [image_scores(heldout.test[0]["x"], heldout.test[0]["y"], peak)]
    return {"per_client": per_client, "held_out": unseen, "states": states, "peak": peak, "step_sizes": steps}


def examples(states: dict, clients: task.ClientSet) -> dict[str, np.ndarray]:
    """One test image per client (S, S): the FBP input, the label and each setting's reconstruction."""
    test = {n: np.stack([t[n][0] for t in clients.test]) for n in clients.test[0]}
    test["client"] = np.arange(len(clients.test), dtype=np.int32)
    out = {NAMES["input"]: test["x"][..., 0], "label": test["y"][..., 0]}
    for name, (config, state) in states.items():
        model = task.make_model(config, name)
        alg = task.make_algorithm(model, clients.geometry, name, config)
        params = task.client_stack(alg, state.extra, len(clients.test))
        run = jax.jit(functools.partial(task.reconstruct, model))
        out[NAMES[name]] = np.asarray(run(params, clients.geometry, test))[..., 0]
    return out


def plot_examples(images: dict[str, np.ndarray], path: Path) -> None:
    """A grid: one row per client, one column per entry of `images` ({title: (K, S, S)}), every image of a
    row on the grey scale of its label's range."""
    titles, num = list(images), len(images["label"])
    fig, axes = pyplot().subplots(num, len(titles), figsize=(1.9 * len(titles), 1.9 * num), squeeze=False)
    for k in range(num):
        lo, hi = float(images["label"][k].min()), float(images["label"][k].max())
        for j, title in enumerate(titles):
            ax = axes[k, j]
            ax.imshow(images[title][k], cmap="gray", vmin=lo, vmax=hi)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title if k == 0 else "", fontsize=7)
            ax.set_ylabel(f"client {k + 1}" if j == 0 else "", fontsize=7)
    save_figure(fig, path)


def format_report(result: dict) -> str:
    per_client, unseen = result["per_client"], result["held_out"]
    num = len(per_client["hyperfed"])
    settings = ["input", *SETTINGS]

    def triple(s):
        return f"{s['psnr']:.2f} / {s['ssim']:.3f} / {s['rmse']:.4f}"

    lines = ["# HyperFed report", "",
             f"{num} clients (HyperFed protocols 1-{num}, fan beam, scaled to {result['image_size']} px: "
             f"views / {result['view_factor']}, detectors / {result['det_factor']}, I0 / {result['dose_factor']}); "
             f"{result['model']}; {result['rounds']} rounds; seed {result['seed']}. Final test scores per client "
             "(PSNR dB / SSIM / RMSE; PSNR peak = the test labels' range).", ""]
    rows = [[NAMES[s]] + [triple(per_client[s][k]) for k in range(num)]
            + [f"{np.mean([per_client[s][k]['psnr'] for k in range(num)]):.2f}"] for s in settings]
    lines += [markdown_table(["setting"] + [f"client {k + 1}" for k in range(num)] + ["mean PSNR"], rows), ""]
    better = [per_client["hyperfed"][k]["psnr"] > per_client["input"][k]["psnr"] for k in range(num)]
    lines += [f"HyperFed above FBP of the same low-dose data on {sum(better)} of {num} clients.", ""]
    lines += [f"Held-out sixth protocol {result['held_out_protocol']} (views, dets, dImg, dDet, s2r, d2r, I0; "
              "never trained on). HyperFed / FedBN / local: the shared (or local) network with each "
              "client's hypernetwork given the new protocol (its FiLM vector for FedBN), one column per "
              "client; FedAvg: its global model.", ""]
    urows = [[NAMES[s]] + [triple(v) for v in unseen[s]] + [""] * (num - len(unseen[s]))
             + [f"{np.mean([v['psnr'] for v in unseen[s]]):.2f}"] for s in settings]
    lines += [markdown_table(["setting"] + [f"model of client {k + 1}" for k in range(num)] + ["mean PSNR"], urows),
              ""]
    for name, rows in result.get("step_sizes", {}).items():
        lines += [f"{NAMES[name]}: step size lambda (mean over blocks) each client's hypernetwork gives for its own "
                  "protocol and for the held-out one, beside the protocols' bounds f . w + b.", ""]
        srows = [[f"client {j + 1}", r["own"], r["bound_own"], r["held_out"], r["bound_held_out"]]
                 for j, r in enumerate(rows)]
        lines += [markdown_table(["hypernetwork of", "lambda (own)", "bound (own)", "lambda (held-out)",
                                  "bound (held-out)"], srows), ""]
    lines += ["Example reconstructions: report.png (rows: clients; one test image each).", ""]
    return "\n".join(lines)


def report(config, workdir: str | Path) -> dict:
    """Runs every setting (module docstring) under workdir/<setting>, writes report.md / .json / .png."""
    workdir = Path(workdir)
    clients = task.make_clients(config)
    heldout = task.make_clients(config, protocols=[task.HELD_OUT_PROTOCOL], seed_offset=1)
    out = run_all(config, clients, heldout, workdir)
    images = examples(out["states"], clients)
    d = config.data
    result = {"per_client": out["per_client"], "held_out": out["held_out"], "step_sizes": out["step_sizes"],
              "rounds": int(config.report.rounds),
              "seed": int(config.seed), "image_size": int(d.image_size), "view_factor": d.view_factor,
              "det_factor": d.det_factor, "dose_factor": d.dose_factor, "held_out_protocol": task.HELD_OUT_PROTOCOL,
              "model": f"{config.model.name}, {config.model.blocks} blocks x {config.model.features} channels",
              "clients": [{"sino_shape": list(g.sino_shape), "I0": i0} for g, i0 in zip(clients.geometries,
                                                                                        clients.doses)]}
    write_report(workdir, result, format_report(result), lambda path: plot_examples(images, path))
    return result
