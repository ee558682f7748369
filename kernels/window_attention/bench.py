"""Benchmark of Swin window attention at Swin-T stage shapes: `jaxlab bench kernels` or
`python -m jaxlab.kernels.window_attention.bench [--quick] [--no-write]`.

Shapes: the four Swin-T stages (56x56 C=96 H=3, 28x28 C=192 H=6, 14x14 C=384 H=12, 7x7 C=768 H=24;
window 7, head dim 32), shift 0 and 3, float32 and bfloat16, forward and forward+backward (grads of
q, k, v and the bias table). Paths: the fused Pallas kernel and the XLA reference on GPU/TPU; on CPU
only the XLA path (interpret-mode Pallas is far too slow to time), with a smaller batch.

The op is memory-bound, so the figure of merit is effective bandwidth: Q, K, V, O (forward) or Q, K,
V, O, dO, dQ, dK, dV (forward+backward) counted once each, over the median time, compared with the
device's copy bandwidth measured in the same run (in-place x + 1 sweeps over a large array: read +
write). Memory is XLA's compiled working set (temporaries + outputs) of each timed function; a
pallas_call's internal buffers are not in it, its outputs are.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxlab.kernels import backend
from jaxlab.kernels.window_attention.api import window_attention
from jaxlab.kernels.window_attention.reference import (
    from_windows,
    padded_size,
    relative_position_bias,
    shift_attention_mask,
    to_windows,
)

from jaxlab import benchmarking as bm

WINDOW, SHIFTS, HEAD_DIM = 7, (0, 3), 32
STAGES = (  # (name, map side, channels, heads)
    ("stage 1", 56, 96, 3),
    ("stage 2", 28, 192, 6),
    ("stage 3", 14, 384, 12),
    ("stage 4", 7, 768, 24),
)
DTYPES = (jnp.float32, jnp.bfloat16)
BATCH = {"accelerator": 32, "accelerator-quick": 8, "cpu": 4, "cpu-quick": 1}
HEADER = ("stage", "B,H,W,C/heads", "shift", "dtype", "pass", "path", "ms", "eff GB/s", "% copy BW", "vs XLA", "vs cuDNN",
          "mem MiB")  # fmt: skip


def copy_bandwidth_gbs(num_bytes: int, iters: int, passes: int = 10) -> float:
    """Measured device bandwidth in GB/s: `passes` in-place x + 1 sweeps over a float32 array of
    num_bytes inside one computation (bytes read + bytes written per second). In one computation the
    buffer is reused, so fresh-allocation costs (page faults on CPU) stay out of the figure."""
    sweep = jax.jit(lambda x: jax.lax.fori_loop(0, passes, lambda _, y: y + 1.0, x))
    arrays = [(jnp.full((num_bytes // 4,), float(i), jnp.float32),) for i in range(2)]
    seconds = bm.time_fn(sweep, arrays, iters=iters)["median_s"]
    return 2 * passes * num_bytes / seconds / 1e9


def _cudnn_attention(q, k, v, table, *, shift: int):
    """Comparison path on GPU: XLA pad/roll/partition, then jax.nn.dot_product_attention on cuDNN
    with the bias + shift mask materialised as a (B * nW, heads, N, N) tensor."""
    batch, height, width, heads, _ = q.shape
    windows = [
        to_windows(x, WINDOW, shift).reshape(-1, WINDOW**2, heads, x.shape[-1]) for x in (q, k, v)
    ]
    bias = relative_position_bias(table, WINDOW)[None]  # 1, heads, N, N
    if shift:
        mask = shift_attention_mask(
            padded_size(height, WINDOW), padded_size(width, WINDOW), WINDOW, shift
        )
        bias = bias + mask[:, None]  # nW, heads, N, N
    windows_per_image = windows[0].shape[0] // batch
    bias = jnp.broadcast_to(bias, (windows_per_image, *bias.shape[1:]))
    bias = jnp.tile(bias, (batch, 1, 1, 1))  # rows are (image, window), image-major
    out = jax.nn.dot_product_attention(*windows, bias=bias.astype(q.dtype), implementation="cudnn")
    return from_windows(
        out.reshape(batch, -1, WINDOW**2, heads, q.shape[-1]), WINDOW, shift, height, width
    )


def _attention(path: str, shift: int) -> Callable:
    """(q, k, v, table) -> output on one path ("pallas", "xla" or "cudnn")."""
    if path == "cudnn":
        return functools.partial(_cudnn_attention, shift=shift)

    def attend(q, k, v, table):
        return window_attention(
            q, k, v, window=WINDOW, shift=shift, rel_pos_bias_table=table, implementation=path
        )

    return attend


def _with_backward(attention: Callable) -> Callable:
    """(q, k, v, table, do) -> (dq, dk, dv, dtable): forward plus backward under the cotangent do."""

    def grads(q, k, v, table, do):
        _, vjp = jax.vjp(attention, q, k, v, table)
        return vjp(do)

    return grads


def _arg_sets(
    shape: tuple[int, ...], heads: int, dtype, with_cotangent: bool, count: int
) -> list[tuple]:
    """`count` independent (q, k, v, table[, do]) sets, rotated while timing so caches do not hold them."""
    sets = []
    for i in range(count):
        keys = jax.random.split(jax.random.key(i), 5)
        q, k, v, do = (jax.random.normal(key, shape, dtype) for key in keys[:4])
        table = 0.02 * jax.random.normal(keys[4], ((2 * WINDOW - 1) ** 2, heads), jnp.float32)
        sets.append((q, k, v, table, do) if with_cotangent else (q, k, v, table))
    return sets


def _measure(fn: Callable, arg_sets: list[tuple], iters: int) -> tuple[float, float | None]:
    """(median seconds, compiled working memory in MiB) of jit(fn) over the rotated arg sets."""
    compiled = jax.jit(fn).lower(*arg_sets[0]).compile()
    stats = compiled.memory_analysis()
    mem = None if stats is None else (stats.temp_size_in_bytes + stats.output_size_in_bytes) / 2**20
    return bm.time_fn(compiled, arg_sets, warmup=2, iters=iters)["median_s"], mem


def _ratio(results: dict, reference: str, seconds: float) -> float | None:
    """reference path's time / this time (> 1: faster than the reference), None without it."""
    reference_seconds = results.get(reference, (None,))[0]
    return reference_seconds / seconds if reference_seconds else None


def _paths(platform: str, dtype) -> list[str]:
    """Timed paths: XLA only on CPU; Pallas and XLA elsewhere, plus cuDNN on GPU in half precision."""
    if platform == "cpu":
        return ["xla"]
    return ["pallas", "xla"] + (["cudnn"] if platform == "gpu" and dtype != jnp.float32 else [])


def _config_rows(stage, shape, shift, dtype, platform, copy_gbs, iters, sets) -> list[list]:
    """Rows for one (stage, shift, dtype): every path, forward and forward+backward."""
    batch, side, _, heads, head_dim = shape
    map_bytes = batch * side * side * heads * head_dim * jnp.dtype(dtype).itemsize
    label = [
        stage,
        f"{batch},{side},{side},{heads * head_dim}/{heads}",
        shift,
        jnp.dtype(dtype).name,
    ]
    rows = []
    for pass_name, tensors in (("fwd", 4), ("fwd+bwd", 8)):
        args = _arg_sets(shape, heads, dtype, pass_name != "fwd", sets)
        results = {}
        for path in _paths(platform, dtype):
            fn = _attention(path, shift)
            fn = fn if pass_name == "fwd" else _with_backward(fn)
            try:
                results[path] = _measure(fn, args, iters)
            except Exception as err:  # noqa: BLE001  (untested backends: a lowering error becomes a row)
                results[path] = (
                    None,
                    f"error: {type(err).__name__}: {str(err).splitlines()[0][:80]}",
                )
        for path, (seconds, mem) in results.items():
            if seconds is None:
                rows.append([*label, pass_name, path, None, None, None, None, None, mem])
                continue
            gbs = tensors * map_bytes / seconds / 1e9
            ratios = [_ratio(results, ref, seconds) for ref in ("xla", "cudnn")]
            rows.append(
                [*label, pass_name, path, seconds * 1e3, gbs, 100 * gbs / copy_gbs, *ratios, mem]
            )
    return rows


def run(quick: bool = False, write: bool = True) -> str:
    """Times every stage/shift/dtype/pass, prints the table and (if write) replaces this platform's
    section of BENCHMARKS.md. Returns the markdown body."""
    platform = backend.platform()
    on_cpu = platform == "cpu"
    batch = BATCH[("cpu" if on_cpu else "accelerator") + ("-quick" if quick else "")]
    iters = (5 if quick else 10) if on_cpu else (10 if quick else 30)
    copy_gbs = copy_bandwidth_gbs((2**28 if on_cpu else 2**30) // (4 if quick else 1), iters)
    rows = []
    for stage, side, channels, heads in STAGES:
        shape = (batch, side, side, heads, channels // heads)
        for shift in SHIFTS:
            for dtype in DTYPES:
                rows += _config_rows(
                    stage, shape, shift, dtype, platform, copy_gbs, iters, sets=2 if on_cpu else 3
                )
    peak = bm.peak_device_memory_bytes()
    notes = [
        f"### Swin window attention ({platform}{', quick' if quick else ''})",
        "",
        bm.environment_line(),
        f"window {WINDOW}, head dim {HEAD_DIM}, batch {batch}; measured copy bandwidth {copy_gbs:.1f} GB/s"
        + ("" if peak is None else f"; process peak device memory {peak / 2**30:.2f} GiB"),
        "eff GB/s counts Q, K, V, O (fwd) or Q, K, V, O, dO, dQ, dK, dV (fwd+bwd) once each; vs XLA = XLA "
        "time / this path's time; mem = compiled temporaries + outputs."
        + (" CPU: XLA path only (interpret-mode Pallas is not timed)." if on_cpu else ""),
        "",
        bm.markdown_table(HEADER, rows),
    ]
    body = "\n".join(notes)
    print(body)
    if write:
        bm.write_section(f"kernels-window-attention-{platform}", body)
    return body


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batch and fewer iterations")
    parser.add_argument(
        "--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone"
    )
    args = parser.parse_args(argv)
    run(quick=args.quick, write=not args.no_write)


if __name__ == "__main__":
    main()
