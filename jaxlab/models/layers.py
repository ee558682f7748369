"""Layers shared by the models ported from PyTorch: a convolution with a choice of implementation, and
PyTorch's BatchNorm.

`Conv`: flax nn.Conv's parameters (params "kernel" (*k, Cin / groups, Cout) and "bias" (Cout,)) with
`impl` "lax" (lax.conv_general_dilated, exactly as nn.Conv) or "im2col" (`conv_im2col`: the kernel taps
gathered into patches, then one matmul with the kernel). The two give the same values to float rounding
(the summation order differs) and the same parameter trees, so params trained one way run the other.
Why im2col: on XLA CPU a convolution inside a while loop (lax.scan over a client's local steps) runs
10-20x slower than outside one (ResNet-20 train step at batch 32 in a scan: 2.2 s lax vs 0.13 s im2col),
and jax.vmap of a convolution over per-client weights becomes a slow grouped convolution; a matmul is
fast in loops and vmaps into a batched matmul.

On the CPU backend a "lax" Conv passes its input through `unfused` (an identity XLA cannot fuse across),
which stops XLA:CPU recomputing a residual network's elementwise chains inside the backward pass
(CPU_FUSION_BOUNDARY; see `unfused`).

`BatchNorm`: torch.nn.BatchNorm{1,2}d's semantics (see its docstring) under flax's names.

`EvalMode`: a module run as after PyTorch's `model.eval()` in training steps too (BatchNorm on frozen
running statistics, Dropout off), with the module's own variable tree.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

CONV_IMPLS = ("lax", "im2col")
# On the CPU backend, Conv ("lax") passes its input through `unfused`, so that XLA:CPU materialises it
# once instead of recomputing its producers inside the backward pass's transposes (ResNet-20 step
# -6 to -10%, ResNet-56 -32%: BENCHMARKS.md). A switch for measuring with and without it.
CPU_FUSION_BOUNDARY = True

PaddingLike = str | int | Sequence[int | tuple[int, int]]


def check_conv_impl(impl: str) -> str:
    """impl if it is one of CONV_IMPLS, else a ValueError naming the valid ones."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    return impl


def explicit_padding(
    padding: PaddingLike, kernel_size: Sequence[int], spatial: Sequence[int], strides: Sequence[int]
) -> list[tuple[int, int]]:
    """[(lo, hi)] per spatial dim for "SAME", "VALID", an int, or a sequence of ints / (lo, hi) pairs.

    "SAME" is lax's: total = max((ceil(L / s) - 1) * s + k - L, 0), lo = total // 2, hi = the rest.
    """
    nd = len(kernel_size)
    if isinstance(padding, str):
        if padding.upper() == "VALID":
            return [(0, 0)] * nd
        if padding.upper() == "SAME":
            totals = [max((-(-n // s) - 1) * s + k - n, 0) for n, s, k in zip(spatial, strides, kernel_size)]
            return [(t // 2, t - t // 2) for t in totals]
        raise ValueError(f"Conv padding {padding!r} is not supported: use 'SAME', 'VALID', an int, or "
                         f"{nd} ints / (lo, hi) pairs")
    if isinstance(padding, int):
        return [(padding, padding)] * nd
    pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
    if len(pads) != nd or any(len(p) != 2 for p in pads):
        raise ValueError(f"Conv padding {padding!r} must give an int or a (lo, hi) pair for each of the "
                         f"{nd} spatial dims")
    return pads


def conv_im2col(
    x: jax.Array,
    kernel: jax.Array,
    padding: Sequence[tuple[int, int]],
    strides: Sequence[int] | None = None,
    groups: int = 1,
    precision: Any = None,
) -> jax.Array:
    """A convolution as patches @ kernel; lax.conv_general_dilated's result to float rounding.

    x (B, *spatial, Cin), kernel (*k, Cin / groups, Cout), explicit padding [(lo, hi)] per spatial dim
    -> (B, *out, Cout) with out_i = (L_i + lo_i + hi_i - k_i) // s_i + 1. groups > 1 (depthwise
    included) contracts each group's patches with its own kernel slice.
    """
    ks = kernel.shape[:-2]
    nd = len(ks)
    strides = tuple(strides or (1,) * nd)
    cin, cout = x.shape[-1], kernel.shape[-1]
    if x.ndim != nd + 2 or len(padding) != nd or len(strides) != nd:
        raise ValueError(f"conv_im2col: x {x.shape} must be (batch, {nd} spatial dims, channels) for "
                         f"kernel {kernel.shape}, with {nd} paddings and strides (got {padding}, {strides})")
    if cin % groups or cout % groups or kernel.shape[-2] != cin // groups:
        raise ValueError(f"conv_im2col: kernel {kernel.shape} does not fit {cin} input channels in "
                         f"{groups} groups (need kernel (*k, {cin} / groups, Cout), Cout divisible by groups)")
    xp = jnp.pad(x, ((0, 0), *map(tuple, padding), (0, 0)))
    out = [(xp.shape[1 + i] - ks[i]) // strides[i] + 1 for i in range(nd)]

    def window(offsets):  # the inputs kernel tap `offsets` sees at every output position: (B, *out, Cin)
        idx = tuple(slice(o, o + s * (n - 1) + 1, s) for o, s, n in zip(offsets, strides, out))
        return xp[(slice(None), *idx)]

    taps = list(itertools.product(*(range(k) for k in ks)))  # row-major, as the kernel's leading dims
    if groups == 1:  # (B, *out, K * Cin) @ (K * Cin, Cout), K = prod(k)
        patches = jnp.concatenate([window(t) for t in taps], axis=-1)
        return jnp.matmul(patches, kernel.reshape(len(taps) * cin, cout), precision=precision)
    patches = jnp.stack([window(t) for t in taps], axis=-2)  # (B, *out, K, Cin)
    patches = patches.reshape(*patches.shape[:-1], groups, cin // groups)
    w = kernel.reshape(len(taps), cin // groups, groups, cout // groups)
    y = jnp.einsum("...kgc,kcgo->...go", patches, w, precision=precision)
    return y.reshape(*y.shape[:-2], cout)


class Conv(nn.Module):
    """flax nn.Conv's parameters and results with a choice of implementation (`impl`, CONV_IMPLS).

    inputs (*batch, *spatial, Cin) (one or more batch dims, or none) -> (*batch, *out, features).
    params: kernel (*kernel_size, Cin / feature_group_count, features), bias (features,) if use_bias.
    padding: "SAME", "VALID", an int, or an int / (lo, hi) pair per spatial dim (nn.Conv's forms except
    CIRCULAR / REFLECT / CAUSAL). No dilation and no mask (none of the ported models has them).
    impl: "lax" (lax.conv_general_dilated, as nn.Conv) or "im2col" (conv_im2col); any other value is a
    ValueError naming the valid ones.
    """

    features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] = 1
    padding: PaddingLike = "SAME"
    feature_group_count: int = 1
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()
    impl: str = "lax"

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        check_conv_impl(self.impl)
        ks = (self.kernel_size,) if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
        nd = len(ks)
        strides = (self.strides,) * nd if isinstance(self.strides, int) else tuple(self.strides)
        if inputs.ndim < nd + 1 or len(strides) != nd:
            raise ValueError(f"Conv with kernel_size {ks}: inputs must be (*batch, {nd} spatial dims, "
                             f"channels), got {inputs.shape}; strides {strides}")
        batch_shape, tail = inputs.shape[: inputs.ndim - nd - 1], inputs.shape[inputs.ndim - nd - 1:]
        cin, groups = tail[-1], self.feature_group_count
        if cin % groups or self.features % groups:
            raise ValueError(f"Conv: feature_group_count {groups} must divide the input channels {cin} "
                             f"and features {self.features}")
        kernel = self.param("kernel", self.kernel_init, ks + (cin // groups, self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        x, kernel, bias = promote_dtype(inputs.reshape((-1, *tail)), kernel, bias, dtype=self.dtype)
        pads = explicit_padding(self.padding, ks, tail[:-1], strides)
        if self.impl == "im2col":
            y = conv_im2col(x, kernel, pads, strides, groups, self.precision)
        else:
            dims = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, _channels_last_spec(nd))
            if CPU_FUSION_BOUNDARY and jax.default_backend() == "cpu":
                x = unfused(x, kernel.reshape(-1)[0])
            y = jax.lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=dims,
                                             feature_group_count=groups, precision=self.precision)
        if bias is not None:
            y = y + bias
        return y.reshape(*batch_shape, *y.shape[1:])


def unfused(x: jax.Array, token: jax.Array) -> jax.Array:
    """x itself, as a value XLA computes once into memory instead of fusing its producers into each of its
    consumers.

    XLA fuses cheap elementwise producers into every consumer, recomputing them there. In a ResNet's
    backward pass this makes each weight-gradient convolution's input transpose (XLA:CPU convolves the
    input as (C, H, W, N) for the weight gradient) recompute the whole BatchNorm / ReLU / residual-add
    chain of the blocks before it, in transposed order: quadratic in depth (ResNet-56 on CPU: 272 ms of
    a 609 ms step in these transposes, up to 9 ms each where a plain one takes 0.13 ms).
    lax.optimization_barrier does not stop it on CPU (XLA expands barriers before fusion); a conditional
    does, since fusion never crosses one. Both branches return x, one as x * 1 so that XLA does not fold
    two identical branches and drop the conditional; the predicate, token == token (false only for a NaN
    token, and both branches agree then too), reads a replicated scalar (a weight), so a batch-sharded x
    costs no communication. Values and gradients are x's and its cotangent's exactly.
    """
    return jax.lax.cond(token == token, lambda v: v, lambda v: v * jnp.ones((), v.dtype), x)


def _channels_last_spec(nd: int) -> tuple[str, str, str]:
    """lax dimension numbers for (N, *spatial, C) inputs and (*k, I, O) kernels with nd spatial dims."""
    if not 1 <= nd <= 3:
        raise ValueError(f"Conv supports 1 to 3 spatial dims, got {nd}")
    spatial = "DHW"[-nd:]
    return f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"


def _bn_statistics(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-channel mean and biased variance of x (..., C) over all axes but the last (two passes, as
    accurate as PyTorch's Welford update in float32)."""
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    return mean, jnp.square(x - mean).mean(axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array,
                     epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode batch normalisation of x (..., C) with per-channel scale and bias (C,):
    (y = (x - mean) / sqrt(var + epsilon) * scale + bias, mean, var), mean and biased var per channel
    over all axes but the last, everything in x's dtype (the caller casts to float32).

    Its VJP is the closed form PyTorch and cuDNN use, with n values per channel and xhat the normalised x:
        dx = scale * rstd / n * (n * dy - sum(dy) - xhat * sum(dy * xhat)),
        dscale = sum(dy * xhat),  dbias = sum(dy)
    (plus the exact terms for cotangents of the returned mean and var). Two reductions and one
    elementwise pass, where differentiating the forward formula gives several more passes over x: on
    XLA CPU this is about a sixth of a CIFAR ResNet-20 train step's CPU time (BENCHMARKS.md).
    """
    return _batch_norm_train_fwd(x, scale, bias, epsilon)[0]


def _batch_norm_train_fwd(x, scale, bias, epsilon):
    mean, var = _bn_statistics(x)
    rstd = jax.lax.rsqrt(var + epsilon)
    y = (x - mean) * rstd * scale + bias
    return (y, mean, var), (x, mean, rstd, scale)


def _batch_norm_train_bwd(epsilon, residuals, cotangents):
    del epsilon  # in rstd
    x, mean, rstd, scale = residuals
    dy, dmean, dvar = cotangents
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    xhat = (x - mean) * rstd
    sum_dy = dy.sum(axes)
    sum_dy_xhat = (dy * xhat).sum(axes)
    dx = (scale * rstd / n) * (n * dy - sum_dy - xhat * sum_dy_xhat)
    dx = dx + (dmean + 2 * dvar * (x - mean)) / n
    return dx, sum_dy_xhat, sum_dy


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


class BatchNorm(nn.Module):
    """torch.nn.BatchNorm{1,2,3}d under flax nn.BatchNorm's names: params "scale" (gamma) and "bias"
    (beta), collection "batch_stats" with "mean" (init 0) and "var" (init 1), so trees match flax's.

    x (..., C) (features last: (N, C), NHWC, ...), statistics per channel over the other axes, n values
    each. Training (use_running_average False): y = (x - mean_b) / sqrt(var_b + epsilon) * scale + bias
    with the BIASED batch variance var_b, and (except during init) the running statistics become
        mean <- (1 - momentum) * mean + momentum * mean_b
        var  <- (1 - momentum) * var  + momentum * var_b * n / (n - 1)   (the UNBIASED batch variance)
    which is where flax's nn.BatchNorm differs (it keeps the biased variance). Eval: the running
    statistics normalise and nothing changes. `momentum` is PyTorch's: the weight of the NEW batch
    statistic (0.1; flax's momentum 0.9 is 1 - this). Statistics are computed in float32 at least.
    Training-mode gradients come from `batch_norm_train`'s closed-form VJP.
    """

    use_running_average: bool = False
    momentum: float = 0.1
    epsilon: float = 1e-5
    use_bias: bool = True
    use_scale: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    scale_init: Any = nn.initializers.ones_init()
    bias_init: Any = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                             use_running_average)
        features = x.shape[-1]
        stats_dtype = jnp.promote_types(x.dtype, jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), stats_dtype))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), stats_dtype))
        scale = (self.param("scale", self.scale_init, (features,), self.param_dtype) if self.use_scale
                 else jnp.ones((features,), self.param_dtype))
        bias = (self.param("bias", self.bias_init, (features,), self.param_dtype) if self.use_bias
                else jnp.zeros((features,), self.param_dtype))
        dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
        xf, scale, bias = (v.astype(stats_dtype) for v in (x, scale, bias))
        if use_running_average:
            y = (xf - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon) * scale + bias
            return y.astype(dtype)
        n = x.size // features
        if n < 2:
            raise ValueError(f"BatchNorm in training needs more than 1 value per channel (as PyTorch); "
                             f"got input {x.shape}")
        y, mean, var = batch_norm_train(xf, scale, bias, self.epsilon)
        if not self.is_initializing():  # var is biased (normalises this batch); the running one is not
            m = self.momentum
            ra_mean.value = (1 - m) * ra_mean.value + m * jax.lax.stop_gradient(mean)
            ra_var.value = (1 - m) * ra_var.value + m * jax.lax.stop_gradient(var) * (n / (n - 1))
        return y.astype(dtype)


class EvalMode(nn.Module):
    """`module` as PyTorch runs a model after `model.eval()`, even in training steps: it is called with
    train=False whatever `train` it is given (BatchNorm normalises with its running statistics and
    leaves them unchanged; Dropout is off); gradients flow as usual. Same variables as `module` (shared
    scope: no extra level in the trees). A module without a `train` argument is called as it is.
    """

    module: nn.Module

    def setup(self):
        nn.share_scope(self, self.module)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # PyTorch's eval mode: the caller's training flag does not reach the layers
        if "train" in inspect.signature(type(self.module).__call__).parameters:
            return self.module(x, train=False)
        return self.module(x)
