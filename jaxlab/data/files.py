"""User files: `file:<path>` (.npz, .h5/.hdf5) and `folder:<path>` (class-per-subfolder images).

Arrays in a file share their leading (example) dimension. A file without a split in its name serves
every split through a fixed seeded partition (`test_fraction`); files named x_train.npz / x_test.npz
are picked by split when the spec names x.npz and it does not exist. The option `keys` (on the command
line --config.data.options.keys=signal:x,label:y) serves the file's "x" as "signal" and "y" as "label".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxlab.data.sources import (
    ArraySource,
    DatasetNotFoundError,
    DataSourceError,
    parse_keys,
    register_kind,
    split_indices,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")


def _split_file(path: Path, split: str) -> tuple[Path, bool]:
    """(file to read, whether it is already split-specific)."""
    if path.exists():
        return path, False
    per_split = path.with_name(f"{path.stem}_{split}{path.suffix}")
    if per_split.exists():
        return per_split, True
    raise DatasetNotFoundError(
        f"data file {str(path)!r} not found (nor {per_split.name!r}). Give the path of an .npz or .h5 "
        "file whose arrays share their first dimension, e.g. signal (N, 128) and label (N,)."
    )


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    if path.suffix in (".h5", ".hdf5"):
        import h5py

        with h5py.File(path, "r") as f:
            return {k: np.asarray(f[k]) for k in f.keys() if isinstance(f[k], h5py.Dataset)}
    raise DataSourceError(f"unsupported data file type {path.suffix!r} for {path}: use .npz, .h5 or .hdf5")


@register_kind("file", renames=True)
def _load_file(
    name: str, *, split: str, seed: int, keys=None, test_fraction: float = 0.5, **_
) -> ArraySource:
    path, split_specific = _split_file(Path(name).expanduser(), split)
    arrays = read_arrays(path)
    keys = parse_keys(keys)
    if keys:  # rename: {"signal": "x"} means the file's "x" is served as "signal" (only named arrays kept)
        missing = [src for src in keys.values() if src not in arrays]
        if missing:
            asked = ",".join(f"{dst}:{src}" for dst, src in keys.items())
            raise DataSourceError(
                f"{path} has no arrays {', '.join(map(repr, missing))} (asked for by data.options.keys="
                f"{asked}); it has: {', '.join(sorted(arrays))}"
            )
        arrays = {dst: arrays[src] for dst, src in keys.items()}
    source = ArraySource(arrays, name=str(path))
    if split_specific:
        return source
    idx = split_indices(len(source), split, test_fraction=test_fraction, seed=seed)
    return ArraySource(source.get(idx), name=f"{path}[{split}]")


@register_kind("folder")
def _load_folder(
    name: str, *, split: str, seed: int, image_size: tuple | None = None, test_fraction: float = 0.2, **_
) -> ArraySource:
    from skimage import io, transform

    root = Path(name).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(f"image folder {str(root)!r} not found; expected <root>/<class>/<image>")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(f, c) for c, cls in enumerate(classes) for f in sorted((root / cls).iterdir())
             if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DatasetNotFoundError(f"image folder {root} has no images in class subfolders ({IMAGE_SUFFIXES})")
    images = []
    for f, _ in files:
        img = io.imread(f)
        if image_size is not None:
            img = (transform.resize(img, tuple(image_size), preserve_range=True)).astype(img.dtype)
        images.append(img)
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise DataSourceError(f"images in {root} differ in shape {sorted(shapes)}; set data.options.image_size")
    source = ArraySource(
        {"image": np.stack(images), "label": np.array([c for _, c in files], np.int32)}, name=str(root)
    )
    idx = split_indices(len(source), split, test_fraction=test_fraction, seed=seed)
    return ArraySource(source.get(idx), name=f"{root}[{split}]")
