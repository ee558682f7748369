"""PyTorch VideoMAE / MAR state dicts -> named arrays that `train.init_from` loads (read and written
by jaxlab.convert).

    jaxlab convert checkpoint.pth weights.npz      # --kind videomae (default); torch needed for .pth only
    jaxlab train --config mar:k400_b --config.train.init_from=weights.npz

Keys become "<part>/params/<module path>" of this project's parts: the encoder ("backbone." in MAR,
"encoder." in VideoMAE), the decoder (encoder_to_decoder, mask_token, "decoder.") and MAR's bridging
classifier (encoder_to_cls_decoder, "cls_head."). Linear weights [out, in] become kernels [in, out],
the Conv3d weight [D, C, t, p, p] becomes [t, p, p, C, D], LayerNorm weight becomes scale. Fixed
tables and constants (pos_embed, the input mean/std) and the bridging head's unused mask token are
dropped; any other key is an error that names it. A VideoMAE fine-tuning checkpoint's own head
(fc_norm, head) has no part here and is refused too (MAR replaces it by the bridging classifier).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

DROPPED = re.compile(r"^(pos_embed|backbone\.pos_embed|encoder\.pos_embed|mean|std|cls_head\.mask_token)$")
PREFIXES = (  # (torch prefix, part, module prefix)
    ("backbone.", "encoder", ""),
    ("encoder.", "encoder", ""),
    ("decoder.", "decoder", ""),
    ("encoder_to_decoder.", "decoder", "encoder_to_decoder."),
    ("encoder_to_cls_decoder.", "classifier", "encoder_to_cls_decoder."),
    ("cls_head.", "classifier", ""),
)
MODULE_RENAMES = (  # torch module path -> flax module path (after the part prefix)
    (r"^patch_embed\.proj\.", "patch_embed."),
    (r"^blocks\.(\d+)\.", r"blocks_\1."),
    (r"\.attn\.to_qkv\.", ".attn.qkv."),  # MAR BaseTransformerLayer
    (r"\.norm_ffn\.", ".norm2."),
    (r"(blocks_\d+)\.norm\.", r"\1.norm1."),
    (r"\.ffn\.net\.0\.", ".mlp.fc1."),
    (r"\.ffn\.net\.3\.", ".mlp.fc2."),
)


def _leaf(name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """torch leaf name and value -> flax leaf name and value (layouts converted)."""
    head, _, leaf = name.rpartition(".")
    if leaf == "weight":
        if value.ndim == 5:  # Conv3d [D, C, t, p, p] -> [t, p, p, C, D]
            return f"{head}.kernel", value.transpose(2, 3, 4, 1, 0)
        if value.ndim == 2:  # Linear [out, in] -> [in, out]
            return f"{head}.kernel", value.T
        return f"{head}.scale", value  # LayerNorm
    return name, value


def convert_state_dict(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{torch name: array} -> {"<part>/params/<path>": array} (module docstring)."""
    out, unknown = {}, []
    for raw, value in state.items():
        name = raw[len("module."):] if raw.startswith("module.") else raw
        value = np.asarray(value, dtype=np.float32)
        if DROPPED.match(name):
            continue
        if name == "mask_token":
            out["decoder/params/mask_token"] = value
            continue
        for prefix, part, module in PREFIXES:
            if name.startswith(prefix):
                path = module + name[len(prefix):]
                break
        else:
            unknown.append(raw)
            continue
        if part == "encoder" and re.match(r"^(fc_norm|head)\.", path):
            unknown.append(raw)
            continue
        for pattern, replacement in MODULE_RENAMES:
            path = re.sub(pattern, replacement, path)
        path, value = _leaf(path, value)
        out[f"{part}/params/" + path.replace(".", "/")] = value
    if unknown:
        raise ValueError(f"{len(unknown)} state-dict keys have no place in the MAR parts: {unknown[:12]}"
                         + (" ..." if len(unknown) > 12 else ""))
    return out
