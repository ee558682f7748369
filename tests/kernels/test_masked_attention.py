"""Masked-patch attention: the Pallas kernel body (interpret mode on CPU) against the XLA reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxlab.kernels import backend
from jaxlab.kernels.masked_attention import (
    KernelConfig,
    api,
    bench,
    gather_visible,
    masked_attention,
    masked_attention_reference,
    pallas,
    reference,
    scatter_visible,
    visible_indices,
)

from jaxlab import benchmarking

SENTINEL = 12345.0  # poison value: never a plausible attention output or gradient here


def _inputs(shape, dtype, seed=0):
    """q, k, v and an output cotangent, [batch, tokens, heads, head_dim], standard normal."""
    keys = jax.random.split(jax.random.key(seed), 4)
    return tuple(jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)


def _value_and_grads(fn, q, k, v, do):
    """(output, (dq, dk, dv)) of fn(q, k, v) under the cotangent do, all in float32."""
    out, vjp = jax.vjp(fn, q, k, v)
    grads = vjp(do.astype(out.dtype))
    return out.astype(jnp.float32), tuple(g.astype(jnp.float32) for g in grads)


def _assert_close(actual, expected, rel_tol, name):
    """Every element: |actual - expected| <= rel_tol * max|expected| (plus a tiny floor)."""
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert np.isfinite(actual).all(), f"{name}: non-finite values"
    bound = rel_tol * max(float(np.abs(expected).max()), 1e-6)
    err = float(np.abs(actual - expected).max())
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


def _check_against_reference(q, k, v, do, valid_length, rel_tol, fn):
    ref = jax.jit(lambda q, k, v: masked_attention_reference(q, k, v, valid_length))
    out, grads = jax.jit(lambda *a: _value_and_grads(fn, *a))(q, k, v, do)
    ref_out, ref_grads = _value_and_grads(ref, q, k, v, do)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
        _assert_close(a, b, rel_tol, name)


CASES = [  # (head_dim, tokens, valid_length or None, dtype, block); tokens % block != 0 for most
    (32, 64, None, jnp.float32, 32),
    (64, 100, [70, 100], jnp.float32, 32),
    (72, 157, [157, 90], jnp.float32, None),
    (128, 48, [48, 17], jnp.float32, 16),
    (64, 100, [100, 33], jnp.bfloat16, 32),
    (72, 157, [120, 157], jnp.bfloat16, None),
]


@pytest.mark.parametrize("head_dim,tokens,valid_length,dtype,block", CASES)
def test_pallas_values_and_grads_match_reference(head_dim, tokens, valid_length, dtype, block):
    q, k, v, do = _inputs((2, tokens, 2, head_dim), dtype, seed=head_dim + tokens)
    lengths = None if valid_length is None else jnp.array(valid_length)

    def fn(q, k, v):
        return masked_attention(
            q, k, v, valid_length=lengths, implementation="pallas", block_q=block, block_k=block
        )

    rel_tol = 1e-5 if dtype == jnp.float32 else 1e-2  # bf16 errors seen: 2e-3 to 5e-3
    _check_against_reference(q, k, v, do, lengths, rel_tol, fn)


def test_reference_agrees_with_jax_dot_product_attention():
    q, k, v, _ = _inputs((2, 40, 3, 16), jnp.float32, seed=1)
    lengths = jnp.array([40, 23])
    ours = masked_attention_reference(q, k, v, lengths)
    theirs = jax.nn.dot_product_attention(
        q, k, v, query_seq_lengths=lengths, key_value_seq_lengths=lengths, implementation="xla"
    )
    valid = np.asarray(reference.token_validity(lengths, 40))  # padded query rows differ by design
    np.testing.assert_allclose(np.asarray(ours)[valid], np.asarray(theirs)[valid], atol=2e-6)
    assert not np.asarray(ours)[~valid].any()


@pytest.mark.parametrize("implementation", ["pallas", "xla"])
def test_all_padding_example_is_finite_and_zero(implementation):
    q, k, v, do = _inputs((2, 40, 2, 32), jnp.float32, seed=2)
    lengths = jnp.array([0, 40])

    def fn(q, k, v):
        return masked_attention(q, k, v, valid_length=lengths, implementation=implementation)

    out, grads = jax.jit(lambda *a: _value_and_grads(fn, *a))(q, k, v, do)
    for name, x in zip(("out", "dq", "dk", "dv"), (out, *grads)):
        assert np.isfinite(np.asarray(x)).all(), name
        assert not np.asarray(x[0]).any(), f"{name} of the all-padding example is not zero"
        assert np.asarray(x[1]).any(), f"{name} of the full example is zero"


def test_padded_positions_holding_nan_do_not_leak():
    q, k, v, do = _inputs((2, 50, 2, 32), jnp.float32, seed=3)
    lengths = jnp.array([50, 29])
    padded = ~np.asarray(reference.token_validity(lengths, 50))[:, :, None, None]
    q_nan, k_nan, v_nan, do_nan = (jnp.where(padded, jnp.nan, x) for x in (q, k, v, do))

    def fn(q, k, v):
        return masked_attention(q, k, v, valid_length=lengths, implementation="pallas")

    out, grads = jax.jit(lambda *a: _value_and_grads(fn, *a))(q_nan, k_nan, v_nan, do_nan)
    ref = jax.jit(lambda q, k, v: masked_attention_reference(q, k, v, lengths))
    ref_out, ref_grads = _value_and_grads(ref, q, k, v, jnp.where(padded, 0.0, do))
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
        _assert_close(a, b, 1e-5, name)


@pytest.mark.parametrize("target", ["gpu", "tpu"])
def test_poisoned_outputs_are_all_overwritten(target):
    """Every output buffer (o, lse, dq, dk, dv) starts as SENTINEL, aliased into the kernel."""
    q, k, v, do = _inputs((2, 45, 2, 72), jnp.float32, seed=4)
    lengths = jnp.array([45, 20])
    config = KernelConfig(32, 16, 16, 32, target=target, interpret=True, poison=SENTINEL)

    def fn(q, k, v):
        return pallas.masked_attention_pallas(q, k, v, lengths, config=config)

    out, grads = jax.jit(lambda *a: _value_and_grads(fn, *a))(q, k, v, do)
    for name, x in zip(("out", "dq", "dk", "dv"), (out, *grads)):
        assert not np.isin(np.asarray(x), SENTINEL).any(), f"{name} kept poisoned elements"
    _check_against_reference(q, k, v, do, lengths, 1e-5, fn)


def test_poison_reaches_unwritten_elements(monkeypatch):
    """The poison check can fail: a kernel that writes nothing leaves every element poisoned."""
    monkeypatch.setattr(pallas, "_forward_kernel", lambda *refs, **kw: None)
    q, k, v, _ = _inputs((1, 32, 1, 32), jnp.float32)
    config = KernelConfig(16, 16, 16, 16, interpret=True, poison=SENTINEL)
    out = pallas.masked_attention_pallas(q, k, v, config=config)
    assert (np.asarray(out) == SENTINEL).all()


def test_fully_padded_blocks_are_skipped():
    """Loop bounds: blocks past the valid length are never visited; padding-only programs do none."""
    visit = jax.jit(pallas._blocks_to_visit, static_argnums=2)
    assert int(visit(0, 100, 32)) == 4  # 100 valid tokens -> blocks 0..3
    assert int(visit(64, 65, 32)) == 3  # own block holds token 64 -> blocks 0..2
    assert int(visit(96, 70, 32)) == 0  # own block is all padding -> no work
    assert int(visit(0, 0, 32)) == 0


@pytest.mark.parametrize(
    "plat,expected_impl,expected_target",
    [("cpu", "xla", "gpu"), ("gpu", "pallas", "gpu"), ("tpu", "pallas", "tpu")],
)
def test_dispatcher_choice_per_backend(monkeypatch, plat, expected_impl, expected_target):
    monkeypatch.setattr(backend, "platform", lambda: plat)
    assert api.choose_implementation("auto") == expected_impl
    assert api.choose_implementation("xla") == "xla"
    assert api.choose_implementation("pallas") == "pallas"
    config = pallas.default_config(784, 72)
    assert config.target == expected_target
    assert config.interpret == (plat == "cpu")
    assert pallas.padded_head_dim(72, config.target) == 128
    assert pallas.default_config(784, 64, block_q=32, block_k=16).block_k_bwd == 16

    calls = []
    monkeypatch.setattr(api, "masked_attention_pallas", lambda *a, **kw: calls.append("pallas"))
    q = jnp.zeros((1, 8, 1, 16))
    out = masked_attention(q, q, q)
    assert calls == (["pallas"] if expected_impl == "pallas" else [])
    if expected_impl == "xla":
        assert out.shape == q.shape


def test_small_sequences_are_not_over_padded():
    config = pallas.default_config(20, 64, interpret=True)
    assert config.token_multiple == 32


def test_bad_inputs_raise_clear_errors():
    q = jnp.zeros((2, 16, 2, 32))
    with pytest.raises(
        ValueError, match=r"k has shape \(2, 15, 2, 32\) but q has shape \(2, 16, 2, 32\)"
    ):
        masked_attention(q, q[:, :15], q)
    with pytest.raises(ValueError, match="v has dtype bfloat16"):
        masked_attention(q, q, q.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match=r"valid_length has shape \(3,\)"):
        masked_attention(q, q, q, valid_length=jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match="implementation="):
        masked_attention(q, q, q, implementation="cuda")
    with pytest.raises(ValueError, match="block_q=48 must be a power of two"):
        masked_attention(q, q, q, implementation="pallas", block_q=48)
    with pytest.raises(ValueError, match="target="):
        KernelConfig(32, 32, 32, 32, target="cuda")


def test_visible_tokens_round_trip():
    batch, tokens, channels, num_visible = 3, 12, 5, 6
    hidden = jnp.arange(tokens) >= num_visible
    mask = jnp.stack([jax.random.permutation(jax.random.key(i), hidden) for i in range(batch)])
    x = jax.random.normal(jax.random.key(6), (batch, tokens, channels))
    mask_token = jnp.full((channels,), -7.0)

    indices, lengths = visible_indices(mask, num_visible)
    assert (np.diff(np.asarray(indices), axis=1) > 0).all(), "indices are not sorted"
    assert (np.asarray(lengths) == num_visible).all()
    visible = gather_visible(x, indices)
    np.testing.assert_array_equal(
        visible, np.asarray(x)[~np.asarray(mask)].reshape(batch, -1, channels)
    )
    restored = scatter_visible(visible, indices, tokens, mask_token)
    expected = jnp.where(mask[..., None], mask_token, x)
    np.testing.assert_array_equal(restored, expected)


def test_visible_tokens_with_fewer_visible_than_count():
    mask = jnp.array([[False, True, False, True, True, True], [False] * 3 + [True] * 3])
    indices, lengths = visible_indices(mask, 3)
    np.testing.assert_array_equal(lengths, [2, 3])
    np.testing.assert_array_equal(indices[:, :2], [[0, 2], [0, 1]])
    x = jnp.arange(12.0).reshape(2, 6, 1)
    restored = scatter_visible(gather_visible(x, indices), indices, 6, jnp.zeros(1), lengths)
    np.testing.assert_array_equal(restored[..., 0], jnp.where(mask, 0.0, x[..., 0]))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("plat,lowering_platform", [("gpu", "cuda"), ("tpu", "tpu")])
def test_kernels_lower_for_triton_and_mosaic(monkeypatch, plat, lowering_platform, dtype):
    """Cross-platform lowering on CPU: the Triton (GPU) and Mosaic (TPU) lowerings accept every
    kernel (forward, dk/dv, dq) with the default blocks. Compiling and running need the device."""
    monkeypatch.setattr(backend, "platform", lambda: plat)
    x = jax.ShapeDtypeStruct((2, 157, 3, 72), dtype)
    lengths = jax.ShapeDtypeStruct((2,), jnp.int32)

    def loss(q, k, v, valid_length):
        out = masked_attention(q, k, v, valid_length=valid_length)
        return out.astype(jnp.float32).sum()

    grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    text = grad_fn.trace(x, x, x, lengths).lower(lowering_platforms=(lowering_platform,)).as_text()
    kernel_call = "xla.gpu.triton" if plat == "gpu" else "tpu_custom_call"
    assert text.count(kernel_call) == 3  # forward, dk/dv, dq


def test_bench_writes_its_section(monkeypatch, tmp_path):
    """bench.run at tiny shapes: the table and the CPU target land in a BENCHMARKS.md section."""
    monkeypatch.setattr(bench, "SHAPES", (("tiny", 2, 24, 2, 16),))
    monkeypatch.setattr(bench, "TARGET_SHAPE", (32, 2, 16))
    monkeypatch.setattr(benchmarking, "BENCHMARKS_FILE", tmp_path / "BENCHMARKS.md")
    body = bench.run(quick=True, write=True)
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "<!-- begin:kernels-masked-attention-cpu -->" in text and body.strip() in text
    assert body.count("| tiny | 1,24,2,16 |") == 4  # float32/bfloat16 x fwd/fwd+bwd, XLA only
    assert "| fwd+bwd |" in body.split("CPU target")[1]
