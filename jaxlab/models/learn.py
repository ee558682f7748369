"""HyperFed's LEARN-style unrolled reconstruction network with FiLM modulation (Yang et al., TNNLS 2023;
Zi-YuanYang/HyperFed models/hyperfed_LEARN.py `Learn`, `IterBlock`, `prj_module`, `ConvBlock`).

Each of the `blocks` iterations (50 in the paper), with its own weights, updates the image x `(B, H, W)`:

    x <- ReLU( x - lambda * A^T (A x - y)  +  CNN(x) )

y `(B, V, D)` the measured sinogram, A / A^T the client's projector and its exact transpose
(jaxlab.ct.project / backproject with its fan-beam `Geometry`). CNN = Conv3x3 1->F, ReLU, Conv3x3 F->F,
ReLU, Conv3x3 F->1 (padding 1, bias), each conv output FiLM-modulated gamma * h + beta before its ReLU.
The modulation vectors gamma, beta `(B, K)`, K = 2F + 2 (130 for F = 64), come from the hypernetwork and
are the same for every block; their layout (`film_slices`): entry 0 modulates the step size, 1..F conv1,
F+1..2F conv2, 2F+1 conv3 (the spec's slices [0:64], [64:128], [128] of gamma[1:]).

Step size (`step_size`), per image: lambda = max(min(w_fed * gamma_0 + beta_0, f . w + b), 0.01) with
the block's learned scalar w_fed, the normalised protocol vector f `(B, 7)` and the fixed bound vector
w = BOUND_W, b = BOUND_B. The released code picks the bound where the (detached) step exceeds it, so the
gradient reaches w_fed, gamma_0 and beta_0 only where the step is below the bound and above 0.01.
w, b are `requires_grad=False` Parameters in the released code (in its state_dict, averaged to the same
constant); they are constants here, outside the parameter tree.

Initialisation as train.py `initialize_weights`: conv kernels N(0, 0.01^2), biases 0, w_fed N(0.02,
0.001^2). Parameters per block: (9F + F) + (9F^2 + F) + (9F + 1) + 1 (38,146 for F = 64; `param_count`).
The blocks run as one `nn.scan` over stacked per-block weights (one compiled block; leaves `(blocks,
...)`), optionally rematerialised (`remat=True`: activations of a block are recomputed in the backward
pass; memory O(1 block) instead of O(blocks)).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlab import ct
from jaxlab.models.layers import Conv

BOUND_W = np.array([-0.8955, 0.0, -2.6443, 0.5331, 1.5326, 0.0, 0.0], np.float32)
BOUND_B = 1.0363
MIN_STEP = 0.01
FEATURES = 64
BLOCKS = 50


def num_modulations(features: int = FEATURES) -> int:
    """K = 1 (step size) + F (conv1) + F (conv2) + 1 (conv3)."""
    return 2 * features + 2


def film_slices(features: int = FEATURES) -> dict[str, slice]:
    """Which entries of gamma / beta `(B, K)` modulate what."""
    return {"step": slice(0, 1), "conv1": slice(1, 1 + features), "conv2": slice(1 + features, 1 + 2 * features),
            "conv3": slice(1 + 2 * features, 2 + 2 * features)}


def step_bound(f: jax.Array) -> jax.Array:
    """`(B,)` the protocol's upper bound f . BOUND_W + BOUND_B on the step size, f `(B, 7)`."""
    return f @ jnp.asarray(BOUND_W) + BOUND_B


def step_size(w_fed: jax.Array, gamma0: jax.Array, beta0: jax.Array, f: jax.Array) -> jax.Array:
    """`(B,)` lambda = max(min(w_fed * gamma0 + beta0, step_bound(f)), MIN_STEP); gamma0, beta0 `(B,)`."""
    weight = w_fed * gamma0 + beta0
    bound = step_bound(f)
    return jnp.maximum(jnp.where(weight <= bound, weight, bound), MIN_STEP)


def _normal(mean: float, std: float):
    def init(key, shape, dtype=jnp.float32):
        return mean + std * jax.random.normal(key, shape, dtype)

    return init


class LearnBlock(nn.Module):
    """One iteration: `(x (B, H, W), (y, geom, gamma, beta, f))` -> `(x', None)` (a scan body)."""

    features: int = FEATURES
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, x: jax.Array, context):
        y, geom, gamma, beta, f = context
        s = film_slices(self.features)
        w_fed = self.param("weight_fed", _normal(0.02, 0.001), (1,))
        lam = step_size(w_fed[0], gamma[:, 0], beta[:, 0], f)
        fidelity = x - lam[:, None, None] * ct.backproject(ct.project(x, geom) - y, geom)

        def film(h, name):
            return h * gamma[:, None, None, s[name]] + beta[:, None, None, s[name]]

        def conv(features, name):
            return Conv(features, (3, 3), padding=1, kernel_init=nn.initializers.normal(0.01),
                        impl=self.conv_impl, name=name)

        h = nn.relu(film(conv(self.features, "conv1")(x[..., None]), "conv1"))
        h = nn.relu(film(conv(self.features, "conv2")(h), "conv2"))
        h = film(conv(1, "conv3")(h), "conv3")
        return nn.relu(fidelity + h[..., 0]), None


class Learn(nn.Module):
    """The unrolled network: x0 `(B, H, W)` (e.g. FBP), y `(B, V, D)`, one `ct.Geometry` for the batch,
    gamma / beta `(B, K)`, f `(B, 7)` -> `(B, H, W)`. Parameters {"blocks": per-block leaves `(blocks, ...)`}."""

    blocks: int = BLOCKS
    features: int = FEATURES
    remat: bool = False
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, x0: jax.Array, y: jax.Array, geom: ct.Geometry, gamma: jax.Array, beta: jax.Array,
                 f: jax.Array) -> jax.Array:
        k = num_modulations(self.features)
        if x0.ndim != 3 or x0.shape[1:] != tuple(geom.image_shape):
            raise ValueError(f"Learn: x0 must be (B, *image_shape) = (B, {geom.image_shape}), got {x0.shape}")
        if y.shape != (x0.shape[0], *geom.sino_shape):
            raise ValueError(f"Learn: sinogram y has shape {y.shape}, expected {(x0.shape[0], *geom.sino_shape)}")
        if gamma.shape != (x0.shape[0], k) or beta.shape != gamma.shape:
            raise ValueError(f"Learn: gamma {gamma.shape} and beta {beta.shape} must be (B, K) = "
                             f"{(x0.shape[0], k)} (K = 2 * features + 2)")
        block = nn.remat(LearnBlock, prevent_cse=False) if self.remat else LearnBlock
        scan = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=nn.broadcast,
                       length=self.blocks)
        x, _ = scan(self.features, self.conv_impl, name="blocks")(x0, (y, geom, gamma, beta, f))
        return x


def param_count(blocks: int = BLOCKS, features: int = FEATURES) -> int:
    """Trained parameters of the unrolled network (per block: three convs and w_fed)."""
    per_block = (9 * features + features) + (9 * features * features + features) + (9 * features + 1) + 1
    return blocks * per_block
