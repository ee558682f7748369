"""Measuring helpers shared by every bench command (kernels, train steps, federated rounds).

Timing follows ../shared/KERNELS.md: warm up, block_until_ready, rotate over several input sets (so
repeated runs do not hit a warm cache with the same data), median of many runs. BENCHMARKS.md is
written in named sections so each bench command replaces only its own table.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform as _platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

BENCHMARKS_FILE = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def device_description() -> str:
    """e.g. 'NVIDIA H100 80GB HBM3 (gpu) x1' or 'cpu x2 (x86_64)'."""
    devs = jax.devices()
    kind = devs[0].device_kind
    if devs[0].platform == "cpu":
        return f"cpu ({_platform.machine()}, {os.cpu_count()} cores), {len(devs)} device(s)"
    return f"{kind} ({devs[0].platform}) x{len(devs)}"


def environment_line() -> str:
    """Device, JAX version and date: the header every BENCHMARKS.md table carries."""
    today = _dt.date.today().isoformat()
    return f"device: {device_description()}; jax {jax.__version__}; date {today}"


def time_fn(
    fn: Callable[..., Any],
    arg_sets: Sequence[tuple],
    *,
    warmup: int = 2,
    iters: int = 20,
) -> dict[str, float]:
    """Median/min wall time (seconds) of `fn(*args)` rotating over `arg_sets`, compile excluded.

    Returns {"median_s", "min_s", "compile_s"}; compile_s is the time of the first call.
    """
    if not arg_sets:
        raise ValueError("time_fn needs at least one argument set")
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*arg_sets[0]))
    compile_s = time.perf_counter() - t0
    for i in range(warmup):
        jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
    times = []
    for i in range(iters):
        args = arg_sets[i % len(arg_sets)]
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "compile_s": compile_s}


def compiled_flops(compiled) -> float:
    """XLA's flop count of a compiled computation (cost analysis; older JAX returns a list of dicts)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def peak_device_memory_bytes() -> int | None:
    """Peak bytes in use on device 0 since start, where the backend reports it (GPU/TPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001  (CPU backends may not implement memory_stats)
        return None
    if not stats:
        return None
    return stats.get("peak_bytes_in_use")


def peak_host_memory_bytes() -> int:
    """Peak resident set size of this process (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table: one line for the header, one `|---|` line, one line per row. Cells are str(x),
    floats with 4 significant digits (f"{x:.4g}") and None as empty; every row has len(header) cells."""
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"markdown_table: row {i} has {len(row)} cells, the header has "
                             f"{len(header)} ({list(header)})")

    def fmt(x):
        if isinstance(x, float):
            return f"{x:.4g}"
        return "" if x is None else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(section: str, body: str, path: Path | str | None = None) -> Path:
    """Replaces (or appends) the section `section` of BENCHMARKS.md with `body`.

    A section is everything between `<!-- begin:{section} -->` and `<!-- end:{section} -->`, so each
    bench command owns its table and reruns replace it. Different devices keep separate sections when
    the caller puts the platform into the section name.
    """
    path = Path(path) if path is not None else BENCHMARKS_FILE
    begin, end = f"<!-- begin:{section} -->", f"<!-- end:{section} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nWritten by bench commands (jaxlab bench ...).\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
    return path


def platform_name() -> str:
    """'cpu', 'gpu' or 'tpu' (the default backend)."""
    name = jax.default_backend()
    return "gpu" if name in ("cuda", "rocm") else name
