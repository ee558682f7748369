"""Audio-visual guided video inpainting on the trainer: parts, losses, steps, evaluation.

State parts: "generator" (STTNGenerator), "discriminator" (TPatchGAN; its spectral-norm vectors u, v are
the part's collections) and "av_net" (the frozen AV-Net: params and BatchNorm statistics). One training
step is the release's iteration: the discriminator's update (hinge loss on real clips vs the detached
composite), then the generator's (`sequential`; `inpaint.gan_schedule="alternate"` gives one update per
step instead, jaxlab.train.step.alternate). The generator's loss (paper Eq. 5):

    L = l1 (hole L1 + valid L1) + adv (-mean D(composite)) + av_att L_AVatt + av_cls L_AVcls

with L_AVatt, L_AVcls through the frozen AV-Net on every frame of the composite (losses.py). Audio: each
frame's audio window becomes its log-mel (jaxlab.audio through jaxlab.methods.av_net.audio_input); with
`model.audio_bottleneck` the AV-Net's audio feature f_A of each frame is fed to the generator.

Masks (masks.py): `inpaint.train_masks="stroke"` draws each clip's mask from a bank of free-form masks in
the step (the release draws one of its 6,000 I-mask PNGs per clip); "object" uses the clip's sounding-object
silhouette, dilated (the release's S-mask runs are separate models, as here). Evaluation: fixed masks
(stroke masks from `inpaint.eval_mask_seed`, object masks from the eval clips' silhouettes), PSNR on RGB
and SSIM on grayscale (the paper's), per frame, averaged.

The guide is a `Guide`: the frozen AV-Net as functions, so the losses can be tested with a stand-in
network; `av_net_guide(config)` builds it from jaxlab.methods.av_net.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab import metrics as image_metrics
from jaxlab.config import Config, ConfigError
from jaxlab.methods.av_inpainting import losses as L
from jaxlab.methods.av_inpainting import masks as masks_lib
from jaxlab.models.sttn import STTNGenerator, TPatchGAN, composite, release_init
from jaxlab.train.method import Method
from jaxlab.train.optim import part_optimizer
from jaxlab.train.state import Part, State, split_variables
from jaxlab.train.step import alternate, make_train_step, sequential

PARTS = ("generator", "discriminator", "av_net")
FEATURES = ("frames", "audio", "object_mask")
MASK_KINDS = ("stroke", "object")


@dataclasses.dataclass(frozen=True)
class Guide:
    """The frozen AV-Net as pure functions. spectrogram(audio (..., S)) -> (..., M, F);
    outputs(params, collections, spectrograms (N, M, F), frames (N, H, W, 3) in [0, 1]) -> dict with
    "attention_map" (N, h, w), "audio_logits", "visual_logits" (N, K); audio_features(params, collections,
    spectrograms) -> (N, A); init(rng, spectrograms, frames) -> (params, collections)."""

    spectrogram: Callable
    outputs: Callable
    audio_features: Callable
    init: Callable
    feature_dim: int


def av_net_sections(config) -> Config:
    """The AV-Net's model and audio config sections: those of the run in inpaint.av_net_workdir (its
    config.json) when there is one, so the module always matches the weights; else config.av_net."""
    path = Path(str(config.inpaint.av_net_workdir or "")) / "config.json"
    if config.inpaint.av_net_workdir and path.exists():
        saved = json.loads(path.read_text())
        return Config(model=saved["model"], audio=saved["audio"])
    return config.av_net


def av_net_guide(config) -> Guide:
    """The Guide of jaxlab.methods.av_net for the AV-Net's sections (av_net_sections)."""
    from jaxlab.methods.av_net import AVNet, audio_input, av_outputs, front_end, model_from_config

    sections = av_net_sections(config)
    model, front = model_from_config(sections), front_end(sections)

    def init(rng, spectrograms, frames):
        return split_variables(model.init(rng, spectrograms, frames, False))

    def audio_features(params, collections, spectrograms):
        return model.apply({"params": params, **collections}, spectrograms, False, method=AVNet.encode_audio)

    return Guide(spectrogram=lambda audio: audio_input(audio, front),
                 outputs=functools.partial(av_outputs, model=model), audio_features=audio_features,
                 init=init, feature_dim=int(model.widths[-1]))


def make_models(config) -> tuple[STTNGenerator, TPatchGAN]:
    m = config.model
    gen = STTNGenerator(channels=tuple(m.channels), num_blocks=int(m.num_blocks),
                        patch_divisors=tuple(m.patch_divisors), share_blocks=bool(m.share_blocks),
                        apply_mask=bool(m.apply_mask), audio_bottleneck=bool(m.audio_bottleneck))
    disc = TPatchGAN(channels=tuple(m.disc_channels), power_iterations=int(m.power_iterations),
                     batch_as_one_video=bool(m.disc_batch_as_one_video))
    return gen, disc


def uses_guide(config) -> bool:
    """Whether the AV-Net takes part: an AV loss on, or audio fed to the generator."""
    i = config.inpaint
    return float(i.av_att) > 0 or float(i.av_cls) > 0 or bool(config.model.audio_bottleneck)


# --- the steps ----------------------------------------------------------------------------------------------


def flat_frames(x: jax.Array) -> jax.Array:
    """(B, T, ...) -> (B T, ...)."""
    return x.reshape((-1,) + x.shape[2:])


class Inpainter:
    """The generator, discriminator and guide as pure functions of {part: params} (module docstring)."""

    def __init__(self, config, guide: Guide | None, bank: np.ndarray | None):
        self.config = config
        self.gen, self.disc = make_models(config)
        self.guide = guide
        self.bank = None if bank is None else jnp.asarray(bank)
        self.weights = {k: float(config.inpaint[k]) for k in ("l1", "adv", "av_att", "av_cls")}
        if (self.weights["av_att"] > 0 or self.weights["av_cls"] > 0 or self.gen.audio_bottleneck) and guide is None:
            raise ConfigError("an AV loss or model.audio_bottleneck needs the AV-Net (a Guide)")

    def spectrograms(self, batch) -> jax.Array:
        """(B T, M, F) log-mel of every frame's audio window."""
        return self.guide.spectrogram(flat_frames(batch["audio"]))

    def holes(self, batch, rng) -> jax.Array:
        """(B, T, H, W, 1) training masks: batch["hole"] when given (object masks, eval), else one bank mask
        per clip drawn with rng, the same in all its frames."""
        if "hole" in batch:
            return batch["hole"]
        b, t = batch["frames"].shape[:2]
        index = jax.random.randint(rng, (b,), 0, self.bank.shape[0])
        return jnp.broadcast_to(self.bank[index][:, None, :, :, None], (b, t) + self.bank.shape[1:] + (1,))

    def generate(self, params, collections, batch, hole, spectrograms=None):
        """(prediction, composite), both (B, T, H, W, 3) in [-1, 1]."""
        frames = batch["frames"] * 2.0 - 1.0
        audio = None
        if self.gen.audio_bottleneck:
            feats = self.guide.audio_features(params["av_net"], collections["av_net"], spectrograms)
            audio = jax.lax.stop_gradient(feats).reshape(frames.shape[:2] + feats.shape[-1:])
        pred = self.gen.apply({"params": params["generator"]}, frames, hole, audio)
        return pred, composite(frames, pred, hole)

    def discriminate(self, params, collections, video, update: bool):
        variables = {"params": params["discriminator"], **collections["discriminator"]}
        if update:
            return self.disc.apply(variables, video, True, mutable=["spectral"])
        return self.disc.apply(variables, video, False), None

    def d_loss(self, params, collections, batch, rng):
        """Hinge loss of the discriminator on real clips vs the detached composite."""
        hole = self.holes(batch, rng)
        spectrograms = self.spectrograms(batch) if self.gen.audio_bottleneck else None
        _, comp = self.generate(params, collections, batch, hole, spectrograms)
        real = batch["frames"] * 2.0 - 1.0
        logits, new = self.discriminate(params, collections, jnp.concatenate([real, jax.lax.stop_gradient(comp)]),
                                        True)
        n = real.shape[0]
        loss = L.hinge_d_loss(logits[:n], logits[n:])
        return loss, ({**collections, "discriminator": new}, {"d_real": logits[:n].mean(), "d_fake": logits[n:].mean()})

    def guidance(self, params, collections, batch, comp, spectrograms):
        """(L_AVatt, L_AVcls) of the composite (B, T, H, W, 3) in [-1, 1] through the frozen AV-Net."""
        av_p, av_c = params["av_net"], collections["av_net"]
        truth = self.guide.outputs(av_p, av_c, spectrograms, flat_frames(batch["frames"]))
        truth = jax.lax.stop_gradient(truth)
        out = self.guide.outputs(av_p, av_c, spectrograms, flat_frames(comp) * 0.5 + 0.5)
        att = L.av_attention_loss(out["attention_map"], truth["attention_map"])
        cls = L.av_class_loss(truth["audio_logits"], out["visual_logits"])
        return att, cls

    def g_loss(self, params, collections, batch, rng):
        """Paper Eq. 5 (module docstring); the discriminator is applied without updating its u, v."""
        w = self.weights
        hole = self.holes(batch, rng)
        need_audio = self.gen.audio_bottleneck or w["av_att"] > 0 or w["av_cls"] > 0
        spectrograms = self.spectrograms(batch) if need_audio else None
        pred, comp = self.generate(params, collections, batch, hole, spectrograms)
        hole_l1, valid_l1 = L.hole_valid_l1(pred, batch["frames"] * 2.0 - 1.0, hole)
        logits, _ = self.discriminate(params, collections, comp, False)
        adv = L.hinge_g_loss(logits)
        loss = w["l1"] * (hole_l1 + valid_l1) + w["adv"] * adv
        metrics = {"hole_l1": hole_l1, "valid_l1": valid_l1, "adv": adv}
        if w["av_att"] > 0 or w["av_cls"] > 0:
            att, cls = self.guidance(params, collections, batch, comp, spectrograms)
            loss = loss + w["av_att"] * att + w["av_cls"] * cls
            metrics.update(av_att=att, av_cls=cls)
        return loss, (collections, metrics)

    def init(self, rng, batch, av_net: tuple | None = None) -> dict:
        """{part: (params, collections)} for clips like batch's: generator and discriminator by the
        release's init (sttn.release_init); the AV-Net's `av_net` (params, collections) when given, else
        the guide's init."""
        kg, kd, ka = jax.random.split(rng, 3)
        frames = batch["frames"] * 2.0 - 1.0
        hole = jnp.zeros(frames.shape[:-1] + (1,), frames.dtype)
        out = {}
        audio = None
        if self.guide is not None:
            out["av_net"] = av_net if av_net is not None else self.guide.init(
                ka, self.spectrograms(batch), flat_frames(batch["frames"]))
            audio = jnp.zeros(frames.shape[:2] + (self.guide.feature_dim,), frames.dtype)
        out["generator"] = (release_init(self.gen, kg, frames, hole, audio)["params"], {})
        out["discriminator"] = split_variables(release_init(self.disc, kd, frames))
        return out

    def inpaint(self, params, collections, frames01, hole, audio=None):
        """Composite (B, T, H, W, 3) in [0, 1] of clips frames01 in [0, 1] with holes (B, T, H, W, 1)."""
        batch = {"frames": frames01}
        spectrograms = None
        if self.gen.audio_bottleneck:
            batch["audio"] = audio
            spectrograms = self.spectrograms(batch)
        _, comp = self.generate(params, collections, batch, hole, spectrograms)
        return comp * 0.5 + 0.5


# --- data ---------------------------------------------------------------------------------------------------


def sources(config):
    """(train, eval) sources of clips with frames, audio and object_mask."""
    from jaxlab.data import av_clips  # noqa: F401  (registers synthetic:av_clips and av_folder:)
    from jaxlab.data.sources import get_source

    d = config.data
    return tuple(get_source(d.source, split, seed=d.seed, data_dir=d.data_dir, features=FEATURES,
                            **dict(d.options)) for split in ("train", "test"))


def make_transform(config) -> Callable[[dict], dict]:
    """Host batch -> frames (B, T, H, W, 3), audio (B, T, S) float32, and with object training masks
    "hole" (B, T, H, W, 1): the dilated silhouettes."""
    kind, dilate = config.inpaint.train_masks, int(config.inpaint.object_dilate)

    def transform(batch):
        out = {"frames": np.asarray(batch["frames"], np.float32), "audio": np.asarray(batch["audio"], np.float32)}
        if kind == "object":
            out["hole"] = masks_lib.object_masks(batch["object_mask"], dilate)[..., None]
        return out

    return transform


def eval_masks(config, arrays: dict) -> dict[str, np.ndarray]:
    """The fixed evaluation masks {"stroke", "object"}: (N, T, H, W, 1) each (module docstring)."""
    n, t, size = arrays["frames"].shape[:3]
    return {"stroke": masks_lib.stroke_video_masks(int(config.inpaint.eval_mask_seed), n, t, size),
            "object": masks_lib.object_masks(arrays["object_mask"], int(config.inpaint.object_dilate))[..., None]}


def inpaint_all(model: Inpainter, state: State, arrays: dict, holes: np.ndarray, batch_size: int) -> np.ndarray:
    """Composites (N, T, H, W, 3) in [0, 1] of every clip with its hole."""
    fn = _inpaint_fn(model)
    params = state.params
    collections = {n: p.collections for n, p in state.parts.items()}
    out = []
    for i in range(0, len(holes), batch_size):
        sl = slice(i, i + batch_size)
        out.append(np.asarray(fn(params, collections, jnp.asarray(arrays["frames"][sl], jnp.float32),
                                 jnp.asarray(holes[sl], jnp.float32), jnp.asarray(arrays["audio"][sl], jnp.float32))))
    return np.concatenate(out)


@functools.lru_cache(maxsize=8)
def _inpaint_fn(model: Inpainter):
    return jax.jit(model.inpaint)


def frame_scores(videos: np.ndarray, reference: np.ndarray) -> dict[str, np.ndarray]:
    """Per-video PSNR (RGB) and SSIM (grayscale), each the mean over frames: (N, T, H, W, 3) x2 -> (N,)."""
    n, t = videos.shape[:2]
    x, y = (jnp.asarray(v.reshape((n * t,) + v.shape[2:]), jnp.float32) for v in (videos, reference))
    psnr = image_metrics.psnr(image_metrics.mse(x, y))
    luma = jnp.asarray([0.299, 0.587, 0.114])
    ssim = image_metrics.ssim((x @ luma)[..., None], (y @ luma)[..., None])
    return {"psnr": np.asarray(psnr).reshape(n, t).mean(1), "ssim": np.asarray(ssim).reshape(n, t).mean(1)}


# --- the method ---------------------------------------------------------------------------------------------


def check_config(config, *, guide_given: bool = False) -> None:
    """Choices named in the config are known; an AV run has a trained AV-Net to load (unless a stand-in
    guide is given)."""
    i = config.inpaint
    if i.train_masks not in MASK_KINDS:
        raise ConfigError(f"inpaint.train_masks must be one of {MASK_KINDS}, got {i.train_masks!r}")
    if i.gan_schedule not in ("sequential", "alternate"):
        raise ConfigError(f"inpaint.gan_schedule must be 'sequential' or 'alternate', got {i.gan_schedule!r}")
    if uses_guide(config) and not guide_given and not (i.av_net_workdir or config.train.init_from):
        raise ConfigError("the AV losses and the audio bottleneck need a trained AV-Net: train one "
                          "(jaxlab train --config av_net:tiny --workdir runs/av_net) and pass "
                          "--config.inpaint.av_net_workdir=runs/av_net (or --config.train.init_from=runs/av_net "
                          "--config.train.init_parts='(\"av_net\",)')")


def make_steps(model: Inpainter, txs: dict) -> tuple[Callable, Callable]:
    """(discriminator step, generator step): each updates its own part only (jaxlab.train.step)."""
    return (make_train_step(model.d_loss, txs, trains=("discriminator",)),
            make_train_step(model.g_loss, txs, trains=("generator",)))


def make_inpainter(config, guide: Guide | None = None) -> Inpainter:
    """The Inpainter of config: its stroke-mask bank when training on strokes, the guide (default the
    AV-Net of config.av_net) when an AV loss or the audio bottleneck is on."""
    i = config.inpaint
    if guide is None and uses_guide(config):
        guide = av_net_guide(config)
    size = int(config.data.options.size)
    bank = masks_lib.mask_bank(int(i.mask_seed), int(i.mask_bank), size) if i.train_masks == "stroke" else None
    return Inpainter(config, guide if uses_guide(config) else None, bank)


def build(config, *, guide: Guide | None = None) -> Method:
    """The av_inpainting Method of config (module docstring). guide: a stand-in for the AV-Net (tests);
    default the AV-Net of config.av_net, loaded from config.inpaint.av_net_workdir when set."""
    check_config(config, guide_given=guide is not None)
    i = config.inpaint
    model = make_inpainter(config, guide)
    loaded = None
    if model.guide is not None and i.av_net_workdir:
        from jaxlab.methods.av_net import load_av_net

        loaded = load_av_net(i.av_net_workdir)
    train_source, eval_source = sources(config)
    steps = int(config.train.steps)
    txs = {p: part_optimizer(config.optimizer, p, steps) for p in ("generator", "discriminator")}

    def init_state(rng, batch):
        made = model.init(rng, batch, loaded)
        parts = {p: Part.create(made[p][0], txs[p], made[p][1]) for p in txs}
        if "av_net" in made:
            parts["av_net"] = Part.frozen(*made["av_net"])
        return State.create(parts)

    d_step, g_step = make_steps(model, txs)
    train_step = (sequential(discriminator=d_step, generator=g_step) if i.gan_schedule == "sequential"
                  else alternate(d_step, g_step))
    eval_arrays = eval_source.get(np.arange(min(len(eval_source), int(i.eval_clips))))
    holes = eval_masks(config, eval_arrays)

    def evaluate(state):
        out = {}
        for kind, hole in holes.items():
            videos = inpaint_all(model, state, eval_arrays, hole, int(config.data.eval_batch_size))
            for name, values in frame_scores(videos, eval_arrays["frames"]).items():
                out[f"{kind}/{name}"] = float(values.mean())
        return out

    def param_groups(state):
        return {p: state.parts[p].params for p in PARTS if p in state.parts}

    def apply_fn(state, batch):
        hole = model.holes(batch, jax.random.key(0))
        collections = {n: p.collections for n, p in state.parts.items()}
        spectrograms = model.spectrograms(batch) if model.gen.audio_bottleneck else None
        return model.generate(state.params, collections, batch, hole, spectrograms)

    return Method(name="av_inpainting", init_state=init_state, train_step=train_step, train_source=train_source,
                  eval_source=eval_source, transform=make_transform(config), evaluate=evaluate,
                  apply_fn=apply_fn, param_groups=param_groups)
