"""AV-Net (av_inpainting.md, first half): an audio-visual network that learns which image regions
sound like the audio, trained alone; jaxlab.methods.av_inpainting then uses it frozen as a guide.

Stages (jaxlab.train.method.Stage):
    attention   av_net.attention_steps steps of Eq. 1 (matched vs mismatched audio-frame pairs)
    classes_r   for r = 1 .. av_net.rounds: enter = pseudo-class discovery (K-means of o = GAP(m * f_V) over
                av_net.cluster_clips training clips, classifiers restarted), then av_net.round_steps steps,
                each an Eq. 1 update followed by an Eq. 2 update (alternating updates,
                jaxlab.train.step.sequential; each on its own random frame of the batch's clips)
The state has the part "av_net" (AVNet's params and batch_stats: everything frozen use needs) and the
frozen part "clusters" ({"centroids": (K, C)}). Each step trains on one random frame of each clip with
its audio window, the log-mel computed in the step (jaxlab.audio). Evaluation (held-out clips, middle
frame): localisation of the sounding object (jaxlab.methods.av_net.task.localisation_values),
matched-vs-mismatched accuracy and audio/visual pseudo-class agreement.

Inferred (the AV-Net training code is not released): negatives pair each frame with the next clip's
audio in the batch (labelled "not the same clip" even when the classes agree, as Eq. 1's y_corr); K-means runs on a sample of clips, re-run at every round, and a clip's pseudo-class
is its nearest centroid under the current network (the sample is held as constants of the jitted
stage enter: keep cluster_clips modest at 224x224); the two objectives alternate update by update, both
in one trainer step (`sequential`: a lax.switch over the two, jaxlab.train.step.alternate, ran each
step 5-8x slower than either objective alone on CPU); the lr drops x0.1 at av_net.lr_decay_step (the
paper: after 2 of 4 epochs).

Public API for av_inpainting: AVNet, attention_map, pseudo_class_logits, av_outputs, model_from_config,
front_end, audio_input, load_av_net, plus the data in jaxlab.data.av_clips (see /work/notes/av_api.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlab.audio import LogMelParams, audio_features
from jaxlab.config import ConfigError
from jaxlab.data import av_clips  # noqa: F401  (registers synthetic:av_clips and av_folder:)
from jaxlab.data.sources import get_source
from jaxlab.methods.av_net.model import AVNet
from jaxlab.methods.av_net.task import (
    attention_map, attention_objective, av_outputs, class_objective, finish_localisation, kmeans,
    localisation_values, pseudo_class_features, pseudo_class_logits,
)
from jaxlab.train.method import Method, Stage
from jaxlab.train.optim import part_optimizer
from jaxlab.train.state import Part, State, split_variables
from jaxlab.train.step import make_train_step, sequential

__all__ = ["AVNet", "attention_map", "audio_input", "av_outputs", "build", "front_end", "load_av_net",
           "model_from_config", "pseudo_class_logits"]

FEATURES = ("frames", "audio", "label", "object_mask", "distractor_mask")
CLASSIFIERS = ("classifier_a", "classifier_v")


def model_from_config(config) -> AVNet:
    """The AVNet of config.model (widths, embed_dim, num_classes = K pseudo-classes, init_scale, conv_impl,
    map_stride)."""
    m = config.model
    return AVNet(widths=tuple(m.widths), embed_dim=m.embed_dim, num_classes=m.num_classes,
                 init_scale=m.init_scale, conv_impl=m.get("conv_impl", "lax"), map_stride=int(m.get("map_stride", 16)))


def front_end(config) -> LogMelParams:
    """The log-mel parameters of config.audio (jaxlab.audio.LogMelParams)."""
    return LogMelParams(**dict(config.audio))


def audio_input(waveform: jax.Array, params: LogMelParams = LogMelParams()) -> jax.Array:
    """(..., samples) audio windows -> AVNet's audio input (..., n_mels, frames) (normalised log-mel)."""
    return audio_features(waveform, params)


def load_av_net(path: str) -> tuple[dict, dict]:
    """(params, collections) of the "av_net" part of an av_net run (its workdir or a checkpoint step dir)."""
    from jaxlab.train.init_from import read_arrays

    arrays = read_arrays(str(path))
    prefix = "av_net/"
    found = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    if not found:
        raise ConfigError(f"{path} holds no 'av_net' part (parts: {sorted({k.split('/')[0] for k in arrays})})")
    nested: dict = {}
    for key, value in found.items():
        node = nested
        *parents, leaf = key.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = jnp.asarray(value)
    return nested.get("params", {}), nested.get("collections", {})


def _check_steps(config) -> None:
    a = config.av_net
    total = a.attention_steps + a.rounds * a.round_steps
    if total != config.train.steps:
        raise ConfigError(f"train.steps={config.train.steps} must equal av_net.attention_steps + av_net.rounds * "
                          f"av_net.round_steps = {a.attention_steps} + {a.rounds} * {a.round_steps} = {total}")


def updates_before(config, step: int) -> int:
    """Optimizer updates made before trainer step `step`: one a step in the attention stage, two (Eq. 1
    then Eq. 2) a step in the rounds."""
    attention = int(config.av_net.attention_steps)
    return min(step, attention) + 2 * max(step - attention, 0)


def optimizer(config) -> optax.GradientTransformation:
    """config.optimizer's optimizer for "av_net", with the lr x av_net.lr_decay from trainer step
    av_net.lr_decay_step on (0: never; the schedule counts updates, two a step in the rounds)."""
    a = config.av_net
    tx = part_optimizer(config.optimizer, "av_net", updates_before(config, int(config.train.steps)))
    if not a.lr_decay_step:
        return tx
    boundary = updates_before(config, int(a.lr_decay_step))
    return optax.chain(tx, optax.scale_by_schedule(lambda count: jnp.where(count >= boundary, a.lr_decay, 1.0)))


def pick_frame(batch, index: jax.Array):
    """Frame `index[i]` of clip i: frames (B, H, W, 3), audio (B, S), object_mask, distractor_mask (B, H, W)."""
    rows = jnp.arange(batch["frames"].shape[0])
    return tuple(batch[k][rows, index] for k in ("frames", "audio", "object_mask", "distractor_mask"))


def reset_classifiers(params, opt_state, tx, rng):
    """params with fresh classifier_a / classifier_v (N(0, 0.01), zero bias), and opt_state with their
    entries (Adam moments) restarted; every other entry kept."""
    keys = jax.random.split(rng, len(CLASSIFIERS))
    params = dict(params)
    for key, name in zip(keys, CLASSIFIERS):
        kernel = params[name]["kernel"]
        params[name] = {"kernel": 0.01 * jax.random.normal(key, kernel.shape, kernel.dtype),
                        "bias": jnp.zeros_like(params[name]["bias"])}
    fresh = tx.init(params)

    def pick(path, old, new):
        return new if any(c in jax.tree_util.keystr(path) for c in CLASSIFIERS) else old

    return params, jax.tree_util.tree_map_with_path(pick, opt_state, fresh)


def build(config) -> Method:
    """The AV-Net method (module docstring)."""
    _check_steps(config)
    a, data = config.av_net, config.data
    model, audio_params = model_from_config(config), front_end(config)
    tx = optimizer(config)
    options = dict(data.options)
    train_source, eval_source = (get_source(data.source, split, seed=data.seed, data_dir=data.data_dir,
                                            features=FEATURES, **options) for split in ("train", "test"))

    def logmel(audio):
        return audio_input(audio, audio_params)

    def variables(params, collections):
        return {"params": params["av_net"], **collections["av_net"]}

    def random_frame(batch, rng):
        frames = batch["frames"]
        return pick_frame(batch, jax.random.randint(rng, (frames.shape[0],), 0, frames.shape[1]))

    def attention_loss(params, collections, batch, rng):
        frames, audio, _, _ = random_frame(batch, rng)
        loss, metrics, new = attention_objective(model, variables(params, collections), logmel(audio), frames)
        return loss, ({"av_net": new}, metrics)

    def class_loss(params, collections, batch, rng):
        frames, audio, _, _ = random_frame(batch, rng)
        loss, metrics, new = class_objective(model, variables(params, collections), params["clusters"]["centroids"],
                                             logmel(audio), frames, a.threshold)
        return loss, ({"av_net": new}, metrics)

    att_step = make_train_step(attention_loss, {"av_net": tx}, trains=("av_net",))
    cls_step = make_train_step(class_loss, {"av_net": tx}, trains=("av_net",))

    @functools.cache
    def cluster_sample():
        """The clips K-means sees: the middle frame (uint8) and its audio window, of the first cluster_clips."""
        rows = train_source.get(np.arange(min(int(a.cluster_clips), len(train_source))))
        middle = rows["frames"].shape[1] // 2
        return np.round(rows["frames"][:, middle] * 255).astype(np.uint8), rows["audio"][:, middle]

    def discover(state, rng):
        """Stage enter: K-means of o over the cluster sample; classifiers restarted."""
        frames, audio = cluster_sample()
        part = state.parts["av_net"]
        net = {"params": part.params, **part.collections}
        chunk = int(a.cluster_chunk)
        count = (len(frames) // chunk) * chunk
        if count < model.num_classes:
            raise ConfigError(f"av_net.cluster_clips gives {len(frames)} clips (whole chunks of "
                              f"{chunk}: {count}); K-means needs at least model.num_classes = {model.num_classes}")

        def features(xs):
            f, wave = xs
            out = model.apply(net, logmel(wave), f.astype(jnp.float32) / 255.0, False)
            return pseudo_class_features(out["attention_map"], out["visual_features"], a.threshold)

        split = lambda x: jnp.asarray(x[:count]).reshape(count // chunk, chunk, *x.shape[1:])  # noqa: E731
        o = jax.lax.map(features, (split(frames), split(audio))).reshape(count, -1)
        k_rng, c_rng = jax.random.split(rng)
        centroids, _ = kmeans(o, model.num_classes, k_rng, int(a.kmeans_iters))
        params, opt_state = reset_classifiers(part.params, part.opt_state, tx, c_rng)
        return state.replace_parts(av_net=part.replace(params=params, opt_state=opt_state),
                                   clusters=Part.frozen({"centroids": centroids}))

    def init_state(rng, batch):
        frames, audio, _, _ = pick_frame(batch, jnp.zeros((batch["frames"].shape[0],), jnp.int32))
        params, collections = split_variables(model.init(rng, logmel(audio), frames, False))
        centroids = jnp.zeros((model.num_classes, model.widths[-1]), jnp.float32)
        return State.create({"av_net": Part.create(params, tx, collections),
                             "clusters": Part.frozen({"centroids": centroids})})

    def middle_frame(batch):
        return pick_frame(batch, jnp.full((batch["frames"].shape[0],), batch["frames"].shape[1] // 2))

    def eval_step(state, batch, rng):
        frames, audio, object_mask, distractor_mask = middle_frame(batch)
        part = state.parts["av_net"]
        net = {"params": part.params, **part.collections}
        spectrograms = logmel(audio)
        out, mismatched = model.apply(net, spectrograms, frames, False, method=AVNet.with_mismatched)
        values = localisation_values(out["attention_map"], object_mask, distractor_mask)
        values["match_accuracy"] = 0.5 * ((out["score_logit"] > 0).astype(jnp.float32)
                                          + (mismatched["score_logit"] <= 0).astype(jnp.float32))
        values["class_agreement"] = (out["audio_logits"].argmax(-1) == out["visual_logits"].argmax(-1)).astype(
            jnp.float32)
        return values

    def apply_fn(state, batch):
        frames, audio, _, _ = middle_frame(batch)
        part = state.parts["av_net"]
        return model.apply({"params": part.params, **part.collections}, logmel(audio), frames, False)

    def param_groups(state):
        p = state.parts["av_net"].params
        heads = {k: v for k, v in p.items() if k not in ("visual", "audio", *CLASSIFIERS)}
        return {"visual": p["visual"], "audio": p["audio"], "projections_and_scale": heads,
                "classifiers": {k: p[k] for k in CLASSIFIERS}}

    stages = [Stage("attention", int(a.attention_steps), att_step, trains=("av_net",))]
    round_step = sequential(attention=att_step, classes=cls_step)
    stages += [Stage(f"classes_{r + 1}", int(a.round_steps), round_step, enter=discover,
                     trains=("av_net",)) for r in range(int(a.rounds))]
    return Method(name="av_net", init_state=init_state, train_step=att_step, train_source=train_source,
                  eval_source=eval_source, eval_step=eval_step, stages=tuple(stages), apply_fn=apply_fn,
                  param_groups=param_groups, eval_finish=finish_localisation)


def report(config, workdir):
    """`jaxlab report` for av_net (jaxlab.methods.av_net.report)."""
    from jaxlab.methods.av_net.report import report as run_report

    return run_report(config, workdir)
