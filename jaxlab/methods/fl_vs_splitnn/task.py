"""FL vs SplitNN (Gao et al. 2020, fl_vs_splitnn.md): each paradigm as a method of the one trainer.

`jaxlab train --config fl_vs_splitnn:tiny` trains one paradigm (config.fl.paradigm: "fl" or "splitnn") on
one data distribution (config.fl.distribution, a name of config.report.distributions) with progress,
checkpoints and exact resume; a step is a round:
- FL: FedAvg (sample-weighted) of the whole model, BatchNorm statistics averaged with the weights, the
  clients' optimizer state kept across rounds, `local_epochs` local epochs a round, on the vmapped
  client axis (jaxlab.federated.algorithms.fedavg). The state's extra is the algorithm's state.
- SplitNN: the client/server halves, clients in turn with client-weight (and BN statistics) relay, one
  server with one optimizer (jaxlab.federated.split.make_splitnn_epoch); a step is an epoch.
Both process every training example once per round. Each step reports the bytes that crossed, measured
from the arrays sent; evaluation after each round gives test accuracy and balanced accuracy (mean
per-class recall) over every test example. `jaxlab report` (report.py) trains both paradigms for every
distribution and seed through the trainer and compares them.

Models (config.model.name): "ecg" (the FL ECG CNN and the SplitNN ECG halves, jaxlab.models.cnn1d),
"resnet20" and "mobilenet" (CIFAR, with their cuts). ECG beats come from config.data.source with each
distribution's class balance; the FL model reads them edge-padded to model.fl_input_length samples (130,
what the reference's Linear(400, 128) implies: 55,989 parameters; 128 = unpadded, Linear(384, 128)).
Images come from "tfds:cifar10" under data.data_dir or any image source (the offline variants use the
real scikit-learn digits resized to 32x32 RGB), normalised per channel by the train split's statistics.
Client data are cut to a multiple of the batch size (DataLoader drop_last), so the measured bytes equal
the formulas: FL per round = 2*K*|W|*b; SplitNN per epoch = sum_k n_k (2 d b + l) + 2 K |W_c| b, where |W|
and |W_c| count BatchNorm running statistics with the weights.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlab.config import ConfigError
from jaxlab.data.images import rgb_images
from jaxlab.data.pipeline import StepBatches
from jaxlab.data.sources import ArraySource, get_source
from jaxlab.federated import clients as C
from jaxlab.federated import split as S
from jaxlab.federated.algorithms import fedavg, plan_round, round_batch
from jaxlab.federated.partition import partition
from jaxlab.losses import softmax_cross_entropy
from jaxlab.methods.ecg_cnn import ecg_transform
from jaxlab.models.cnn1d import ECGFLNet, ECGSplitNNClient, ECGSplitNNServer
from jaxlab.models.layers import EvalMode
from jaxlab.models.mobilenet_cifar import MobileNetCifar, MobileNetClient, MobileNetServer
from jaxlab.models.resnet_cifar import ResNet20Client, ResNet20Server, resnet20
from jaxlab.train import mesh as mesh_lib
from jaxlab.train.method import Method
from jaxlab.train.optim import make_optimizer
from jaxlab.train.state import State, param_count

PyTree = Any
PARADIGMS = ("fl", "splitnn")
SPLIT_KINDS = ("activations", "labels", "gradients", "weights")  # make_splitnn_epoch's byte metrics


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
    """The FedAvg client loss: (params, model_state, batch, rng) -> (loss, (model_state, metrics)). The
    model trains in training mode (batch statistics, updated state, dropout) unless it is an EvalMode
    module (get_models with clients_train_in_eval_mode): then frozen running statistics, state unchanged,
    no dropout."""

    def loss_fn(params, state, batch, rng):
        logits, state = forward(model, params, state, batch["x"], rng, True)
        return softmax_cross_entropy(logits, batch["y"], double_softmax=double_softmax).mean(), (state, {})

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
    src = get_source(d.source, split, seed=d.seed, data_dir=d.data_dir, features=("signal", "label"), **options)
    batch = ecg_transform(src.get(np.arange(len(src))))
    return {"x": batch["signal"], "y": batch["label"]}


@functools.lru_cache(maxsize=4)
def _channel_stats(source: str, seed: int, data_dir: str | None, size: int, options: tuple) -> tuple:
    x, _ = rgb_images(source, "train", seed, data_dir, size, dict(options))
    return x.mean(axis=(0, 1, 2)), x.std(axis=(0, 1, 2))


def load_images(config, split: str) -> dict[str, np.ndarray]:
    """{"x": (N, 32, 32, 3) float32, "y": (N,) int32} from config.data.source, normalised per channel by
    the train split's mean and std (CIFAR-10: the reference's (0.4914, 0.4822, 0.4465) / (0.2470,
    0.2435, 0.2616)); data.options.limit keeps the first examples."""
    d = config.data
    options = dict(d.options)
    x, y = rgb_images(d.source, split, d.seed, d.data_dir, 32, options)
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


def tree_bytes(tree: PyTree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))


def make_tx(config) -> optax.GradientTransformation:
    """The clients' (and the SplitNN server's) optimizer from config.optimizer, at a constant rate as in
    the reference."""
    if config.optimizer.schedule != "constant":
        raise ValueError(f"fl_vs_splitnn trains at a constant learning rate (as the reference does); "
                         f"optimizer.schedule={config.optimizer.schedule!r} is not supported")
    return make_optimizer(config.optimizer, total_steps=1)


def distribution(config):
    """The entry of config.report.distributions named config.fl.distribution."""
    names = [d.name for d in config.report.distributions]
    if config.fl.distribution not in names:
        raise ConfigError(f"fl.distribution={config.fl.distribution!r} is not one of {names}")
    return config.report.distributions[names.index(config.fl.distribution)]


def pad_beats(x: np.ndarray, length: int) -> np.ndarray:
    """(N, L, 1) beats edge-padded to `length` samples (split as evenly as possible, the extra at the end)."""
    extra = length - x.shape[1]
    if extra < 0:
        raise ConfigError(f"model.fl_input_length={length} is shorter than the {x.shape[1]}-sample beats")
    return np.pad(x, ((0, 0), (extra // 2, extra - extra // 2), (0, 0)), mode="edge") if extra else x


class Setup(NamedTuple):
    """What both paradigms need: train and test arrays, the clients' example indices, the models."""

    train: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    parts: list[np.ndarray]
    models: Models


def setup(config) -> Setup:
    dist = distribution(config)
    train, test = load_data(config, dist, "train"), load_data(config, dist, "test")
    if config.model.name == "ecg" and config.fl.paradigm == "fl":
        train, test = ({**d, "x": pad_beats(d["x"], config.model.fl_input_length)} for d in (train, test))
    parts = client_parts(train["y"], dist, config.data.batch_size, config.seed)
    return Setup(train, test, parts, get_models(config))


def round_data(config, s: Setup, round_index: int) -> C.ClientData:
    """Round `round_index`'s local epochs of every client: a pure function of (seed, round)."""
    return C.stack_client_data(s.train, s.parts, config.data.batch_size, epochs=config.fl.local_epochs,
                               seed=config.seed * 100_003 + round_index)


# --- the two paradigms as methods -------------------------------------------------------------------------


def build(config) -> Method:
    if config.fl.paradigm not in PARADIGMS:
        raise ConfigError(f"fl.paradigm={config.fl.paradigm!r} must be one of {PARADIGMS}")
    s = setup(config)
    return (fl_method if config.fl.paradigm == "fl" else splitnn_method)(config, s)


def _eval_values(logits: jax.Array, y: jax.Array, num_classes: int) -> dict[str, jax.Array]:
    """Per-example accuracy, and per class c the indicators "class{c}" (y == c) and "hit{c}" (correct and
    y == c), whose means give each class's recall (eval_finish)."""
    pred = jnp.argmax(logits, -1)
    out = {"accuracy": (pred == y).astype(jnp.float32)}
    for c in range(num_classes):
        out[f"class{c}"] = (y == c).astype(jnp.float32)
        out[f"hit{c}"] = ((y == c) & (pred == c)).astype(jnp.float32)
    return out


def eval_finish(metrics: dict[str, float]) -> dict[str, float]:
    """accuracy and balanced_accuracy (mean recall over the classes present) from _eval_values' means."""
    classes = sorted(int(k[5:]) for k in metrics if k.startswith("class"))
    recall = [metrics[f"hit{c}"] / metrics[f"class{c}"] for c in classes if metrics[f"class{c}"] > 0]
    return {"accuracy": metrics["accuracy"], "balanced_accuracy": float(np.mean(recall))}


def _batches(config, local_batch):
    return lambda mesh: StepBatches(local_batch, mesh_lib.replicated(mesh))


def fl_method(config, s: Setup) -> Method:
    """FedAvg of the whole model; a step = a round (every client, one local epoch)."""
    model, k = s.models.whole, len(s.parts)
    tx = make_tx(config)
    alg = fedavg.build(fl_loss_fn(model, config.model.double_softmax), tx, persist_opt_state=True,
                       chunk_size=config.fl.chunk_size or k)

    def init_state(rng, example):
        params, model_state = init_variables(model, rng, jnp.asarray(s.train["x"][:1]))
        return State.create({}, alg.init(params, model_state, k, rng))

    def train_step(state, batch, rng):
        algorithm_state, metrics = alg.round(state.extra, batch, rng)
        message = tree_bytes(alg.broadcast(state.extra))  # static: the shapes of what every client downloads
        metrics["bytes_weights_down"] = jnp.asarray(batch.client_ids.shape[0] * message, jnp.float32)
        metrics["bytes_weights_up"] = metrics["clients_accepted"].astype(jnp.float32) * message
        return state.replace(step=state.step + 1, extra=algorithm_state), metrics

    def eval_step(state, batch, rng):
        params, model_state = alg.evaluation_params(state.extra)
        logits, _ = forward(model, params, model_state, batch["x"], None, False)
        return _eval_values(logits, batch["y"], config.model.num_classes)

    def local_batch(r):
        return round_batch(round_data(config, s, r), plan_round(config.seed, r, k))

    return Method(name="fl_vs_splitnn/fl", init_state=init_state, train_step=train_step,
                  eval_source=ArraySource(s.test, name="test"), eval_step=eval_step,
                  train_batches=_batches(config, local_batch), eval_finish=eval_finish,
                  param_groups=lambda state: {"model": alg.evaluation_params(state.extra)[0]})


def splitnn_method(config, s: Setup) -> Method:
    """Vanilla SplitNN; a step = an epoch (clients in turn, client weights relayed)."""
    models = s.models
    client_apply, server_loss = split_fns(models.client, models.server, config.model.double_softmax)
    tx = make_tx(config)
    epoch = S.make_splitnn_epoch(client_apply, server_loss, tx, tx)

    def init_state(rng, example):
        c_key, s_key = jax.random.split(rng)
        x0 = jnp.asarray(s.train["x"][:1])
        cp, cs = init_variables(models.client, c_key, x0)
        sp, ss = init_variables(models.server, s_key, forward(models.client, cp, cs, x0, None, False)[0])
        return State.create({}, S.init_splitnn(cp, sp, tx, tx, len(s.parts), client_state=cs, server_state=ss))

    def train_step(state, batch, rng):
        split_state, metrics = epoch(state.extra, batch, rng)
        metrics = {("bytes_" + k if k in SPLIT_KINDS else k): v for k, v in metrics.items()}
        return state.replace(step=state.step + 1, extra=split_state), metrics

    def eval_step(state, batch, rng):
        x = state.extra
        a, _ = forward(models.client, x.client_params, x.client_state, batch["x"], None, False)
        logits, _ = forward(models.server, x.server_params, x.server_state, a, None, False)
        return _eval_values(logits, batch["y"], config.model.num_classes)

    return Method(name="fl_vs_splitnn/splitnn", init_state=init_state, train_step=train_step,
                  eval_source=ArraySource(s.test, name="test"), eval_step=eval_step,
                  train_batches=_batches(config, lambda r: round_data(config, s, r)), eval_finish=eval_finish,
                  param_groups=lambda state: {"client": state.extra.client_params,
                                              "server": state.extra.server_params})
