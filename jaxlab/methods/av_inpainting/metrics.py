"""Video inpainting measures beyond per-frame PSNR / SSIM (those are jaxlab.metrics).

Videos are numpy (N, T, H, W, 3) float in [0, 1].

VFID (Wang et al. 2019, the paper's video FID): the Fréchet distance between Gaussians fitted to one
feature vector per video of the inpainted and of the real test videos,
    ||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 sqrtm(C_a C_b))      (scipy.linalg.sqrtm, real part).
The paper's features are I3D's (Kinetics-pretrained), which are not available offline. Here: a fixed,
randomly initialised 3D conv network (`VideoFeatures`: three Conv3d + ReLU, global average pool, seed 0),
the same weights everywhere (jax.random is reproducible across versions). Why not the AV-Net's visual
branch: the AV-Net is the guide of two of the four compared arms, and scoring them with the features they
were trained to match would favour them by construction; random conv features still separate videos by
their local spatio-temporal statistics (random-feature FIDs rank generators like trained ones in
Naeem et al. 2020's and Kynkäänniemi et al. 2023's checks, though less sharply). Numbers are comparable
only within this code, not with the paper's VFID.

E_warp (Lai et al. 2018, flow warping error): with the optical flow F_t from frame t to t+1 of the real
video (TV-L1, skimage.registration.optical_flow_tvl1 on grayscale) and its non-occlusion mask O_t
(forward-backward consistency, Sundaram et al. 2010: |F_f + F_b(x + F_f)|^2 <= 0.01 (|F_f|^2 +
|F_b(x + F_f)|^2) + 0.5), both fixed by the real video,
    E_warp(V) = mean_t sum_x O_t(x) |V_t(x) - V_{t+1}(x + F_t(x))|^2 / sum_x O_t(x),
|.|^2 summed over RGB. Lower is more temporally consistent.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from scipy import ndimage


# --- VFID ---------------------------------------------------------------------------------------------------


class VideoFeatures(nn.Module):
    """(N, T, H, W, 3) in [0, 1] -> (N, features[-1]): Conv3d k3 s(1,2,2) / s(1,2,2) / s(2,2,2) + ReLU,
    global average pool."""

    features: tuple[int, ...] = (16, 32, 64)

    @nn.compact
    def __call__(self, video: jax.Array) -> jax.Array:
        x = video * 2.0 - 1.0
        for i, f in enumerate(self.features):
            stride = (2, 2, 2) if i == len(self.features) - 1 else (1, 2, 2)
            x = nn.relu(nn.Conv(f, (3, 3, 3), strides=stride, padding=1,
                                kernel_init=nn.initializers.he_normal())(x))
        return x.mean(axis=(1, 2, 3))


@functools.lru_cache(maxsize=4)
def _feature_fn(seed: int, shape: tuple[int, ...]):
    net = VideoFeatures()
    params = net.init(jax.random.key(seed), jnp.zeros((1,) + shape, jnp.float32))
    return jax.jit(lambda v: net.apply(params, v))


def video_features(videos: np.ndarray, *, seed: int = 0, batch_size: int = 32) -> np.ndarray:
    """(N, T, H, W, 3) -> (N, F) float64 features of the fixed random network (module docstring)."""
    videos = np.asarray(videos, np.float32)
    fn = _feature_fn(seed, videos.shape[1:])
    return np.concatenate([np.asarray(fn(videos[i:i + batch_size]), np.float64)
                           for i in range(0, len(videos), batch_size)])


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (N, F) and b (M, F), N, M >= 2."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(ca @ cb)
    root = np.real(root)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(ca + cb - 2.0 * root))


def vfid(videos: np.ndarray, reference: np.ndarray, *, seed: int = 0) -> float:
    """VFID of videos (N, T, H, W, 3) against real reference videos (M, T, H, W, 3), all in [0, 1]."""
    return frechet_distance(video_features(videos, seed=seed), video_features(reference, seed=seed))


# --- E_warp -------------------------------------------------------------------------------------------------


def gray(frames: np.ndarray) -> np.ndarray:
    """(..., 3) RGB -> (...) luma (ITU-R BT.601), float64."""
    return np.asarray(frames, np.float64) @ np.array([0.299, 0.587, 0.114])


def warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """image (H, W[, C]) sampled at x + flow(x), flow (2, H, W) as (rows, cols); bilinear, edges clamped."""
    h, w = image.shape[:2]
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    coords = [rows + flow[0], cols + flow[1]]
    if image.ndim == 2:
        return ndimage.map_coordinates(image, coords, order=1, mode="nearest")
    return np.stack([ndimage.map_coordinates(image[..., c], coords, order=1, mode="nearest")
                     for c in range(image.shape[-1])], -1)


def flows_and_occlusion(video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Real video (T, H, W, 3) -> (flows (T-1, 2, H, W): frame t to t+1, non-occlusion masks
    (T-1, H, W) float32) by TV-L1 and the forward-backward check (module docstring)."""
    from skimage.registration import optical_flow_tvl1

    g = gray(video)
    flows, masks = [], []
    for t in range(len(g) - 1):
        fwd = optical_flow_tvl1(g[t], g[t + 1])
        bwd = optical_flow_tvl1(g[t + 1], g[t])
        bwd_at = np.stack([warp(bwd[i], fwd) for i in range(2)])
        diff = np.sum((fwd + bwd_at) ** 2, 0)
        bound = 0.01 * (np.sum(fwd ** 2, 0) + np.sum(bwd_at ** 2, 0)) + 0.5
        flows.append(fwd)
        masks.append((diff <= bound).astype(np.float32))
    return np.stack(flows), np.stack(masks)


def warp_error(video: np.ndarray, flows: np.ndarray, masks: np.ndarray) -> float:
    """E_warp of one video (T, H, W, 3) with its real video's flows (T-1, 2, H, W) and masks (T-1, H, W)."""
    video = np.asarray(video, np.float64)
    errs = []
    for t in range(len(video) - 1):
        err = np.sum((video[t] - warp(video[t + 1], flows[t])) ** 2, -1)
        errs.append(np.sum(masks[t] * err) / max(float(masks[t].sum()), 1.0))
    return float(np.mean(errs))
