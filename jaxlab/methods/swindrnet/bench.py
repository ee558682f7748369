"""`jaxlab bench swindrnet`: inference frames/s and training examples/s of SwinDRNet.

On a GPU / TPU: the paper model (two Swin-T streams, 224x224, batch 8) with the window attention of both
backbones and the fusion through the Pallas kernel and through XLA, side by side. On CPU: the tiny
config at its size (XLA only; Pallas would run in interpret mode). Timing: jaxlab.benchmarking.time_fn
(warm-up, block_until_ready, median over runs rotating two input sets, compile excluded). The table
goes to BENCHMARKS.md's section swindrnet-throughput-<platform> when write.
"""

from __future__ import annotations

import copy

import jax
import numpy as np

from jaxlab import benchmarking as bm
from jaxlab.config import load_config
from jaxlab.data.synthetic.dreds import simulate
from jaxlab.methods.swindrnet.task import build, transform


def bench_config(variant: str, impl: str, batch: int):
    """The config benched: `variant` with attention_impl `impl`, a tiny simulated data set of `batch` frames."""
    c = copy.deepcopy(load_config(f"swindrnet:{variant}"))
    c.model.attention_impl = impl
    c.data.batch_size = batch
    c.data.options.update(n_train=batch, n_test=batch)
    c.train.steps = 1000
    return c


def measure(variant: str, impl: str, batch: int, iters: int) -> dict:
    """{"infer_fps", "train_eps", "infer_ms", "train_ms", compile seconds} of one configuration."""
    c = bench_config(variant, impl, batch)
    size = int(c.data.options.size)
    method = build(c)
    batches = [transform(simulate(batch, height=size, width=size, seed=s)) for s in (0, 1)]
    state = jax.jit(method.init_state)(jax.random.PRNGKey(0), batches[0])
    model_apply = jax.jit(lambda st, b: method.apply_fn(st, b))
    step = jax.jit(method.train_step)
    rngs = [jax.random.PRNGKey(i) for i in range(2)]
    infer = bm.time_fn(model_apply, [(state, b) for b in batches], iters=iters)
    train = bm.time_fn(step, [(state, b, r) for b, r in zip(batches, rngs)], iters=iters)
    return {"infer_fps": batch / infer["median_s"], "train_eps": batch / train["median_s"],
            "infer_ms": 1e3 * infer["median_s"], "train_ms": 1e3 * train["median_s"],
            "compile_s": infer["compile_s"] + train["compile_s"]}


def bench(quick: bool = False, write: bool = True) -> str:
    """Measure (module docstring), print the table and, when write, put it into BENCHMARKS.md."""
    platform = bm.platform_name()
    if platform == "cpu":
        variant, impls, batch = "tiny", ("xla",), 16
    else:
        variant, impls, batch = "paper", ("pallas", "xla"), 8
    iters = 3 if quick else 10
    rows = []
    for impl in impls:
        r = measure(variant, impl, batch, iters)
        size = int(load_config(f"swindrnet:{variant}").data.options.size)
        rows.append([variant, f"{size}x{size}", batch, impl, r["infer_fps"], r["infer_ms"], r["train_eps"],
                     r["train_ms"], r["compile_s"]])
    table = bm.markdown_table(["config", "input", "batch", "window attention", "inference frames/s",
                               "inference ms/batch", "training examples/s", "train ms/step", "compile s"], rows)
    body = (f"## SwinDRNet throughput ({platform})\n\n{bm.environment_line()}; `jaxlab bench swindrnet`"
            f"{' --quick' if quick else ''}; float32, median of {iters} runs\n\n{table}")
    print(body)
    if write:
        bm.write_section(f"swindrnet-throughput-{platform}", body)
    return body


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    bench(quick=True, write=False)
