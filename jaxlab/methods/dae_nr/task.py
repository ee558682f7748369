"""DAE-NR on the trainer: the autoencoder and the readout as parts, the loss, the regimes as stages.

State parts: "encoder" (ConvEncoder), "decoder" (ConvDecoder), "readout" (FactorizedReadout or
LinearReadout on encoder layer `model.mapped_layer`). Loss (per batch of B images (B, H, W, 1) and
responses (B, N)):

    L = recon_weight * mean_pixels (x - x_hat)^2 + alpha * mean_neurons L_neural(r, r_hat) + l1 |readout|

with L_neural the Poisson NLL r_hat - r log r_hat (dropping log r!, which does not depend on the model)
or the squared error. Regimes (`dae.regime`), each a sequence of trainer stages:
    autoencoder  alpha = 0: stage "autoencoder" trains encoder + decoder on reconstruction; the readout
                 is never trained (a frozen part) and no neural prediction is reported.
    posthoc      stage "autoencoder" as above, then stage "readout" (dae.readout_steps steps), whose enter
                 turns encoder and decoder into frozen parts, trains the readout on L_neural alone.
    joint        stage "joint" trains all three on L.
    neural       stage "neural" trains encoder + readout on L_neural alone (the decoder stays frozen at
                 its initialisation): the "neural responses alone" arm.
`evaluate(state)` measures the whole eval set (jaxlab.methods.dae_nr.metrics): reconstruction MSE, PSNR,
SSIM, the neural loss, mean per-neuron correlation (and CC_norm when the eval set has repeated trials) and
RSA of the mapped layer with the recorded population.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.config import Config, ConfigError
from jaxlab.data import neural as _neural  # noqa: F401  (registers synthetic:neural_population, neural:)
from jaxlab.data.sources import get_source
from jaxlab.methods.dae_nr import metrics as M
from jaxlab.models.autoencoder import ConvDecoder, ConvEncoder, decoder_features, make_readout
from jaxlab.train.method import Method, Stage
from jaxlab.train.optim import part_optimizer
from jaxlab.train.state import Part, State
from jaxlab.train.step import compute_dtype, make_train_step

REGIMES = ("autoencoder", "posthoc", "joint", "neural")
NEURAL_LOSSES = ("poisson", "mse")
PARTS = ("encoder", "decoder", "readout")


class Model:
    """The three modules and the mapped layer, as pure functions of {part: params}."""

    def __init__(self, model_config, num_neurons: int):
        m = model_config
        self.features = tuple(m.features)
        if not 0 <= m.mapped_layer < len(self.features):
            raise ConfigError(f"model.mapped_layer={m.mapped_layer} is not an encoder layer: the encoder has "
                              f"layers 0..{len(self.features) - 1} (model.features={self.features})")
        self.mapped_layer = int(m.mapped_layer)
        self.encoder = ConvEncoder(self.features, conv_impl=m.conv_impl)
        self.decoder = ConvDecoder(decoder_features(self.features), out_channels=1, conv_impl=m.conv_impl)
        self.readout = make_readout(m.readout, num_neurons)
        self.readout_kind = m.readout
        self.per_image = jax.jit(self._per_image)

    def _per_image(self, params: dict, image: jax.Array) -> tuple[jax.Array, ...]:
        """(per-image MSE (B,), SSIM (B,), rates (B, N), recon (B, H, W, 1), then every encoder layer
        flattened (B, h w c))."""
        layers = self.layers(params, image)
        recon = self.decoder.apply({"params": params["decoder"]}, layers[-1])
        rates = self.readout.apply({"params": params["readout"]}, layers[self.mapped_layer])
        flat = tuple(layer.reshape(layer.shape[0], -1) for layer in layers)
        return (M.mse(recon, image), M.ssim(recon, image), rates, recon, *flat)

    def check_image(self, shape) -> None:
        """Images (B, H, W, 1) with H and W divisible by 2^layers, else a ConfigError naming both."""
        factor = 2 ** len(self.features)
        if len(shape) != 4 or shape[-1] != 1 or shape[1] % factor or shape[2] % factor:
            raise ConfigError(f"images must be (B, H, W, 1) with H, W multiples of {factor} for "
                              f"{len(self.features)} stride-2 encoder layers; got {tuple(shape)}")

    def init(self, rng: jax.Array, image: jax.Array) -> dict:
        """{part: params} for images like `image` (B, H, W, 1)."""
        self.check_image(image.shape)
        ke, kd, kr = jax.random.split(rng, 3)
        enc = self.encoder.init(ke, image)["params"]
        layers = self.encoder.apply({"params": enc}, image)
        dec = self.decoder.init(kd, layers[-1])["params"]
        read = self.readout.init(kr, layers[self.mapped_layer])["params"]
        return {"encoder": enc, "decoder": dec, "readout": read}

    def layers(self, params: dict, image: jax.Array) -> tuple[jax.Array, ...]:
        return self.encoder.apply({"params": params["encoder"]}, image)

    def forward(self, params: dict, image: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """image (B, H, W, 1) -> (reconstruction (B, H, W, 1), mapped layer (B, h, w, c), rates (B, N))."""
        layers = self.layers(params, image)
        recon = self.decoder.apply({"params": params["decoder"]}, layers[-1])
        mapped = layers[self.mapped_layer]
        return recon, mapped, self.readout.apply({"params": params["readout"]}, mapped)


def get_model(model_config, num_neurons: int) -> Model:
    """The Model of a config's model section, one per distinct setting in a process, so that runs and
    reports with the same model share its compiled evaluation (Model.per_image)."""
    m = model_config
    return _cached_model(tuple(m.features), int(m.mapped_layer), m.readout, m.conv_impl, int(num_neurons))


@functools.lru_cache(maxsize=16)
def _cached_model(features, mapped_layer, readout, conv_impl, num_neurons) -> Model:
    return Model(Config(features=features, mapped_layer=mapped_layer, readout=readout, conv_impl=conv_impl),
                 num_neurons)


def poisson_nll(rate: jax.Array, response: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Elementwise Poisson negative log-likelihood without the model-free log(response!) term."""
    return rate - response * jnp.log(rate + eps)


def neural_loss(kind: str, rate: jax.Array, response: jax.Array) -> jax.Array:
    """Mean over batch and neurons of the Poisson NLL or the squared error, rate/response (B, N)."""
    if kind == "poisson":
        return jnp.mean(poisson_nll(rate, response))
    if kind == "mse":
        return jnp.mean(jnp.square(rate - response))
    raise ConfigError(f"dae.neural_loss must be one of {NEURAL_LOSSES}, got {kind!r}")


def readout_l1(params) -> jax.Array:
    """Sum of |w| over the readout's weight arrays (mask, features, dense kernel; not the bias)."""
    return sum(jnp.sum(jnp.abs(p)) for p in jax.tree_util.tree_leaves(params) if p.ndim > 1)


def make_loss(model: Model, dae, recon_weight: float, alpha: float) -> Callable:
    """loss(params, collections, batch, rng) -> (loss, (collections, metrics)) of the module docstring."""

    def loss_fn(params, collections, batch, rng):
        recon, _, rate = model.forward(params, batch["image"])
        recon_mse = jnp.mean(jnp.square(recon - batch["image"]))
        neural = neural_loss(dae.neural_loss, rate, batch["response"])
        l1 = readout_l1(params["readout"])
        loss = recon_weight * recon_mse + alpha * neural + dae.readout_l1 * l1
        return loss, (collections, {"recon_mse": recon_mse, "neural_loss": neural})

    return loss_fn


def sources(config) -> tuple:
    """(train, eval) sources of config.data with at least image and response."""
    data = config.data
    options = dict(data.options)
    return tuple(get_source(data.source, split, seed=data.seed, data_dir=data.data_dir,
                            features=("image", "response"), **options) for split in ("train", "test"))


def transform(batch: dict) -> dict:
    """A training batch: image (B, H, W, 1) and response (B, N) as float32 (other features dropped)."""
    return {"image": np.asarray(batch["image"], np.float32),
            "response": np.asarray(batch["response"], np.float32)}


def stage_plan(regime: str, steps: int,
               readout_steps: int) -> list[tuple[str, int, tuple[str, ...], float, float | None]]:
    """[(stage name, steps, trained parts, recon weight, alpha)] of a regime (module docstring); alpha is
    the neural loss's weight: 0 without it, 1.0 where it trains alone, None for the config's dae.alpha."""
    if regime == "autoencoder":
        return [("autoencoder", steps, ("encoder", "decoder"), 1.0, 0.0)]
    if regime == "posthoc":
        return [("autoencoder", steps, ("encoder", "decoder"), 1.0, 0.0),
                ("readout", readout_steps, ("readout",), 0.0, 1.0)]
    if regime == "joint":
        return [("joint", steps, PARTS, 1.0, None)]
    if regime == "neural":
        return [("neural", steps, ("encoder", "readout"), 0.0, 1.0)]
    raise ConfigError(f"dae.regime must be one of {REGIMES}, got {regime!r}")


def freeze(*names: str) -> Callable[[State, jax.Array], State]:
    """A stage enter that turns the named parts into frozen parts (optimizer state dropped)."""

    def enter(state: State, rng: jax.Array) -> State:
        return state.replace_parts(**{n: Part.frozen(state.parts[n].params, state.parts[n].collections)
                                      for n in names})

    return enter


def gather(arrays: dict, fn: Callable, batch_size: int) -> tuple[np.ndarray, ...]:
    """fn(image chunk) -> tuple of arrays, over arrays["image"] in chunks of batch_size, concatenated."""
    images = arrays["image"]
    outs = [jax.device_get(fn(jnp.asarray(images[i:i + batch_size], jnp.float32)))
            for i in range(0, len(images), batch_size)]
    return tuple(np.concatenate([o[k] for o in outs]) for k in range(len(outs[0])))


def measure(model: Model, params: dict, arrays: dict, *, neural: bool, batch_size: int = 256,
            neural_kind: str = "poisson") -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Metrics of params on a whole set (image, response[, trials]) and the arrays behind them.

    Returns ({recon_mse, psnr, ssim, rsa (the mapped layer), rsa_layer<i> (every encoder layer)[,
    neural_loss, corr, corr_norm]}, {"recon", "layer" (the mapped one, flattened), "rates", "rdm_model",
    "rdm_population"}); the neural entries only when `neural` (a trained readout)."""
    outputs = gather(arrays, lambda image: model.per_image(params, image), batch_size)
    mse, ssim, rates, recon, *layers = outputs
    response = np.asarray(arrays["response"], np.float64)
    rdm_population = M.rdm(response)
    rdms = [M.rdm(layer) for layer in layers]
    rdm_model = rdms[model.mapped_layer]
    out = {"recon_mse": float(mse.mean()), "psnr": float(np.mean(M.psnr(mse))), "ssim": float(ssim.mean()),
           "rsa": M.rsa(rdm_model, rdm_population),
           **{f"rsa_layer{i}": M.rsa(r, rdm_population) for i, r in enumerate(rdms)}}
    if neural:
        out["neural_loss"] = float(neural_loss(neural_kind, jnp.asarray(rates),
                                               jnp.asarray(response, jnp.float32)))
        out["corr"] = float(np.nanmean(M.correlation(rates, response)))
        if "trials" in arrays and np.asarray(arrays["trials"]).ndim == 3 and arrays["trials"].shape[1] > 1:
            out["corr_norm"] = float(np.nanmean(M.normalized_correlation(rates, arrays["trials"])))
    return out, {"recon": recon, "layer": layers[model.mapped_layer], "rates": rates, "rdm_model": rdm_model,
                 "rdm_population": rdm_population}


def build(config) -> Method:
    """The DAE-NR method of config.dae.regime (module docstring)."""
    dae = config.dae
    train_source, eval_source = sources(config)
    probe = train_source.get(np.arange(len(train_source)))
    num_neurons = int(np.asarray(probe["response"]).shape[-1])
    if dae.neural_loss == "poisson" and float(np.min(probe["response"])) < 0:
        raise ConfigError("dae.neural_loss='poisson' needs non-negative responses (counts or rates), but the "
                          "training responses go below 0 (dF/F?); use --config.dae.neural_loss=mse")
    model = get_model(config.model, num_neurons)
    model.check_image((1, *np.asarray(probe["image"]).shape[1:]))
    plan = stage_plan(dae.regime, config.train.steps, dae.readout_steps)
    trained = sorted({p for _, _, parts, _, _ in plan for p in parts})
    txs = {p: part_optimizer(config.optimizer, p, sum(s for _, s, parts, _, _ in plan if p in parts))
           for p in trained}
    dtype = compute_dtype(config.train.compute_dtype)
    eval_arrays = eval_source.get(np.arange(len(eval_source)))

    def init_state(rng, batch):
        params = model.init(rng, batch["image"])
        return State.create({p: Part.create(params[p], txs[p]) if p in txs else Part.frozen(params[p])
                             for p in PARTS})

    stages = []
    for name, steps, parts, recon_weight, alpha in plan:
        loss = make_loss(model, dae, recon_weight, dae.alpha if alpha is None else alpha)
        step = make_train_step(loss, txs, trains=parts, accum_steps=config.train.accum_steps, dtype=dtype)
        enter = freeze("encoder", "decoder") if name == "readout" else None
        stages.append(Stage(name, steps, step, enter=enter, trains=parts))

    def evaluate(state):
        metrics, _ = measure(model, state.params, eval_arrays, neural=dae.regime != "autoencoder",
                             batch_size=config.data.eval_batch_size, neural_kind=dae.neural_loss)
        return metrics

    def apply_fn(state, batch):
        return model.forward(state.params, batch["image"])

    return Method(name="dae_nr", init_state=init_state, train_step=stages[0].train_step,
                  train_source=train_source, eval_source=eval_source, transform=transform,
                  stages=tuple(stages), apply_fn=apply_fn, evaluate=evaluate)
