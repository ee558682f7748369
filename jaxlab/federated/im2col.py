"""Convolutions as im2col matmuls (patches @ kernel), for client functions that loop and vmap on CPU.

Why: on XLA CPU a convolution inside a while loop (lax.scan over a client's local steps) runs 10-20x
slower than the same convolution outside one (ECG CNN: 80 ms vs 7 ms for 10 steps of 32 beats;
ResNet-20 train step at batch 32: 2.2 s vs 0.13 s), and jax.vmap of a convolution over per-client
weights becomes a grouped convolution that is slow too. A convolution written as
`patches (B, *out, prod(k)*Cin) @ kernel.reshape(prod(k)*Cin, Cout)` is a plain dot: fast inside loops,
and it vmaps into a batched matmul. Same parameters, same result to float rounding (summation order
differs), so it is an execution detail, not a model change.

`im2col_convs(fn)` runs fn with every flax `nn.Conv` call it makes (at trace time) replaced by the
im2col form when the conv is 1D or 2D, undilated, unmasked, with explicit/SAME/VALID padding, any
strides and feature groups (depthwise included: a per-group contraction); any other conv, and `init`
(no kernel yet), go to flax unchanged. Parameter trees are identical, so params trained either way
are interchangeable.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

CONV_IMPLS = ("im2col", "lax")


def conv_im2col(
    x: jax.Array,
    kernel: jax.Array,
    padding: Sequence[tuple[int, int]],
    strides: Sequence[int] | None = None,
    groups: int = 1,
) -> jax.Array:
    """x (B, *spatial, Cin), kernel (*k, Cin / groups, Cout), explicit padding per spatial dim ->
    (B, *out, Cout), out_i = (L_i + lo_i + hi_i - k_i) // s_i + 1 (lax.conv_general_dilated's result)."""
    ks = kernel.shape[:-2]
    nd = len(ks)
    strides = tuple(strides or (1,) * nd)
    xp = jnp.pad(x, ((0, 0), *map(tuple, padding), (0, 0)))
    out = [(xp.shape[1 + i] - ks[i]) // strides[i] + 1 for i in range(nd)]

    def window(offsets):
        idx = tuple(slice(o, o + s * (n - 1) + 1, s) for o, s, n in zip(offsets, strides, out))
        return xp[(slice(None), *idx)]

    cin, cout = x.shape[-1], kernel.shape[-1]
    taps = list(itertools.product(*(range(k) for k in ks)))
    if groups == 1:  # (B, *out, K * Cin) @ (K * Cin, Cout), K = prod(k), tap-major as the kernel
        patches = jnp.concatenate([window(t) for t in taps], axis=-1)
        return patches @ kernel.reshape(len(taps) * cin, cout)
    patches = jnp.stack([window(t) for t in taps], axis=-2)  # (B, *out, K, Cin)
    patches = patches.reshape(*patches.shape[:-1], groups, cin // groups)
    w = kernel.reshape(len(taps), cin // groups, groups, cout // groups)
    y = jnp.einsum("...kgc,kcgo->...go", patches, w)
    return y.reshape(*y.shape[:-2], cout)


def conv1d_im2col(x: jax.Array, kernel: jax.Array, padding: tuple[int, int]) -> jax.Array:
    """x (B, L, Cin), kernel (k, Cin, Cout), stride 1 -> (B, L + lo + hi - k + 1, Cout)."""
    return conv_im2col(x, kernel, [padding])


def _ones(x: Any) -> bool:
    return x is None or x == 1 or (isinstance(x, Sequence) and all(v == 1 for v in x))


def _tuple(x: Any, nd: int) -> tuple[int, ...]:
    if x is None:
        return (1,) * nd
    return (x,) * nd if isinstance(x, int) else tuple(x)


def _padding(padding: Any, ks: tuple[int, ...], sizes: tuple[int, ...], strides: tuple[int, ...]):
    """Explicit [(lo, hi)] per spatial dim for flax's padding forms, or None if unsupported."""
    if isinstance(padding, str):
        if padding.upper() == "VALID":
            return [(0, 0)] * len(ks)
        if padding.upper() == "SAME":  # lax: total = max((ceil(L / s) - 1) * s + k - L, 0), lo = total // 2
            totals = [max((-(-n // s) - 1) * s + k - n, 0) for n, s, k in zip(sizes, strides, ks)]
            return [(t // 2, t - t // 2) for t in totals]
        return None
    if isinstance(padding, int):
        return [(padding, padding)] * len(ks)
    pads = list(padding)
    if len(pads) != len(ks):
        return None
    return [(p, p) if isinstance(p, int) else tuple(p) for p in pads]


def _supported(m: nn.Conv, inputs: jax.Array):
    """(padding, strides) if this conv call can run as im2col, else None."""
    ks = (m.kernel_size,) if isinstance(m.kernel_size, int) else tuple(m.kernel_size)
    nd = len(ks)
    if nd not in (1, 2) or inputs.ndim < nd + 1 or not m.has_variable("params", "kernel"):
        return None
    if not (_ones(m.input_dilation) and _ones(m.kernel_dilation)):
        return None
    if m.mask is not None or m.conv_general_dilated_cls is not None:
        return None
    if m.conv_general_dilated is not None:
        return None
    strides = _tuple(m.strides, nd)
    pads = _padding(m.padding, ks, tuple(inputs.shape[-nd - 1 : -1]), strides)
    return None if pads is None else (pads, strides)


def _interceptor(next_fun, args, kwargs, context):
    m = context.module
    if type(m) is not nn.Conv or context.method_name != "__call__" or len(args) != 1 or kwargs:
        return next_fun(*args, **kwargs)
    (inputs,) = args
    plan = _supported(m, inputs)
    if plan is None:
        return next_fun(*args, **kwargs)
    pads, strides = plan
    kernel = m.get_variable("params", "kernel")
    bias = m.get_variable("params", "bias") if m.use_bias else None
    dtype = m.dtype or jnp.result_type(inputs, kernel)
    nd = len(pads)
    batch_shape = inputs.shape[: -nd - 1]
    x = inputs.reshape((-1,) + inputs.shape[-nd - 1 :]).astype(dtype)
    y = conv_im2col(x, kernel.astype(dtype), pads, strides, m.feature_group_count)
    if bias is not None:
        y = y + bias.astype(dtype)
    return y.reshape(batch_shape + y.shape[1:])


def im2col_convs(fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn with its flax 1D / 2D nn.Conv calls run as im2col matmuls (see module docstring)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with nn.intercept_methods(_interceptor):
            return fn(*args, **kwargs)

    return wrapped


def with_conv_impl(fn: Callable[..., Any], conv_impl: str) -> Callable[..., Any]:
    """fn unchanged for "lax", im2col_convs(fn) for "im2col"."""
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
    return im2col_convs(fn) if conv_impl == "im2col" else fn
