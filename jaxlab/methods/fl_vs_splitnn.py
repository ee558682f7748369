"""FL vs SplitNN on ECG beats (Gao et al. 2020, fl_vs_splitnn.md): a report-only method.

`jaxlab report --config fl_vs_splitnn:tiny` trains, for every data distribution of
config.report.distributions (IID, natural MIT-BIH class imbalance, one class per client):
- FL: FedAvg (sample-weighted) of the FL ECG model (jaxlab.models.cnn1d.ECGFLNet), client Adam whose
  state persists across rounds, `local_epochs` local epochs a round, on the vmapped client axis;
- vanilla SplitNN: the SplitNN client/server halves, clients in turn with client-weight relay, one
  server with one Adam (jaxlab.federated.split.make_splitnn_epoch);
for the same budget (`rounds` FL rounds of one local epoch = `rounds` SplitNN epochs: both paradigms
process every training example once per round). It records test accuracy after every round/epoch,
bytes by kind (measured from the arrays that cross and from the spec's formulas), wall time and
memory, writes report.md / report.json / report.png, and checks the paper's findings in kind.

Client data are cut to a multiple of the batch size (DataLoader drop_last), so the measured bytes
equal the formulas exactly: FL per round = 2*K*|W|*b; SplitNN per epoch = sum_k n_k (2 d b + l) + 2 K |W_c| b.

Wall time on CPU: XLA CPU runs these convs several times slower inside a rolled lax.scan than
unrolled (SplitNN step at batch 32: ~17 ms rolled vs ~1.8 ms unrolled; FL model ~12 vs ~6 ms), and
the SplitNN epoch is a scan of scans, so CPU train times overstate SplitNN's cost; compare on GPU.

CIFAR-10: the models (jaxlab.models.resnet_cifar: ResNet-20, the ResNet-20 and MobileNet client cuts)
and load_cifar10 (tfds:cifar10 under a data_dir) exist; the report runs the ECG task only so far
(FedAvg of BatchNorm statistics is not wired into the report).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlab.benchmarking import markdown_table, peak_device_memory_bytes, peak_host_memory_bytes
from jaxlab.data.sources import get_source
from jaxlab.federated import algorithms as F
from jaxlab.federated import clients as C
from jaxlab.federated import split as S
from jaxlab.federated.partition import label_histogram, partition
from jaxlab.methods.base import softmax_cross_entropy
from jaxlab.methods.ecg_cnn import ecg_transform
from jaxlab.models.cnn1d import ECGFLNet, ECGSplitNNClient, ECGSplitNNServer
from jaxlab.train.state import param_count

PyTree = Any
CUT_SHAPE = (64, 16)  # SplitNN cut activation per sample (length, channels): d = 1,024 floats


def build(config):
    raise ValueError(
        "fl_vs_splitnn is a report-only method (it trains FL and SplitNN side by side); run "
        "`jaxlab report --config fl_vs_splitnn:tiny` (or :paper)"
    )


# --- data -----------------------------------------------------------------------------------------------


def load_beats(config, dist, split: str) -> dict[str, np.ndarray]:
    """{"x": (N, 128, 1) float32, "y": (N,) int32} from config.data.source with dist's class balance
    (`balance`) at data.options.scale * dist.scale_factor."""
    d = config.data
    options = {**dict(d.options), "balance": dist.balance, "scale": d.options.scale * dist.scale_factor}
    src = get_source(d.source, split, seed=d.seed, data_dir=d.data_dir, **options)
    batch = ecg_transform(src.get(np.arange(len(src))))
    return {"x": batch["signal"], "y": batch["label"]}


CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def load_cifar10(data_dir: str | None, split: str, limit: int | None = None) -> dict[str, np.ndarray]:
    """{"x": (N, 32, 32, 3) float32 normalised per channel, "y": (N,) int32} from "tfds:cifar10" prepared
    under data_dir (see jaxlab.data.tfds_source); the first `limit` examples if given."""
    src = get_source("tfds:cifar10", split, data_dir=data_dir)
    batch = src.get(np.arange(min(len(src), limit or len(src))))
    x = (batch["image"].astype(np.float32) / 255.0 - np.float32(CIFAR_MEAN)) / np.float32(CIFAR_STD)
    return {"x": x.astype(np.float32), "y": batch["label"].astype(np.int32)}


def client_parts(labels: np.ndarray, dist, batch_size: int, seed: int) -> list[np.ndarray]:
    """Partitions by dist.scheme (dist.options passed on), each client cut to a multiple of batch_size."""
    parts = partition(dist.scheme, labels, dist.num_clients, seed=seed, **dict(dist.options))
    cut = [p[: len(p) // batch_size * batch_size] for p in parts]
    if any(len(p) == 0 for p in cut):
        raise ValueError(f"{dist.name}: a client has fewer than batch_size={batch_size} examples; "
                         f"sizes {[len(p) for p in parts]} (raise data.options.scale)")
    return cut


# --- models as pure functions -----------------------------------------------------------------------------


def fl_loss_fn(model: ECGFLNet, double_softmax: bool):
    def loss_fn(params, batch, rng):
        logits = model.apply({"params": params}, batch["x"])
        return softmax_cross_entropy(logits, batch["y"], double_softmax=double_softmax).mean()

    return loss_fn


def split_fns(client: ECGSplitNNClient, server: ECGSplitNNServer, double_softmax: bool):
    """client_apply(p, x (B,128,1), rng) -> (B, 64, 16); server_loss(p, a, y, rng) -> ()."""

    def client_apply(params, x, rng):
        return client.apply({"params": params}, x)

    def server_loss(params, activation, y, rng):
        logits = server.apply({"params": params}, activation)
        return softmax_cross_entropy(logits, y, double_softmax=double_softmax).mean()

    return client_apply, server_loss


def make_evaluator(logits_fn, test: dict[str, np.ndarray], batch_size: int, num_classes: int):
    """evaluate(params) -> {"accuracy", "balanced_accuracy"} (mean per-class recall) on the test set."""
    n = len(test["y"]) // batch_size * batch_size or len(test["y"])
    x = jnp.asarray(test["x"][:n]).reshape(-1, min(batch_size, n), *test["x"].shape[1:])
    y = np.asarray(test["y"][:n])

    @jax.jit
    def predict(params):
        return jax.lax.map(lambda xb: jnp.argmax(logits_fn(params, xb), -1), x).reshape(-1)

    def evaluate(params) -> dict[str, float]:
        pred = np.asarray(predict(params))
        recall = [np.mean(pred[y == c] == c) for c in range(num_classes) if np.any(y == c)]
        return {"accuracy": float(np.mean(pred == y)), "balanced_accuracy": float(np.mean(recall))}

    return evaluate


def tree_bytes(tree: PyTree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))


# --- the two paradigms ------------------------------------------------------------------------------------


def run_fl(config, train, parts, evaluate, key) -> dict:
    """FedAvg rounds; per round: test accuracy, bytes measured from the weights that cross, time."""
    c = config.fl
    model = ECGFLNet(num_classes=config.model.num_classes)
    params = model.init(key, jnp.asarray(train["x"][:1]))["params"]
    tx = optax.adam(config.optimizer.lr)
    alg = F.fedavg(fl_loss_fn(model, config.model.double_softmax), tx, persist_opt_state=True,
                   chunk_size=len(parts))
    state = alg.init(params, len(parts))
    curve, times, measured = [], [], 0
    for r in range(config.report.rounds):
        data = C.stack_client_data(train, parts, config.data.batch_size, epochs=c.local_epochs,
                                   seed=config.seed * 100_003 + r)
        t0 = time.perf_counter()
        plan = F.plan_round(config.seed, r, len(parts))
        sent_down = len(plan.client_ids) * tree_bytes(alg.broadcast(state)["params"])
        state, metrics = alg.apply(state, data, plan)
        jax.block_until_ready(state.params)
        times.append(time.perf_counter() - t0)
        measured += sent_down + int(metrics["clients_accepted"]) * tree_bytes(state.params)  # + uploads
        curve.append({"round": r + 1, "loss": float(metrics["loss"]), **evaluate(state.params)})
    n_params = param_count(params)
    per_round = S.fl_round_bytes(len(parts), n_params)
    client_state = tree_bytes(params) + tree_bytes(tx.init(params))
    return {"curve": curve, "times": times, "params": n_params, "client_params": n_params,
            "bytes_measured": measured, "bytes_formula": per_round["total"] * config.report.rounds,
            "bytes_formula_per_round": per_round, "client_state_bytes": client_state}


def run_splitnn(config, train, parts, evaluate, key) -> dict:
    """Vanilla SplitNN epochs; per epoch: test accuracy, bytes measured from the arrays that cross, time."""
    client, server = ECGSplitNNClient(), ECGSplitNNServer(num_classes=config.model.num_classes)
    client_apply, server_loss = split_fns(client, server, config.model.double_softmax)
    c_key, s_key = jax.random.split(key)
    x0 = jnp.asarray(train["x"][:1])
    cp = client.init(c_key, x0)["params"]
    sp = server.init(s_key, client.apply({"params": cp}, x0))["params"]
    tx = optax.adam(config.optimizer.lr)
    epoch = S.make_splitnn_epoch(client_apply, server_loss, tx, tx)
    state = S.init_splitnn(cp, sp, tx, tx, len(parts))
    curve, times, measured = [], [], {}
    for r in range(config.report.rounds):
        data = C.stack_client_data(train, parts, config.data.batch_size, seed=config.seed * 100_003 + r)
        t0 = time.perf_counter()
        state, metrics = epoch(state, data, jax.random.fold_in(key, r))
        jax.block_until_ready(state.server_params)
        times.append(time.perf_counter() - t0)
        for kind in ("activations", "labels", "gradients", "weights"):
            measured[kind] = measured.get(kind, 0) + int(metrics[kind])
        params = {"client": state.client_params, "server": state.server_params}
        curve.append({"round": r + 1, "loss": float(metrics["loss"]), **evaluate(params)})
    d = int(np.prod(CUT_SHAPE))
    per_epoch = S.splitnn_epoch_bytes([len(p) for p in parts], d, param_count(cp))
    client_state = tree_bytes(cp) + tree_bytes(tx.init(cp))
    return {"curve": curve, "times": times, "params": param_count(cp) + param_count(sp),
            "client_params": param_count(cp), "bytes_measured": sum(measured.values()),
            "bytes_measured_by_kind": measured, "bytes_formula": per_epoch["total"] * config.report.rounds,
            "bytes_formula_per_round": per_epoch, "client_state_bytes": client_state}


def split_logits(client: ECGSplitNNClient, server: ECGSplitNNServer):
    return lambda p, x: server.apply({"params": p["server"]}, client.apply({"params": p["client"]}, x))


# --- report -----------------------------------------------------------------------------------------------


def run_distribution(config, dist) -> dict:
    """Trains both paradigms on one distribution; returns its row of the report."""
    train = load_beats(config, dist, "train")
    test = load_beats(config, dist, "test")
    parts = client_parts(train["y"], dist, config.data.batch_size, config.seed)
    k = config.model.num_classes
    key = jax.random.key(config.seed)
    fl_eval = make_evaluator(lambda p, x: ECGFLNet(num_classes=k).apply({"params": p}, x), test,
                             config.data.eval_batch_size, k)
    sp_eval = make_evaluator(split_logits(ECGSplitNNClient(), ECGSplitNNServer(num_classes=k)), test,
                             config.data.eval_batch_size, k)
    out = {"name": dist.name, "num_clients": len(parts), "client_sizes": [len(p) for p in parts],
           "label_histogram": label_histogram(parts, train["y"], k).tolist(), "test_size": len(test["y"])}
    for name, run, evaluate in (("FL", run_fl, fl_eval), ("SplitNN", run_splitnn, sp_eval)):
        res = run(config, train, parts, evaluate, key)
        res["wall_s"] = float(sum(res["times"]))
        res["steady_round_s"] = float(np.median(res["times"][1:] if len(res["times"]) > 1 else res["times"]))
        res["final"] = res["curve"][-1]
        res["peak_host_bytes_after"] = peak_host_memory_bytes()
        res["peak_device_bytes_after"] = peak_device_memory_bytes()
        out[name] = res
    return out


def check_findings(rows: list[dict], bytes_ratio: float) -> list[dict]:
    """The paper's findings in kind, from the final test accuracies and the bytes sent."""
    by = {r["name"]: r for r in rows}
    acc = lambda r, p: r[p]["final"]["accuracy"]
    out = []
    if "imbalanced" in by:
        r = by["imbalanced"]
        out.append({"finding": "imbalanced: SplitNN accuracy > FL accuracy",
                    "detail": f"SplitNN {100 * acc(r, 'SplitNN'):.2f}% vs FL {100 * acc(r, 'FL'):.2f}%",
                    "holds": acc(r, "SplitNN") > acc(r, "FL")})
    if "non-iid" in by:
        r = by["non-iid"]
        out.append({"finding": "extreme non-IID: FL accuracy > SplitNN accuracy",
                    "detail": f"FL {100 * acc(r, 'FL'):.2f}% vs SplitNN {100 * acc(r, 'SplitNN'):.2f}%",
                    "holds": acc(r, "FL") > acc(r, "SplitNN")})
    for r in rows:
        ratio = r["SplitNN"]["bytes_measured"] / r["FL"]["bytes_measured"]
        out.append({"finding": f"{r['name']}: FL sends >= {bytes_ratio:g}x fewer bytes than SplitNN",
                    "detail": f"SplitNN/FL = {ratio:.1f}x", "holds": ratio >= bytes_ratio})
    return out


def report(config, workdir: str | Path) -> dict:
    """Runs every distribution, writes report.md, report.json, report.png under workdir; returns the result."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = [run_distribution(config, dist) for dist in config.report.distributions]
    result = {"rounds": int(config.report.rounds), "rows": rows,
              "findings": check_findings(rows, float(config.report.bytes_ratio))}
    (workdir / "report.json").write_text(json.dumps(result, indent=2))
    text = format_report(result)
    (workdir / "report.md").write_text(text)
    plot_report(rows, workdir / "report.png")
    print(text, flush=True)
    return result


def format_report(result: dict) -> str:
    header = ["distribution", "paradigm", "clients", "final test acc %", "balanced acc %", "best acc %",
              "bytes sent (measured)", "bytes (formula)", "train s", "s / round", "client state KiB",
              "peak host RSS MiB"]
    rows = []
    for r in result["rows"]:
        for p in ("FL", "SplitNN"):
            x = r[p]
            rows.append([r["name"], p, r["num_clients"], f"{100 * x['final']['accuracy']:.2f}",
                         f"{100 * x['final']['balanced_accuracy']:.2f}",
                         f"{100 * max(c['accuracy'] for c in x['curve']):.2f}",
                         f"{x['bytes_measured']:,}", f"{x['bytes_formula']:,}", f"{x['wall_s']:.2f}",
                         f"{x['steady_round_s']:.3f}", f"{x['client_state_bytes'] / 1024:.1f}",
                         f"{x['peak_host_bytes_after'] / 2**20:.0f}"])
    yes = lambda b: "yes" if b else "NO"
    findings = markdown_table(["paper finding", "here", "holds"],
                              [[f["finding"], f["detail"], yes(f["holds"])] for f in result["findings"]])
    return (f"FL vs SplitNN on ECG beats, {result['rounds']} FL rounds (1 local epoch) vs "
            f"{result['rounds']} SplitNN epochs\n\n{markdown_table(header, rows)}\n\n"
            "train s includes the first round's compilation; peak host RSS is the process's running "
            "maximum after that paradigm.\n\n" + findings + "\n")


def plot_report(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 3.4), squeeze=False)
    for ax, r in zip(axes[0], rows):
        for p, style in (("FL", "C0-"), ("SplitNN", "C3--")):
            curve = r[p]["curve"]
            ax.plot([c["round"] for c in curve], [100 * c["accuracy"] for c in curve], style, label=p)
        ax.set_title(f"{r['name']} ({r['num_clients']} clients)")
        ax.set_xlabel("FL round / SplitNN epoch")
        ax.set_ylabel("test accuracy %")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
