"""`jaxlab convert --kind <kind> <source> <dest>`: a PyTorch state dict (.pth / .pt, or an .npz of its
arrays) -> an .npz of named arrays that this project's loaders read. Reading and saving are here, once;
each kind's module only maps names and layouts (`convert_state_dict(state) -> arrays`):

    videomae   jaxlab.methods.mar.convert        VideoMAE / MAR ViTs, for `train.init_from`
    swin       jaxlab.methods.swindrnet.convert  ImageNet Swin (or an mmseg / SwinDRNet backbone),
                                                 for SwinDRNet's `model.pretrained`
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from jaxlab.errors import UsageError, UserError

if TYPE_CHECKING:
    import numpy as np

KINDS = {"videomae": "jaxlab.methods.mar.convert", "swin": "jaxlab.methods.swindrnet.convert"}


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A .pth/.pt (torch.load; the 'model' / 'model_state' / 'state_dict' entry if present) or an .npz."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"convert: no file {path}")
    if path.suffix == ".npz":
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    try:
        import torch
    except ImportError as err:
        raise UserError(f"reading {path} needs PyTorch (pip install torch); .npz state dicts need nothing") from err
    state = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("model", "model_state", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    return {k: v.detach().cpu().float().numpy() for k, v in state.items() if hasattr(v, "detach")}


def convert(kind: str, source: str | Path, dest: str | Path) -> dict[str, np.ndarray]:
    """Reads `source`, maps it with `kind`'s convert_state_dict, writes the arrays to `dest` (.npz)."""
    if kind not in KINDS:
        raise UsageError(f"convert: unknown kind {kind!r}; choose {', '.join(sorted(KINDS))}")
    import numpy as np

    arrays = importlib.import_module(KINDS[kind]).convert_state_dict(read_state_dict(source))
    np.savez(dest, **arrays)
    return arrays
