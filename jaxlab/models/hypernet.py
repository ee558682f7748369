"""HyperFed's hypernetwork (Yang et al., TNNLS 2023; Zi-YuanYang/HyperFed models/hyperfed_LEARN.py
`Hyper`, datasets.py): an institution's scanning protocol -> FiLM modulation (gamma, beta) of the shared
imaging network. Each client owns one; it is never aggregated (jaxlab.methods.hyperfed).

Protocol vector (datasets.py): from the geometry row [views, dets, width, height, dImg, dDet, dAng, s2r,
d2r, binshift, I0] take f = [views, dets, dImg, dDet, s2r, d2r, I0], map views -> log2(views), dets ->
dets / 256, I0 -> log10(I0), then min-max normalise with the released code's fixed bounds
(PROTOCOL_MIN, PROTOCOL_MAX; values outside them are not clipped, as there).

Network: Linear 7->256, ReLU, Dropout 0.5, Linear 256->512, ReLU, Dropout 0.5, Linear 512->2K; the
output's first K entries are gamma, the last K beta. Initialisation as train.py `initialize_weights`:
weights N(0, 0.001^2); biases keep PyTorch's Linear default U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
Parameters: 7*256+256 + 256*512+512 + 512*2K+2K (`param_count`; 267,012 for LEARN's K = 130).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PROTOCOL_MIN = np.array([5.0, 0.0, 0.005 - 0.001, 0.004 - 0.0015, 2.0 - 0.5, 2.0 - 0.5, 3.5], np.float32)
PROTOCOL_MAX = np.array([11.0, 4.0, 0.012 + 0.001, 0.014 + 0.0015, 5.0 + 0.5, 5.0 + 0.5, 6.5], np.float32)
HIDDEN = (256, 512)
DROPOUT = 0.5


def protocol_features(views, dets, d_img, d_det, s2r, d2r, i0) -> np.ndarray:
    """`(7,)` float32 the hypernetwork's input f: [log2 views, dets / 256, dImg, dDet, s2r, d2r, log10 I0]
    min-max normalised by (PROTOCOL_MIN, PROTOCOL_MAX). Lengths in the protocol table's units (cm)."""
    raw = np.array([np.log2(views), dets / 256.0, d_img, d_det, s2r, d2r, np.log10(i0)], np.float64)
    return ((raw - PROTOCOL_MIN) / (PROTOCOL_MAX - PROTOCOL_MIN)).astype(np.float32)


def torch_bias_init(fan_in: int):
    """PyTorch's nn.Linear default bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class HyperNet(nn.Module):
    """f `(B, 7)` -> (gamma `(B, K)`, beta `(B, K)`); `deterministic=False` applies dropout (rng "dropout")."""

    num_modulations: int
    hidden: Sequence[int] = HIDDEN
    dropout: float = DROPOUT

    @nn.compact
    def __call__(self, f: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        if f.ndim != 2 or f.shape[-1] != len(PROTOCOL_MIN):
            raise ValueError(f"HyperNet: protocol features must be (B, {len(PROTOCOL_MIN)}), got {f.shape}")
        h, fan_in = f, f.shape[-1]
        for i, width in enumerate(self.hidden):
            h = nn.Dense(width, kernel_init=nn.initializers.normal(0.001), bias_init=torch_bias_init(fan_in),
                         name=f"linear{i}")(h)
            h = nn.Dropout(self.dropout)(nn.relu(h), deterministic=deterministic)
            fan_in = width
        out = nn.Dense(2 * self.num_modulations, kernel_init=nn.initializers.normal(0.001),
                       bias_init=torch_bias_init(fan_in), name=f"linear{len(self.hidden)}")(h)
        return out[:, : self.num_modulations], out[:, self.num_modulations:]


def param_count(num_modulations: int, hidden: Sequence[int] = HIDDEN, inputs: int = 7) -> int:
    """Weights + biases of the hypernetwork: inputs -> hidden... -> 2K."""
    widths = [inputs, *hidden, 2 * num_modulations]
    return int(sum(a * b + b for a, b in zip(widths[:-1], widths[1:])))
