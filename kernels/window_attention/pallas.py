"""Fused Swin shifted-window attention in Pallas: forward and backward kernels behind a jax.custom_vjp.

Kernel layout (built in XLA around the kernel):

    q, k, v, out:  [heads, B * nW * Np, Dp]   rows = (image, window, token), windows row-major
    bias:          [heads, Np, Np] float32    relative position bias, gathered from the table

Np is the window's N = w*w tokens padded to `block_tokens` (49 -> 64: Triton needs power-of-two
blocks); padded keys are masked out and padded query rows are dropped. Dp is head_dim, padded to a
power of two >= 16 on GPU only (zeros: they change no dot product; the extra output columns are
cropped).

Grid (heads, B * nW / G): a program owns G windows of one head and loops over them (no batched dot
inside a Triton kernel). Per window it computes logits = (q * scale) k^T + bias + shift mask, softmax
and PV in f32 (bf16 inputs: bf16 dots with f32 accumulation). The shift mask is rebuilt from the
window index and a token iota (`_token_masks`, `_shift_mask`): no (nW, N, N) mask is read.

The backward kernel recomputes the probabilities (a whole window fits, so nothing is saved but the
inputs), writes dq, dk, dv per window and accumulates d(bias) over its G windows in registers: the
output is [heads, (B * nW / G) * Np, Np] partial sums, reduced by a tiny XLA sum (and the table
gather's transpose, a scatter-add into [(2w-1)^2, heads]); no (B * nW, heads, N, N) tensor exists.

What is done in XLA, not in index maps: the pad, cyclic roll and window partition (and their inverse)
are one fused XLA copy per tensor each way. A window is a 7x7 spatial block at a non-block-aligned
offset once rolled (and wraps around at the edge), and Triton blocks must be powers of two, so
neither backend's Blocked index maps can address it directly. The table gather (heads * N * N
values, batch independent) is also done in XLA, since an in-kernel gather does not lower on Triton.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jaxlab.kernels.backend import compiler_params, interpret_mode, platform
from jaxlab.kernels.window_attention.reference import (
    SHIFT_MASK_VALUE,
    PadValues,
    default_scale,
    from_windows,
    padded_size,
    relative_position_bias,
    to_windows,
    validate_inputs,
)

Array = jax.Array
PAD_LOGIT = -0.7 * float(np.finfo(np.float32).max)  # padded keys: exp() is exactly 0, never NaN
MIN_PROGRAMS = 256  # keep enough programs in flight to fill a GPU (132 SMs on H100)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static description of one launch (hashable: it is a custom_vjp non-diff argument)."""

    window: int
    shift: int
    windows_h: int  # windows along the padded height
    windows_w: int  # windows along the padded width
    block_tokens: int  # Np: tokens per window, padded
    scale: float
    group: int  # windows per program, forward
    backward_group: int  # windows per program, backward
    interpret: bool

    @property
    def tokens(self) -> int:
        return self.window * self.window

    @property
    def windows_per_image(self) -> int:
        return self.windows_h * self.windows_w


def default_block_tokens(tokens: int) -> int:
    """Tokens per window padded to a power of two >= 16 (Triton blocks and dot minimum)."""
    return max(16, pl.next_power_of_2(tokens))


def default_head_dim_block(head_dim: int) -> int:
    """Head dim as the kernel sees it: a power of two >= 16 on GPU (Triton), unchanged elsewhere."""
    return max(16, pl.next_power_of_2(head_dim)) if platform() == "gpu" else head_dim


def choose_group(
    total_windows: int, heads: int, max_group: int, min_programs: int = MIN_PROGRAMS
) -> int:
    """Windows per program: the largest power of two <= max_group dividing total_windows that keeps
    at least min_programs programs (or 1)."""
    group = 1
    while (
        group * 2 <= max_group
        and total_windows % (group * 2) == 0
        and heads * total_windows // (group * 2) >= min_programs
    ):
        group *= 2
    return group


# ----------------------------------------------------------------------------- kernel body helpers


def _dot(a: Array, b: Array, *, trans_a: bool = False, trans_b: bool = False) -> Array:
    """2-D matmul with optional transposes and float32 accumulation."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _token_row_col(tokens: Array, window: int) -> tuple[Array, Array]:
    """Row and column inside the window of int32 token ids (division done exactly in float32, which
    every backend lowers)."""
    row = jnp.floor((tokens.astype(jnp.float32) + 0.5) * (1.0 / window)).astype(jnp.int32)
    return row, tokens - row * window


class _TokenMasks(NamedTuple):
    """Window-independent [Np, Np] boolean masks over (query token, key token)."""

    key_valid: Array  # key is a real token, not padding
    row_cut: Array | None  # float 1.0 where query and key lie on different sides of the row cut
    col_cut: Array | None  # same for columns (floats, not bools: no scalar-bool broadcasts needed)


def _token_masks(cfg: KernelConfig) -> _TokenMasks:
    """Token masks from iotas. In the rolled frame, only the last window row (column) straddles
    a region boundary, at in-window row (column) window - shift."""
    shape = (cfg.block_tokens, cfg.block_tokens)
    query, key = (
        lax.broadcasted_iota(jnp.int32, shape, 0),
        lax.broadcasted_iota(jnp.int32, shape, 1),
    )
    key_valid = key < cfg.tokens
    if not cfg.shift:
        return _TokenMasks(key_valid, None, None)
    cut = cfg.window - cfg.shift
    query_row, query_col = _token_row_col(query, cfg.window)
    key_row, key_col = _token_row_col(key, cfg.window)
    row_cut = jnp.where((query_row < cut) != (key_row < cut), 1.0, 0.0)
    col_cut = jnp.where((query_col < cut) != (key_col < cut), 1.0, 0.0)
    return _TokenMasks(key_valid, row_cut, col_cut)


def _shift_mask(window_index: Array, masks: _TokenMasks, cfg: KernelConfig) -> Array:
    """Swin's -100 / 0 shift mask [Np, Np] for the window with global index `window_index`.

    Matches the img_mask regions: windows not in the last row (column) lie entirely in row
    (column) region 0; the last row (column) splits into regions 1 and 2 at window - shift.
    """
    in_image = lax.rem(window_index, cfg.windows_per_image)
    # Scalar flags as float casts: a scalar jnp.where(flag, 1.0, 0.0) breaks the Triton lowering.
    last_row = (in_image >= cfg.windows_per_image - cfg.windows_w).astype(jnp.float32)
    last_col = (lax.rem(in_image, cfg.windows_w) == cfg.windows_w - 1).astype(jnp.float32)
    crosses = jnp.maximum(last_row * masks.row_cut, last_col * masks.col_cut)  # exactly 0 or 1
    return SHIFT_MASK_VALUE * crosses


def _probabilities(
    q_scaled: Array,
    k: Array,
    bias: Array,
    window_index: Array,
    masks: _TokenMasks,
    cfg: KernelConfig,
) -> Array:
    """softmax((q * scale) k^T + bias + shift mask) over real keys: float32 [Np, Np]."""
    logits = _dot(q_scaled, k, trans_b=True) + bias
    if cfg.shift:
        logits = logits + _shift_mask(window_index, masks, cfg)
    logits = jnp.where(masks.key_valid, logits, PAD_LOGIT)
    unnormalised = jnp.exp(logits - jnp.max(logits, axis=1)[:, None])
    return unnormalised / jnp.sum(unnormalised, axis=1)[:, None]


def _scaled(q: Array, scale: float) -> Array:
    """q * scale in float32, back in q's dtype (Swin scales q before QK)."""
    return (q.astype(jnp.float32) * scale).astype(q.dtype)


def _window_rows(w: Array, block_tokens: int) -> pl.Slice:
    """Rows of window `w` (0 <= w < G) inside a program's block."""
    return pl.ds(pl.multiple_of(w * block_tokens, block_tokens), block_tokens)


# ----------------------------------------------------------------------------- kernels


def _forward_kernel(bias_ref, q_ref, k_ref, v_ref, o_ref, *, cfg: KernelConfig, group: int):
    """One program: G windows of one head. Refs: bias [Np, Np], q/k/v/o [G * Np, Dp]."""
    masks = _token_masks(cfg)
    bias = bias_ref[...]
    first_window = pl.program_id(1) * group

    def one_window(w, carry):
        rows = _window_rows(w, cfg.block_tokens)
        v = v_ref[rows, :]
        q = _scaled(q_ref[rows, :], cfg.scale)
        probs = _probabilities(q, k_ref[rows, :], bias, first_window + w, masks, cfg)
        o_ref[rows, :] = _dot(probs.astype(v.dtype), v).astype(o_ref.dtype)
        return carry

    lax.fori_loop(0, group, one_window, 0)


def _backward_kernel(
    bias_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    dq_ref,
    dk_ref,
    dv_ref,
    dbias_ref,
    *,
    cfg: KernelConfig,
    group: int,
):
    """One program: gradients of G windows of one head; dbias_ref [Np, Np] gets their d(bias) sum.

    dS = P * (dP - rowsum(P * dP)) with dP = dO V^T; dq = scale * dS K, dk = dS^T (q * scale),
    dv = P^T dO, d(bias) = sum over windows of dS.
    """
    masks = _token_masks(cfg)
    bias = bias_ref[...]
    first_window = pl.program_id(1) * group

    def one_window(w, dbias):
        rows = _window_rows(w, cfg.block_tokens)
        q = _scaled(q_ref[rows, :], cfg.scale)
        k, v, do = k_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
        probs = _probabilities(q, k, bias, first_window + w, masks, cfg)
        dprobs = _dot(do, v, trans_b=True)
        dlogits = probs * (dprobs - jnp.sum(probs * dprobs, axis=1)[:, None])
        dv_ref[rows, :] = _dot(probs.astype(do.dtype), do, trans_a=True).astype(dv_ref.dtype)
        dq_ref[rows, :] = (_dot(dlogits.astype(k.dtype), k) * cfg.scale).astype(dq_ref.dtype)
        dk_ref[rows, :] = _dot(dlogits.astype(q.dtype), q, trans_a=True).astype(dk_ref.dtype)
        return dbias + dlogits

    zeros = jnp.zeros((cfg.block_tokens, cfg.block_tokens), jnp.float32)
    dbias_ref[...] = lax.fori_loop(0, group, one_window, zeros)


# ----------------------------------------------------------------------------- pallas_call builders


class _Specs(NamedTuple):
    """Block specs on the grid (heads h, window groups g)."""

    rows: pl.BlockSpec  # q, k, v, o and their grads: G windows of head h
    bias: pl.BlockSpec  # head h's [Np, Np] bias, the same for every g
    bias_partials: (
        pl.BlockSpec
    )  # program (h, g)'s d(bias) sum, block (h, g) of [heads, groups * Np, Np]


def _block_specs(cfg: KernelConfig, group: int, head_dim: int) -> _Specs:
    tokens = cfg.block_tokens
    return _Specs(
        rows=pl.BlockSpec((None, group * tokens, head_dim), lambda h, g: (h, g, 0)),
        bias=pl.BlockSpec((None, tokens, tokens), lambda h, g: (h, 0, 0)),
        bias_partials=pl.BlockSpec((None, tokens, tokens), lambda h, g: (h, g, 0)),
    )


def _grid(q: Array, cfg: KernelConfig, group: int) -> tuple[int, int]:
    heads, total_rows, _ = q.shape
    return heads, total_rows // (group * cfg.block_tokens)


def _cost(q: Array, cfg: KernelConfig, matmuls: int, tensors: int) -> pl.CostEstimate:
    """Rough cost for XLA's scheduler: `matmuls` Np x Np x Dp products per (window, head)."""
    heads, total_rows, head_dim = q.shape
    windows = heads * total_rows // cfg.block_tokens
    return pl.CostEstimate(
        flops=2 * matmuls * windows * cfg.block_tokens**2 * head_dim,
        transcendentals=windows * cfg.block_tokens**2,
        bytes_accessed=tensors * q.size * q.dtype.itemsize,
    )


def forward_windows(q: Array, k: Array, v: Array, bias: Array, cfg: KernelConfig) -> Array:
    """Forward kernel on the kernel layout: q, k, v [heads, B*nW*Np, Dp], bias [heads, Np, Np] f32."""
    specs = _block_specs(cfg, cfg.group, q.shape[2])
    kernel = functools.partial(
        _forward_kernel, cfg=cfg, group=cfg.group
    )  # fresh per call: jax#40847
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=_grid(q, cfg, cfg.group),
        in_specs=[specs.bias, specs.rows, specs.rows, specs.rows],
        out_specs=specs.rows,
        interpret=cfg.interpret,
        compiler_params=compiler_params(
            num_warps=4, num_stages=2, dimension_semantics=("parallel", "parallel")
        ),
        cost_estimate=_cost(q, cfg, matmuls=2, tensors=4),
        name="swin_window_attention_fwd",
    )(bias, q, k, v)


def backward_windows(
    q: Array, k: Array, v: Array, bias: Array, d_out: Array, cfg: KernelConfig
) -> tuple[Array, Array, Array, Array]:
    """Backward kernel: returns dq, dk, dv (q's layout and dtype) and d(bias) partial sums
    [heads, (B*nW/G) * Np, Np] float32, one [Np, Np] block per program."""
    group = cfg.backward_group
    specs = _block_specs(cfg, group, q.shape[2])
    heads, num_groups = _grid(q, cfg, group)
    dbias_shape = jax.ShapeDtypeStruct(
        (heads, num_groups * cfg.block_tokens, cfg.block_tokens), jnp.float32
    )
    grad_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
    kernel = functools.partial(_backward_kernel, cfg=cfg, group=group)  # fresh per call: jax#40847
    return pl.pallas_call(
        kernel,
        out_shape=(grad_shape, grad_shape, grad_shape, dbias_shape),
        grid=(heads, num_groups),
        in_specs=[specs.bias, specs.rows, specs.rows, specs.rows, specs.rows],
        out_specs=(specs.rows, specs.rows, specs.rows, specs.bias_partials),
        interpret=cfg.interpret,
        compiler_params=compiler_params(
            num_warps=4, num_stages=1, dimension_semantics=("parallel", "parallel")
        ),
        cost_estimate=_cost(q, cfg, matmuls=5, tensors=7),
        name="swin_window_attention_bwd",
    )(bias, q, k, v, d_out)


# ----------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attend_windows(q: Array, k: Array, v: Array, bias: Array, cfg: KernelConfig) -> Array:
    """Differentiable fused window attention on the kernel layout (see module docstring)."""
    return forward_windows(q, k, v, bias, cfg)


def _attend_windows_fwd(q, k, v, bias, cfg):
    return forward_windows(q, k, v, bias, cfg), (q, k, v, bias)


def _attend_windows_bwd(cfg, residuals, d_out):
    q, k, v, bias = residuals
    dq, dk, dv, dbias_parts = backward_windows(q, k, v, bias, d_out, cfg)
    heads, np_ = bias.shape[0], cfg.block_tokens
    dbias = dbias_parts.reshape(heads, -1, np_, np_).sum(axis=1)
    return dq, dk, dv, dbias.astype(bias.dtype)


attend_windows.defvjp(_attend_windows_fwd, _attend_windows_bwd)


# ----------------------------------------------------------------------------- layout + entry point


def to_kernel_layout(
    x: Array, cfg: KernelConfig, head_dim_block: int, pad_value: Array | None = None
) -> Array:
    """[B, H, W, heads, d] -> [heads, B*nW*Np, Dp]: pad map, roll, partition, pad tokens and d."""
    windows = to_windows(x, cfg.window, cfg.shift, pad_value)  # [B, nW, N, heads, d]
    b, nw, n, heads, d = windows.shape
    windows = jnp.pad(
        windows, ((0, 0), (0, 0), (0, cfg.block_tokens - n), (0, 0), (0, head_dim_block - d))
    )
    return windows.transpose(3, 0, 1, 2, 4).reshape(
        heads, b * nw * cfg.block_tokens, head_dim_block
    )


def from_kernel_layout(y: Array, cfg: KernelConfig, map_shape: tuple[int, ...]) -> Array:
    """Inverse of to_kernel_layout: [heads, B*nW*Np, Dp] -> map_shape [B, H, W, heads, d]."""
    batch, height, width, heads, head_dim = map_shape
    y = y.reshape(heads, batch, cfg.windows_per_image, cfg.block_tokens, -1)
    y = y[:, :, :, : cfg.tokens, :head_dim].transpose(1, 2, 3, 0, 4)
    return from_windows(y, cfg.window, cfg.shift, height, width)


def make_config(
    q_shape: tuple[int, ...],
    *,
    window: int,
    shift: int,
    scale: float,
    block_tokens: int | None = None,
    max_group: int = 8,
    max_backward_group: int = 16,
    min_programs: int = MIN_PROGRAMS,
    interpret: bool | None = None,
) -> KernelConfig:
    """Static launch configuration for maps of shape q_shape [B, H, W, heads, d]."""
    batch, height, width, heads, _ = q_shape
    windows_h, windows_w = (
        padded_size(height, window) // window,
        padded_size(width, window) // window,
    )
    block_tokens = default_block_tokens(window * window) if block_tokens is None else block_tokens
    if block_tokens < window * window or block_tokens % 8:
        raise ValueError(
            f"block_tokens={block_tokens} must be a multiple of 8 and >= window**2={window**2}"
        )
    total = batch * windows_h * windows_w
    return KernelConfig(
        window=window,
        shift=shift,
        windows_h=windows_h,
        windows_w=windows_w,
        block_tokens=block_tokens,
        scale=float(scale),
        group=choose_group(total, heads, max_group, min_programs),
        backward_group=choose_group(total, heads, max_backward_group, min_programs),
        interpret=interpret_mode() if interpret is None else interpret,
    )


def window_attention_pallas(
    q: Array,
    k: Array,
    v: Array,
    *,
    window: int,
    shift: int,
    rel_pos_bias_table: Array,
    scale: float | None = None,
    kv_pad_values: PadValues = None,
    **launch_options,
) -> Array:
    """Shifted-window attention with the fused kernel; same contract as window_attention_reference.

    q, k, v: [B, H, W, heads, d]; rel_pos_bias_table: [(2w-1)^2, heads]; returns [B, H, W, heads, d]
    in q's dtype. Differentiable in q, k, v, the table and kv_pad_values. launch_options go to
    make_config: block_tokens (Np, default next power of two), max_group / max_backward_group
    (windows per program), min_programs (groups shrink below that), interpret.
    """
    validate_inputs(q, k, v, window=window, shift=shift, rel_pos_bias_table=rel_pos_bias_table)
    head_dim = q.shape[-1]
    scale = default_scale(head_dim) if scale is None else scale
    cfg = make_config(q.shape, window=window, shift=shift, scale=scale, **launch_options)
    head_dim_block = default_head_dim_block(head_dim)
    k_pad, v_pad = (None, None) if kv_pad_values is None else kv_pad_values
    qw = to_kernel_layout(q, cfg, head_dim_block)
    kw = to_kernel_layout(k, cfg, head_dim_block, k_pad)
    vw = to_kernel_layout(v, cfg, head_dim_block, v_pad)
    pad = cfg.block_tokens - cfg.tokens
    bias = jnp.pad(
        relative_position_bias(rel_pos_bias_table.astype(jnp.float32), window),
        ((0, 0), (0, pad), (0, pad)),
    )
    out = attend_windows(qw, kw, vw, bias, cfg)
    return from_kernel_layout(out, cfg, q.shape)
