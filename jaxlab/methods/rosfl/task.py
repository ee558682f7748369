"""RoS-FL as a method of the one trainer: CT restoration with clients of different scanners and doses.

Data (rosfl.md "Data", built here with jaxlab.ct): each client k owns random ellipse phantoms
(`ct.random_ellipses`, FOV radius 1, body value `data.value`), scanned by its own fan-beam geometry:
HyperFed's protocol table (shared/papers/hyperfed.md) with every length rescaled so the client's image
FOV spans [-1, 1], views divided by `data.view_factor`, detectors by `data.det_factor` (spacing times
it) and I0 divided by `data.dose_factor`. The closed-form sinogram (no inverse crime) gets Poisson and
electronic noise (`ct.low_dose`), and the FBP (`data.filter`) of it is the client's input x; the
rasterised phantom is the label y. Both (N, S, S, 1) float32.

Segmentation variant (rosfl.task="segmentation", model.name="unet"; rosfl.md "Data": thresholded shapes,
BCE + Dice): same inputs, the label is the mask y > data.seg_threshold (the phantom's inner shapes
brighter than the body), the U-Net's tail outputs logits (no global residual), loss `bce_dice_loss`.

A step of the trainer is a round (jaxlab.methods.rosfl.round): every client one local epoch of its
training phantoms, vmapped. Evaluation, overall and per client (suffix _c{k}), the degraded input's
scores alongside (prefix input_): restoration PSNR (from the mean MSE, peak = the test labels' range),
RMSE and SSIM (jaxlab.metrics.ssim, data_range = the same peak); segmentation Dice and
IoU over all test pixels of the prediction (logit > 0), the input's baseline being x > seg_threshold.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab import ct, metrics
from jaxlab.config import ConfigError
from jaxlab.data.pipeline import StepBatches
from jaxlab.data.sources import ArraySource
from jaxlab.federated import clients as C
from jaxlab.federated import split as S
from jaxlab.federated.algorithms import base as B
from jaxlab.federated.algorithms import fedavg
from jaxlab.methods.rosfl import dwcs
from jaxlab.methods.rosfl.round import init, make_round
from jaxlab.methods.rosfl.split import bce_dice_loss, init_red_cnn, init_unet, mse_loss, red_cnn_parts, unet_parts
from jaxlab.models.red_cnn import RedCNN
from jaxlab.models.unet import UNet
from jaxlab.train import mesh as mesh_lib
from jaxlab.train.method import Method
from jaxlab.train.state import State

# HyperFed's clients 1-4 (hyperfed.md): views, dets, dImg, dDet, s2r, d2r, I0
HYPERFED_PROTOCOLS = ((512, 368, 0.0133, 0.0257, 5.95, 4.906, 5e4), (512, 315, 0.014, 0.03, 4.5, 3.5, 6.875e4),
                      (384, 330, 0.0139, 0.026, 4.0, 3.0, 8.75e4), (400, 350, 0.012, 0.022, 4.0, 3.5, 1.0625e5))
HYPERFED_SIZE = 256
TASKS = ("restoration", "segmentation")


def client_geometry(protocol, size: int, view_factor: int, det_factor: int) -> tuple[ct.Geometry, float]:
    """(fan-beam geometry at `size` px with FOV [-1, 1], I0) of one HyperFed protocol, scaled down."""
    views, dets, d_img, d_det, s2r, d2r, i0 = protocol
    scale = 2.0 / (HYPERFED_SIZE * d_img)  # lengths in units of the FOV radius
    geom = ct.fan_beam(max(1, views // view_factor), max(1, dets // det_factor), size,
                       det_spacing=d_det * scale * det_factor, pixel_size=2.0 / size, s2r=s2r * scale,
                       d2r=d2r * scale)
    return geom, i0


class ClientSet(NamedTuple):
    """Per client k: train {"x", "y"} (N_k, S, S, 1) and test likewise; geometries and doses."""

    train: list[dict[str, np.ndarray]]
    test: list[dict[str, np.ndarray]]
    geometries: list[ct.Geometry]
    doses: list[float]


def simulate(ellipses: jax.Array, geom: ct.Geometry, i0: float, key: jax.Array, config) -> dict[str, jax.Array]:
    """One phantom: {"x": FBP of its low-dose sinogram, "y": its image}, each (S, S, 1)."""
    image = ct.ellipse_image(ellipses, geom)
    sino = ct.low_dose(key, ct.ellipse_sinogram(ellipses, geom), i0, config.data.electronic_std)
    recon = ct.fbp(sino, geom, config.data.filter)
    return {"x": recon[..., None], "y": image[..., None]}


def make_clients(config) -> ClientSet:
    """Every client's train and test phantoms (deterministic in config.seed and the client index)."""
    d = config.data
    protocols = HYPERFED_PROTOCOLS[: config.rosfl.num_clients]
    if len(protocols) < config.rosfl.num_clients:
        raise ConfigError(f"rosfl.num_clients={config.rosfl.num_clients}: the HyperFed table has "
                          f"{len(HYPERFED_PROTOCOLS)} protocols")
    train, test, geoms, doses = [], [], [], []
    for k, protocol in enumerate(protocols):
        geom, i0 = client_geometry(protocol, d.image_size, d.view_factor, d.det_factor)
        i0 = i0 / d.dose_factor
        n = d.train_per_client + d.test_per_client
        keys = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), k), n)
        phantoms = jax.vmap(lambda key: ct.random_ellipses(key, d.ellipses, 0.95, value=d.value))(keys)
        noise_keys = jax.vmap(lambda key: jax.random.fold_in(key, 1))(keys)
        data = jax.jit(jax.vmap(lambda e, key: simulate(e, geom, i0, key, config)))(phantoms, noise_keys)
        data = {name: np.asarray(v, np.float32) for name, v in data.items()}
        train.append({name: v[: d.train_per_client] for name, v in data.items()})
        test.append({name: v[d.train_per_client:] for name, v in data.items()})
        geoms.append(geom)
        doses.append(i0)
    return ClientSet(train, test, geoms, doses)


def _stacked(parts: list[dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """Concatenated arrays and each client's index range into them."""
    arrays = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    starts = np.cumsum([0] + [len(p["x"]) for p in parts])
    return arrays, [np.arange(a, b) for a, b in zip(starts[:-1], starts[1:])]


def per_client(values: dict[str, jax.Array], client: jax.Array, num_clients: int) -> dict[str, jax.Array]:
    """Per-example values plus, per client k, the indicator in{k} and each value masked to k ({name}{k}):
    their means over the test set divided by mean(in{k}) are client k's means (eval_finish)."""
    out = dict(values)
    for k in range(num_clients):
        member = (client == k).astype(jnp.float32)
        out |= {f"in{k}": member} | {f"{name}{k}": v * member for name, v in values.items()}
    return out


def client_means(means: dict[str, float], names, num_clients: int) -> list[dict[str, float] | None]:
    """Client k's mean of each name (None for a client absent from the test set)."""
    out = []
    for k in range(num_clients):
        share = means[f"in{k}"]
        out.append({n: means[f"{n}{k}"] / share for n in names} if share > 0 else None)
    return out


def eval_values(restored: jax.Array, batch: dict, num_clients: int, peak: float = 1.0) -> dict[str, jax.Array]:
    """Restoration, per example (B,): mse, ssim and the degraded input's input_mse, input_ssim (SSIM of
    jaxlab.methods.dae_nr.metrics with data_range = peak), with per-client masks (`per_client`)."""
    y = batch["y"]
    values = {"mse": metrics.mse(restored, y), "input_mse": metrics.mse(batch["x"], y),
              "ssim": metrics.ssim(restored, y, peak), "input_ssim": metrics.ssim(batch["x"], y, peak)}
    return per_client(values, batch["client"], num_clients)


def segmentation_values(logits: jax.Array, batch: dict, num_clients: int, threshold: float) -> dict[str, jax.Array]:
    """Segmentation, per example (B,): intersection, predicted and true foreground pixel counts of the
    prediction (logit > 0) and of the thresholded degraded input (x > threshold, the baseline)."""
    mask = batch["y"] > 0.5
    out = {}
    for prefix, pred in (("", logits > 0), ("input_", batch["x"] > threshold)):
        out |= {f"{prefix}inter": jnp.sum(pred & mask, axis=(1, 2, 3)).astype(jnp.float32),
                f"{prefix}pred": jnp.sum(pred, axis=(1, 2, 3)).astype(jnp.float32),
                f"{prefix}true": jnp.sum(mask, axis=(1, 2, 3)).astype(jnp.float32)}
    return per_client(out, batch["client"], num_clients)


def make_eval_finish(peak: float, num_clients: int):
    """means -> psnr / rmse / ssim and the input's input_psnr / input_ssim, overall and per client
    (psnr_c{k}, ...); PSNR = 10 log10(peak^2 / mean MSE), RMSE = sqrt(mean MSE), SSIM the mean."""

    def psnr(mse):
        return float(10 * np.log10(peak**2 / max(mse, 1e-20)))

    def scores(m: dict[str, float], suffix: str) -> dict[str, float]:
        return {f"psnr{suffix}": psnr(m["mse"]), f"rmse{suffix}": float(np.sqrt(m["mse"])),
                f"ssim{suffix}": float(m["ssim"]), f"input_psnr{suffix}": psnr(m["input_mse"]),
                f"input_rmse{suffix}": float(np.sqrt(m["input_mse"])), f"input_ssim{suffix}": float(m["input_ssim"])}

    def finish(means: dict[str, float]) -> dict[str, float]:
        out = scores(means, "")
        for k, m in enumerate(client_means(means, ("mse", "input_mse", "ssim", "input_ssim"), num_clients)):
            out |= scores(m, f"_c{k}") if m else {}
        return out

    return finish


def make_segmentation_finish(num_clients: int):
    """means -> dice = 2 I / (P + T) and iou = I / (P + T - I) over all test pixels (the counts' means),
    overall and per client (dice_c{k}, ...), and the thresholded input's input_dice / input_iou."""

    def scores(m: dict[str, float], suffix: str) -> dict[str, float]:
        out = {}
        for prefix in ("", "input_"):
            i, p, t = m[f"{prefix}inter"], m[f"{prefix}pred"], m[f"{prefix}true"]
            out |= {f"{prefix}dice{suffix}": float(2 * i / max(p + t, 1e-12)),
                    f"{prefix}iou{suffix}": float(i / max(p + t - i, 1e-12))}
        return out

    names = ("inter", "pred", "true", "input_inter", "input_pred", "input_true")

    def finish(means: dict[str, float]) -> dict[str, float]:
        out = scores(means, "")
        for k, m in enumerate(client_means(means, names, num_clients)):
            out |= scores(m, f"_c{k}") if m else {}
        return out

    return finish


def model_parts(config, image_size: int):
    """(chain parts, init(rng) -> [head, body, tail], unsplit module) of config.model: "red_cnn"
    (model.features channels) or "unet" (features (f, 2f, 4f), f = model.features; no global residual and
    logits out for segmentation)."""
    name, f, impl = config.model.name, config.model.features, config.model.conv_impl
    segmentation = config.rosfl.task == "segmentation"
    size = (image_size, image_size)
    if name == "red_cnn":
        if segmentation:
            raise ConfigError("rosfl.task='segmentation' needs model.name='unet' (RED-CNN's tail ends in "
                              "ReLU(x + input), which cannot give logits)")
        return red_cnn_parts(f, impl), lambda rng: init_red_cnn(rng, size, f), RedCNN(f, impl)
    if name == "unet":
        features, residual = (f, 2 * f, 4 * f), not segmentation
        return (unet_parts(features, 1, residual, impl), lambda rng: init_unet(rng, size, features, 1, residual),
                UNet(features, 1, residual, impl))
    raise ConfigError(f"model.name={name!r}: RoS-FL supports 'red_cnn' and 'unet'")


def task_data(config, clients: ClientSet) -> tuple[list, list]:
    """(train, test) per client; for rosfl.task="segmentation" the label y becomes the mask
    y > data.seg_threshold (the phantom's bright inner shapes), the input stays the degraded FBP."""
    task = config.rosfl.task
    if task not in TASKS:
        raise ConfigError(f"rosfl.task={task!r}: one of {TASKS}")
    if task == "restoration":
        return clients.train, clients.test

    def masks(d):
        return {"x": d["x"], "y": (d["y"] > config.data.seg_threshold).astype(np.float32)}

    return [masks(d) for d in clients.train], [masks(d) for d in clients.test]


def fedavg_round(model, loss_fn, tx, init_params, num_clients: int):
    """The FedAvg baseline (rosfl.algorithm="fedavg") on jaxlab.federated's engine: the unsplit `model`,
    every client each round, its local epoch with its own persistent optimizer `tx` (as RoS-FL's
    clients), the server's example-weighted mean (equal here: equal client sizes). Returns (round(extra,
    ClientData, rng) -> (extra, metrics), init(rng) -> extra, global params of extra)."""

    def loss(params, model_state, batch, rng):
        value, metrics = loss_fn(model.apply({"params": params}, batch["x"]), batch["y"])
        return value, (model_state, metrics)

    alg = fedavg.build(loss, tx, persist_opt_state=True, chunk_size=num_clients)
    ids, stays = jnp.arange(num_clients, dtype=jnp.int32), jnp.ones(num_clients, bool)

    def init_extra(rng):
        return alg.init(dict(zip(dwcs.PART_NAMES, init_params(rng))), {}, num_clients, rng)

    def round_fn(extra, data, rng):
        return alg.round(extra, B.RoundBatch(data, ids, stays), rng)

    return round_fn, init_extra, lambda extra: alg.evaluation_params(extra)[0]


def splitfed_round(parts, loss_fn, tx, init_params, num_clients: int):
    """The SplitFed V1 baseline (rosfl.algorithm="splitfed"; jaxlab.federated.split.splitfed_v1): the
    usual two-part split, the client keeps the head and the server runs body and tail (per-client server
    replicas, both halves FedAvg'd, persistent client Adam): the head's kept values (RED-CNN's input
    image, U-Net's skips) and the labels go to the server with the activation. Returns as `fedavg_round`."""
    head, body, tail = (p.apply for p in parts)

    def client_apply(params, state, x, rng):
        return head(params, {}, x, rng)[0], state

    def server_loss(params, state, activation, labels, rng):
        h, kept = activation
        out = tail(params["tail"], {}, (body(params["body"], {}, h, rng)[0], kept), rng)[0]
        return loss_fn(out, labels)[0], state

    alg = S.splitfed_v1(client_apply, server_loss, tx, persist_opt_state=True, chunk_size=num_clients)
    ids, stays = jnp.arange(num_clients, dtype=jnp.int32), jnp.ones(num_clients, bool)

    def init_extra(rng):
        h, b, t = init_params(rng)
        return alg.init({"client": h, "server": {"body": b, "tail": t}}, {}, num_clients, rng)

    def round_fn(extra, data, rng):
        return alg.round(extra, B.RoundBatch(data, ids, stays), rng)

    def global_params(extra):
        p = alg.evaluation_params(extra)[0]
        return {"head": p["client"], "body": p["server"]["body"], "tail": p["server"]["tail"]}

    return round_fn, init_extra, global_params


def build(config, clients: ClientSet | None = None) -> Method:
    """The RoS-FL method (rosfl.task "restoration" or "segmentation"; model.name "red_cnn" or "unet");
    a trainer step is one round. clients: the simulated scans (default `make_clients(config)`; pass them
    to reuse one simulation across runs); its train list sets the trained clients and its test list the
    evaluated ones (the report's local-only and centralised runs train 1 client, or all data pooled as
    one, and evaluate on every client's test set)."""
    size = config.data.image_size
    parts, init_params, model = model_parts(config, size)
    train_parts, test_parts = task_data(config, make_clients(config) if clients is None else clients)
    train, parts_index = _stacked(train_parts)
    test, _ = _stacked([{**t, "client": np.full(len(t["x"]), k, np.int32)} for k, t in enumerate(test_parts)])
    num, num_eval = len(train_parts), len(test_parts)  # trained clients; evaluated clients
    segmentation = config.rosfl.task == "segmentation"
    tx = dwcs.torch_adam(config.optimizer.lr, config.optimizer.weight_decay)
    correction_tx = dwcs.torch_adam(config.rosfl.dwcs_lr, config.optimizer.weight_decay)
    loss_fn = bce_dice_loss if segmentation else mse_loss
    algorithm = config.rosfl.algorithm
    if algorithm == "rosfl":
        round_fn = make_round(parts, loss_fn, tx, correction_tx, mu=config.rosfl.mu,
                              dwcs_parts=tuple(config.rosfl.dwcs_parts), laplace_scale=config.rosfl.laplace_scale)
        init_extra = lambda rng: init(init_params(rng), num, tx, correction_tx)  # noqa: E731
        global_params = lambda extra: dict(zip(dwcs.PART_NAMES, extra.params))  # noqa: E731
    elif algorithm == "fedavg":
        round_fn, init_extra, global_params = fedavg_round(model, loss_fn, tx, init_params, num)
    elif algorithm == "splitfed":
        round_fn, init_extra, global_params = splitfed_round(parts, loss_fn, tx, init_params, num)
    else:
        raise ConfigError(f"rosfl.algorithm={algorithm!r}: one of 'rosfl', 'fedavg', 'splitfed'")

    def init_state(rng, example):
        return State.create({}, init_extra(rng))

    def train_step(state, batch, rng):
        new, metrics = round_fn(state.extra, batch, rng)
        metrics = {k: v for k, v in metrics.items() if jnp.ndim(v) == 0}
        return state.replace(step=state.step + 1, extra=new), metrics

    def restore(state, x):
        return model.apply({"params": global_params(state.extra)}, x)

    peak = float(np.ptp(test["y"]))
    if segmentation:
        threshold = config.data.seg_threshold

        def eval_step(state, batch, rng):
            return segmentation_values(restore(state, batch["x"]), batch, num_eval, threshold)

        finish = make_segmentation_finish(num_eval)
    else:
        def eval_step(state, batch, rng):
            return eval_values(restore(state, batch["x"]), batch, num_eval, peak)

        finish = make_eval_finish(peak, num_eval)

    def local_batch(r):
        return C.stack_client_data(train, parts_index, config.data.batch_size,
                                   epochs=config.rosfl.local_epochs, seed=config.seed * 100_003 + r)

    return Method(name="rosfl", init_state=init_state, train_step=train_step,
                  eval_source=ArraySource(test, name="test"), eval_step=eval_step,
                  train_batches=lambda mesh: StepBatches(local_batch, mesh_lib.replicated(mesh)),
                  eval_finish=finish, apply_fn=lambda state, b: restore(state, b["x"]),
                  param_groups=lambda state: global_params(state.extra))

