"""Video sources for MAR: user clip folders (Kinetics / SSv2 style) and the GIF shipped in scikit-image.

`video:<root>` reads `<root>/<split>.csv` (rows `clip,label`; a header row `path,label` or
`clip,label` is skipped) where `clip` is, relative to root, a folder of frame images (sorted by
name: png/jpg/jpeg/bmp), an `.npz` holding `frames` [T, H, W, 3] (uint8 or float in [0, 1]), or a video
file (.mp4, .webm, .avi, .mkv, .mov: decoded whole with PyAV, the `video` extra; .gif with Pillow).
`num_frames` frames are sampled per clip, SSv2-style segment-based (the middle frame of each of
num_frames equal segments; `sampling="segment"`) or Kinetics-style at a fixed stride from the clip's
centre (`sampling="interval"`, `stride` frames apart, indices clipped at the ends), and resized to
`size` x `size` (bilinear, whole frame). Clips are read when a batch asks for them.

`shipped:skimage_gif`: skimage/data/no_time_for_that_tiny.gif as one clip [1, T, H, W, 3] (a real-video
smoke input, label 0), its frames resized to `size` and sampled to `num_frames` like a user clip.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from jaxlab.data.sources import DatasetNotFoundError, DataSourceError, register, register_kind

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".gif")


def sample_indices(length: int, num_frames: int, sampling: str = "segment", stride: int = 4) -> np.ndarray:
    """Frame indices [num_frames] into a clip of `length` frames (module docstring)."""
    if length < 1:
        raise DataSourceError("a clip has no frames")
    if sampling == "segment":
        edges = np.linspace(0, length, num_frames + 1)
        return np.minimum(((edges[:-1] + edges[1:]) / 2).astype(int), length - 1)
    if sampling == "interval":
        span = (num_frames - 1) * stride
        start = (length - 1 - span) // 2
        return np.clip(start + stride * np.arange(num_frames), 0, length - 1)
    raise DataSourceError(f"sampling={sampling!r} must be 'segment' or 'interval'")


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """[T, H, W, C] float -> [T, size, size, C] by bilinear interpolation (align_corners=False)."""
    def axis(n_in):
        pos = np.clip((np.arange(size) + 0.5) * n_in / size - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), pos - lo

    y0, y1, fy = axis(frames.shape[1])
    x0, x1, fx = axis(frames.shape[2])
    rows = frames[:, y0] * (1 - fy)[None, :, None, None] + frames[:, y1] * fy[None, :, None, None]
    return rows[:, :, x0] * (1 - fx)[None, None, :, None] + rows[:, :, x1] * fx[None, None, :, None]


def _as_unit_float(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim == 3:  # grey
        frames = np.repeat(frames[..., None], 3, axis=-1)
    frames = frames[..., :3]
    return frames.astype(np.float32) / 255.0 if frames.dtype == np.uint8 else frames.astype(np.float32)


def read_clip(path: Path) -> np.ndarray:
    """All frames of a clip folder or .npz as float32 [T, H, W, 3] in [0, 1]."""
    if path.suffix == ".npz":
        with np.load(path) as f:
            if "frames" not in f.files:
                raise DataSourceError(f"{path} has arrays {f.files}; a clip .npz needs 'frames' [T, H, W, 3]")
            return _as_unit_float(f["frames"])
    if path.suffix.lower() in VIDEO_SUFFIXES:
        if not path.is_file():
            raise DatasetNotFoundError(f"no video file {path}")
        return _as_unit_float(read_video_file(path))
    if path.is_dir():
        from PIL import Image

        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not files:
            raise DataSourceError(f"clip folder {path} holds no frame images ({', '.join(FRAME_SUFFIXES)})")
        return _as_unit_float(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files]))
    raise DatasetNotFoundError(f"clip {path} is neither a folder of frames, an .npz nor a video file "
                               f"({', '.join(VIDEO_SUFFIXES)})")


def read_video_file(path: Path) -> np.ndarray:
    """Every frame of a video file as uint8 [T, H, W, 3]: GIFs through Pillow, the rest through PyAV."""
    if path.suffix.lower() == ".gif":
        from PIL import Image, ImageSequence

        return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(Image.open(path))])
    try:
        import av
    except ImportError:
        raise DataSourceError(f"reading {path.suffix} files needs PyAV: pip install 'jaxlab[video]' (or "
                              "extract the frames into a folder of images)") from None
    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.FFmpegError, IndexError) as err:
        raise DataSourceError(f"cannot decode {path}: {err}") from None
    if not frames:
        raise DataSourceError(f"{path} holds no video frames")
    return np.stack(frames)


class VideoFolderSource:
    """Clips listed in a CSV, read lazily: get(indices) -> {'video': uint8 [n, T, S, S, 3], 'label': int32 [n]}."""

    def __init__(self, root: Path, split: str, num_frames: int, size: int, sampling: str, stride: int):
        self.root, self.num_frames, self.size, self.sampling, self.stride = root, num_frames, size, sampling, stride
        listing = root / f"{split}.csv"
        if not listing.is_file():
            raise DatasetNotFoundError(
                f"no {listing}: a video source needs <root>/{split}.csv with rows 'clip,label' (clip: a "
                "folder of frames, an .npz with 'frames' or a video file, relative to root)")
        rows = [r for r in csv.reader(listing.open()) if r]
        if rows and rows[0][-1].strip().lower() == "label":
            rows = rows[1:]
        if not rows:
            raise DataSourceError(f"{listing} lists no clips")
        try:
            self.clips = [root / r[0].strip() for r in rows]
            self.labels = np.asarray([int(r[1]) for r in rows], np.int32)
        except (IndexError, ValueError) as err:
            raise DataSourceError(f"{listing}: every row must be 'clip,integer label' ({err})") from None
        self.name = f"video:{root}"

    def __len__(self) -> int:
        return len(self.clips)

    def clip(self, index: int) -> np.ndarray:
        frames = read_clip(self.clips[index])
        frames = frames[sample_indices(len(frames), self.num_frames, self.sampling, self.stride)]
        frames = resize_frames(frames, self.size)
        return np.clip(frames * 255.0 + 0.5, 0, 255).astype(np.uint8)

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices)
        return {"video": np.stack([self.clip(int(i)) for i in indices]), "label": self.labels[indices]}


@register_kind("video")
def video_source(name: str, *, split: str, seed: int, data_dir: str | None = None, num_frames: int = 16,
                 size: int = 224, sampling: str = "segment", stride: int = 4, **_) -> VideoFolderSource:
    """`video:<root>` (module docstring); a relative root is taken under data_dir when given."""
    root = Path(name).expanduser()
    if data_dir and not root.is_absolute():
        root = Path(data_dir).expanduser() / root
    return VideoFolderSource(root, split, num_frames, size, sampling, stride)


@register("shipped", "skimage_gif")
def skimage_gif(split: str, seed: int, num_frames: int = 16, size: int = 224, sampling: str = "segment",
                stride: int = 4, **_) -> dict:
    """The tiny real GIF in scikit-image as one clip (module docstring)."""
    import skimage

    path = Path(skimage.__file__).parent / "data" / "no_time_for_that_tiny.gif"
    if not path.is_file():
        raise DatasetNotFoundError(f"{path} is not in this scikit-image install")
    frames = _as_unit_float(read_video_file(path))
    frames = resize_frames(frames[sample_indices(len(frames), num_frames, sampling, stride)], size)
    video = np.clip(frames * 255.0 + 0.5, 0, 255).astype(np.uint8)[None]
    return {"video": video, "label": np.zeros((1,), np.int32)}
