"""AV-Net's objectives, pseudo-class discovery and localisation metrics, as pure functions.

Attention (Eq. 1): L_att = BCE(y_corr, GMP(M(a, v))) over the B matched pairs (frame i, audio i) and
B mismatched pairs (frame i, audio i + 1 mod B) of a batch; computed on the map's logits (GMP commutes
with the sigmoid).
Pseudo-classes: m = M > threshold (0.07); o = GAP(m * f_V) (B, C); K-means (K = num_classes) over the o
of a fixed sample of training clips (`av_net.cluster_clips`; the paper: all clips) gives centroids;
a clip's pseudo-class y_p is its o's nearest centroid. Eq. 2: L_cls = CE(y_p, y_A) + CE(y_p, y_V).
Each clustering restarts the classifiers (N(0, 0.01), zero bias: the official init_classifier) and
their Adam moments, since cluster indices are arbitrary from one clustering to the next.

Frozen use (av_inpainting): attention_map / pseudo_class_logits / av_outputs run the network in eval
mode (BatchNorm on running statistics) on any params and collections; gradients flow to the frames.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxlab.methods.av_net.model import AVNet

# --- frozen use -----------------------------------------------------------------------------------------------


def av_outputs(params, collections, audio_logmel: jax.Array, frames: jax.Array, *,
               model: AVNet | None = None) -> dict[str, jax.Array]:
    """AVNet's output dict in eval mode. audio_logmel (B, n_mels, frames) normalised log-mel
    (jaxlab.audio.audio_features), frames (B, H, W, 3) in [0, 1]; collections: {"batch_stats": ...}."""
    model = AVNet() if model is None else model
    return model.apply({"params": params, **collections}, audio_logmel, frames, False)


def attention_map(params, collections, audio_logmel: jax.Array, frames: jax.Array, *,
                  model: AVNet | None = None) -> jax.Array:
    """M(a, v) (B, h, w) in (0, 1), h = H / model.map_stride (av_outputs' arguments)."""
    return av_outputs(params, collections, audio_logmel, frames, model=model)["attention_map"]


def pseudo_class_logits(params, collections, audio_logmel: jax.Array, frames: jax.Array, *,
                        model: AVNet | None = None) -> tuple[jax.Array, jax.Array]:
    """(y_A(a), y_V(v)), each (B, num_classes) logits (av_outputs' arguments)."""
    out = av_outputs(params, collections, audio_logmel, frames, model=model)
    return out["audio_logits"], out["visual_logits"]


# --- pseudo-classes ------------------------------------------------------------------------------------------


def pseudo_class_features(attention: jax.Array, visual_features: jax.Array, threshold: float = 0.07) -> jax.Array:
    """o = GAP((M > threshold) * f_V): attention (B, h, w), visual_features (B, h, w, C) -> (B, C)."""
    mask = (attention > threshold).astype(visual_features.dtype)
    return (mask[..., None] * visual_features).mean(axis=(1, 2))


def squared_distances(points: jax.Array, centroids: jax.Array) -> jax.Array:
    """(N, D), (K, D) -> (N, K) squared Euclidean distances."""
    hi = jax.lax.Precision.HIGHEST
    cross = jnp.matmul(points, centroids.T, precision=hi)
    return jnp.maximum((points ** 2).sum(-1)[:, None] - 2 * cross + (centroids ** 2).sum(-1)[None], 0.0)


def nearest_centroid(points: jax.Array, centroids: jax.Array) -> jax.Array:
    """(N, D), (K, D) -> (N,) int32 index of each point's nearest centroid."""
    return jnp.argmin(squared_distances(points, centroids), axis=-1).astype(jnp.int32)


def kmeans(points: jax.Array, k: int, rng: jax.Array, iters: int = 30) -> tuple[jax.Array, jax.Array]:
    """K-means (k-means++ seeding, then `iters` Lloyd steps; an empty cluster keeps its centroid).
    points (N, D), N >= k -> (centroids (k, D), assignment (N,) int32)."""
    n = points.shape[0]
    if n < k:
        raise ValueError(f"kmeans needs at least k = {k} points, got {points.shape}")
    points = points.astype(jnp.float32)
    first, rng = jax.random.split(rng)
    centroids = jnp.zeros((k, points.shape[1]), jnp.float32).at[0].set(
        points[jax.random.randint(first, (), 0, n)])

    def seed(i, carry):  # k-means++: next centroid drawn with probability ~ squared distance to the chosen
        centroids, key = carry
        d2 = jnp.where(jnp.arange(k)[None] < i, squared_distances(points, centroids), jnp.inf).min(-1)
        key, sub = jax.random.split(key)
        total = d2.sum()
        p = jnp.where(total > 0, d2 / jnp.where(total > 0, total, 1.0), 1.0 / n)
        return centroids.at[i].set(points[jax.random.choice(sub, n, p=p)]), key

    centroids, _ = jax.lax.fori_loop(1, k, seed, (centroids, rng))

    def lloyd(_, centroids):
        onehot = jax.nn.one_hot(nearest_centroid(points, centroids), k, dtype=jnp.float32)
        counts = onehot.sum(0)
        sums = jnp.matmul(onehot.T, points, precision=jax.lax.Precision.HIGHEST)
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], centroids)

    centroids = jax.lax.fori_loop(0, iters, lloyd, centroids)
    return centroids, nearest_centroid(points, centroids)


# --- objectives ------------------------------------------------------------------------------------------------


def attention_objective(model: AVNet, variables, audio_logmel, frames, train: bool = True):
    """Eq. 1 on B matched + B mismatched pairs -> (loss, metrics, new batch_stats or None)."""
    mutable = ["batch_stats"] if train else False
    result = model.apply(variables, audio_logmel, frames, train, method=AVNet.with_mismatched, mutable=mutable)
    (matched, mismatched), new = result if train else (result, None)
    logits = jnp.concatenate([matched["score_logit"], mismatched["score_logit"]])
    labels = jnp.concatenate([jnp.ones_like(matched["score_logit"]), jnp.zeros_like(mismatched["score_logit"])])
    loss = optax.sigmoid_binary_cross_entropy(logits, labels).mean()
    accuracy = jnp.mean((logits > 0) == (labels > 0.5))
    return loss, {"att_loss": loss, "match_accuracy": accuracy}, new


def class_objective(model: AVNet, variables, centroids, audio_logmel, frames, threshold: float):
    """Eq. 2 with pseudo-labels from the nearest centroid of o (no gradient through the labels)
    -> (loss, metrics, new batch_stats)."""
    out, new = model.apply(variables, audio_logmel, frames, True, mutable=["batch_stats"])
    o = pseudo_class_features(jax.lax.stop_gradient(out["attention_map"]),
                              jax.lax.stop_gradient(out["visual_features"]), threshold)
    labels = nearest_centroid(o, centroids)
    ce_a = optax.softmax_cross_entropy_with_integer_labels(out["audio_logits"], labels).mean()
    ce_v = optax.softmax_cross_entropy_with_integer_labels(out["visual_logits"], labels).mean()
    agree = jnp.mean(out["audio_logits"].argmax(-1) == out["visual_logits"].argmax(-1))
    return ce_a + ce_v, {"cls_loss": ce_a + ce_v, "cls_audio": ce_a, "cls_visual": ce_v,
                         "class_agreement": agree}, new


# --- localisation ---------------------------------------------------------------------------------------------


def upsample_maps(maps: jax.Array, height: int, width: int) -> jax.Array:
    """(B, h, w) -> (B, height, width), bilinear (half-pixel centres)."""
    return jax.image.resize(maps, (maps.shape[0], height, width), "bilinear")


def cell_coverage(mask: jax.Array, h: int, w: int) -> jax.Array:
    """(B, H, W) -> (B, h, w): the fraction of each map cell's pixels inside the mask (H, W multiples of h, w)."""
    b, height, width = mask.shape
    if height % h or width % w:
        raise ValueError(f"mask {mask.shape} does not tile into the {h}x{w} map's cells")
    return mask.reshape(b, h, height // h, w, width // w).mean((2, 4))


def localisation_values(maps: jax.Array, object_mask: jax.Array, distractor_mask: jax.Array) -> dict[str, jax.Array]:
    """Per-example localisation of the sounding object by AV maps (B, h, w), masks (B, H, W) in {0, 1}:
    map_inside / map_outside (mean map, upsampled to H x W, inside / outside the object's mask);
    pointing: 1 if the map's peak cell is "on the object" (holds at least half as much of the object as
    the cell holding most; the map's own resolution, so a coarse map is not judged by interpolation),
    pointing_chance: the fraction of cells on the object (a random cell's hit rate);
    distractor_present and sounding_over_distractor (present and the mean map on the object exceeds that
    on the silent objects)."""
    full = upsample_maps(maps, *object_mask.shape[1:])
    inside_area = object_mask.sum((1, 2))
    outside_area = (1 - object_mask).sum((1, 2))
    inside = (full * object_mask).sum((1, 2)) / jnp.maximum(inside_area, 1.0)
    outside = (full * (1 - object_mask)).sum((1, 2)) / jnp.maximum(outside_area, 1.0)
    cover = cell_coverage(object_mask, *maps.shape[1:]).reshape(maps.shape[0], -1)
    on_object = cover >= 0.5 * cover.max(-1, keepdims=True)
    peak = jnp.argmax(maps.reshape(maps.shape[0], -1), axis=-1)
    pointing = jnp.take_along_axis(on_object, peak[:, None], axis=-1)[:, 0].astype(jnp.float32)
    d_area = distractor_mask.sum((1, 2))
    on_distractor = (full * distractor_mask).sum((1, 2)) / jnp.maximum(d_area, 1.0)
    present = (d_area > 0).astype(jnp.float32)
    return {"map_inside": inside, "map_outside": outside, "pointing": pointing,
            "pointing_chance": on_object.mean(-1), "distractor_present": present,
            "sounding_over_distractor": present * (inside > on_distractor)}


def finish_localisation(means: dict[str, float]) -> dict[str, float]:
    """Eval means -> reported metrics: adds map_contrast = inside - outside and turns
    sounding_over_distractor into a rate over the clips with a visible distractor."""
    out = dict(means)
    if "map_inside" in out and "map_outside" in out:
        out["map_contrast"] = out["map_inside"] - out["map_outside"]
    if out.get("distractor_present", 0) > 0:
        out["sounding_over_distractor"] = out["sounding_over_distractor"] / out["distractor_present"]
    return out
