"""`jaxlab bench federated` is wired, and the bench's pieces run at toy size (the full bench is minutes)."""

import jax
import optax

from jaxlab import cli
from jaxlab.federated import algorithms as F
from jaxlab.federated import bench


def test_cli_accepts_bench_federated():
    args = cli._parser().parse_args(["bench", "federated", "--quick", "--no-write"])
    assert args.what == "federated" and args.quick and args.no_write


def test_bench_setup_round_and_no_retrace():
    params, loss_fn, data = bench.setup(3, steps=2)
    assert data.batches["x"].shape == (3, 2, bench.BATCH, 128, 1)
    alg = F.fedavg(loss_fn, optax.sgd(bench.LR), chunk_size=2)
    state = alg.init(params, 3)
    state, _ = alg.apply(state, data, F.plan_round(0, 0, 3))
    traces = bench.TRACES["loss"]
    state, _ = alg.apply(state, data, F.plan_round(0, 1, 3))
    jax.block_until_ready(state.params)
    assert bench.TRACES["loss"] == traces
    assert bench.step_flops(loss_fn, params, data) > 1e7
