"""`jaxlab bench hyperfed`: throughput (rounds/s) and memory of a HyperFed round with the unrolled
LEARN network at 50 blocks, with and without rematerialisation (model.remat).

Rows (each a jitted round = five vmapped clients x hyperfed.local_steps Adam steps, batch 2, plus the
server's mean): on every device the tiny clients (64x64, hyperfed:tiny's scaled protocols) with 50
blocks of 16 channels; on an accelerator also the paper's imaging network (50 blocks x 64 channels) at
128x128 and 256x256 (views / 4 and / 2, detectors / 2 and / 1 at 128 and 256). Memory: XLA's
temporary buffer size of the compiled round (memory_analysis; any device) and, on GPU / TPU, the
device's peak bytes in use after the row (cumulative: rows run remat-on first). Written to
BENCHMARKS.md's `hyperfed-<platform>` section.
"""

from __future__ import annotations

import jax

from jaxlab import benchmarking as bm
from jaxlab.config import load_config


def row_configs(platform: str, quick: bool) -> list[tuple[str, object]]:
    """(label, config) of every measured setting on this platform (module docstring)."""
    sizes = [("tiny 64x64, 16 ch", {})]
    if platform != "cpu":
        sizes += [("128x128, 64 ch", dict(image_size=128, view_factor=4, det_factor=2, features=64)),
                  ("256x256, 64 ch (paper net)", dict(image_size=256, view_factor=2, det_factor=1, features=64))]
    if quick:
        sizes = sizes[:1]
    rows = []
    for label, o in sizes:
        for remat in (True, False):
            c = load_config("hyperfed:tiny")
            c.model.update(blocks=50, remat=remat, features=o.get("features", c.model.features),
                           conv_impl="im2col" if platform == "cpu" else "lax")
            c.data.update(train_per_client=4, test_per_client=1,
                          **{k: v for k, v in o.items() if k != "features"})
            rows.append((f"{label}, remat {'on' if remat else 'off'}", c))
    return rows


def measure(config, iters: int) -> dict:
    """Compile and time one round of `config`'s HyperFed method."""
    from jaxlab.methods.hyperfed import task
    from jaxlab.train.mesh import make_mesh

    method = task.build(config)
    state = jax.jit(method.init_state)(jax.random.key(0), None)
    batch = method.train_batches(make_mesh(1)).batch(0)
    keys = [(state, batch, jax.random.key(i)) for i in range(2)]
    compiled = jax.jit(method.train_step).lower(*keys[0]).compile()
    memory = compiled.memory_analysis()
    timing = bm.time_fn(compiled, keys, warmup=1, iters=iters)
    return {"rounds_per_s": 1.0 / timing["median_s"], "round_s": timing["median_s"],
            "temp_mib": getattr(memory, "temp_size_in_bytes", float("nan")) / 2**20,
            "peak_mib": (bm.peak_device_memory_bytes() or float("nan")) / 2**20}


def bench(quick: bool = False, write: bool = True) -> str:
    """Measures every row (`row_configs`), prints the table and (write) puts it into BENCHMARKS.md."""
    platform = bm.platform_name()
    rows = []
    for label, config in row_configs(platform, quick):
        m = measure(config, iters=2 if quick else 5)
        d = config.data
        rows.append([label, str(d.image_size), f"{config.hyperfed.local_steps} x batch {d.batch_size}",
                     m["rounds_per_s"], m["round_s"], m["temp_mib"], m["peak_mib"]])
        print(rows[-1], flush=True)
    table = bm.markdown_table(["setting (LEARN, 50 blocks, 5 clients)", "image", "local steps / round",
                               "rounds/s", "s/round", "XLA temp MiB", "device peak MiB"], rows)
    body = (f"## HyperFed round: unrolled LEARN, 50 blocks, remat on / off ({platform})\n\n"
            f"{bm.environment_line()}; `jaxlab bench hyperfed`{' --quick' if quick else ''}\n\n{table}")
    print(body)
    if write:
        bm.write_section(f"hyperfed-{platform}", body)
    return body
