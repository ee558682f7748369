"""Flash-style masked attention in Pallas: online-softmax forward, custom_vjp backward from the saved LSE.

Public entry: `masked_attention_pallas(q, k, v, valid_length, ...)` over [batch, tokens, heads, head_dim].

How it maps to the hardware:
- The wrapper pads tokens to a multiple of the largest block and head_dim to what the backend needs
  (GPU/Triton: a power of two; TPU/Mosaic: a multiple of 128), with zeros.
- Forward grid (batch, heads, query blocks): each program keeps a [block_q, head_dim] query tile and
  loops over key blocks with an online softmax, so no [tokens, tokens] matrix exists anywhere. It
  writes the output tile and the log-sum-exp (base 2) of each row.
- Backward: two kernels recompute the probabilities from the LSE: one per key block (dk, dv; loops
  over query blocks), one per query block (dq; loops over key blocks). delta = rowsum(o * do) is a
  cheap XLA reduction.
- Masking: per-example valid_length, read as a scalar. Loops stop at the last key/query block that
  holds a valid token, so blocks that are entirely padding are skipped (and a query block that is
  entirely padding does no work at all, it only writes zeros). Padded rows of loaded tiles are
  zeroed, so whatever padded positions hold never reaches valid outputs or gradients.
- Targets: "gpu" keeps the [batch, tokens, heads, dim] layout (tiles are strided, which Triton reads
  directly) and passes valid_length as an ordinary operand; "tpu" transposes to [batch, heads,
  tokens, dim] (Mosaic wants the last two block dims to be (tokens, dim)) and passes valid_length
  through scalar prefetch (SMEM). On CPU the "gpu" structure runs in interpret mode.
- Each pallas_call gets a freshly built functools.partial kernel (stale-trace bug jax#40847).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jaxlab.kernels import backend
from jaxlab.kernels.masked_attention.reference import check_inputs, default_scale

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: masked logits never make inf - inf
LOG2_E = math.log2(math.e)
TARGETS = ("gpu", "tpu")

# (block_q, block_k, block_q_bwd, block_k_bwd) per target; "cpu" is interpret mode (few, big steps).
DEFAULT_BLOCKS = {
    "gpu": (128, 64, 64, 64),
    "tpu": (128, 128, 128, 128),
    "cpu": (64, 64, 64, 64),
}

_NN = ((1,), (0,))  # a @ b
_NT = ((1,), (1,))  # a @ b.T
_TN = ((0,), (0,))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static kernel settings (hashable: passed as a non-differentiable custom_vjp argument).

    target: "gpu" (Triton structure, also used in interpret mode) or "tpu" (Mosaic structure).
    poison: for tests; when set, every output buffer is pre-filled with this value and aliased into
    the call, so an element the kernel fails to write keeps it.
    """

    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    target: str = "gpu"
    interpret: bool = False
    num_warps: int = 4
    num_stages: int = 2
    poison: float | None = None

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"target={self.target!r} is not one of {TARGETS}")
        smallest = 16 if self.target == "gpu" else 8  # Triton dots need >= 16; Mosaic sublanes 8
        for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
            size = getattr(self, name)
            if size < smallest or size & (size - 1):
                raise ValueError(
                    f"{name}={size} must be a power of two >= {smallest} for target {self.target!r}"
                )

    @property
    def token_multiple(self) -> int:
        """Tokens are padded to a multiple of this (every block divides it: all are powers of two)."""
        return max(self.block_q, self.block_k, self.block_q_bwd, self.block_k_bwd)


def padded_head_dim(head_dim: int, target: str) -> int:
    """head_dim rounded up to what the target's matmuls take (72 -> 128 on both)."""
    if target == "tpu":
        return -(-head_dim // 128) * 128
    return max(16, pl.next_power_of_2(head_dim))


def default_config(
    tokens: int,
    head_dim: int,
    *,
    block_q: int | None = None,
    block_k: int | None = None,
    target: str | None = None,
    interpret: bool | None = None,
) -> KernelConfig:
    """Block sizes for this backend and shape; block_q/block_k override forward and backward blocks.

    Default blocks shrink to the next power of two of `tokens` so short sequences are not over-padded.
    """
    platform = backend.platform()
    target = target or ("tpu" if platform == "tpu" else "gpu")
    interpret = backend.interpret_mode() if interpret is None else interpret
    defaults = DEFAULT_BLOCKS["cpu" if interpret else target]
    cap = max(16, pl.next_power_of_2(tokens))
    fq, fk, bq, bk = (min(size, cap) for size in defaults)
    wide = padded_head_dim(head_dim, target) > 64
    return KernelConfig(
        block_q=block_q or fq,
        block_k=block_k or fk,
        block_q_bwd=block_q or bq,
        block_k_bwd=block_k or bk,
        target=target,
        interpret=interpret,
        num_warps=8 if wide else 4,
        num_stages=2,
    )


# ----------------------------------------------------------------------------- in-kernel helpers


def _dot(a: jax.Array, b: jax.Array, contract) -> jax.Array:
    """2-D matmul with float32 accumulation; `contract` is one of _NN, _NT, _TN."""
    return lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


def _rows_valid(start, size: int, length) -> jax.Array:
    """bool [size, 1]: row start + i is a valid token."""
    return start + lax.broadcasted_iota(jnp.int32, (size, 1), 0) < length


def _cols_valid(start, size: int, length) -> jax.Array:
    """bool [1, size]: column start + j is a valid token."""
    return start + lax.broadcasted_iota(jnp.int32, (1, size), 1) < length


def _zero_padded_rows(tile: jax.Array, start, length) -> jax.Array:
    """tile [rows, dim] with rows at or past `length` set to zero (whatever they held)."""
    return jnp.where(_rows_valid(start, tile.shape[0], length), tile, jnp.zeros_like(tile))


def _blocks_to_visit(own_start, length, block: int):
    """How many `block`-sized blocks hold valid tokens; 0 when this program's own block is padding."""
    return jnp.where(own_start < length, lax.div(length + block - 1, block), 0)


def _tile(ref, index, block: int) -> jax.Array:
    """Rows [index * block, (index + 1) * block) of a whole-sequence ref."""
    return ref[pl.ds(pl.multiple_of(index * block, block), block), :]


def _probabilities(q, k, lse, q_start, k_start, length, scale):
    """Softmax probabilities [bq, bk] recomputed from the saved base-2 LSE; zero on padded pairs."""
    logits = _dot(q, k, _NT) * (scale * LOG2_E)
    valid = _rows_valid(q_start, q.shape[0], length) & _cols_valid(k_start, k.shape[0], length)
    return jnp.where(valid, jnp.exp2(logits - lse), 0.0)


# ----------------------------------------------------------------------------- kernels


def _forward_kernel(length_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, block_k: int, scale: float):
    """One (batch, head, query block): online softmax over the key blocks that hold valid tokens.

    q_ref/o_ref: [block_q, dim] tiles; k_ref/v_ref: [tokens, dim] whole sequence; lse_ref: [block_q, 1].
    """
    length = length_ref[pl.program_id(0)]
    block_q, dim = q_ref.shape
    q_start = pl.program_id(2) * block_q
    q = q_ref[...]

    def step(j, carry):
        acc, row_max, row_sum = carry
        k_start = j * block_k
        k = _tile(k_ref, j, block_k)
        v = _zero_padded_rows(_tile(v_ref, j, block_k), k_start, length)
        logits = _dot(q, k, _NT) * (scale * LOG2_E)
        logits = jnp.where(_cols_valid(k_start, block_k, length), logits, MASK_VALUE)
        new_max = jnp.maximum(row_max, jnp.max(logits, axis=1, keepdims=True))
        correction = jnp.exp2(row_max - new_max)
        p = jnp.exp2(logits - new_max)
        row_sum = correction * row_sum + jnp.sum(p, axis=1, keepdims=True)
        acc = correction * acc + _dot(p.astype(v.dtype), v, _NN)
        return acc, new_max, row_sum

    init = (
        jnp.zeros((block_q, dim), jnp.float32),
        jnp.full((block_q, 1), -jnp.inf, jnp.float32),
        jnp.zeros((block_q, 1), jnp.float32),
    )
    acc, row_max, row_sum = lax.fori_loop(0, _blocks_to_visit(q_start, length, block_k), step, init)
    valid = _rows_valid(q_start, block_q, length)
    safe_sum = jnp.where(row_sum > 0, row_sum, 1.0)
    o_ref[...] = jnp.where(valid, acc / safe_sum, 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(valid, row_max + jnp.log2(safe_sum), 0.0)


def _dkv_kernel(
    length_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
    *, block_q: int, scale: float,
):  # fmt: skip
    """One (batch, head, key block): dk, dv accumulated over the query blocks that hold valid tokens.

    k_ref/v_ref/dk_ref/dv_ref: [block_k, dim] tiles; q_ref/do_ref: [tokens, dim]; lse/delta: [tokens, 1].
    """
    length = length_ref[pl.program_id(0)]
    block_k, dim = k_ref.shape
    k_start = pl.program_id(2) * block_k
    k = k_ref[...]
    v = _zero_padded_rows(v_ref[...], k_start, length)

    def step(i, carry):
        dk, dv = carry
        q_start = i * block_q
        q = _zero_padded_rows(_tile(q_ref, i, block_q), q_start, length)
        do = _zero_padded_rows(_tile(do_ref, i, block_q), q_start, length)
        p = _probabilities(q, k, _tile(lse_ref, i, block_q), q_start, k_start, length, scale)
        dv = dv + _dot(p.astype(do.dtype), do, _TN)
        ds = p * (_dot(do, v, _NT) - _tile(delta_ref, i, block_q))
        dk = dk + _dot(ds.astype(q.dtype), q, _TN)
        return dk, dv

    zeros = jnp.zeros((block_k, dim), jnp.float32)
    dk, dv = lax.fori_loop(0, _blocks_to_visit(k_start, length, block_q), step, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(
    length_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref,
    *, block_k: int, scale: float,
):  # fmt: skip
    """One (batch, head, query block): dq accumulated over the key blocks that hold valid tokens.

    q_ref/do_ref/dq_ref: [block_q, dim] tiles; lse/delta: [block_q, 1]; k_ref/v_ref: [tokens, dim].
    """
    length = length_ref[pl.program_id(0)]
    block_q, dim = q_ref.shape
    q_start = pl.program_id(2) * block_q
    q = _zero_padded_rows(q_ref[...], q_start, length)
    do = _zero_padded_rows(do_ref[...], q_start, length)
    lse, delta = lse_ref[...], delta_ref[...]

    def step(j, dq):
        k_start = j * block_k
        k = _zero_padded_rows(_tile(k_ref, j, block_k), k_start, length)
        v = _zero_padded_rows(_tile(v_ref, j, block_k), k_start, length)
        p = _probabilities(q, k, lse, q_start, k_start, length, scale)
        ds = p * (_dot(do, v, _NT) - delta)
        return dq + _dot(ds.astype(k.dtype), k, _NN)

    dq = lax.fori_loop(
        0, _blocks_to_visit(q_start, length, block_k), step, jnp.zeros((block_q, dim), jnp.float32)
    )
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


# ----------------------------------------------------------------------------- pallas_call plumbing


def _token_spec(config: KernelConfig, block: int, dim: int, tiled: bool) -> pl.BlockSpec:
    """Spec for a kernel-layout operand: a `block`-token tile at grid axis 2, or the whole sequence."""

    def index(i):
        return i if tiled else 0

    if config.target == "tpu":  # [batch, heads, tokens, dim]
        return pl.BlockSpec((None, None, block, dim), lambda b, h, i, *_: (b, h, index(i), 0))
    return pl.BlockSpec((None, block, None, dim), lambda b, h, i, *_: (b, index(i), h, 0))


def _row_stat_spec(block: int, tiled: bool) -> pl.BlockSpec:
    """Spec for a [batch, heads, tokens, 1] float32 row statistic (lse, delta)."""
    if tiled:
        return pl.BlockSpec((None, None, block, 1), lambda b, h, i, *_: (b, h, i, 0))
    return pl.BlockSpec((None, None, block, 1), lambda b, h, i, *_: (b, h, 0, 0))


def _skip_refs(kernel: Callable, start: int, count: int) -> Callable:
    """Drops refs [start, start + count) before calling `kernel` (the aliased poison inputs)."""

    def wrapped(*refs):
        return kernel(*refs[:start], *refs[start + count :])

    return wrapped


def _call(
    kernel: Callable,
    config: KernelConfig,
    *,
    grid: tuple[int, int, int],
    valid_length: jax.Array,
    operands: Sequence[jax.Array],
    in_specs: Sequence[pl.BlockSpec],
    out_shape: Sequence[jax.ShapeDtypeStruct],
    out_specs: Sequence[pl.BlockSpec],
    name: str,
):
    """Runs `kernel(length_ref, *operand_refs, *out_refs)` over `grid` on the configured backend."""
    operands, in_specs, aliases = list(operands), list(in_specs), {}
    if config.poison is not None:
        first = 1 + len(operands)  # operand index counts valid_length
        kernel = _skip_refs(kernel, first, len(out_shape))
        operands += [jnp.full(s.shape, config.poison, s.dtype) for s in out_shape]
        in_specs += list(out_specs)
        aliases = {first + j: j for j in range(len(out_shape))}
    params = backend.compiler_params(
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        dimension_semantics=("parallel", "parallel", "parallel"),
    )
    common = {
        "out_shape": list(out_shape),
        "input_output_aliases": aliases,
        "interpret": config.interpret,
        "compiler_params": None if config.interpret else params,
        "name": name,
    }
    if config.target == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=grid, in_specs=in_specs, out_specs=list(out_specs)
        )
        call = pl.pallas_call(kernel, grid_spec=grid_spec, **common)
    else:
        length_spec = pl.BlockSpec(valid_length.shape, lambda *_: (0,))
        call = pl.pallas_call(
            kernel,
            grid=grid,
            in_specs=[length_spec, *in_specs],
            out_specs=list(out_specs),
            **common,
        )
    return call(valid_length, *operands)


def _grid(x: jax.Array, config: KernelConfig, block: int) -> tuple[int, int, int]:
    """(batch, heads, token blocks) for a kernel-layout array."""
    if config.target == "tpu":
        batch, heads, tokens, _ = x.shape
    else:
        batch, tokens, heads, _ = x.shape
    return batch, heads, tokens // block


def _stat_shape(x: jax.Array, config: KernelConfig) -> jax.ShapeDtypeStruct:
    """[batch, heads, tokens, 1] float32 for a kernel-layout array."""
    batch, heads, tokens = _grid(x, config, 1)
    return jax.ShapeDtypeStruct((batch, heads, tokens, 1), jnp.float32)


def _forward(q, k, v, valid_length, scale: float, config: KernelConfig):
    """Kernel-layout q, k, v -> (o like q, lse [batch, heads, tokens, 1] float32, base 2)."""
    tokens, dim = _grid(q, config, 1)[2], q.shape[-1]
    bq = config.block_q
    kernel = functools.partial(_forward_kernel, block_k=config.block_k, scale=scale)
    o, lse = _call(
        kernel,
        config,
        grid=_grid(q, config, bq),
        valid_length=valid_length,
        operands=(q, k, v),
        in_specs=[
            _token_spec(config, bq, dim, tiled=True),
            _token_spec(config, tokens, dim, tiled=False),
            _token_spec(config, tokens, dim, tiled=False),
        ],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), _stat_shape(q, config)],
        out_specs=[_token_spec(config, bq, dim, tiled=True), _row_stat_spec(bq, tiled=True)],
        name="masked_attention_forward",
    )
    return o, lse


def _row_dot(o, do, valid_length, config: KernelConfig) -> jax.Array:
    """delta = rowsum(o * do) in float32 [batch, heads, tokens, 1]; zero on padded rows (do may be NaN)."""
    token_axis = 2 if config.target == "tpu" else 1
    shape = [1, 1, 1, 1]
    shape[token_axis] = o.shape[token_axis]
    tokens = jnp.arange(o.shape[token_axis]).reshape(shape)
    valid = tokens < valid_length.reshape(-1, 1, 1, 1)
    products = jnp.where(valid, o.astype(jnp.float32) * do.astype(jnp.float32), 0.0)
    delta = jnp.sum(products, axis=-1, keepdims=True)
    return delta if config.target == "tpu" else delta.transpose(0, 2, 1, 3)


def _backward(q, k, v, valid_length, o, lse, do, scale: float, config: KernelConfig):
    """Kernel-layout residuals and output cotangent -> (dq, dk, dv), each like q."""
    tokens, dim = _grid(q, config, 1)[2], q.shape[-1]
    bq, bk = config.block_q_bwd, config.block_k_bwd
    operands = (q, k, v, do, lse, _row_dot(o, do, valid_length, config))
    like_q = jax.ShapeDtypeStruct(q.shape, q.dtype)

    def specs(q_tiled: bool, q_block: int, k_block: int) -> list[pl.BlockSpec]:
        q_spec = _token_spec(config, q_block, dim, tiled=q_tiled)
        k_spec = _token_spec(config, k_block, dim, tiled=not q_tiled)
        stat = _row_stat_spec(q_block, tiled=q_tiled)
        return [q_spec, k_spec, k_spec, q_spec, stat, stat]

    call = functools.partial(_call, config=config, valid_length=valid_length, operands=operands)
    dk, dv = call(
        functools.partial(_dkv_kernel, block_q=bq, scale=scale),
        grid=_grid(k, config, bk),
        in_specs=specs(q_tiled=False, q_block=tokens, k_block=bk),
        out_shape=[like_q, like_q],
        out_specs=[_token_spec(config, bk, dim, tiled=True)] * 2,
        name="masked_attention_backward_dkv",
    )
    (dq,) = call(
        functools.partial(_dq_kernel, block_k=bk, scale=scale),
        grid=_grid(q, config, bq),
        in_specs=specs(q_tiled=True, q_block=bq, k_block=tokens),
        out_shape=[like_q],
        out_specs=[_token_spec(config, bq, dim, tiled=True)],
        name="masked_attention_backward_dq",
    )
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash_attention(q, k, v, valid_length, scale: float, config: KernelConfig):
    """Kernel-layout attention; differentiable in q, k, v through the Pallas backward kernels."""
    return _forward(q, k, v, valid_length, scale, config)[0]


def _flash_attention_fwd(q, k, v, valid_length, scale, config):
    o, lse = _forward(q, k, v, valid_length, scale, config)
    return o, (q, k, v, valid_length, o, lse)


def _flash_attention_bwd(scale, config, residuals, do):
    q, k, v, valid_length, o, lse = residuals
    dq, dk, dv = _backward(q, k, v, valid_length, o, lse, do, scale, config)
    return dq, dk, dv, None


_flash_attention.defvjp(_flash_attention_fwd, _flash_attention_bwd)


# ----------------------------------------------------------------------------- public entry


def _to_kernel_layout(x: jax.Array, tokens: int, dim: int, target: str) -> jax.Array:
    """[B, T, H, D] -> zero-padded [B, tokens, H, dim] (gpu) or [B, H, tokens, dim] (tpu)."""
    pad = ((0, 0), (0, tokens - x.shape[1]), (0, 0), (0, dim - x.shape[3]))
    x = jnp.pad(x, pad) if any(p[1] for p in pad) else x
    return x.transpose(0, 2, 1, 3) if target == "tpu" else x


def _from_kernel_layout(x: jax.Array, tokens: int, dim: int, target: str) -> jax.Array:
    """Inverse of _to_kernel_layout: back to [B, tokens, H, dim] without the padding."""
    x = x.transpose(0, 2, 1, 3) if target == "tpu" else x
    return x[:, :tokens, :, :dim]


def masked_attention_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    valid_length: jax.Array | None = None,
    *,
    scale: float | None = None,
    config: KernelConfig | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> jax.Array:
    """Masked attention through the Pallas kernels. q, k, v: [batch, tokens, heads, head_dim].

    valid_length: int [batch] or None (all valid). Returns [batch, tokens, heads, head_dim] in q's
    dtype; rows of padded queries are zero. Differentiable in q, k, v (custom_vjp).
    config: full kernel settings; otherwise default_config(tokens, head_dim, block_q=, block_k=).
    """
    valid_length = check_inputs(q, k, v, valid_length)
    _, tokens, _, head_dim = q.shape
    scale = default_scale(head_dim) if scale is None else float(scale)
    if config is None:
        config = default_config(tokens, head_dim, block_q=block_q, block_k=block_k)
    padded_tokens = -(-tokens // config.token_multiple) * config.token_multiple
    dim = padded_head_dim(head_dim, config.target)
    q, k, v = (_to_kernel_layout(x, padded_tokens, dim, config.target) for x in (q, k, v))
    o = _flash_attention(q, k, v, valid_length, scale, config)
    return _from_kernel_layout(o, tokens, head_dim, config.target)
