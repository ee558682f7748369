"""SwinDRNet on the one trainer: model from config, loss, eval metrics, data sources, optional ImageNet
initialisation of the streams.

Batch features (data/sources.py): rgb [B, H, W, 3], raw_depth and depth [B, H, W] metres, material
[B, H, W] uint8, intrinsics [B, 4]. The state has one part, "model" (jaxlab.train.supervised).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.config import ConfigError
from jaxlab.data.sources import get_source
from jaxlab.data import rgbd as _sources  # noqa: F401  (registers the sources)
from jaxlab.data.rgbd import FEATURES
from jaxlab.methods.swindrnet.losses import WEIGHTS, swindrnet_loss
from jaxlab.methods.swindrnet.metrics import all_region_metrics, finish_means
from jaxlab.methods.swindrnet.model import SwinDRNet
from jaxlab.train.supervised import supervised

STREAMS = ("backbone_rgb_branch", "backbone_xyz_branch")


def get_model(model_config) -> SwinDRNet:
    """SwinDRNet from config.model (size, embed_dim, depths, num_heads, window, drop_path_rate,
    head_channels, pool_scales, fusion, attention_impl)."""
    m = dict(model_config)
    known = {f.name for f in dataclasses.fields(SwinDRNet)} - {"parent", "name"}
    unknown = sorted(set(m) - known - {"pretrained"})
    if unknown:
        raise ConfigError(f"config.model has keys SwinDRNet does not take: {unknown}; valid: {sorted(known)}")
    for key in ("depths", "num_heads", "pool_scales"):
        if m.get(key) is not None:
            m[key] = tuple(m[key])
    m.pop("pretrained", None)
    return SwinDRNet(**m)


def sources(config):
    """(train source, eval source) from config.data."""
    data = config.data
    return tuple(get_source(data.source, split, seed=data.seed, data_dir=data.data_dir, features=FEATURES,
                            **dict(data.options)) for split in ("train", "test"))


def transform(batch: dict) -> dict:
    """Host-side casts: float32 images and depths, int32 materials."""
    return {"rgb": np.asarray(batch["rgb"], np.float32), "raw_depth": np.asarray(batch["raw_depth"], np.float32),
            "depth": np.asarray(batch["depth"], np.float32), "material": np.asarray(batch["material"], np.int32),
            "intrinsics": np.asarray(batch["intrinsics"], np.float32)}


def augment_rgb(rgb: jax.Array, rng: jax.Array, strength: float) -> jax.Array:
    """Colour and noise augmentation (inferred from the released imgaug pipeline's kinds, milder): per
    image brightness x U(1 -+ s), contrast about the mean x U(1 -+ s), per-channel gain x U(1 -+ s / 2),
    Gaussian noise sigma U(0, s / 10); clipped to [0, 1]. [B, H, W, 3] -> same."""
    if strength <= 0:
        return rgb
    b = rgb.shape[0]
    k1, k2, k3, k4, k5 = jax.random.split(rng, 5)
    u = lambda k, shape, s: jax.random.uniform(k, shape, minval=1 - s, maxval=1 + s)
    mean = rgb.mean(axis=(1, 2, 3), keepdims=True)
    out = (rgb - mean) * u(k2, (b, 1, 1, 1), strength) + mean
    out = out * u(k1, (b, 1, 1, 1), strength) * u(k3, (b, 1, 1, 3), strength / 2)
    sigma = jax.random.uniform(k4, (b, 1, 1, 1), maxval=strength / 10)
    return jnp.clip(out + sigma * jax.random.normal(k5, rgb.shape), 0.0, 1.0)


def load_pretrained(params: dict, path: str, streams=STREAMS) -> dict:
    """params with both Swin streams (or `streams`) overwritten from an .npz of named arrays
    ('/'-joined Swin paths, as `jaxlab convert ... --kind swin` writes: "patch_embed/proj/kernel", ...). Every
    backbone array must be present with its shape; extra arrays (the classifier's norm and head) are
    ignored; the stage norms norm0..3 are loaded when present (mmseg / SwinDRNet backbones), else kept.
    Returns a new tree."""
    from flax.traverse_util import flatten_dict, unflatten_dict

    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    flat = flatten_dict(params, sep="/")
    out, missing = dict(flat), []
    for stream in streams:
        for key, value in flat.items():
            if not key.startswith(stream + "/"):
                continue
            name = key[len(stream) + 1:]
            stage_norm = name.split("/")[0][:4] == "norm" and name.split("/")[0][4:].isdigit()
            if stage_norm and name not in arrays:
                continue  # the stage norms norm0..3 are the segmentation backbone's own (not in ImageNet)
            if name not in arrays:
                missing.append(name)
                continue
            if arrays[name].shape != value.shape:
                raise ValueError(f"{path}: {name} has shape {arrays[name].shape}, the model's is {value.shape}")
            out[key] = jnp.asarray(arrays[name], value.dtype)
    if missing:
        raise ValueError(f"{path} lacks {len(set(missing))} Swin arrays, e.g. {sorted(set(missing))[:5]}")
    return unflatten_dict(out, sep="/")


def build(config):
    """The SwinDRNet method (module docstring) for config (configs/swindrnet.py)."""
    model = get_model(config.model)
    train_source, eval_source = sources(config)
    weights = {**WEIGHTS, **dict(config.swindrnet.loss_weights)}
    strength = float(config.swindrnet.augment)
    pretrained = config.model.get("pretrained", "")

    def init(rng, batch):
        params_rng, dropout_rng = jax.random.split(rng)
        variables = model.init({"params": params_rng, "dropout": dropout_rng}, batch["rgb"], batch["raw_depth"])
        if pretrained:
            variables = {**variables, "params": load_pretrained(variables["params"], pretrained)}
        return variables

    def loss_fn(params, model_state, batch, rng):
        aug_rng, dropout_rng = jax.random.split(rng)
        rgb = augment_rgb(batch["rgb"], aug_rng, strength)
        out, new_state = model.apply({"params": params, **model_state}, rgb, batch["raw_depth"], train=True,
                                     rngs={"dropout": dropout_rng}, mutable=list(model_state))
        object_mask = batch["material"] > 0
        loss, parts = swindrnet_loss(out["depth"], out["depth_initial"], batch["depth"], batch["intrinsics"],
                                     object_mask, weights)
        return loss, (new_state, parts)

    def eval_fn(params, model_state, batch, rng):
        out = model.apply({"params": params, **model_state}, batch["rgb"], batch["raw_depth"], train=False)
        gt, material = batch["depth"], batch["material"]
        values = all_region_metrics(out["depth"], gt, material)
        values.update(all_region_metrics(batch["raw_depth"], gt, material, prefix="raw/"))
        values.update(all_region_metrics(out["depth_initial"], gt, material, prefix="initial/"))
        return values

    def apply_fn(variables, batch):
        return model.apply(variables, batch["rgb"], batch["raw_depth"], train=False)

    method = supervised(config, name="swindrnet", init=init, loss_fn=loss_fn, eval_fn=eval_fn,
                        apply_fn=apply_fn, train_source=train_source, eval_source=eval_source,
                        transform=transform)
    return dataclasses.replace(method, eval_finish=finish_means)
