"""Audio-visual clip sources (av_inpainting.md): seeded synthetic clips (the offline default) and user
AVE / MUSIC-style folders. Every source serves, per clip:

    frames           float32 [T, H, W, 3] in [0, 1]
    audio            float32 [T, S]  the audio window of each frame (window_seconds at sample_rate,
                     centred on the frame's time (t + 0.5) / fps, clipped to the clip, as the official loader)
    label            int32 []        the clip's class (-1 when a folder lists none)
    object_mask      float32 [T, H, W] 1 on the sounding object's silhouette (synthetic; folder: its
                     mask/ PNGs, else zeros)
    distractor_mask  float32 [T, H, W] 1 on the silent objects' visible pixels (synthetic; folder: zeros)

(`object_mask`, not `mask`: the trainer's eval batches use "mask" for padding rows.)

`synthetic:av_clips`: K classes; a clip shows one sounding object of its class and `distractors` silent
objects of other classes moving over a smooth random background with pixel noise. Class c fixes the
object's shape (disk, square, triangle, diamond, ring, then repeating) and colour (PALETTE[c]), and the
tone's pitch (class_pitch(c): 220 Hz up 5 semitones a class) and timbre (c % 3: pure sine; odd
harmonics 1/k; all harmonics 1/k; harmonics below Nyquist), mixed with white noise at `audio_noise` times
the tone's RMS. The sounding object is drawn last (on top), so object_mask is its whole silhouette.

`av_folder:<root>`: the official code's layout, <root>/<split>/png/<clip>/<NNN>.png (frames sorted by
name, at `fps`), <root>/<split>/wav/<clip>.wav (any rate: resampled to sample_rate; stereo averaged),
optional <root>/<split>/mask/<clip>/<NNN>.png (sounding-object masks, >= 128 is inside) and optional
<root>/<split>/labels.csv (rows `clip,label`). `num_frames` frames a clip are sampled segment-wise
(jaxlab.data.video.sample_indices) and resized to `size` (bilinear).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from jaxlab.data.sources import DatasetNotFoundError, DataSourceError, register, register_kind
from jaxlab.data.video import FRAME_SUFFIXES, resize_frames, sample_indices

SHAPES = ("disk", "square", "triangle", "diamond", "ring")
PALETTE = np.asarray([
    (0.95, 0.25, 0.2), (0.2, 0.8, 0.3), (0.25, 0.45, 0.95), (0.95, 0.85, 0.2), (0.85, 0.3, 0.9),
    (0.2, 0.9, 0.9), (1.0, 0.6, 0.15), (0.95, 0.95, 0.95), (0.55, 0.35, 0.15), (0.5, 0.9, 0.55),
], np.float32)
BASE_HZ = 220.0
SEMITONES_PER_CLASS = 5
HARMONICS = 4
SPLIT_IDS = {"train": 0, "test": 1, "all": 2}


def class_pitch(label) -> np.ndarray:
    """The fundamental (Hz) of class `label`'s tone: 220 * 2 ** (5 * label / 12)."""
    return BASE_HZ * 2.0 ** (SEMITONES_PER_CLASS * np.asarray(label, np.float64) / 12.0)


def class_tone(label: int, t: np.ndarray, phase: float, sample_rate: int) -> np.ndarray:
    """Unit-RMS tone of class `label` at times t (s): timbre label % 3 (module docstring)."""
    f0 = float(class_pitch(label))
    timbre = label % 3
    wave = np.zeros_like(t)
    for k in range(1, HARMONICS + 1):
        if k * f0 >= sample_rate / 2 or (timbre == 0 and k > 1) or (timbre == 1 and k % 2 == 0):
            continue
        wave += np.sin(2 * np.pi * k * f0 * t + k * phase) / k
    return wave / np.sqrt(np.mean(wave ** 2))


def shape_mask(kind: str, size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    """Boolean [size, size] silhouette of a shape centred at (cx, cy) pixels (x right, y down)."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = x - cx, y - cy
    if kind == "disk":
        return dx ** 2 + dy ** 2 <= radius ** 2
    if kind == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * radius
    if kind == "triangle":
        return (dy >= -radius) & (dy <= 0.8 * radius) & (np.abs(dx) <= 0.6 * (dy + radius))
    if kind == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.2 * radius
    if kind == "ring":
        d2 = dx ** 2 + dy ** 2
        return (d2 <= radius ** 2) & (d2 >= (0.5 * radius) ** 2)
    raise ValueError(f"unknown shape {kind!r}; shapes: {SHAPES}")


def bouncing_path(rng: np.random.Generator, num_frames: int, size: int, radius: float) -> np.ndarray:
    """[T, 2] centres moving at a constant speed (1.5 .. 3 px a frame at 64 px) reflected at the borders."""
    low, high = radius, size - radius
    pos = rng.uniform(low, high, 2)
    angle = rng.uniform(0, 2 * np.pi)
    vel = rng.uniform(1.5, 3.0) * size / 64 * np.array([np.cos(angle), np.sin(angle)])
    path = []
    for _ in range(num_frames):
        path.append(pos.copy())
        pos = pos + vel
        for i in range(2):  # reflect at the walls
            if pos[i] < low:
                pos[i], vel[i] = 2 * low - pos[i], -vel[i]
            elif pos[i] > high:
                pos[i], vel[i] = 2 * high - pos[i], -vel[i]
    return np.stack(path)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """[size, size, 3] dim gradient between two random colours along a random direction."""
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * (x - 0.5) + np.sin(angle) * (y - 0.5) + 0.75) / 1.5
    a, b = rng.uniform(0.0, 0.4, 3), rng.uniform(0.0, 0.4, 3)
    return a + (b - a) * ramp[..., None]


def frame_windows(wave: np.ndarray, num_frames: int, fps: float, sample_rate: int, window: int,
                  frame_index: np.ndarray | None = None) -> np.ndarray:
    """[T, window] windows of `wave` centred on each frame's time (i + 0.5) / fps, clipped to the wave
    (the official loader's centre clipping; a wave shorter than a window is zero-padded at the end)."""
    frame_index = np.arange(num_frames) if frame_index is None else np.asarray(frame_index)
    if len(wave) < window:
        wave = np.pad(wave, (0, window - len(wave)))
    half = window // 2
    centres = ((frame_index + 0.5) / fps * sample_rate).astype(int)
    centres = np.clip(centres, half, len(wave) - (window - half))
    return np.stack([wave[c - half: c - half + window] for c in centres]).astype(np.float32)


def synthetic_clip(rng: np.random.Generator, label: int, *, num_classes: int, num_frames: int, size: int,
                   sample_rate: int, window: int, fps: float, distractors: int, audio_noise: float,
                   pixel_noise: float, radius: float) -> dict[str, np.ndarray]:
    """One clip of class `label` (module docstring); radius in pixels."""
    others = [c for c in range(num_classes) if c != label]
    silent = rng.choice(others, size=min(distractors, len(others)), replace=False) if others else []
    background = _background(rng, size)
    paths = [bouncing_path(rng, num_frames, size, radius * rng.uniform(0.85, 1.15)) for _ in range(len(silent) + 1)]
    radii = [radius * rng.uniform(0.85, 1.15) for _ in paths]
    frames = np.empty((num_frames, size, size, 3), np.float32)
    sounding = np.zeros((num_frames, size, size), np.float32)
    distract = np.zeros((num_frames, size, size), np.float32)
    for t in range(num_frames):
        image, silent_px = background.copy(), np.zeros((size, size), bool)
        for c, path, r in zip([*silent, label], paths, radii):
            m = shape_mask(SHAPES[c % len(SHAPES)], size, *path[t], r)
            image[m] = PALETTE[c % len(PALETTE)]
            if c == label:
                sounding[t] = m
                silent_px &= ~m
            else:
                silent_px |= m
        distract[t] = silent_px
        frames[t] = np.clip(image + pixel_noise * rng.standard_normal(image.shape), 0.0, 1.0)
    seconds = num_frames / fps + window / sample_rate
    times = np.arange(int(round(seconds * sample_rate))) / sample_rate
    wave = class_tone(label, times, rng.uniform(0, 2 * np.pi), sample_rate)
    wave = 0.3 * (wave + audio_noise * rng.standard_normal(wave.shape))
    audio = frame_windows(wave, num_frames, fps, sample_rate, window)
    return {"frames": frames, "audio": audio, "label": np.int32(label), "object_mask": sounding,
            "distractor_mask": distract}


@register("synthetic", "av_clips")
def synthetic_av_clips(split: str, seed: int, num_clips: int = 256, num_classes: int = 4, num_frames: int = 5,
                       size: int = 64, sample_rate: int = 16000, window_seconds: float = 1.0, fps: float = 8.0,
                       distractors: int = 1, audio_noise: float = 0.3, pixel_noise: float = 0.03,
                       radius: float = 0.16, **_) -> dict[str, np.ndarray]:
    """`num_clips` clips (module docstring), classes balanced (clip i has class i % num_classes, order
    shuffled); train and test draw from disjoint seeds. radius: the objects' radius as a fraction of size."""
    if split not in SPLIT_IDS:
        raise DataSourceError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
    if not 1 <= num_classes <= len(PALETTE):
        raise DataSourceError(f"num_classes must be 1 .. {len(PALETTE)} (distinct colours), got {num_classes}")
    rng = np.random.default_rng([seed, SPLIT_IDS[split], 0xA7])
    labels = rng.permutation(np.arange(num_clips) % num_classes)
    clips = [synthetic_clip(rng, int(c), num_classes=num_classes, num_frames=num_frames, size=size,
                            sample_rate=sample_rate, window=int(window_seconds * sample_rate), fps=fps,
                            distractors=distractors, audio_noise=audio_noise, pixel_noise=pixel_noise,
                            radius=radius * size) for c in labels]
    return {k: np.stack([clip[k] for clip in clips]) for k in clips[0]}


# --- user folders -------------------------------------------------------------------------------------------


def read_wav(path: Path, sample_rate: int) -> np.ndarray:
    """Mono float32 waveform of a .wav at `sample_rate` (integer PCM scaled to [-1, 1], channels averaged,
    resampled with scipy.signal.resample_poly when the file's rate differs)."""
    from math import gcd

    from scipy.io import wavfile
    from scipy.signal import resample_poly

    rate, data = wavfile.read(path)
    if np.issubdtype(data.dtype, np.integer):
        data = data.astype(np.float64) / max(abs(np.iinfo(data.dtype).min), np.iinfo(data.dtype).max)
    data = np.asarray(data, np.float64)
    if data.ndim == 2:
        data = data.mean(axis=1)
    if rate != sample_rate:
        g = gcd(int(rate), int(sample_rate))
        data = resample_poly(data, sample_rate // g, rate // g)
    return data.astype(np.float32)


def _read_images(files: list[Path], size: int, grey: bool) -> np.ndarray:
    """[n, size, size, 3] RGB (or [n, size, size] grey) float32 in [0, 1], resized bilinearly."""
    from PIL import Image

    images = np.stack([np.asarray(Image.open(p).convert("L" if grey else "RGB"), np.float32) / 255.0
                       for p in files])
    if grey:
        return resize_frames(images[..., None], size)[..., 0]
    return resize_frames(images, size)


class AVFolderSource:
    """Clips of an AVE / MUSIC-style folder (module docstring), read when a batch asks for them."""

    def __init__(self, root: Path, split: str, num_frames: int, size: int, sample_rate: int,
                 window_seconds: float, fps: float):
        self.root, self.split_dir = root, root / split
        self.num_frames, self.size, self.sample_rate, self.fps = num_frames, size, sample_rate, fps
        self.window = int(window_seconds * sample_rate)
        png, wav = self.split_dir / "png", self.split_dir / "wav"
        if not png.is_dir() or not wav.is_dir():
            raise DatasetNotFoundError(
                f"no {png} or {wav}: an av_folder source needs <root>/{split}/png/<clip>/<frames>.png and "
                f"<root>/{split}/wav/<clip>.wav (the official AVE / MUSIC layout)")
        self.clips = sorted(p.name for p in png.iterdir() if p.is_dir())
        missing = [c for c in self.clips if not (wav / f"{c}.wav").is_file()]
        if not self.clips:
            raise DataSourceError(f"{png} holds no clip folders")
        if missing:
            raise DataSourceError(f"{self.split_dir}: {len(missing)} clips have frames but no wav/<clip>.wav: "
                                  f"{missing[:5]}")
        self.labels = np.full(len(self.clips), -1, np.int32)
        listing = self.split_dir / "labels.csv"
        if listing.is_file():
            table = {r[0].strip(): r[1].strip() for r in csv.reader(listing.open()) if len(r) >= 2}
            try:
                self.labels = np.asarray([int(table.get(c, -1)) for c in self.clips], np.int32)
            except ValueError as err:
                raise DataSourceError(f"{listing}: rows must be 'clip,integer label' ({err})") from None
        self.name = f"av_folder:{root}"

    def __len__(self) -> int:
        return len(self.clips)

    def clip(self, index: int) -> dict[str, np.ndarray]:
        name = self.clips[index]
        files = sorted(p for p in (self.split_dir / "png" / name).iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not files:
            raise DataSourceError(f"{self.split_dir / 'png' / name} holds no frames ({', '.join(FRAME_SUFFIXES)})")
        chosen = sample_indices(len(files), self.num_frames)
        frames = _read_images([files[i] for i in chosen], self.size, grey=False)
        mask_dir = self.split_dir / "mask" / name
        masks = np.zeros(frames.shape[:3], np.float32)
        if mask_dir.is_dir():
            mask_files = sorted(p for p in mask_dir.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
            if len(mask_files) != len(files):
                raise DataSourceError(f"{mask_dir} has {len(mask_files)} masks for {len(files)} frames")
            masks = (_read_images([mask_files[i] for i in chosen], self.size, grey=True) >= 0.5).astype(np.float32)
        wave = read_wav(self.split_dir / "wav" / f"{name}.wav", self.sample_rate)
        span = int(len(files) / self.fps * self.sample_rate)  # the official clip length: frames / fps seconds
        audio = frame_windows(wave[:max(span, self.window)], self.num_frames, self.fps, self.sample_rate,
                              self.window, chosen)
        return {"frames": frames.astype(np.float32), "audio": audio, "label": self.labels[index],
                "object_mask": masks, "distractor_mask": np.zeros_like(masks)}

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        clips = [self.clip(int(i)) for i in np.asarray(indices)]
        return {k: np.stack([c[k] for c in clips]) for k in clips[0]}


@register_kind("av_folder")
def av_folder_source(name: str, *, split: str, seed: int, data_dir: str | None = None, num_frames: int = 5,
                     size: int = 224, sample_rate: int = 16000, window_seconds: float = 1.0, fps: float = 8.0,
                     **_) -> AVFolderSource:
    """`av_folder:<root>` (module docstring); a relative root is taken under data_dir when given."""
    root = Path(name).expanduser()
    if data_dir and not root.is_absolute():
        root = Path(data_dir).expanduser() / root
    return AVFolderSource(root, split, num_frames, size, sample_rate, window_seconds, fps)
