"""STTN (Zeng et al., ECCV 2020) as used by audio-visual guided video inpainting (av_inpainting.md), and
its T-PatchGAN discriminator with spectral normalisation.

Layout: channels last. frames (B, T, H, W, 3) in [-1, 1], masks (B, T, H, W, 1) with 1 = hole.

Generator (`STTNGenerator`), as kyuyeonpooh/Audio-Visual-Deep-Video-Inpainting models/sttn.py:
- encoder per frame: conv3x3 s2 3->c0, c0->c0, s2 c0->c1, c1->hidden, each + LeakyReLU(0.2) (paper:
  c0 = 64, c1 = 128, hidden = 256), padding 1 (PyTorch's, not lax "SAME", which pads stride-2 convs (0, 1));
- optional audio at the bottleneck: the clip's audio feature (B, A) broadcast over frames and positions,
  concatenated to the encoder output and fused back to `hidden` channels by a 1x1 conv (the paper says
  "concatenated at the bottleneck"; where exactly and the 1x1 fusion are inferred; the released code has
  no audio input at all);
- `num_blocks` transformer blocks: multi-head patch attention over all T frames (Q / K / V 1x1 convs, the
  channels split into one group per head, head i cuts the h x w map into patches of
  (h / patch_divisors[i], w / patch_divisors[i]) (paper: 56, 28, 14, 7 on 56 x 56), tokens = every patch
  of every frame, softmax(q k^T / sqrt(d_token)) v, keys whose patch is more than half hole masked out,
  then a 3x3 conv + LeakyReLU) and a feed-forward of conv3x3 dilation 2 + LeakyReLU, conv3x3 + LeakyReLU,
  each with a residual;
- decoder: bilinear x2 (align_corners=True), conv hidden->c1, c1->c0, bilinear x2, c0->c0 (LeakyReLU),
  c0->3, tanh.
Released-code quirks, off by default: `share_blocks` (nn.Sequential(*[block] * 8): one block's weights
applied 8 times) and `apply_mask=False` (`scores.masked_fill(m, -1e9)` is not in place, so no key is ever
masked; STTN's own release has the same line).

Discriminator (`TPatchGAN`): six Conv3d with kernel (3, 5, 5), stride (1, 2, 2), no bias, channels
(64, 128, 256, 256, 256, 256), padding 1 on the first and (1, 2, 2) after, LeakyReLU(0.2) between,
spectral norm on the first five; output (B, T, h', w', C) patch features for the hinge loss.
`batch_as_one_video` reproduces the released forward, which transposes (B T, C, H, W) into one clip of B T
frames, so the temporal kernels run across clip boundaries (off by default).

Spectral norm (`SpectralConv`): PyTorch's torch.nn.utils.spectral_norm: the kernel as a (out, in k)
matrix W, vectors u (out,) and v (in k,) kept in the "spectral" collection, one power iteration per
training call (v = W^T u / |.|, u = W v / |.|), sigma = u^T W v with u and v constants for the gradient,
kernel / sigma used. Evaluation (update=False) reuses the stored u, v.

Weights: normal(0, 0.02), biases 0 (the released init_weights; `release_init` draws them).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INIT = nn.initializers.normal(0.02)
LEAK = 0.2


def leaky(x: jax.Array) -> jax.Array:
    return nn.leaky_relu(x, LEAK)


def conv2d(features: int, *, stride: int = 1, padding: int = 1, dilation: int = 1, kernel: int = 3,
           name: str | None = None) -> nn.Conv:
    """A PyTorch-padded 2D conv (symmetric `padding`) with the released init."""
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((padding, padding),) * 2,
                   kernel_dilation=(dilation, dilation), kernel_init=INIT, name=name)


def align_corners_matrix(n: int) -> np.ndarray:
    """(2n, n) bilinear x2 interpolation weights with align_corners=True: output i samples input position
    i (n - 1) / (2n - 1)."""
    pos = np.arange(2 * n) * (n - 1) / max(2 * n - 1, 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    m = np.zeros((2 * n, n), np.float32)
    np.add.at(m, (np.arange(2 * n), lo), 1 - (pos - lo))
    np.add.at(m, (np.arange(2 * n), hi), pos - lo)
    return m


def upsample2x_align_corners(x: jax.Array) -> jax.Array:
    """Bilinear x2 with align_corners=True (F.interpolate's), over axes -3 and -2 of (..., H, W, C), as two
    small matmuls (their gradients are matmuls too: no gather / scatter)."""
    rows = jnp.asarray(align_corners_matrix(x.shape[-3]), x.dtype)
    cols = jnp.asarray(align_corners_matrix(x.shape[-2]), x.dtype)
    x = jnp.einsum("ih,...hwc->...iwc", rows, x)
    return jnp.einsum("jw,...iwc->...ijc", cols, x)


def release_init(module: nn.Module, rng: jax.Array, *args, std: float = 0.02, **kwargs) -> dict:
    """The module's variables as the release's init_weights draws them: every "kernel" N(0, std), every
    "bias" 0, spectral-norm vectors u, v unit-norm Gaussian; shapes from jax.eval_shape(module.init), the
    numbers from one jax.random.normal call (one RNG op to compile instead of one per parameter: XLA's
    CPU compile of a per-parameter init takes tens of seconds)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), *args, **kwargs)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    sizes = [int(np.prod(leaf.shape)) for _, leaf in leaves]
    draws = jax.random.normal(rng, (max(sum(sizes), 1),), jnp.float32)
    out, start = [], 0
    for (path, leaf), size in zip(leaves, sizes):
        name = getattr(path[-1], "key", str(path[-1]))
        x = draws[start:start + size].reshape(leaf.shape)
        start += size
        if name == "bias":
            x = jnp.zeros(leaf.shape, leaf.dtype)
        elif name in ("u", "v"):
            x = _l2_normalize(x)
        else:
            x = std * x
        out.append(x.astype(leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


# --- transformer --------------------------------------------------------------------------------------------


def to_patches(x: jax.Array, ph: int, pw: int) -> jax.Array:
    """(B, T, H, W, C) -> (B, T (H/ph) (W/pw), ph pw C): every patch of every frame as one token."""
    b, t, h, w, c = x.shape
    x = x.reshape(b, t, h // ph, ph, w // pw, pw, c).transpose(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, t * (h // ph) * (w // pw), ph * pw * c)


def from_patches(x: jax.Array, t: int, h: int, w: int, ph: int, pw: int) -> jax.Array:
    """Inverse of to_patches: (B, T (H/ph) (W/pw), ph pw C) -> (B, T, H, W, C)."""
    b, c = x.shape[0], x.shape[-1] // (ph * pw)
    x = x.reshape(b, t, h // ph, w // pw, ph, pw, c).transpose(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, t, h, w, c)


def patch_attention(q, k, v, hole, ph: int, pw: int, apply_mask: bool) -> jax.Array:
    """One head: q, k, v (B, T, h, w, d), hole (B, T, h, w, 1) in {0, 1} -> (B, T, h, w, d).

    Tokens are (ph, pw) patches of all frames; a key patch more than half hole is masked (-1e9) when
    apply_mask."""
    b, t, h, w, _ = q.shape
    if h % ph or w % pw:
        raise ValueError(f"patch ({ph}, {pw}) does not tile the {h}x{w} feature map")
    qt, kt, vt = (to_patches(a, ph, pw) for a in (q, k, v))
    scores = qt @ jnp.swapaxes(kt, -1, -2) / jnp.sqrt(jnp.asarray(qt.shape[-1], qt.dtype))
    if apply_mask:
        key_hole = to_patches(hole, ph, pw).mean(-1) > 0.5  # (B, N)
        scores = jnp.where(key_hole[:, None, :], jnp.asarray(-1e9, scores.dtype), scores)
    out = jax.nn.softmax(scores, axis=-1) @ vt
    return from_patches(out, t, h, w, ph, pw)


class PatchAttention(nn.Module):
    """Multi-head patch attention across frames: x (B, T, h, w, C), hole (B, T, h, w, 1) -> (B, T, h, w, C)."""

    patch_divisors: Sequence[int]
    apply_mask: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, hole: jax.Array) -> jax.Array:
        c, heads = x.shape[-1], len(self.patch_divisors)
        if c % heads:
            raise ValueError(f"hidden channels {c} do not split into {heads} heads (one per patch size)")
        q, k, v = (nn.Conv(c, (1, 1), kernel_init=INIT, name=n)(x) for n in ("query", "key", "value"))
        h, w = x.shape[2:4]
        outs = []
        for i, div in enumerate(self.patch_divisors):
            part = slice(i * c // heads, (i + 1) * c // heads)
            outs.append(patch_attention(q[..., part], k[..., part], v[..., part], hole, h // div, w // div,
                                        self.apply_mask))
        return leaky(conv2d(c, name="output")(jnp.concatenate(outs, -1)))


class TransformerBlock(nn.Module):
    """x + attention(x), then + feed-forward (conv3x3 dilation 2, conv3x3, LeakyReLU after each)."""

    patch_divisors: Sequence[int]
    apply_mask: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, hole: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = x + PatchAttention(self.patch_divisors, self.apply_mask, name="attention")(x, hole)
        y = leaky(conv2d(c, padding=2, dilation=2, name="ff_0")(x))
        return x + leaky(conv2d(c, name="ff_1")(y))


# --- generator ----------------------------------------------------------------------------------------------


class STTNGenerator(nn.Module):
    """frames (B, T, H, W, 3) in [-1, 1], masks (B, T, H, W, 1) (1 = hole)[, audio (B, A) or per frame
    (B, T, A)] -> predicted
    frames (B, T, H, W, 3) in [-1, 1] (module docstring). H and W must be multiples of 4 * max divisor."""

    channels: Sequence[int] = (64, 128, 256)  # c0, c1, hidden
    num_blocks: int = 8
    patch_divisors: Sequence[int] = (1, 2, 4, 8)
    share_blocks: bool = False
    apply_mask: bool = True
    audio_bottleneck: bool = False

    @nn.compact
    def __call__(self, frames: jax.Array, masks: jax.Array, audio: jax.Array | None = None) -> jax.Array:
        if frames.ndim != 5 or masks.shape != frames.shape[:-1] + (1,):
            raise ValueError(f"STTN needs frames (B, T, H, W, 3) and masks (B, T, H, W, 1); got frames "
                             f"{frames.shape}, masks {masks.shape}")
        c0, c1, hidden = self.channels
        factor = 4 * max(self.patch_divisors)
        if frames.shape[2] % factor or frames.shape[3] % factor:
            raise ValueError(f"frame size {frames.shape[2:4]} must be a multiple of {factor} (x4 encoder "
                             f"downsampling, patch divisors {tuple(self.patch_divisors)})")
        x = frames * (1.0 - masks)
        for i, (f, s) in enumerate(((c0, 2), (c0, 1), (c1, 2), (hidden, 1))):
            x = leaky(conv2d(f, stride=s, name=f"encoder_{i}")(x))
        if self.audio_bottleneck:
            if audio is None:
                raise ValueError("STTN built with audio_bottleneck=True needs an audio feature (B, A)")
            a = audio[:, None, None, None, :] if audio.ndim == 2 else audio[:, :, None, None, :]
            a = jnp.broadcast_to(a, x.shape[:-1] + audio.shape[-1:])
            x = leaky(nn.Conv(hidden, (1, 1), kernel_init=INIT, name="audio_fusion")(
                jnp.concatenate([x, a.astype(x.dtype)], -1)))
        hole = masks[:, :, ::4, ::4]  # F.interpolate(scale 1/4), nearest
        shared = TransformerBlock(self.patch_divisors, self.apply_mask, name="block") if self.share_blocks else None
        for i in range(self.num_blocks):
            block = shared or TransformerBlock(self.patch_divisors, self.apply_mask, name=f"block_{i}")
            x = block(x, hole)
        x = leaky(conv2d(c1, name="decoder_0")(upsample2x_align_corners(x)))
        x = leaky(conv2d(c0, name="decoder_1")(x))
        x = leaky(conv2d(c0, name="decoder_2")(upsample2x_align_corners(x)))
        return jnp.tanh(conv2d(3, name="decoder_3")(x))


def composite(frames: jax.Array, predicted: jax.Array, masks: jax.Array) -> jax.Array:
    """The inpainted video: frames where valid, the prediction in the hole (mask 1), (B, T, H, W, 3)."""
    return frames * (1.0 - masks) + predicted * masks


# --- discriminator ------------------------------------------------------------------------------------------


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x), eps)


def spectral_normalize(matrix: jax.Array, u: jax.Array, v: jax.Array, iterations: int
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """PyTorch's power iteration on W (out, n): `iterations` steps from (u (out,), v (n,)), then
    sigma = u^T W v with u, v held constant for the gradient. Returns (W / sigma, u, v)."""
    for _ in range(iterations):
        v = _l2_normalize(matrix.T @ u)
        u = _l2_normalize(matrix @ v)
    u, v = jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)
    sigma = u @ matrix @ v
    return matrix / sigma, u, v


class SpectralConv(nn.Module):
    """A 3D conv (no bias, conv3d_taps) whose kernel is divided by its spectral norm (module docstring).

    x (B, T, H, W, Cin) -> (B, T', H', W', features). update: run `power_iterations` steps and store u, v in the
    "spectral" collection (training); otherwise reuse the stored ones."""

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int]
    padding: Sequence[int]
    power_iterations: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, update: bool = True) -> jax.Array:
        ks = tuple(self.kernel_size)
        kernel = self.param("kernel", INIT, ks + (x.shape[-1], self.features))
        matrix = jnp.moveaxis(kernel, -1, 0).reshape(self.features, -1)  # (out, k... in): torch's (out, in k)
        u = self.variable("spectral", "u", lambda: _l2_normalize(
            jax.random.normal(self.make_rng("params"), (self.features,))))
        v = self.variable("spectral", "v", lambda: _l2_normalize(
            jax.random.normal(self.make_rng("params"), (matrix.shape[1],))))
        normed, new_u, new_v = spectral_normalize(matrix, u.value, v.value,
                                                  self.power_iterations if update else 0)
        if update and not self.is_initializing():
            u.value, v.value = new_u, new_v
        kernel = jnp.moveaxis(normed.reshape((self.features,) + ks + (x.shape[-1],)), 0, -1)
        return conv3d_taps(x, kernel.astype(x.dtype), self.strides, self.padding)


def conv3d_taps(x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: Sequence[int]) -> jax.Array:
    """A 3D conv, temporal stride 1, as a sum over the kt temporal taps of 2D convs: x (B, T, H, W, Cin),
    kernel (kt, kh, kw, Cin, Cout), symmetric padding (pt, ph, pw) -> (B, T + 2 pt - kt + 1, H', W', Cout).
    The same numbers as lax's 3D conv (to float rounding); on XLA:CPU its gradient is ~40x faster (a
    T-PatchGAN layer's backward: 4.5 s -> 0.1 s)."""
    if strides[0] != 1:
        raise ValueError(f"conv3d_taps needs temporal stride 1, got strides {tuple(strides)}")
    kt, (b, t) = kernel.shape[0], x.shape[:2]
    padded = jnp.pad(x, ((0, 0), (padding[0], padding[0]), (0, 0), (0, 0), (0, 0)))
    t_out = t + 2 * padding[0] - kt + 1
    out = 0.0
    for dt in range(kt):
        frames = padded[:, dt:dt + t_out].reshape((b * t_out,) + x.shape[2:])
        dims = jax.lax.conv_dimension_numbers(frames.shape, kernel[dt].shape, ("NHWC", "HWIO", "NHWC"))
        out = out + jax.lax.conv_general_dilated(frames, kernel[dt], tuple(strides[1:]),
                                                 [(p, p) for p in padding[1:]], dimension_numbers=dims)
    return out.reshape((b, t_out) + out.shape[1:])


class Conv3D(nn.Module):
    """A bias-free 3D conv by conv3d_taps: x (B, T, H, W, Cin) -> (B, T', H', W', features)."""

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int]
    padding: Sequence[int]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", INIT, tuple(self.kernel_size) + (x.shape[-1], self.features))
        return conv3d_taps(x, kernel.astype(x.dtype), self.strides, self.padding)


class TPatchGAN(nn.Module):
    """video (B, T, H, W, 3) -> patch features (B, T, h', w', channels[-1]) (module docstring)."""

    channels: Sequence[int] = (64, 128, 256, 256, 256, 256)
    power_iterations: int = 1
    batch_as_one_video: bool = False

    @nn.compact
    def __call__(self, video: jax.Array, update: bool = True) -> jax.Array:
        if video.ndim != 5:
            raise ValueError(f"T-PatchGAN needs videos (B, T, H, W, C), got {video.shape}")
        shape = video.shape
        x = video.reshape((1, shape[0] * shape[1]) + shape[2:]) if self.batch_as_one_video else video
        kernel, strides = (3, 5, 5), (1, 2, 2)
        for i, f in enumerate(self.channels[:-1]):
            padding = (1, 1, 1) if i == 0 else (1, 2, 2)
            x = leaky(SpectralConv(f, kernel, strides, padding, self.power_iterations, name=f"conv_{i}")(x, update))
        x = Conv3D(self.channels[-1], kernel, strides, (1, 2, 2), name=f"conv_{len(self.channels) - 1}")(x)
        return x.reshape(shape[:2] + x.shape[2:]) if self.batch_as_one_video else x
