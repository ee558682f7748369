"""Public Swin checkpoints (microsoft/Swin-Transformer ImageNet .pth, or an mmseg / SwinDRNet backbone) ->
named arrays that `model.pretrained` loads into both SwinDRNet streams (read and written by
jaxlab.convert).

    jaxlab convert swin_tiny_patch4_window7_224.pth swin_t.npz --kind swin   # torch needed for .pth only
    jaxlab train --config swindrnet:paper --config.model.pretrained=swin_t.npz

Keys become '/'-joined paths of jaxlab.models.swin.SwinTransformer: "layers.0.blocks.1.attn.qkv.weight" ->
"layers_0/blocks_1/attn/qkv/kernel". Linear weights [out, in] become kernels [in, out], the patch
Conv2d weight [D, C, p, p] becomes [p, p, C, D], LayerNorm weight becomes scale. Buffers
(relative_position_index, attn_mask) are dropped; a "backbone." prefix (mmseg) or a SwinDRNet stream
prefix ("backbone_rgb_branch.") is stripped. Any other key is an error that names it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

DROPPED = re.compile(r"(relative_position_index|attn_mask)$")
PREFIXES = ("module.", "backbone.", "backbone_rgb_branch.", "backbone_xyz_branch.")
SWIN_KEY = re.compile(
    r"^(patch_embed\.(proj|norm)"
    r"|layers\.\d+\.blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
    r"|layers\.\d+\.blocks\.\d+\.attn\.relative_position_bias_table"
    r"|layers\.\d+\.downsample\.(reduction|norm)"
    r"|norm\d?|head)(\.(weight|bias))?$"
)


def flax_leaf(name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """torch name and value -> Swin path and value (layouts converted)."""
    path = re.sub(r"\.(\d+)\.", r"_\1.", name)  # layers.0.blocks.1. -> layers_0.blocks_1.
    head, _, leaf = path.rpartition(".")
    if leaf == "weight":
        if value.ndim == 4:  # Conv2d [D, C, p, p] -> [p, p, C, D]
            return f"{head}/kernel".replace(".", "/"), value.transpose(2, 3, 1, 0)
        if value.ndim == 2:  # Linear [out, in] -> [in, out]
            return f"{head}/kernel".replace(".", "/"), value.T
        return f"{head}/scale".replace(".", "/"), value  # LayerNorm
    return path.replace(".", "/"), value


def convert_state_dict(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{torch name: array} -> {Swin path: array} (module docstring)."""
    out, unknown = {}, []
    for raw, value in state.items():
        name = raw
        for prefix in PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        if DROPPED.search(name):
            continue
        if not SWIN_KEY.match(name):
            unknown.append(raw)
            continue
        path, converted = flax_leaf(name, np.asarray(value, np.float32))
        out[path] = converted
    if unknown:
        raise ValueError(f"{len(unknown)} state-dict keys are not Swin backbone keys: {unknown[:12]}"
                         + (" ..." if len(unknown) > 12 else ""))
    if not out:
        raise ValueError("the state dict holds no Swin arrays")
    return out
