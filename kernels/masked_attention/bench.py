"""Benchmark of masked-patch attention at MAR shapes: `jaxlab bench kernels` or `python -m ...bench`.

Paths: the Pallas kernel and the XLA path (the float32 reference) on GPU/TPU, plus
jax.nn.dot_product_attention(implementation="cudnn") on GPU (half precision only); on CPU only the
XLA path (interpret-mode Pallas is far too slow to time), with a smaller batch, plus the CPU target:
attention over the 50% visible tokens (gather included) against full-token attention.

FLOPs follow the FlashAttention papers: forward 4 * B * H * T^2 * D; forward+backward 3.5x that.
Memory is XLA's compiled working set (temporaries + outputs) of each timed function.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxlab.kernels import backend
from jaxlab.kernels.masked_attention.api import masked_attention
from jaxlab.kernels.masked_attention.visible_tokens import gather_visible

from jaxlab import benchmarking as bm

# (name, batch on accelerators, tokens, heads, head_dim)
SHAPES = (
    ("ViT-B encoder, 50% visible", 8, 784, 12, 64),
    ("ViT-B decoder, all tokens", 8, 1568, 6, 64),
    ("ViT-L encoder, 50% visible", 4, 784, 16, 64),
    ("VideoMAE pre-train, 10% visible", 32, 157, 12, 64),
)
DTYPES = (jnp.float32, jnp.bfloat16)
CPU_TARGET = 0.55  # 50%-token attention time / full-token attention time, at most
TARGET_SHAPE = (1568, 12, 64)  # ViT-B over all tokens: (tokens, heads, head_dim)
FORWARD_TARGET = 300.0  # TFLOP/s, decoder shape, bf16 forward, on an H100
HEADER = (
    "shape",
    "B,T,H,D",
    "dtype",
    "pass",
    "path",
    "ms",
    "TFLOP/s",
    "vs XLA",
    "vs cuDNN",
    "mem MiB",
)


def _attention_fn(path: str) -> Callable:
    """(q, k, v) -> output for a path: "pallas", "xla" or "cudnn"."""
    if path == "cudnn":
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    return lambda q, k, v: masked_attention(q, k, v, implementation=path)


def _with_backward(attention: Callable) -> Callable:
    """(q, k, v, do) -> (dq, dk, dv): forward plus backward under the cotangent do."""

    def grads(q, k, v, do):
        _, vjp = jax.vjp(attention, q, k, v)
        return vjp(do)

    return grads


def _arg_sets(shape, dtype, with_cotangent: bool, count: int) -> list[tuple]:
    """`count` independent input sets (rotated while timing, so caches do not hold them)."""
    n = 4 if with_cotangent else 3
    sets = []
    for i in range(count):
        keys = jax.random.split(jax.random.key(i), n)
        sets.append(tuple(jax.random.normal(key, shape, dtype) for key in keys))
    return sets


def _measure(fn: Callable, arg_sets: list[tuple], iters: int) -> tuple[float, float]:
    """(median seconds, compiled working memory in MiB) of fn over the rotated arg sets."""
    compiled = jax.jit(fn).lower(*arg_sets[0]).compile()
    stats = compiled.memory_analysis()
    mem = None if stats is None else (stats.temp_size_in_bytes + stats.output_size_in_bytes) / 2**20
    return bm.time_fn(compiled, arg_sets, warmup=2, iters=iters)["median_s"], mem


def _paths(platform: str, dtype) -> list[str]:
    """Paths timed on this platform for this dtype (cuDNN attention takes half precision only)."""
    if platform == "cpu":
        return ["xla"]
    paths = ["pallas", "xla"]
    if platform == "gpu" and dtype != jnp.float32:
        paths.append("cudnn")
    return paths


def _shape_rows(name, shape, dtype, platform, iters, sets) -> list[list]:
    """Rows for one shape and dtype: every path, forward and forward+backward."""
    batch, tokens, heads, dim = shape
    forward_flops = 4 * batch * heads * tokens**2 * dim
    rows = []
    for pass_name, flops in (("fwd", forward_flops), ("fwd+bwd", 3.5 * forward_flops)):
        args = _arg_sets(shape, dtype, pass_name != "fwd", sets)
        times, mems = {}, {}
        for path in _paths(platform, dtype):
            fn = _attention_fn(path)
            fn = fn if pass_name == "fwd" else _with_backward(fn)
            try:
                times[path], mems[path] = _measure(fn, args, iters)
            except (
                RuntimeError,
                ValueError,
                NotImplementedError,
            ) as err:  # e.g. no cuDNN: keep going
                times[path], mems[path] = None, f"error: {str(err).splitlines()[0][:60]}"
        for path, seconds in times.items():
            row = [name, ",".join(map(str, shape)), jnp.dtype(dtype).name, pass_name, path]
            if seconds is None:
                rows.append(row + [None, None, None, None, mems[path]])
                continue
            ratios = [times[ref] / seconds if times.get(ref) else None for ref in ("xla", "cudnn")]
            rows.append(row + [seconds * 1e3, flops / seconds / 1e12, *ratios, mems[path]])
    return rows


def cpu_target_rows(batch: int, iters: int) -> list[list]:
    """XLA path at TARGET_SHAPE: attention over half the tokens (gathered) vs all of them."""
    tokens, heads, dim = TARGET_SHAPE
    visible = tokens // 2
    full = _arg_sets((batch, tokens, heads, dim), jnp.float32, True, 2)
    indices = jnp.sort(jax.random.permutation(jax.random.key(0), tokens)[:visible])
    indices = jnp.broadcast_to(indices, (batch, visible))
    attention = _attention_fn("xla")

    def on_visible(q, k, v):
        return attention(*(gather_visible(x, indices) for x in (q, k, v)))

    rows = []
    for pass_name in ("fwd", "fwd+bwd"):
        if pass_name == "fwd":
            args = [a[:3] for a in full]
            t_full = _measure(attention, args, iters)[0]
            t_half = _measure(on_visible, args, iters)[0]
        else:
            half_cotangent = [(*a[:3], a[3][:, :visible]) for a in full]
            t_full = _measure(_with_backward(attention), full, iters)[0]
            t_half = _measure(_with_backward(on_visible), half_cotangent, iters)[0]
        ratio = t_half / t_full
        verdict = "met" if ratio <= CPU_TARGET else "missed"
        rows.append([pass_name, t_full * 1e3, t_half * 1e3, ratio, f"{verdict} (<= {CPU_TARGET})"])
    return rows


def _ratio(x) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def accelerator_target_lines(rows: list[list]) -> list[str]:
    """The issue's accelerator targets, read off the bf16 Pallas rows of the table."""
    col = {name: i for i, name in enumerate(HEADER)}
    lines = []
    for row in rows:
        if row[col["path"]] != "pallas" or row[col["dtype"]] != "bfloat16" or not row[col["ms"]]:
            continue
        shape, tflops = row[col["shape"]], row[col["TFLOP/s"]]
        if row[col["pass"]] == "fwd" and shape.startswith("ViT-B decoder"):
            lines.append(
                f"- {shape}, bf16 fwd: {tflops:.0f} TFLOP/s (target >= {FORWARD_TARGET:.0f})"
            )
        if row[col["pass"]] == "fwd+bwd":
            vs_cudnn, vs_xla = _ratio(row[col["vs cuDNN"]]), _ratio(row[col["vs XLA"]])
            lines.append(
                f"- {shape}, bf16 fwd+bwd: {vs_cudnn} cuDNN speed (target >= 1x), "
                f"{vs_xla} XLA speed (target >= 2x)"
            )
    return lines


def run(quick: bool = False, write: bool = True) -> str:
    """Times every MAR shape, prints the table and (when write) stores it in BENCHMARKS.md."""
    platform = backend.platform()
    on_cpu = platform == "cpu"
    iters = (3 if quick else 7) if on_cpu else (10 if quick else 30)
    sets = 2 if on_cpu else 3
    rows = []
    for name, batch, tokens, heads, dim in SHAPES:
        batch = (1 if quick else 2) if on_cpu else batch
        for dtype in DTYPES:
            rows += _shape_rows(name, (batch, tokens, heads, dim), dtype, platform, iters, sets)
    body = (
        f"### Kernel: masked-patch attention ({platform})\n\n{bm.environment_line()}; "
        f"median of {iters} runs over {sets} rotated input sets; all tokens valid. "
        "'vs XLA' / 'vs cuDNN' = their time / this time (above 1: faster). "
        "mem = XLA's compiled temporaries + outputs.\n\n" + bm.markdown_table(HEADER, rows)
    )
    peak = bm.peak_device_memory_bytes()
    if peak is not None:
        body += f"\n\nDevice peak memory over the whole run: {peak / 2**20:.0f} MiB."
    if not on_cpu:
        body += "\n\nTargets:\n" + "\n".join(accelerator_target_lines(rows))
    if on_cpu:
        body += (
            "\n\nThe GPU targets (decoder bf16 forward >= 300 TFLOP/s on an H100; fwd+bwd at least "
            "cuDNN's speed and 2x the XLA path) need `jaxlab bench kernels` on a GPU: no figure here."
        )
        target = cpu_target_rows(1 if quick else 2, iters)
        body += (
            f"\n\nCPU target (XLA path, float32, tokens,heads,head_dim = {TARGET_SHAPE}): "
            "attention over half the tokens (gathered) vs all tokens.\n\n"
            + bm.markdown_table(("pass", "full ms", "50% ms", "ratio", "target"), target)
        )
    print(body)
    if write:
        bm.write_section(f"kernels-masked-attention-{platform}", body)
    return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batch, fewer runs")
    parser.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md")
    args = parser.parse_args()
    run(quick=args.quick, write=not args.no_write)


if __name__ == "__main__":
    main()
