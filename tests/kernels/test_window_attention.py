"""Swin window attention: the Pallas kernel (interpret mode on CPU) against the XLA reference, and the
reference against a literal transcription of the PyTorch WindowAttention + mask construction."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental import pallas as pl
from jaxlab.kernels import backend
from jaxlab.kernels.window_attention import pallas as wa_pallas
from jaxlab.kernels.window_attention import (
    relative_position_index,
    shift_attention_mask,
    window_attention,
    window_attention_reference,
    window_cross_attention,
)

HEADS, HEAD_DIM, WINDOW = 2, 32, 7
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}  # max |error| / max |expected|


def _random_maps(seed: int, shape: tuple[int, ...], dtype, count: int) -> list[jax.Array]:
    keys = jax.random.split(jax.random.key(seed), count)
    return [jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys]


def _table(seed: int, window: int = WINDOW, heads: int = HEADS) -> jax.Array:
    return 0.5 * jax.random.normal(
        jax.random.key(seed), ((2 * window - 1) ** 2, heads), jnp.float32
    )


def _assert_close(actual, expected, tol: float, name: str) -> None:
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape, f"{name}: {actual.shape} vs {expected.shape}"
    assert np.isfinite(actual).all(), f"{name}: non-finite values"
    error = np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-6)
    assert error < tol, f"{name}: relative max error {error:.3g} >= {tol}"


def _grouped_pallas(q, k, v, **kwargs):
    """The kernel with several windows per program even on tiny inputs (the api's default keeps
    >= 256 programs, i.e. one window per program at test sizes)."""
    return wa_pallas.window_attention_pallas(
        q, k, v, max_group=2, max_backward_group=4, min_programs=1, **kwargs
    )


IMPLEMENTATIONS = {"xla": window_attention_reference, "pallas": _grouped_pallas}


def _outputs_and_grads(implementation: str, q, k, v, table, d_out, *, shift: int, pad_values=None):
    """Output and grads of <out, d_out> w.r.t. q, k, v, the table (and the pad values if given)."""

    def run(q, k, v, table, pad_values):
        return IMPLEMENTATIONS[implementation](
            q, k, v, window=WINDOW, shift=shift, rel_pos_bias_table=table, kv_pad_values=pad_values
        )

    out, vjp = jax.vjp(run, q, k, v, table, pad_values)
    return out, vjp(d_out)


def _check_against_reference(q, k, v, table, d_out, *, shift: int, pad_values=None) -> None:
    tol = TOLERANCE[q.dtype.type]
    got = _outputs_and_grads("pallas", q, k, v, table, d_out, shift=shift, pad_values=pad_values)
    want = _outputs_and_grads("xla", q, k, v, table, d_out, shift=shift, pad_values=pad_values)
    _assert_close(got[0], want[0], tol, "output")
    got_grads, want_grads = jax.tree.leaves(got[1]), jax.tree.leaves(want[1])
    names = ("dq", "dk", "dv", "dtable", "dk_pad", "dv_pad")[: len(want_grads)]
    for name, g, w in zip(names, got_grads, want_grads, strict=True):
        _assert_close(g, w, tol, name)


@pytest.mark.parametrize(
    "height, width, shift, dtype",
    [
        (14, 14, 0, jnp.float32),
        (14, 14, 3, jnp.float32),
        (10, 12, 3, jnp.float32),  # not divisible by the window: padded to 14x14
        (7, 7, 3, jnp.float32),  # one window, shift still applies (mmseg-style 7x7 stage)
        (14, 14, 3, jnp.bfloat16),
        (10, 12, 0, jnp.bfloat16),
    ],
)
def test_pallas_matches_reference(height, width, shift, dtype):
    shape = (2, height, width, HEADS, HEAD_DIM)
    q, k, v, d_out = _random_maps(height * 100 + shift, shape, dtype, 4)
    _check_against_reference(q, k, v, _table(shift), d_out, shift=shift)


def test_cross_form_with_pad_values_matches_reference():
    """Queries from one stream, keys/values from another; padded k/v tokens take given values."""
    shape = (1, 10, 12, HEADS, HEAD_DIM)
    q_depth, k_rgb, v_rgb, d_out = _random_maps(7, shape, jnp.float32, 4)
    pad_values = tuple(_random_maps(8, (HEADS, HEAD_DIM), jnp.float32, 2))
    _check_against_reference(
        q_depth, k_rgb, v_rgb, _table(9), d_out, shift=3, pad_values=pad_values
    )
    table = _table(9)  # the public cross entry point, default launch configuration
    cross = window_cross_attention(
        q_depth,
        k_rgb,
        v_rgb,
        window=WINDOW,
        shift=3,
        rel_pos_bias_table=table,
        implementation="pallas",
    )
    plain = window_attention_reference(
        q_depth, k_rgb, v_rgb, window=WINDOW, shift=3, rel_pos_bias_table=table
    )
    _assert_close(cross, plain, TOLERANCE[jnp.float32], "cross output")


def test_tpu_style_block_of_56_tokens_matches_reference():
    shape = (1, 14, 14, HEADS, HEAD_DIM)
    q, k, v = _random_maps(11, shape, jnp.float32, 3)
    table = _table(12)
    got = wa_pallas.window_attention_pallas(
        q, k, v, window=WINDOW, shift=3, rel_pos_bias_table=table, block_tokens=56
    )
    want = window_attention_reference(q, k, v, window=WINDOW, shift=3, rel_pos_bias_table=table)
    _assert_close(got, want, TOLERANCE[jnp.float32], "output (Np=56)")


def test_every_kernel_output_element_is_written():
    """Interpret mode fills outputs with NaN before the kernel runs; every element must be overwritten,
    including padded token rows and every d(bias) partial block."""
    shape = (2, 10, 12, HEADS, HEAD_DIM)
    q, k, v, d_out = _random_maps(13, shape, jnp.float32, 4)
    cfg = wa_pallas.make_config(
        shape,
        window=WINDOW,
        shift=3,
        scale=HEAD_DIM**-0.5,
        max_group=2,
        max_backward_group=4,
        min_programs=1,
    )
    assert (cfg.group, cfg.backward_group) == (2, 4)
    qw, kw, vw, dw = (wa_pallas.to_kernel_layout(x, cfg, HEAD_DIM) for x in (q, k, v, d_out))
    bias = jnp.zeros((HEADS, cfg.block_tokens, cfg.block_tokens), jnp.float32)
    outputs = [wa_pallas.forward_windows(qw, kw, vw, bias, cfg)]
    outputs += wa_pallas.backward_windows(qw, kw, vw, bias, dw, cfg)
    for name, out in zip(("out", "dq", "dk", "dv", "dbias partials"), outputs, strict=True):
        assert np.isfinite(np.asarray(out)).all(), f"{name} has unwritten (NaN) elements"


def test_interpret_mode_poisons_unwritten_outputs():
    """Guards the check above: an output block the kernel never writes stays NaN."""

    def write_first_half(x_ref, o_ref):
        o_ref[pl.ds(0, 4), :] = x_ref[pl.ds(0, 4), :]

    out = pl.pallas_call(
        write_first_half, out_shape=jax.ShapeDtypeStruct((8, 8), jnp.float32), interpret=True
    )(jnp.ones((8, 8), jnp.float32))
    assert np.isnan(np.asarray(out)[4:]).all() and np.isfinite(np.asarray(out)[:4]).all()


@pytest.mark.parametrize("implementation", ["pallas", "xla"])
def test_shift_mask_isolates_regions(implementation):
    """14x14, shift 3: token (0, 0) rolls to (11, 11), region (2, 2) of the last window, whose other
    regions hold e.g. token (13, 13); token (1, 1) shares its region. Perturbing (0, 0)'s key and
    value must leave (13, 13)'s output bit-identical (exp(-100) vanishes in f32) and move (1, 1)'s."""
    shape = (1, 14, 14, HEADS, HEAD_DIM)
    q, k, v = _random_maps(21, shape, jnp.float32, 3)
    table = _table(22)

    def attend(k, v, shift):
        return np.asarray(
            window_attention(
                q,
                k,
                v,
                window=WINDOW,
                shift=shift,
                rel_pos_bias_table=table,
                implementation=implementation,
            )
        )

    k2, v2 = k.at[0, 0, 0].add(5.0), v.at[0, 0, 0].add(5.0)
    before, after = attend(k, v, 3), attend(k2, v2, 3)
    np.testing.assert_array_equal(after[0, 13, 13], before[0, 13, 13])
    np.testing.assert_array_equal(after[0, 7, 7], before[0, 7, 7])  # other region, same window
    assert np.abs(after[0, 1, 1] - before[0, 1, 1]).max() > 1e-3
    unshifted_before, unshifted_after = (
        attend(k, v, 0),
        attend(k2, v2, 0),
    )  # shift 0: one region per window
    assert np.abs(unshifted_after[0, 6, 6] - unshifted_before[0, 6, 6]).max() > 1e-3


@pytest.mark.parametrize(
    "height, width, window, shift", [(14, 21, 7, 3), (7, 7, 7, 3), (7, 14, 7, 1), (9, 6, 3, 2)]
)
def test_in_kernel_shift_mask_equals_swin_attn_mask(height, width, window, shift):
    """The kernel's iota-built mask (evaluated outside a kernel) equals Swin's img_mask construction."""
    cfg = wa_pallas.make_config((1, height, width, 1, 16), window=window, shift=shift, scale=1.0)
    masks = wa_pallas._token_masks(cfg)
    n = window * window
    expected = shift_attention_mask(height, width, window, shift)
    for w in range(cfg.windows_per_image):
        got = wa_pallas._shift_mask(
            jnp.int32(w + cfg.windows_per_image), masks, cfg
        )  # second image
        np.testing.assert_array_equal(np.asarray(got)[:n, :n], expected[w], err_msg=f"window {w}")


def _abstract_target(target: str):
    """Context in which an export for `target` can lower without that device (jax 0.11 needs an
    abstract GPU to pick the Triton compute capability; 0.10 takes it too)."""
    if target != "cuda" or not hasattr(jax.sharding, "AbstractDevice"):
        return contextlib.nullcontext()
    device = jax.sharding.AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"
    )
    axis_types = (jax.sharding.AxisType.Explicit,)
    mesh = jax.sharding.AbstractMesh((1,), ("x",), axis_types, abstract_device=device)
    return jax.sharding.use_abstract_mesh(mesh)


@pytest.mark.parametrize(
    "target, platform, custom_call",
    [("cuda", "gpu", "__gpu$xla.gpu.triton"), ("tpu", "tpu", "tpu_custom_call")],
)
def test_kernels_lower_for_triton_and_mosaic(monkeypatch, target, platform, custom_call):
    """Forward + backward, bf16, shift 3, lowered through the real Triton / Mosaic TPU Pallas lowering
    on this CPU machine (jax.export for another platform). Catches non-power-of-two blocks, ops
    without a lowering rule and bad block shapes; it does not run the GPU/TPU compilers."""
    monkeypatch.setattr(backend, "platform", lambda: platform)  # compiler params of that backend
    monkeypatch.setattr(wa_pallas, "platform", lambda: platform)
    shape = (2, 14, 14, HEADS, HEAD_DIM)

    def forward_backward(q, k, v, table, d_out):
        def attend(q, k, v, table):
            return wa_pallas.window_attention_pallas(
                q,
                k,
                v,
                window=WINDOW,
                shift=3,
                rel_pos_bias_table=table,
                interpret=False,
                min_programs=1,
            )

        out, vjp = jax.vjp(attend, q, k, v, table)
        return out, vjp(d_out)

    maps = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    table = jax.ShapeDtypeStruct(((2 * WINDOW - 1) ** 2, HEADS), jnp.float32)
    checks = [export.DisabledSafetyCheck.custom_call(custom_call)]
    with _abstract_target(target):
        exported = export.export(
            jax.jit(forward_backward), platforms=[target], disabled_checks=checks
        )(maps, maps, maps, table, maps)
    assert exported.mlir_module().count(custom_call) >= 2  # forward and backward kernels


# ----------------------------------------------------------------------------- literal PyTorch transcription


def _torch_relative_position_index(window: int) -> np.ndarray:
    """WindowAttention.__init__, line by line."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"))  # 2, Wh, Ww
    coords_flatten = coords.reshape(2, -1)
    relative_coords = coords_flatten[:, :, None] - coords_flatten[:, None, :]
    relative_coords = relative_coords.transpose(1, 2, 0).copy()
    relative_coords[:, :, 0] += window - 1
    relative_coords[:, :, 1] += window - 1
    relative_coords[:, :, 0] *= 2 * window - 1
    return relative_coords.sum(-1)


def _torch_window_partition(x, ws):
    b, h, w, c = x.shape
    x = x.reshape(b, h // ws, ws, w // ws, ws, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, c)


def _torch_window_reverse(windows, ws, h, w):
    b = int(windows.shape[0] / (h * w / ws / ws))
    x = windows.reshape(b, h // ws, w // ws, ws, ws, -1)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, -1)


def _torch_attn_mask(h, w, ws, shift):
    """BasicLayer.forward's mask construction."""
    hp, wp = int(np.ceil(h / ws)) * ws, int(np.ceil(w / ws)) * ws
    img_mask = np.zeros((1, hp, wp, 1))
    slices = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    cnt = 0
    for hs in slices:
        for wsl in slices:
            img_mask[:, hs, wsl, :] = cnt
            cnt += 1
    mask_windows = _torch_window_partition(img_mask, ws).reshape(-1, ws * ws)
    attn_mask = mask_windows[:, None, :] - mask_windows[:, :, None]
    return np.where(attn_mask != 0, -100.0, 0.0)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _torch_swin_block_attention(x, h, w, ws, shift, heads, w_qkv, b_qkv, table):
    """SwinTransformerBlock.forward's attention part + WindowAttention.forward (no proj), float64."""
    b, _, c = x.shape
    x = x.reshape(b, h, w, c)
    pad_r, pad_b = (ws - w % ws) % ws, (ws - h % ws) % ws
    x = np.pad(x, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
    hp, wp = x.shape[1:3]
    shifted = np.roll(x, (-shift, -shift), axis=(1, 2)) if shift > 0 else x
    windows = _torch_window_partition(shifted, ws).reshape(-1, ws * ws, c)
    b_, n, _ = windows.shape
    qkv = (windows @ w_qkv + b_qkv).reshape(b_, n, 3, heads, c // heads).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * (c // heads) ** -0.5
    attn = q @ k.transpose(0, 1, 3, 2)
    bias = (
        table[_torch_relative_position_index(ws).reshape(-1)].reshape(n, n, -1).transpose(2, 0, 1)
    )
    attn = attn + bias[None]
    if shift > 0:
        mask = _torch_attn_mask(h, w, ws, shift)
        nw = mask.shape[0]
        attn = (attn.reshape(b_ // nw, nw, heads, n, n) + mask[None, :, None]).reshape(
            -1, heads, n, n
        )
    out = (_softmax(attn) @ v).transpose(0, 2, 1, 3).reshape(b_, n, c)
    shifted = _torch_window_reverse(out.reshape(-1, ws, ws, c), ws, hp, wp)
    x = np.roll(shifted, (shift, shift), axis=(1, 2)) if shift > 0 else shifted
    return x[:, :h, :w, :]


@pytest.mark.parametrize(
    "height, width, window, shift", [(6, 6, 3, 1), (5, 7, 3, 1), (3, 3, 3, 1), (5, 4, 3, 0)]
)
def test_reference_matches_literal_pytorch_transcription(height, width, window, shift):
    heads, head_dim, batch = 2, 4, 2
    channels = heads * head_dim
    rng = np.random.default_rng(height * 10 + width + shift)
    x = rng.normal(size=(batch, height * width, channels))
    w_qkv, b_qkv = rng.normal(size=(channels, 3 * channels)) * 0.5, rng.normal(size=3 * channels)
    table = rng.normal(size=((2 * window - 1) ** 2, heads))
    expected = _torch_swin_block_attention(
        x, height, width, window, shift, heads, w_qkv, b_qkv, table
    )

    qkv = (x @ w_qkv + b_qkv).reshape(batch, height, width, 3, heads, head_dim)
    q, k, v = (jnp.asarray(qkv[:, :, :, i], jnp.float32) for i in range(3))
    bias = b_qkv.reshape(3, heads, head_dim)
    got = window_attention_reference(
        q,
        k,
        v,
        window=window,
        shift=shift,
        rel_pos_bias_table=jnp.asarray(table, jnp.float32),
        kv_pad_values=(jnp.asarray(bias[1], jnp.float32), jnp.asarray(bias[2], jnp.float32)),
    )
    np.testing.assert_allclose(
        np.asarray(got).reshape(expected.shape), expected, atol=2e-5, rtol=2e-5
    )
    np.testing.assert_array_equal(
        relative_position_index(window), _torch_relative_position_index(window)
    )


# ----------------------------------------------------------------------------- dispatch and errors


def test_auto_is_xla_on_cpu():
    shape = (1, 7, 7, HEADS, HEAD_DIM)
    q, k, v = _random_maps(31, shape, jnp.float32, 3)
    table = _table(32)
    auto = window_attention(q, k, v, window=WINDOW, shift=3, rel_pos_bias_table=table)
    ref = window_attention_reference(q, k, v, window=WINDOW, shift=3, rel_pos_bias_table=table)
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(ref))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"k": jnp.zeros((1, 7, 8, HEADS, HEAD_DIM))}, "k.shape"),
        ({"rel_pos_bias_table": jnp.zeros((169, HEADS + 1))}, "rel_pos_bias_table.shape"),
        ({"shift": 7}, "shift"),
        ({"implementation": "cuda"}, "implementation"),
    ],
)
def test_errors_name_the_problem(change, message):
    q = jnp.zeros((1, 7, 7, HEADS, HEAD_DIM))
    kwargs = {
        "k": q,
        "v": q,
        "window": WINDOW,
        "shift": 3,
        "rel_pos_bias_table": jnp.zeros((169, HEADS)),
        "implementation": "xla",
    }
    kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        window_attention(q, **kwargs)
