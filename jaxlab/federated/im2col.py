"""1D convolutions as im2col matmuls (patches @ kernel), for client functions that loop and vmap on CPU.

Why: on XLA CPU a convolution inside a while loop (lax.scan over a client's local steps) runs ~10x
slower than the same convolution outside one (measured on the ECG CNN: 80 ms vs 7 ms for 10 steps of
32 beats), and jax.vmap of a convolution over per-client weights becomes a grouped convolution that is
slow too. A 1D convolution written as `patches (B, L, k*Cin) @ kernel.reshape(k*Cin, Cout)` is a plain
dot: fast inside loops and it vmaps into a batched matmul. Same parameters, same result to float
rounding (summation order differs), so it is an execution detail, not a model change.

`im2col_convs(fn)` runs fn with every flax `nn.Conv` call it makes (at trace time) replaced by the
im2col form when the conv is 1D, stride 1, undilated, ungrouped, unmasked, with explicit/SAME/VALID
padding; any other conv, and `init` (no kernel yet), go to flax unchanged. Parameter trees are
identical, so params trained either way are interchangeable.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

CONV_IMPLS = ("im2col", "lax")


def conv1d_im2col(x: jax.Array, kernel: jax.Array, padding: tuple[int, int]) -> jax.Array:
    """x (B, L, Cin), kernel (k, Cin, Cout), stride 1 -> (B, L + lo + hi - k + 1, Cout)."""
    k = kernel.shape[0]
    lo, hi = padding
    xp = jnp.pad(x, ((0, 0), (lo, hi), (0, 0)))
    out_len = xp.shape[1] - k + 1
    patches = jnp.concatenate([xp[:, j : j + out_len] for j in range(k)], axis=-1)
    return patches @ kernel.reshape(k * kernel.shape[1], kernel.shape[2])


def _ones(x: Any) -> bool:
    return x is None or x == 1 or (isinstance(x, Sequence) and all(v == 1 for v in x))


def _padding_1d(padding: Any, k: int) -> tuple[int, int] | None:
    if isinstance(padding, str):
        if padding.upper() == "VALID":
            return (0, 0)
        if padding.upper() == "SAME":
            return ((k - 1) // 2, k // 2)
        return None
    if isinstance(padding, int):
        return (padding, padding)
    pads = list(padding)
    if len(pads) == 1 and isinstance(pads[0], Sequence):
        return tuple(pads[0])  # type: ignore[return-value]
    if len(pads) == 1 and isinstance(pads[0], int):
        return (pads[0], pads[0])
    return None


def _supported(m: nn.Conv, inputs: jax.Array) -> tuple[int, int] | None:
    """Padding (lo, hi) if this conv call can run as im2col, else None."""
    ks = (m.kernel_size,) if isinstance(m.kernel_size, int) else tuple(m.kernel_size)
    if len(ks) != 1 or inputs.ndim < 2 or not m.has_variable("params", "kernel"):
        return None
    if not (_ones(m.strides) and _ones(m.input_dilation) and _ones(m.kernel_dilation)):
        return None
    if m.feature_group_count != 1 or m.mask is not None or m.conv_general_dilated_cls is not None:
        return None
    if m.conv_general_dilated is not None:
        return None
    return _padding_1d(m.padding, ks[0])


def _interceptor(next_fun, args, kwargs, context):
    m = context.module
    if type(m) is not nn.Conv or context.method_name != "__call__" or len(args) != 1 or kwargs:
        return next_fun(*args, **kwargs)
    (inputs,) = args
    pad = _supported(m, inputs)
    if pad is None:
        return next_fun(*args, **kwargs)
    kernel = m.get_variable("params", "kernel")
    bias = m.get_variable("params", "bias") if m.use_bias else None
    dtype = m.dtype or jnp.result_type(inputs, kernel)
    batch_shape = inputs.shape[:-2]
    x = inputs.reshape((-1,) + inputs.shape[-2:]).astype(dtype)
    y = conv1d_im2col(x, kernel.astype(dtype), pad)
    if bias is not None:
        y = y + bias.astype(dtype)
    return y.reshape(batch_shape + y.shape[1:])


def im2col_convs(fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn with its flax 1D nn.Conv calls run as im2col matmuls (see module docstring)."""

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
