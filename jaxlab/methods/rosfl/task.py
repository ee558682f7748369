"""RoS-FL as a method of the one trainer: CT restoration with clients of different scanners and doses.

Data (rosfl.md "Data", built here with jaxlab.ct): each client k owns random ellipse phantoms
(`ct.random_ellipses`, FOV radius 1, body value `data.value`), scanned by its own fan-beam geometry:
HyperFed's protocol table (shared/papers/hyperfed.md) with every length rescaled so the client's image
FOV spans [-1, 1], views divided by `data.view_factor`, detectors by `data.det_factor` (spacing times
it) and I0 divided by `data.dose_factor`. The closed-form sinogram (no inverse crime) gets Poisson and
electronic noise (`ct.low_dose`), and the FBP (`data.filter`) of it is the client's input x; the
rasterised phantom is the label y. Both (N, S, S, 1) float32.

A step of the trainer is a round (jaxlab.methods.rosfl.round): every client one local epoch of its
training phantoms, vmapped. Evaluation: per test example MSE of the restored and of the degraded input
against the label, with per-client indicators, so eval_finish reports PSNR (from the mean MSE, peak =
the labels' range), RMSE per client and overall, and the input's PSNR for comparison.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab import ct
from jaxlab.config import ConfigError
from jaxlab.data.pipeline import StepBatches
from jaxlab.data.sources import ArraySource
from jaxlab.federated import clients as C
from jaxlab.methods.rosfl import dwcs
from jaxlab.methods.rosfl.round import init, make_round
from jaxlab.methods.rosfl.split import init_red_cnn, mse_loss, red_cnn_parts
from jaxlab.models.red_cnn import RedCNN
from jaxlab.train import mesh as mesh_lib
from jaxlab.train.method import Method
from jaxlab.train.state import State

# HyperFed's clients 1-4 (hyperfed.md): views, dets, dImg, dDet, s2r, d2r, I0
HYPERFED_PROTOCOLS = ((512, 368, 0.0133, 0.0257, 5.95, 4.906, 5e4), (512, 315, 0.014, 0.03, 4.5, 3.5, 6.875e4),
                      (384, 330, 0.0139, 0.026, 4.0, 3.0, 8.75e4), (400, 350, 0.012, 0.022, 4.0, 3.5, 1.0625e5))
HYPERFED_SIZE = 256


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


def eval_values(restored: jax.Array, batch: dict, num_clients: int) -> dict[str, jax.Array]:
    """Per example: mse and input_mse, and per client k the indicators in{k} and the masked mse{k},
    input_mse{k} (their means over the test set give each client's mean MSE in eval_finish)."""
    mse = jnp.mean((restored - batch["y"]) ** 2, axis=(1, 2, 3))
    input_mse = jnp.mean((batch["x"] - batch["y"]) ** 2, axis=(1, 2, 3))
    out = {"mse": mse, "input_mse": input_mse}
    for k in range(num_clients):
        member = (batch["client"] == k).astype(jnp.float32)
        out |= {f"in{k}": member, f"mse{k}": mse * member, f"input_mse{k}": input_mse * member}
    return out


def make_eval_finish(peak: float, num_clients: int):
    """means -> psnr / rmse / input_psnr overall and per client (psnr_c{k}, ...), PSNR = 10 log10(peak^2 / MSE)."""

    def psnr(mse):
        return float(10 * np.log10(peak**2 / max(mse, 1e-20)))

    def finish(means: dict[str, float]) -> dict[str, float]:
        out = {"psnr": psnr(means["mse"]), "rmse": float(np.sqrt(means["mse"])),
               "input_psnr": psnr(means["input_mse"])}
        for k in range(num_clients):
            share = means[f"in{k}"]
            if share > 0:
                out |= {f"psnr_c{k}": psnr(means[f"mse{k}"] / share),
                        f"rmse_c{k}": float(np.sqrt(means[f"mse{k}"] / share)),
                        f"input_psnr_c{k}": psnr(means[f"input_mse{k}"] / share)}
        return out

    return finish


def build(config) -> Method:
    """The RoS-FL method on RED-CNN (model.name "red_cnn"); a trainer step is one round."""
    if config.model.name != "red_cnn":
        raise ConfigError(f"model.name={config.model.name!r}: this RoS-FL method supports 'red_cnn'")
    clients = make_clients(config)
    train, parts_index = _stacked(clients.train)
    test, _ = _stacked([{**t, "client": np.full(len(t["x"]), k, np.int32)} for k, t in enumerate(clients.test)])
    num, features = len(clients.train), config.model.features
    tx = dwcs.torch_adam(config.optimizer.lr, config.optimizer.weight_decay)
    correction_tx = dwcs.torch_adam(config.rosfl.dwcs_lr, config.optimizer.weight_decay)
    parts = red_cnn_parts(features, config.model.conv_impl)
    round_fn = make_round(parts, mse_loss, tx, correction_tx, mu=config.rosfl.mu,
                          dwcs_parts=tuple(config.rosfl.dwcs_parts), laplace_scale=config.rosfl.laplace_scale)
    model = RedCNN(features, config.model.conv_impl)
    size = (config.data.image_size, config.data.image_size)

    def init_state(rng, example):
        return State.create({}, init(init_red_cnn(rng, size, features), num, tx, correction_tx))

    def train_step(state, batch, rng):
        new, metrics = round_fn(state.extra, batch, rng)
        metrics = {k: v for k, v in metrics.items() if k != "client_loss"}
        return state.replace(step=state.step + 1, extra=new), metrics

    def restore(state, x):
        head, body, tail = state.extra.params
        return model.apply({"params": {"head": head, "body": body, "tail": tail}}, x)

    def eval_step(state, batch, rng):
        return eval_values(restore(state, batch["x"]), batch, num)

    def local_batch(r):
        return C.stack_client_data(train, parts_index, config.data.batch_size,
                                   epochs=config.rosfl.local_epochs, seed=config.seed * 100_003 + r)

    peak = float(np.ptp(test["y"]))
    return Method(name="rosfl", init_state=init_state, train_step=train_step,
                  eval_source=ArraySource(test, name="test"), eval_step=eval_step,
                  train_batches=lambda mesh: StepBatches(local_batch, mesh_lib.replicated(mesh)),
                  eval_finish=make_eval_finish(peak, num), apply_fn=lambda state, b: restore(state, b["x"]),
                  param_groups=lambda state: dict(zip(dwcs.PART_NAMES, state.extra.params)))
