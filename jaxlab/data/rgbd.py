"""RGB-D data sources (SwinDRNet and other depth restoration); every one serves the same features, one row per frame:

    rgb [H, W, 3] float32 in [0, 1], raw_depth [H, W] and depth [H, W] float32 metres (0 = no value),
    material [H, W] uint8 (0 background, 1 diffuse, 2 specular, 3 transparent), intrinsics [4] float32
    (fx, fy, cx, cy) at the served size.

    synthetic:dreds            the procedural simulator (jaxlab.data.synthetic.dreds); options n_train, n_test, size
    shipped:stereo_rgbd        scikit-image's real stereo pair (Middlebury "motorcycle"): left image and
                               the depth of its dense disparity; raw_depth = the sensor quantisation of
                               it with the pair's unknown pixels as holes; material all background
    dreds:<root>               DREDS / STD folders (see DredsFolder)
    rgbd_tfds:<name>           a prepared TFDS RGB-D set (nyu_depth_v2: "image", "depth") through
                               tfds.data_source, resized, with blob holes and quantisation as raw_depth

Registered by jaxlab.data.sources (found by name like every built-in source).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxlab.data.sources import DatasetNotFoundError, DataSourceError, register, register_kind
from jaxlab.data.synthetic.dreds import FOCAL, REF_HEIGHT, REF_WIDTH, quantise, simulate, smooth_field

FEATURES = ("rgb", "raw_depth", "depth", "material", "intrinsics")
SPLIT_STREAMS = {"train": 0, "test": 1}
# DREDS meta material codes -> ours (its 0 and 1 are diffuse, 2 transparent, 3 specular)
DREDS_MATERIALS = {0: 1, 1: 1, 2: 3, 3: 2}
RAW_SUFFIXES = ("_simDepthImage", "_depth_415", "_raw_depth")
GT_SUFFIXES = ("_depth_120", "_gt_depth", "_depth_0", "_depth")
DEPTH_EXTENSIONS = (".npy", ".exr", ".png")


def as_size(size) -> tuple[int, int]:
    """An int or (height, width) -> (height, width)."""
    return (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))


def scaled_intrinsics(height: int, width: int, focal: float = FOCAL,
                      original_size=(REF_HEIGHT, REF_WIDTH)) -> np.ndarray:
    """(fx, fy, cx, cy) of a camera with focal `focal` at original_size (h, w) resized to height x width
    (as the released loss scales it; centre W // 2 - 0.5, H // 2 - 0.5)."""
    oh, ow = original_size
    return np.array([focal * width / ow, focal * height / oh, width // 2 - 0.5, height // 2 - 0.5], np.float32)


@register("synthetic", "dreds")
def synthetic_dreds(split: str, seed: int, n_train: int = 256, n_test: int = 64, size=64, **_) -> dict:
    """The simulator's frames: train and test are disjoint seeded streams."""
    if split not in SPLIT_STREAMS:
        raise DataSourceError(f"synthetic:dreds has splits {sorted(SPLIT_STREAMS)}, got {split!r}")
    height, width = as_size(size)
    n = n_train if split == "train" else n_test
    return simulate(int(n), height=height, width=width, seed=seed, stream=SPLIT_STREAMS[split])


def resize_nearest(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of [H, W, ...] (pixel centres), for depth and label maps."""
    h, w = image.shape[:2]
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(int), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(int), w - 1)
    return image[rows][:, cols]


def resize_rgb(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of an RGB image (uint8 or float in [0, 1]) to float32 [height, width, 3] in [0, 1]."""
    from PIL import Image

    if image.dtype != np.uint8:
        image = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    out = Image.fromarray(image[..., :3]).resize((width, height), Image.BILINEAR)
    return np.asarray(out, np.float32) / 255.0


def centre_square(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return image[top:top + side, left:left + side]


@register("shipped", "stereo_rgbd")
def stereo_rgbd(split: str, seed: int, size=64, **_) -> dict:
    """scikit-image's Middlebury motorcycle pair as one RGB-D frame, centre square resized to `size`:
    depth = baseline * f / (disparity + doffs) (f 3979.911 px, baseline 0.193001 m, doffs 124.343)."""
    from skimage import data

    left, _, disparity = data.stereo_motorcycle()
    valid = np.isfinite(disparity) & (disparity > 0)
    f, baseline, doffs = 3979.911, 0.193001, 124.343
    depth = np.where(valid, baseline * f / (np.where(valid, disparity, 0.0) + doffs), 0.0)
    height, width = as_size(size)
    full_h, full_w = left.shape[:2]
    side = min(full_h, full_w)
    depth = resize_nearest(centre_square(depth), height, width).astype(np.float32)
    rgb = resize_rgb(centre_square(left), height, width)
    intr = np.array([f * width / side, f * height / side, width // 2 - 0.5, height // 2 - 0.5], np.float32)
    return {"rgb": rgb[None], "raw_depth": quantise(depth).astype(np.float32)[None], "depth": depth[None],
            "material": np.zeros((1, height, width), np.uint8), "intrinsics": intr[None]}


def read_depth(path: Path, png_scale: float) -> np.ndarray:
    """A depth map in metres [H, W]: .npy (metres), .png (16-bit integers times png_scale, DREDS / STD
    store millimetres: 0.001) or .exr (first channel, metres; needs an EXR-capable imageio plugin)."""
    if path.suffix == ".npy":
        depth = np.load(path)
    elif path.suffix == ".png":
        import imageio.v3 as iio

        depth = iio.imread(path).astype(np.float64) * png_scale
    else:
        import imageio.v3 as iio

        try:
            depth = iio.imread(path)
        except Exception as err:  # noqa: BLE001  (which plugin is missing depends on the install)
            raise DataSourceError(f"cannot read {path} ({type(err).__name__}: {err}); install an EXR reader "
                                  "(pip install openexr or imageio[freeimage]) or convert the depth maps to "
                                  ".npy metres") from err
    depth = np.asarray(depth, np.float32)
    depth = depth[..., 0] if depth.ndim == 3 else depth
    return np.where(np.isfinite(depth) & (depth > 0), depth, 0.0).astype(np.float32)


def read_materials(mask_path: Path, meta_path: Path | None) -> np.ndarray:
    """Material codes [H, W] uint8: with a DREDS meta file (lines "index label ... material"), mask values
    are instance indices mapped through DREDS_MATERIALS (others background); without one the mask holds
    our codes (0..3) directly."""
    if mask_path.suffix == ".npy":
        mask = np.load(mask_path)
    else:
        import imageio.v3 as iio

        mask = iio.imread(mask_path)
    mask = np.asarray(mask)
    mask = mask[..., 0] if mask.ndim == 3 else mask
    if meta_path is None:
        if mask.max(initial=0) > 3:
            raise DataSourceError(f"{mask_path} holds values up to {mask.max()} but there is no meta file "
                                  f"({mask_path.name.replace('_mask', '_meta')}.txt) to map instances to "
                                  "materials; without one the mask must hold codes 0..3")
        return mask.astype(np.uint8)
    out = np.zeros(mask.shape, np.uint8)
    for line in meta_path.read_text().splitlines():
        words = line.split()
        if len(words) < 3:
            continue
        material = int(words[5]) if len(words) > 5 else int(words[2])
        out[mask == int(words[0])] = DREDS_MATERIALS.get(material, 0)
    return out


def find_file(prefix: str, suffixes, extensions) -> Path | None:
    for suffix in suffixes:
        for ext in extensions:
            path = Path(prefix + suffix + ext)
            if path.exists():
                return path
    return None


class DredsFolder:
    """`dreds:<root>`: DREDS / STD folders. Frames are the `*_color.png` files under root/<split> (or
    root when that folder does not exist), with, by the same prefix, a raw depth (_simDepthImage,
    _depth_415 or _raw_depth), a ground-truth depth (_depth_120, _gt_depth, _depth_0 or _depth), each
    .npy / .exr / .png, a mask (_mask.png / .exr / .npy) and an optional DREDS _meta.txt. Frames are
    resized to `size` (RGB bilinear, depth and mask nearest); intrinsics are `focal` at `original_size`
    (default the DREDS simulated camera, 446.31 px at 360 x 640; STD's real camera: focal 918.3 at
    720 x 1280) scaled to it."""

    def __init__(self, root: str, split: str, size=224, png_scale: float = 0.001, focal: float = FOCAL,
                 original_size=(REF_HEIGHT, REF_WIDTH)):
        base = Path(root).expanduser()
        if not base.is_dir():
            raise DatasetNotFoundError(f"dreds:{root}: no folder {base}; point it at a DREDS / STD split "
                                       "folder (<scene>/<id>_color.png, _simDepthImage.exr, _depth_120.exr, "
                                       "_mask.png, _meta.txt)")
        folder = base / split if (base / split).is_dir() else base
        self.colors = sorted(folder.rglob("*_color.png"))
        if not self.colors:
            raise DatasetNotFoundError(f"dreds:{root}: no *_color.png under {folder}")
        self.size, self.png_scale = as_size(size), png_scale
        self.intrinsics = scaled_intrinsics(*self.size, focal=focal, original_size=tuple(original_size))
        self.frames = [self._frame_files(p) for p in self.colors]

    @staticmethod
    def _frame_files(color: Path) -> dict:
        prefix = str(color)[: -len("_color.png")]
        files = {"rgb": color, "raw_depth": find_file(prefix, RAW_SUFFIXES, DEPTH_EXTENSIONS),
                 "depth": find_file(prefix, GT_SUFFIXES, DEPTH_EXTENSIONS),
                 "mask": find_file(prefix, ("_mask",), (".png", ".exr", ".npy")),
                 "meta": find_file(prefix, ("_meta",), (".txt",))}
        missing = [k for k in ("raw_depth", "depth", "mask") if files[k] is None]
        if missing:
            raise DataSourceError(f"{color}: no {', '.join(missing)} file beside it (looked for "
                                  f"{prefix}{{{','.join(RAW_SUFFIXES + GT_SUFFIXES + ('_mask',))}}}"
                                  f"{{{','.join(DEPTH_EXTENSIONS)}}})")
        return files

    def __len__(self) -> int:
        return len(self.frames)

    def _load(self, files: dict) -> dict:
        import imageio.v3 as iio

        h, w = self.size
        return {"rgb": resize_rgb(np.asarray(iio.imread(files["rgb"])), h, w),
                "raw_depth": resize_nearest(read_depth(files["raw_depth"], self.png_scale), h, w),
                "depth": resize_nearest(read_depth(files["depth"], self.png_scale), h, w),
                "material": resize_nearest(read_materials(files["mask"], files["meta"]), h, w),
                "intrinsics": self.intrinsics}

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        rows = [self._load(self.frames[int(i)]) for i in np.asarray(indices)]
        return {k: np.stack([r[k] for r in rows]) for k in FEATURES}


@register_kind("dreds")
def _dreds(name: str, *, split: str, seed: int, **options) -> DredsFolder:
    return DredsFolder(name, split, **options)


class TfdsRGBD:
    """`rgbd_tfds:<name>`: a TFDS RGB-D set ("image" uint8 [H, W, 3], "depth" metres [H, W], as
    nyu_depth_v2) resized to `size` (centre square); raw_depth = the sensor quantisation of the depth with
    smooth blob holes over `hole_fraction` of the frame (seeded by (seed, index)); material all
    background (no labels: only the "all" region is scored); intrinsics `focal` (NYU's Kinect: 518.86 px
    at 480 x 640) scaled to the served size."""

    def __init__(self, name: str, split: str, seed: int, data_dir=None, size=64, hole_fraction: float = 0.1,
                 focal: float = 518.86, original_size=(480, 640)):
        from jaxlab.data.tfds_source import TFDSSource

        self.source = TFDSSource(name, split=split, data_dir=data_dir)
        self.seed, self.size, self.hole_fraction = seed, as_size(size), float(hole_fraction)
        oh, ow = original_size
        side = min(oh, ow)
        h, w = self.size
        self.intrinsics = np.array([focal * w / side, focal * h / side, w // 2 - 0.5, h // 2 - 0.5], np.float32)

    def __len__(self) -> int:
        return len(self.source)

    def _frame(self, row: dict, index: int) -> dict:
        h, w = self.size
        depth = np.asarray(row["depth"], np.float32)
        depth = resize_nearest(centre_square(depth[..., 0] if depth.ndim == 3 else depth), h, w)
        depth = np.where(np.isfinite(depth) & (depth > 0), depth, 0.0).astype(np.float32)
        field = smooth_field(np.random.default_rng([self.seed, index]), h, w, cell=max(2, min(h, w) // 8))
        holes = field > np.quantile(field, 1.0 - self.hole_fraction) if self.hole_fraction > 0 else field < 0
        raw = np.where(holes, 0.0, quantise(depth)).astype(np.float32)
        return {"rgb": resize_rgb(centre_square(np.asarray(row["image"])), h, w), "raw_depth": raw,
                "depth": depth, "material": np.zeros((h, w), np.uint8), "intrinsics": self.intrinsics}

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices)
        rows = self.source.get(indices)
        frames = [self._frame({k: v[j] for k, v in rows.items()}, int(i)) for j, i in enumerate(indices)]
        return {k: np.stack([f[k] for f in frames]) for k in FEATURES}


@register_kind("rgbd_tfds")
def _rgbd_tfds(name: str, *, split: str, seed: int, **options) -> TfdsRGBD:
    return TfdsRGBD(name, split, seed, **options)

