"""FL vs SplitNN (Gao et al. 2020, fl_vs_splitnn.md): a report-only method.

`jaxlab report --config fl_vs_splitnn:tiny` trains, for every data distribution of
config.report.distributions (IID, class imbalance, one class per client), side by side:
- FL: FedAvg (sample-weighted) of the whole model, BatchNorm statistics averaged with the weights
  (jaxlab.federated.algorithms, stateful), client optimizer state kept across rounds, `local_epochs`
  local epochs a round, on the vmapped client axis;
- vanilla SplitNN: the client/server halves, clients in turn with client-weight (and BN statistics)
  relay, one server with one optimizer (jaxlab.federated.split.make_splitnn_epoch);
for the same budget (`rounds` FL rounds of one local epoch = `rounds` SplitNN epochs: both paradigms
process every training example once per round). It records test accuracy after every round/epoch,
bytes by kind (measured from the arrays that cross and from the spec's formulas), wall time and
memory, writes report.md / report.json / report.png, and checks the paper's findings in kind. Every
distribution runs once per seed of config.report.seeds and accuracies are compared as means over the
seeds: under one class per client, which paradigm ends ahead changes from seed to seed.

Models (config.model.name): "ecg" (the FL ECG CNN and the SplitNN ECG halves, jaxlab.models.cnn1d),
"resnet20" (ResNet-20 and its cut, jaxlab.models.resnet_cifar) and "mobilenet" (CIFAR MobileNet and its
cut, jaxlab.models.mobilenet_cifar). ECG beats come from config.data.source with each distribution's
class balance; images from "tfds:cifar10" under data.data_dir, or any image source (the offline
variants use the real scikit-learn digits, resized to 32x32 RGB), normalised per channel by the train
split's mean and std (on CIFAR-10 these are the reference's constants).

Client data are cut to a multiple of the batch size (DataLoader drop_last), so the measured bytes
equal the formulas exactly: FL per round = 2*K*|W|*b; SplitNN per epoch = sum_k n_k (2 d b + l) + 2 K |W_c| b,
where |W| and |W_c| count BatchNorm running statistics with the weights (they cross in the reference's
state_dict; its int64 num_batches_tracked counters are not counted).

Both paradigms run their convolutions as im2col matmuls inside their scans (jaxlab.federated.im2col;
XLA CPU runs convolutions 10-70x slower inside loops), so CPU wall times compare the paradigms fairly.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import time
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlab.benchmarking import markdown_table, peak_device_memory_bytes, peak_host_memory_bytes
from jaxlab.data.pipeline import eval_batches
from jaxlab.data.sources import ArraySource, get_source
from jaxlab.federated import algorithms as F
from jaxlab.federated import clients as C
from jaxlab.federated import split as S
from jaxlab.federated.partition import label_histogram, partition
from jaxlab.losses import softmax_cross_entropy
from jaxlab.methods.ecg_cnn import ecg_transform
from jaxlab.models.cnn1d import ECGFLNet, ECGSplitNNClient, ECGSplitNNServer
from jaxlab.models.layers import EvalMode
from jaxlab.models.mobilenet_cifar import MobileNetCifar, MobileNetClient, MobileNetServer
from jaxlab.models.resnet_cifar import ResNet20Client, ResNet20Server, resnet20
from jaxlab.train.optim import make_optimizer
from jaxlab.train.state import param_count

PyTree = Any


def build(config):
    raise ValueError(
        "fl_vs_splitnn is a report-only method (it trains FL and SplitNN side by side); run "
        "`jaxlab report --config fl_vs_splitnn:tiny` (or :paper, :resnet20, :mobilenet, ...)"
    )


# --- models -----------------------------------------------------------------------------------------------


class Models(NamedTuple):
    """The whole model FL trains and the SplitNN client / server halves."""

    whole: nn.Module
    client: nn.Module
    server: nn.Module


MODELS = {  # name -> (num_classes, conv_impl) -> Models
    "ecg": lambda k, impl: Models(ECGFLNet(num_classes=k, conv_impl=impl), ECGSplitNNClient(conv_impl=impl),
                                  ECGSplitNNServer(num_classes=k, conv_impl=impl)),
    "resnet20": lambda k, impl: Models(resnet20(k, conv_impl=impl), ResNet20Client(conv_impl=impl),
                                       ResNet20Server(num_classes=k, conv_impl=impl)),
    "mobilenet": lambda k, impl: Models(MobileNetCifar(k, conv_impl=impl), MobileNetClient(conv_impl=impl),
                                        MobileNetServer(k, conv_impl=impl)),
}


def get_models(config) -> Models:
    """config.model.name's models with config.model.conv_impl ("lax" or "im2col": same parameters and
    values). With config.model.clients_train_in_eval_mode (the official CIFAR clients' model.eval()), the
    modules the clients train, the whole model (FL) and the client half (SplitNN), are wrapped in
    jaxlab.models.layers.EvalMode: fl_loss_fn's and split_fns' training steps then run them with frozen
    BatchNorm running statistics (returned unchanged) and no Dropout; the SplitNN server still trains in
    training mode, as the reference's does. Evaluation is unaffected (always evaluation mode)."""
    name = config.model.name
    if name not in MODELS:
        raise ValueError(f"unknown fl_vs_splitnn model {name!r}; valid: {sorted(MODELS)}")
    models = MODELS[name](config.model.num_classes, config.model.conv_impl)
    if config.model.clients_train_in_eval_mode:
        models = models._replace(whole=EvalMode(models.whole), client=EvalMode(models.client))
    return models


def _takes_train(module: nn.Module) -> bool:
    return "train" in inspect.signature(type(module).__call__).parameters


def init_variables(module: nn.Module, key: jax.Array, x: jax.Array) -> tuple[PyTree, PyTree]:
    """(params, model_state): model_state = the other collections (BatchNorm "batch_stats"), {} if none."""
    variables = dict(module.init({"params": key, "dropout": key}, x))
    return variables.pop("params"), variables


def forward(module: nn.Module, params, state, x, rng, train: bool) -> tuple[jax.Array, PyTree]:
    """module(x) as a pure function of (params, state); in training, batch statistics are updated and
    dropout draws from rng. Returns (output, new state)."""
    kwargs = {"train": train} if _takes_train(module) else {}
    variables = {"params": params, **state}
    rngs = {"dropout": rng} if train else {}
    if train and state:
        out, new_state = module.apply(variables, x, rngs=rngs, mutable=list(state), **kwargs)
        return out, dict(new_state)
    return module.apply(variables, x, rngs=rngs, **kwargs), state


def fl_loss_fn(model: nn.Module, double_softmax: bool):
    """Stateful FedAvg loss: (params, model_state, batch, rng) -> (loss, model_state). The model trains in
    training mode (batch statistics, updated state, dropout) unless it is an EvalMode module (get_models
    with clients_train_in_eval_mode): then frozen running statistics, state unchanged, no dropout."""

    def loss_fn(params, state, batch, rng):
        logits, state = forward(model, params, state, batch["x"], rng, True)
        return softmax_cross_entropy(logits, batch["y"], double_softmax=double_softmax).mean(), state

    return loss_fn


def split_fns(client: nn.Module, server: nn.Module, double_softmax: bool):
    """Stateful split forms: client_apply(p, s, x, rng) -> (cut, s); server_loss(p, s, a, y, rng) -> (loss, s).
    Both halves train in training mode; a client wrapped in EvalMode (get_models with
    clients_train_in_eval_mode) runs on frozen running statistics and returns its state unchanged."""

    def client_apply(params, state, x, rng):
        return forward(client, params, state, x, rng, True)

    def server_loss(params, state, activation, y, rng):
        logits, state = forward(server, params, state, activation, rng, True)
        return softmax_cross_entropy(logits, y, double_softmax=double_softmax).mean(), state

    return client_apply, server_loss


def whole_logits(model: nn.Module):
    """logits(p, x) for evaluation with p = {"params", "state"}."""
    return lambda p, x: forward(model, p["params"], p["state"], x, None, False)[0]


def split_logits(client: nn.Module, server: nn.Module):
    """logits(p, x) for evaluation with p = {"client", "client_state", "server", "server_state"}."""

    def logits(p, x):
        a, _ = forward(client, p["client"], p["client_state"], x, None, False)
        return forward(server, p["server"], p["server_state"], a, None, False)[0]

    return logits


# --- data -------------------------------------------------------------------------------------------------


def load_beats(config, dist, split: str) -> dict[str, np.ndarray]:
    """{"x": (N, 128, 1) float32, "y": (N,) int32} from config.data.source with dist's class balance
    (`balance`) at data.options.scale * dist.scale_factor."""
    d = config.data
    options = {**dict(d.options), "balance": dist.balance, "scale": d.options.scale * dist.scale_factor}
    src = get_source(d.source, split, seed=d.seed, data_dir=d.data_dir, **options)
    batch = ecg_transform(src.get(np.arange(len(src))))
    return {"x": batch["signal"], "y": batch["label"]}


def _raw_images(source: str, split: str, seed: int, data_dir: str | None, size: int, options) -> tuple:
    """(images (N, size, size, 3) float32 in [0, 1], labels (N,) int32) from any source with
    "image" (N, H, W, 1 or 3; uint8 or float in [0, 1]) and "label"; resized (bilinear) to size x size."""
    src = get_source(source, split, seed=seed, data_dir=data_dir, **dict(options))
    limit = options.get("limit")
    batch = src.get(np.arange(min(len(src), limit or len(src))))
    x = np.asarray(batch["image"])
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"{source}: images must be (N, H, W, 1 or 3), got {x.shape}")
    if x.shape[1:3] != (size, size):
        x = np.asarray(jax.image.resize(x, (x.shape[0], size, size, x.shape[-1]), "linear"))
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return x, np.asarray(batch["label"]).astype(np.int32)


@functools.lru_cache(maxsize=4)
def _channel_stats(source: str, seed: int, data_dir: str | None, size: int, options: tuple) -> tuple:
    x, _ = _raw_images(source, "train", seed, data_dir, size, dict(options))
    return x.mean(axis=(0, 1, 2)), x.std(axis=(0, 1, 2))


def load_images(config, split: str) -> dict[str, np.ndarray]:
    """{"x": (N, 32, 32, 3) float32, "y": (N,) int32} from config.data.source, normalised per channel by
    the train split's mean and std (CIFAR-10: the reference's (0.4914, 0.4822, 0.4465) / (0.2470,
    0.2435, 0.2616)); data.options.limit keeps the first examples."""
    d = config.data
    options = dict(d.options)
    x, y = _raw_images(d.source, split, d.seed, d.data_dir, 32, options)
    mean, std = _channel_stats(d.source, d.seed, d.data_dir, 32, tuple(sorted(options.items())))
    return {"x": ((x - mean) / np.maximum(std, 1e-6)).astype(np.float32), "y": y}


def load_data(config, dist, split: str) -> dict[str, np.ndarray]:
    return load_beats(config, dist, split) if config.model.name == "ecg" else load_images(config, split)


def client_parts(labels: np.ndarray, dist, batch_size: int, seed: int) -> list[np.ndarray]:
    """Partitions by dist.scheme (dist.options passed on), each client cut to a multiple of batch_size."""
    parts = partition(dist.scheme, labels, dist.num_clients, seed=seed, **dict(dist.options))
    cut = [p[: len(p) // batch_size * batch_size] for p in parts]
    if any(len(p) == 0 for p in cut):
        raise ValueError(f"{dist.name}: a client has fewer than batch_size={batch_size} examples; "
                         f"sizes {[len(p) for p in parts]} (raise data.options.scale)")
    return cut


def make_evaluator(logits_fn, test: dict[str, np.ndarray], batch_size: int, num_classes: int):
    """evaluate(params) -> {"accuracy", "balanced_accuracy"} (mean per-class recall) over every test
    example: the trainer's eval_batches (last batch padded, masked out), so nothing is dropped."""
    source = ArraySource(test, name="test")
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    predict = jax.jit(lambda params, x: jnp.argmax(logits_fn(params, x), -1))
    y = np.asarray(test["y"])

    def evaluate(params) -> dict[str, float]:
        preds = [np.asarray(predict(params, b["x"]))[np.asarray(b["mask"]) > 0]
                 for b in eval_batches(source, batch_size, sharding)]
        pred = np.concatenate(preds)
        recall = [np.mean(pred[y == c] == c) for c in range(num_classes) if np.any(y == c)]
        return {"accuracy": float(np.mean(pred == y)), "balanced_accuracy": float(np.mean(recall))}

    return evaluate


def tree_bytes(tree: PyTree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))


def make_tx(config) -> optax.GradientTransformation:
    """The clients' (and the SplitNN server's) optimizer from config.optimizer, at a constant rate as in
    the reference."""
    if config.optimizer.schedule != "constant":
        raise ValueError(f"fl_vs_splitnn trains at a constant learning rate (as the reference does); "
                         f"optimizer.schedule={config.optimizer.schedule!r} is not supported")
    return make_optimizer(config.optimizer, total_steps=1)


# --- the two paradigms ------------------------------------------------------------------------------------


def run_fl(config, train, parts, evaluate, key) -> dict:
    """FedAvg rounds; per round: test accuracy, bytes measured from the weights that cross, time."""
    c = config.fl
    model = get_models(config).whole
    params, model_state = init_variables(model, key, jnp.asarray(train["x"][:1]))
    tx = make_tx(config)
    alg = F.fedavg(fl_loss_fn(model, config.model.double_softmax), tx, persist_opt_state=True,
                   stateful=True, chunk_size=c.chunk_size or len(parts))
    state = alg.init(params, len(parts), model_state=model_state)
    curve, times, measured = [], [], 0
    for r in range(config.report.rounds):
        data = C.stack_client_data(train, parts, config.data.batch_size, epochs=c.local_epochs,
                                   seed=config.seed * 100_003 + r)
        t0 = time.perf_counter()
        plan = F.plan_round(config.seed, r, len(parts))
        b = alg.broadcast(state)
        message = tree_bytes(b["params"]) + tree_bytes(b["model_state"])
        state, metrics = alg.apply(state, data, plan)
        jax.block_until_ready(state.params)
        times.append(time.perf_counter() - t0)
        measured += (len(plan.client_ids) + int(metrics["clients_accepted"])) * message  # down + up
        evaluated = evaluate({"params": state.params, "state": state.model_state})
        curve.append({"round": r + 1, "loss": float(metrics["loss"]), **evaluated})
    n_weights = param_count(params) + param_count(model_state)
    per_round = S.fl_round_bytes(len(parts), n_weights)
    client_state = tree_bytes(params) + tree_bytes(model_state) + tree_bytes(tx.init(params))
    return {"curve": curve, "times": times, "params": param_count(params),
            "client_params": param_count(params), "bytes_measured": measured,
            "bytes_formula": per_round["total"] * config.report.rounds,
            "bytes_formula_per_round": per_round, "client_state_bytes": client_state}


def run_splitnn(config, train, parts, evaluate, key) -> dict:
    """Vanilla SplitNN epochs; per epoch: test accuracy, bytes measured from the arrays that cross, time."""
    models = get_models(config)
    client_apply, server_loss = split_fns(models.client, models.server, config.model.double_softmax)
    c_key, s_key = jax.random.split(key)
    x0 = jnp.asarray(train["x"][:1])
    cp, cs = init_variables(models.client, c_key, x0)
    cut = forward(models.client, cp, cs, x0, None, False)[0]
    sp, ss = init_variables(models.server, s_key, cut)
    tx = make_tx(config)
    epoch = S.make_splitnn_epoch(client_apply, server_loss, tx, tx, stateful=True)
    state = S.init_splitnn(cp, sp, tx, tx, len(parts), client_state=cs, server_state=ss)
    curve, times, measured = [], [], {}
    for r in range(config.report.rounds):
        data = C.stack_client_data(train, parts, config.data.batch_size, seed=config.seed * 100_003 + r)
        t0 = time.perf_counter()
        state, metrics = epoch(state, data, jax.random.fold_in(key, r))
        jax.block_until_ready(state.server_params)
        times.append(time.perf_counter() - t0)
        for kind in ("activations", "labels", "gradients", "weights"):
            measured[kind] = measured.get(kind, 0) + int(metrics[kind])
        params = {"client": state.client_params, "client_state": state.client_state,
                  "server": state.server_params, "server_state": state.server_state}
        curve.append({"round": r + 1, "loss": float(metrics["loss"]), **evaluate(params)})
    client_weights = param_count(cp) + param_count(cs)
    per_epoch = S.splitnn_epoch_bytes([len(p) for p in parts], int(np.prod(cut.shape[1:])), client_weights)
    client_state = tree_bytes(cp) + tree_bytes(cs) + tree_bytes(tx.init(cp))
    return {"curve": curve, "times": times, "params": param_count(cp) + param_count(sp),
            "client_params": param_count(cp), "cut_shape": list(cut.shape[1:]),
            "bytes_measured": sum(measured.values()), "bytes_measured_by_kind": measured,
            "bytes_formula": per_epoch["total"] * config.report.rounds,
            "bytes_formula_per_round": per_epoch, "client_state_bytes": client_state}


# --- report -----------------------------------------------------------------------------------------------


def run_distribution(config, dist) -> dict:
    """Trains both paradigms on one distribution; returns its row of the report."""
    train = load_data(config, dist, "train")
    test = load_data(config, dist, "test")
    parts = client_parts(train["y"], dist, config.data.batch_size, config.seed)
    k = config.model.num_classes
    key = jax.random.key(config.seed)
    models = get_models(config)
    fl_eval = make_evaluator(whole_logits(models.whole), test, config.data.eval_batch_size, k)
    sp_eval = make_evaluator(split_logits(models.client, models.server), test,
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


def run_seeds(config, dist) -> dict:
    """run_distribution once per seed of config.report.seeds (the seed sets the client partition, the
    initialisation and the batch order; the data stay the same). Returns the first seed's row (its curves,
    bytes, times and memory), with, per paradigm, "by_seed": the final and best test accuracies of every
    seed and its accuracy averaged over the rounds (the area under its learning curve: convergence speed
    as well as accuracy), "mean" and "std" of those over the seeds, and "mean_curve": the test accuracy
    per round averaged over the seeds."""
    if not config.report.seeds:
        raise ValueError("report.seeds is empty: give at least one seed, e.g. --config.report.seeds='(0,)'")
    rows = []
    for seed in config.report.seeds:
        c = copy.deepcopy(config)
        c.seed = int(seed)
        rows.append(run_distribution(c, dist))
    row = rows[0]
    row["seeds"] = [int(s) for s in config.report.seeds]
    keys = ("accuracy", "balanced_accuracy", "best_accuracy", "accuracy_over_rounds")
    for p in ("FL", "SplitNN"):
        curves = np.asarray([[c["accuracy"] for c in r[p]["curve"]] for r in rows])  # (seeds, rounds)
        by_seed = [{"seed": s, **r[p]["final"], "best_accuracy": float(curve.max()),
                    "accuracy_over_rounds": float(curve.mean())}
                   for s, r, curve in zip(row["seeds"], rows, curves)]
        row[p]["by_seed"] = by_seed
        row[p]["mean"] = {k: float(np.mean([b[k] for b in by_seed])) for k in keys}
        row[p]["std"] = {k: float(np.std([b[k] for b in by_seed])) for k in keys}
        row[p]["mean_curve"] = curves.mean(0).tolist()
    return row


def check_findings(rows: list[dict], bytes_ratio: float) -> list[dict]:
    """The paper's findings in kind, from the bytes and from the two sides of its "learning performance"
    (model accuracy and convergence speed): the final test accuracy and the test accuracy averaged over
    the rounds, each as a mean over the seeds. Returns jaxlab.report.Finding dicts
    ({"finding", "detail", "holds"})."""
    from jaxlab.report import Finding

    by = {r["name"]: r for r in rows}
    out = []

    def ahead(r, first: str, second: str, key: str, what: str) -> Finding:
        a, b = r[first]["mean"][key], r[second]["mean"][key]
        wins = sum(x[key] > y[key] for x, y in zip(r[first]["by_seed"], r[second]["by_seed"]))
        seeds = len(r[first]["by_seed"])
        detail = f"{first} {100 * a:.2f}% vs {second} {100 * b:.2f}%"
        if seeds > 1:
            detail += f" (mean of {seeds} seeds; {first} ahead in {wins} of {seeds})"
        return Finding(f"{r['name']}: {first} {what} > {second}", detail, bool(a > b))

    for name, first, second in (("imbalanced", "SplitNN", "FL"), ("non-iid", "FL", "SplitNN")):
        if name in by:
            out.append(ahead(by[name], first, second, "accuracy", "final accuracy"))
            out.append(ahead(by[name], first, second, "accuracy_over_rounds", "accuracy averaged over rounds"))
    for r in rows:
        ratio = r["SplitNN"]["bytes_measured"] / r["FL"]["bytes_measured"]
        out.append(Finding(f"{r['name']}: FL sends >= {bytes_ratio:g}x fewer bytes than SplitNN",
                           f"SplitNN/FL = {ratio:.1f}x", bool(ratio >= bytes_ratio)))
    return [f.as_dict() for f in out]


def report(config, workdir: str | Path) -> dict:
    """Runs every distribution, writes report.md, report.json, report.png under workdir; returns the result."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = [run_seeds(config, dist) for dist in config.report.distributions]
    result = {"model": config.model.name, "source": config.data.source, "rounds": int(config.report.rounds),
              "seeds": [int(s) for s in config.report.seeds], "rows": rows,
              "findings": check_findings(rows, float(config.report.bytes_ratio))}
    (workdir / "report.json").write_text(json.dumps(result, indent=2))
    text = format_report(result)
    (workdir / "report.md").write_text(text)
    plot_report(rows, workdir / "report.png")
    print(text, flush=True)
    return result


def format_report(result: dict) -> str:
    """Markdown: one row per distribution and paradigm (accuracies as mean ± std over the seeds, bytes,
    times, memory), then the findings with yes / NO."""
    from jaxlab.report import findings_table, mean_std

    seeds = result["seeds"]

    def pm(x: dict, key: str) -> str:  # mean (± std over the seeds) as a percentage
        return mean_std([b[key] for b in x["by_seed"]], percent=True)

    header = ["distribution", "paradigm", "clients", "final test acc %", "balanced acc %", "best acc %",
              "acc over rounds %", "bytes sent (measured)", "bytes (formula)", "train s", "s / round",
              "client state KiB", "peak host RSS MiB"]
    rows = []
    for r in result["rows"]:
        for p in ("FL", "SplitNN"):
            x = r[p]
            rows.append([r["name"], p, r["num_clients"], pm(x, "accuracy"), pm(x, "balanced_accuracy"),
                         pm(x, "best_accuracy"), pm(x, "accuracy_over_rounds"),
                         f"{x['bytes_measured']:,}", f"{x['bytes_formula']:,}", f"{x['wall_s']:.2f}",
                         f"{x['steady_round_s']:.3f}", f"{x['client_state_bytes'] / 1024:.1f}",
                         f"{x['peak_host_bytes_after'] / 2**20:.0f}"])
    findings = findings_table(result["findings"])
    over = (f"mean ± std over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}")
    return (f"FL vs SplitNN, {result['model']} on {result['source']}, {result['rounds']} FL rounds (1 local epoch) vs "
            f"{result['rounds']} SplitNN epochs\n\n{markdown_table(header, rows)}\n\n"
            f"Accuracies: {over} (a seed sets the client partition, the initialisation and the batch order); "
            "acc over rounds = test accuracy averaged over every round (convergence speed and accuracy). "
            f"Bytes, times and memory: seed {seeds[0]}; train s includes the first round's compilation; peak "
            "host RSS is the process's running maximum after that paradigm.\n\n" + findings + "\n")


def plot_report(rows: list[dict], path: Path) -> None:
    """One panel per distribution: FL and SplitNN test accuracy % per round (mean curve over the seeds)."""
    from jaxlab.report import plot_curves, save_figure, subplots

    fig, axes = subplots(len(rows))
    for ax, r in zip(axes, rows):
        seeds = len(r["seeds"])
        plot_curves(ax, {p: r[p]["mean_curve"] for p in ("FL", "SplitNN")},
                    styles={"FL": "C0-", "SplitNN": "C3--"}, scale=100,
                    title=f"{r['name']} ({r['num_clients']} clients)", xlabel="FL round / SplitNN epoch",
                    ylabel=f"test accuracy % (mean of {seeds} seeds)" if seeds > 1 else "test accuracy %")
    save_figure(fig, path)
