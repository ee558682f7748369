"""HyperFed as a method of the one trainer: personalised CT reconstruction across five scanners.

Clients (`make_clients`): HyperFed's protocol table (PROTOCOLS, hyperfed.md; dAng = 2 pi / views) scaled
to `data.image_size` S: views / data.view_factor, detectors / data.det_factor (spacing times it), the
pixel size dImg * 256 / S (the field of view of the 256-pixel protocol), s2r and d2r as in the table,
I0 / data.dose_factor; all lengths in the table's units (cm), so each client keeps its own field of view
and A's scale is the released code's. Each client owns random ellipse phantoms (`ct.random_ellipses`,
radius 0.95 of its FOV radius, body value data.value per cm), scanned by its fan beam: the closed-form
sinogram (no inverse crime) with Poisson and electronic noise (`ct.low_dose`) is y, its FBP
(data.filter) the network's input x0, the rasterised phantom the label. Sinograms are padded to the
largest client's (views, detectors) and the clients' geometries stacked (`ct.stack_geometries`, pads
masked), so every client's round runs in one vmap. The hypernetwork's input is the client's protocol
vector f from its row of the table (jaxlab.models.hypernet.protocol_features: the normalisation and
the step-size bound are defined on the 256-pixel protocols).

A trainer step is a round on jaxlab.federated's FedAvg engine (equal-weight mean, the released code's
client_weights = 1 / K), every client data.local_steps Adam steps (torch-style, persistent per client),
vmapped. `hyperfed.algorithm`:
    hyperfed  {"hypernet", "imaging"}: the hypernetwork is private (never aggregated, never broadcast);
              every other parameter is averaged
    fedavg    {"film", "imaging"}: no hypernetwork; gamma, beta are one learned vector (init 1, 0),
              averaged with the rest
    fedbn     the same tree with "film" private: per-client affine modulation, FedBN-style (inferred:
              the imaging network has no BatchNorm; its per-channel scale/shift layers are the FiLM)
    local     the hyperfed tree, every parameter private: each client trains alone
Evaluation per client with its own parameters and geometry (suffix _c{k}); input_* = its FBP.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlab import ct
from jaxlab.config import ConfigError
from jaxlab.data.pipeline import StepBatches
from jaxlab.data.sources import ArraySource
from jaxlab.federated import clients as C
from jaxlab.federated.aggregators import weighted_mean
from jaxlab.federated.algorithms import base as B
from jaxlab.federated.algorithms import fedavg
from jaxlab.methods.hyperfed.film_red import FilmRedCNN
from jaxlab.methods.rosfl.dwcs import torch_adam
from jaxlab.methods.rosfl.task import eval_values, make_eval_finish
from jaxlab.models import hypernet as H
from jaxlab.models import learn as L
from jaxlab.train import mesh as mesh_lib
from jaxlab.train.method import Method
from jaxlab.train.state import State

# views, dets, dImg, dDet, s2r, d2r, I0 (hyperfed.md; datasets.py's geometry rows)
PROTOCOLS = ((512, 368, 0.0133, 0.0257, 5.95, 4.906, 5e4), (512, 315, 0.014, 0.03, 4.5, 3.5, 6.875e4),
             (384, 330, 0.0139, 0.026, 4.0, 3.0, 8.75e4), (400, 350, 0.012, 0.022, 4.0, 3.5, 1.0625e5),
             (384, 350, 0.014, 0.025, 5.0, 3.0, 1.25e5))
# the report's unseen sixth scanner (ours, inside the table's ranges but equal to no row)
HELD_OUT_PROTOCOL = (448, 340, 0.0135, 0.0275, 5.5, 4.0, 7.5e4)
REFERENCE_SIZE = 256
ALGORITHMS = ("hyperfed", "fedavg", "fedbn", "local")
MODELS = ("learn", "red_cnn")


def scaled_geometry(protocol, size: int, view_factor: int, det_factor: int) -> ct.Geometry:
    """The fan-beam geometry of one table row at `size` pixels (module docstring)."""
    views, dets, d_img, d_det, s2r, d2r, _ = protocol
    return ct.from_protocol(max(1, views // view_factor), max(1, dets // det_factor), size, size,
                            d_img * REFERENCE_SIZE / size, d_det * det_factor, s2r, d2r)


class ClientSet(NamedTuple):
    """Per client k: train / test {"x", "y" (N, S, S, 1), "sino" (N, V, D) padded, "f" (N, 7)}; its
    geometry (unpadded), dose and protocol row; `geometry` the stacked, padded geometries [K, ...]."""

    train: list[dict[str, np.ndarray]]
    test: list[dict[str, np.ndarray]]
    geometries: list[ct.Geometry]
    doses: list[float]
    protocols: list[tuple]
    geometry: ct.Geometry


def simulate(ellipses, geom: ct.Geometry, i0, key, config) -> dict[str, jax.Array]:
    """One phantom on one (padded) geometry: x (FBP of its low-dose sinogram, (S, S, 1)), y (the image,
    (S, S, 1)), sino (the low-dose sinogram (V, D), 0 on masked views / detectors)."""
    mask = geom.view_mask[:, None] * geom.det_mask[None, :]
    sino = ct.low_dose(key, ct.ellipse_sinogram(ellipses, geom), i0, config.data.electronic_std) * mask
    return {"x": ct.fbp(sino, geom, config.data.filter)[..., None], "y": ct.ellipse_image(ellipses, geom)[..., None],
            "sino": sino}


def make_clients(config, protocols=None, seed_offset: int = 0) -> ClientSet:
    """Every client's train and test phantoms and scans (deterministic in config.seed, the client index
    and seed_offset), simulated for all clients in one vmap over their stacked geometries; protocols
    default to the first hyperfed.num_clients rows of PROTOCOLS."""
    d = config.data
    if protocols is None:
        if not 1 <= config.hyperfed.num_clients <= len(PROTOCOLS):
            raise ConfigError(f"hyperfed.num_clients={config.hyperfed.num_clients}: 1..{len(PROTOCOLS)} "
                              f"(the protocol table's rows)")
        protocols = PROTOCOLS[: config.hyperfed.num_clients]
    geoms = [scaled_geometry(p, d.image_size, d.view_factor, d.det_factor) for p in protocols]
    stacked = ct.stack_geometries(geoms)
    doses = [p[6] / d.dose_factor for p in protocols]
    radii = [0.95 * d.image_size * float(g.pixel_size) / 2 for g in geoms]
    n = d.train_per_client + d.test_per_client
    client_keys = jnp.stack([jax.random.fold_in(jax.random.key(config.seed), 1000 * seed_offset + k)
                             for k in range(len(geoms))])

    def one_client(geom, i0, radius, key):
        keys = jax.random.split(key, n)
        phantoms = jax.vmap(lambda k: ct.random_ellipses(k, d.ellipses, radius, value=d.value))(keys)
        noise_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
        return jax.vmap(lambda e, k: simulate(e, geom, i0, k, config))(phantoms, noise_keys)

    data = jax.jit(jax.vmap(one_client))(stacked, jnp.asarray(doses, jnp.float32),
                                         jnp.asarray(radii, jnp.float32), client_keys)
    train, test = [], []
    for k, protocol in enumerate(protocols):
        arrays = {name: np.asarray(v[k], np.float32) for name, v in data.items()}
        arrays["f"] = np.broadcast_to(H.protocol_features(*protocol), (n, 7)).copy()
        train.append({name: v[: d.train_per_client] for name, v in arrays.items()})
        test.append({name: v[d.train_per_client:] for name, v in arrays.items()})
    return ClientSet(train, test, geoms, doses, list(protocols), stacked)


# --- the model: modulation source + imaging network ------------------------------------------------------


class HyperFedModel(nn.Module):
    """(x0 (B, S, S, 1), y (B, V, D), geometry, f (B, 7)) -> (B, S, S, 1). Parameters: "imaging" and
    either "hypernet" (modulation = hypernet(f), modulation="hypernet") or "film" {"gamma", "beta": (K,)}
    (one learned vector, modulation="vector")."""

    network: str = "learn"
    modulation: str = "hypernet"
    blocks: int = L.BLOCKS
    features: int = L.FEATURES
    remat: bool = False
    conv_impl: str = "lax"
    dropout: float = H.DROPOUT

    def num_modulations(self) -> int:
        return L.num_modulations(self.features) if self.network == "learn" else 2 * self.features + 1

    @nn.compact
    def __call__(self, x0, y, geom, f, *, train: bool = False):
        k, batch = self.num_modulations(), x0.shape[0]
        if self.modulation == "hypernet":
            gamma, beta = H.HyperNet(k, dropout=self.dropout, name="hypernet")(f, deterministic=not train)
        else:
            film = FilmVector(k, name="film")()
            gamma, beta = (jnp.broadcast_to(v, (batch, k)) for v in film)
        if self.network == "learn":
            out = L.Learn(self.blocks, self.features, self.remat, self.conv_impl, name="imaging")(
                x0[..., 0], y, geom, gamma, beta, f)
            return out[..., None]
        return FilmRedCNN(self.features, self.conv_impl, name="imaging")(x0, gamma, beta)


class FilmVector(nn.Module):
    """Learned gamma (init 1) and beta (init 0), each (K,): the modulation without a hypernetwork."""

    size: int

    @nn.compact
    def __call__(self):
        return (self.param("gamma", nn.initializers.ones, (self.size,)),
                self.param("beta", nn.initializers.zeros, (self.size,)))


def make_model(config, algorithm: str) -> HyperFedModel:
    m = config.model
    if m.name not in MODELS:
        raise ConfigError(f"model.name={m.name!r}: HyperFed's imaging networks are {MODELS}")
    return HyperFedModel(m.name, "hypernet" if algorithm in ("hyperfed", "local") else "vector", int(m.blocks),
                         int(m.features), bool(m.remat), m.conv_impl, float(config.hyperfed.dropout))


def private_keys(algorithm: str) -> frozenset[str] | None:
    """Top-level parameter keys each client keeps (never aggregated, never broadcast)."""
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"hyperfed.algorithm={algorithm!r}: one of {ALGORITHMS}")
    return {"hyperfed": frozenset({"hypernet"}), "fedavg": None, "fedbn": frozenset({"film"}),
            "local": frozenset({"hypernet", "imaging"})}[algorithm]


def equal_mean(updates, weights, mask):
    """The released code's aggregation: every accepted client weighs 1 / K whatever its data size."""
    return weighted_mean(updates, jnp.ones_like(weights), mask)


def client_geometry(stacked: ct.Geometry, k: jax.Array) -> ct.Geometry:
    return jax.tree.map(lambda a: a[k], stacked)


def make_algorithm(model: HyperFedModel, stacked: ct.Geometry, algorithm: str, config) -> B.Algorithm:
    """The round on the FedAvg engine: MSE loss of the client's reconstruction with its geometry (picked
    from `stacked` by the batch's client index), torch Adam persistent per client, equal-weight mean."""

    def loss(params, model_state, batch, rng):
        geom = client_geometry(stacked, batch["client"][0])
        out = model.apply({"params": params}, batch["x"], batch["sino"], geom, batch["f"], train=True,
                          rngs={"dropout": rng})
        value = jnp.mean((out - batch["y"]) ** 2)
        return value, (model_state, {"mse": value})

    tx = torch_adam(config.optimizer.lr, config.optimizer.weight_decay)
    keys = private_keys(algorithm)
    return fedavg.build(loss, tx, aggregator=equal_mean, persist_opt_state=True, private=keys,
                        chunk_size=int(config.hyperfed.chunk_size))


def init_params(model: HyperFedModel, clients: ClientSet, rng: jax.Array):
    """The model's initial parameters (one set; every client starts from it, as the released code's
    deep copies of one server model)."""
    t = clients.train[0]
    geom = client_geometry(clients.geometry, 0)
    return jax.jit(model.init)({"params": rng}, t["x"][:1], t["sino"][:1], geom, t["f"][:1])["params"]


def client_stack(alg: B.Algorithm, state, num_clients: int):
    """Every client's full parameters stacked [K, ...] (its private part merged into the global one)."""
    return jax.vmap(lambda k: alg.client_params(state, k)[0])(jnp.arange(num_clients))


def _stacked(parts: list[dict[str, np.ndarray]], with_client: bool):
    """Concatenated arrays (plus "client" ids) and each client's index range into them."""
    if with_client:
        parts = [{**p, "client": np.full(len(p["x"]), k, np.int32)} for k, p in enumerate(parts)]
    arrays = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    starts = np.cumsum([0] + [len(p["x"]) for p in parts])
    return arrays, [np.arange(a, b) for a, b in zip(starts[:-1], starts[1:])]


def reconstruct(model: HyperFedModel, params_per_client, stacked: ct.Geometry, batch) -> jax.Array:
    """(B, S, S, 1) each example reconstructed by its client's parameters and geometry (batch["client"])."""

    def one(x, sino, f, k):
        params = jax.tree.map(lambda a: a[k], params_per_client)
        return model.apply({"params": params}, x[None], sino[None], client_geometry(stacked, k), f[None])[0]

    return jax.vmap(one)(batch["x"], batch["sino"], batch["f"], batch["client"])


def param_groups(alg: B.Algorithm, state, algorithm: str) -> dict:
    """What `jaxlab info` counts: the imaging network, and client 0's modulation (its hypernetwork, or
    the FiLM vector) counted once (every client has one of the same size)."""
    params = alg.client_params(state, 0)[0]
    groups = {"imaging_network": params["imaging"]}
    if "hypernet" in params:
        groups["hypernetwork_per_client"] = params["hypernet"]
    else:
        groups["film_vector" + ("_per_client" if algorithm == "fedbn" else "")] = params["film"]
    return groups


def build(config, clients: ClientSet | None = None) -> Method:
    """The HyperFed method (hyperfed.algorithm, model.name); a trainer step is one round. clients: the
    simulated scans (default `make_clients(config)`; pass them to reuse one simulation across runs)."""
    clients = make_clients(config) if clients is None else clients
    algorithm = config.hyperfed.algorithm
    model = make_model(config, algorithm)
    alg = make_algorithm(model, clients.geometry, algorithm, config)
    train, parts_index = _stacked(clients.train, True)
    test, _ = _stacked(clients.test, True)
    num = len(clients.train)

    def init_state(rng, example):
        return State.create({}, alg.init(init_params(model, clients, rng), {}, num, rng))

    ids, stays = jnp.arange(num, dtype=jnp.int32), jnp.ones(num, bool)

    def train_step(state, batch, rng):
        new, metrics = alg.round(state.extra, B.RoundBatch(batch, ids, stays), rng)
        return state.replace(step=state.step + 1, extra=new), metrics

    def restore(state, batch):
        return reconstruct(model, client_stack(alg, state.extra, num), clients.geometry, batch)

    peak = float(np.ptp(test["y"]))

    def eval_step(state, batch, rng):
        return eval_values(restore(state, batch), batch, num, peak)

    def local_batch(r):
        return C.stack_client_data(train, parts_index, config.data.batch_size, epochs=1,
                                   seed=config.seed * 100_003 + r, max_steps=int(config.hyperfed.local_steps))

    return Method(name="hyperfed", init_state=init_state, train_step=train_step,
                  eval_source=ArraySource(test, name="test"), eval_step=eval_step,
                  train_batches=lambda mesh: StepBatches(local_batch, mesh_lib.replicated(mesh)),
                  eval_finish=make_eval_finish(peak, num), apply_fn=restore,
                  param_groups=lambda state: param_groups(alg, state.extra, algorithm))
