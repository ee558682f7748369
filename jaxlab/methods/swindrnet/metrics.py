"""Depth-restoration metrics (utils/metrics_depth_restoration.py of PKU-EPIC/DREDS), per frame and region.

On the pixels of a region where the truth is valid (gt > 0), per frame:
    RMSE = sqrt(mean (d - d*)^2),  REL = mean |d - d*| / d*,  MAE = mean |d - d*|,
    delta_t = fraction with max(d*/d, d/d*) < t  for t = 1.05, 1.10, 1.25.
Regions: "all" (every valid pixel), "object" (object pixels), "ts" (transparent or specular pixels).
A frame with no pixel in a region does not count for that region: the averages are over the frames
that have one (as the released inference metric's num_valid), which eval_finish does from the
per-frame values times a "<region>/frames" indicator.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

METRICS = ("rmse", "rel", "mae", "d105", "d110", "d125")
THRESHOLDS = {"d105": 1.05, "d110": 1.10, "d125": 1.25}
REGIONS = ("all", "object", "ts")
MATERIALS = ("background", "diffuse", "specular", "transparent")  # the simulator's material codes 0..3


def region_masks(gt: jax.Array, material: jax.Array) -> dict[str, jax.Array]:
    """{region: bool [B, H, W]} from the truth [B, H, W] and material codes [B, H, W] (MATERIALS)."""
    valid = gt > 0
    return {"all": valid, "object": valid & (material > 0),
            "ts": valid & ((material == 2) | (material == 3))}


def frame_metrics(pred: jax.Array, gt: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Per-frame metrics {name: [B]} over mask [B, H, W] (METRICS), plus "frames": 1.0 where the frame
    has a pixel in the mask (else the metrics are 0 and do not count)."""
    m = mask.astype(jnp.float32)
    n = m.sum(axis=(1, 2))
    count = jnp.maximum(n, 1.0)
    safe_pred = jnp.where(mask, pred, 1.0)
    safe_gt = jnp.where(mask, gt, 1.0)
    err = safe_pred - safe_gt

    def mean(values):
        return (values * m).sum(axis=(1, 2)) / count

    ratio = jnp.maximum(safe_gt / safe_pred, safe_pred / safe_gt)
    ratio = jnp.where(safe_pred > 0, ratio, jnp.inf)  # a hole (0) or a negative depth is never within t
    out = {"rmse": jnp.sqrt(mean(err**2)), "rel": mean(jnp.abs(err) / safe_gt), "mae": mean(jnp.abs(err))}
    out.update({name: mean((ratio < t).astype(jnp.float32)) for name, t in THRESHOLDS.items()})
    out["frames"] = (n > 0).astype(jnp.float32)
    return out


def all_region_metrics(pred: jax.Array, gt: jax.Array, material: jax.Array, prefix: str = "") -> dict:
    """{f"{prefix}{region}/{metric}": [B]} for every region and metric, values times the frame
    indicator, and f"{prefix}{region}/frames" (see finish_means)."""
    out = {}
    for region, mask in region_masks(gt, material).items():
        values = frame_metrics(pred, gt, mask)
        frames = values.pop("frames")
        out.update({f"{prefix}{region}/{k}": v * frames for k, v in values.items()})
        out[f"{prefix}{region}/frames"] = frames
    return out


def finish_means(means: dict[str, float]) -> dict[str, float]:
    """Means over frames of all_region_metrics' values -> averages over the frames that count:
    mean(value * frames) / mean(frames) per region; other keys pass through."""
    out = {}
    for key, value in means.items():
        region, _, name = key.rpartition("/")
        if name in METRICS and f"{region}/frames" in means:
            frames = means[f"{region}/frames"]
            out[key] = float(value) / float(frames) if frames > 0 else float("nan")
        elif name != "frames":
            out[key] = float(value)
    return out
