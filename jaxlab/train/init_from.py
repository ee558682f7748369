"""Start a run from named parts of another run's checkpoint or of an .npz of named arrays.

    train.init_from = "runs/pretrain"            # a workdir (its latest checkpoint) or a checkpoint step dir
    train.init_from = "weights/videomae_b.npz"   # converted public weights
    train.init_parts = ("encoder",)              # which parts to take (default: every part of this run)
    train.init_rename = (("^blocks\\.", "encoder/params/blocks_"),)   # regex renames of .npz keys

Arrays are addressed by '/'-joined paths inside the state's parts: "<part>/params/<module>/.../<name>"
and "<part>/collections/<collection>/.../<name>". Parameters and collections of the chosen parts are
replaced; optimizer states stay fresh and the step starts at 0. Every array of the chosen parts must be
present with this run's shape: a missing or mis-shaped array is an error naming each one (an .npz key
that matches nothing is named too, so a wrong rename does not pass silently).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxlab.config import ConfigError
from jaxlab.train.optim import path_name
from jaxlab.train.state import Part, State

LISTED = 12  # names shown per kind of problem


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'/'-joined path: leaf}."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {prefix + path_name(path): leaf for path, leaf in leaves}


def _read_checkpoint(path: Path) -> dict[str, np.ndarray]:
    import orbax.checkpoint as ocp

    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if not (path / "default").is_dir():  # a manager directory: take its latest step
        steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit())
        if not steps:
            raise ConfigError(f"train.init_from={str(path)!r}: no checkpoint found there")
        path = path / str(steps[-1])
    tree = ocp.StandardCheckpointer().restore(path / "default")
    parts = tree.get("parts", {}) if isinstance(tree, dict) else {}
    out = {}
    for name, part in parts.items():
        for kind in ("params", "collections"):
            out.update(flatten(part.get(kind, {}), f"{name}/{kind}/"))
    return {k: np.asarray(v) for k, v in out.items()}


def read_arrays(source: str, rename: tuple = ()) -> dict[str, np.ndarray]:
    """The named arrays of a checkpoint (workdir or step dir) or an .npz, renames applied to .npz keys."""
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"train.init_from={source!r} does not exist")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        for pattern, replacement in rename:
            arrays = {re.sub(pattern, replacement, k): v for k, v in arrays.items()}
        return arrays
    return _read_checkpoint(path)


def load_parts(state: State, arrays: dict[str, np.ndarray], parts: tuple[str, ...] = (),
               source: str = "") -> State:
    """`state` with the params and collections of `parts` (default: all) taken from `arrays`."""
    names = tuple(parts) or tuple(n for n, p in state.parts.items() if isinstance(p, Part))
    unknown = [n for n in names if n not in state.parts]
    if unknown:
        raise ConfigError(f"train.init_parts names {unknown}, not parts of this run: {sorted(state.parts)}")
    missing, misshaped, replaced = [], [], dict(state.parts)
    used = set()
    for name in names:
        part = state.parts[name]
        new = {}
        for kind in ("params", "collections"):
            tree = getattr(part, kind)

            def take(path, leaf, kind=kind):
                key = f"{name}/{kind}/{path_name(path)}"
                if key not in arrays:
                    missing.append(key)
                    return leaf
                used.add(key)
                value = arrays[key]
                if value.shape != leaf.shape:
                    misshaped.append(f"{key}: {value.shape} in the source, {leaf.shape} here")
                    return leaf
                return jax.device_put(value.astype(leaf.dtype), getattr(leaf, "sharding", None))

            new[kind] = jax.tree_util.tree_map_with_path(take, tree)
        replaced[name] = part.replace(**new)
    prefixes = tuple(f"{n}/" for n in names)
    unmatched = sorted(k for k in arrays if k.startswith(prefixes) and k not in used)
    problems = []
    for label, items in (("missing", missing), ("with another shape", misshaped),
                         ("in the source but not in this run", unmatched)):
        if items:
            shown = "; ".join(items[:LISTED]) + (f"; ... ({len(items) - LISTED} more)" if len(items) > LISTED else "")
            problems.append(f"{len(items)} arrays {label}: {shown}")
    if not any(k.startswith(prefixes) for k in arrays):
        problems.append(f"no array of parts {list(names)} in the source (its keys start with "
                        f"{sorted({k.split('/')[0] for k in arrays})[:LISTED]}; see train.init_rename)")
    if problems:
        raise ConfigError(f"train.init_from={source!r} does not fit parts {list(names)}: " + " | ".join(problems))
    return state.replace(parts=replaced)
