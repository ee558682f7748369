"""`jaxlab bench federated` is wired, the bench's pieces run at toy size (the full bench is minutes), and
the jaxlab.benchmarking helpers it writes with (tables, BENCHMARKS.md sections, timing, FLOPs) do what
they say, on files under tmp_path (never the repo's BENCHMARKS.md)."""

import jax
import jax.numpy as jnp
import optax
import pytest

from jaxlab import benchmarking as bm
from jaxlab import cli
from jaxlab.federated import bench
from jaxlab.federated.algorithms import fedavg


def test_cli_accepts_bench_federated():
    args = cli._parser().parse_args(["bench", "federated", "--quick", "--no-write"])
    assert args.what == "federated" and args.quick and args.no_write


def test_bench_setup_round_and_no_retrace():
    params, loss_fn, data = bench.setup(3, steps=2)
    assert data.batches["x"].shape == (3, 2, bench.BATCH, 128, 1)
    alg = fedavg.build(loss_fn, optax.sgd(bench.LR), chunk_size=2)
    step = jax.jit(alg.round)
    state, batch, rng = bench._round_args(alg, params, data, 3, 0)
    state, _ = step(state, batch, rng)
    traces = bench.TRACES["loss"]
    state, _ = step(state, *bench._round_args(alg, params, data, 3, 1)[1:])
    jax.block_until_ready(state.params)
    assert bench.TRACES["loss"] == traces
    assert bench.step_flops(loss_fn, params, data) > 1e7


def test_bench_models_use_the_conv_impl_they_are_given():
    """The bench's im2col and lax rows run the same parameters (layers.Conv) and agree to rounding."""
    p_fast, loss_fast, data = bench.setup(2, steps=1, conv_impl="im2col")
    p_lax, loss_lax, _ = bench.setup(2, steps=1, conv_impl="lax")
    assert jax.tree_util.tree_structure(p_fast) == jax.tree_util.tree_structure(p_lax)
    batch = {k: v[0, 0] for k, v in data.batches.items()}
    fast, lax = bench.plain_loss(loss_fast)(p_fast, batch), bench.plain_loss(loss_lax)(p_lax, batch)
    assert abs(float(fast) - float(lax)) < 1e-4 * max(1.0, abs(float(lax)))
    with pytest.raises(ValueError, match="conv_impl"):
        bench.setup(1, steps=1, conv_impl="fft")


# --- jaxlab.benchmarking: the tables and sections every bench command writes -------------------------------


def test_markdown_table_cells():
    table = bm.markdown_table(["name", "n", "s", "note"], [["a", 3, 12345.678, None], ["b", 2, 0.000123456, "x"]])
    assert table == ("| name | n | s | note |\n|---|---|---|---|\n"
                     "| a | 3 | 1.235e+04 |  |\n"
                     "| b | 2 | 0.0001235 | x |")


def test_write_section_creates_appends_and_replaces_only_its_own_section(tmp_path):
    path = tmp_path / "B.md"
    assert bm.write_section("one", "first body\n", path) == path
    header = "# Benchmarks\n\nWritten by bench commands (jaxlab bench ...).\n"
    one = "<!-- begin:one -->\nfirst body\n<!-- end:one -->"
    assert path.read_text() == f"{header.rstrip()}\n\n{one}\n"

    bm.write_section("two", "| a |\n|---|\n| 1 |", path)
    two = "<!-- begin:two -->\n| a |\n|---|\n| 1 |\n<!-- end:two -->"
    assert path.read_text() == f"{header.rstrip()}\n\n{one}\n\n{two}\n"

    path.write_text(path.read_text() + "\nhand-written note\n")
    bm.write_section("one", r"new body with \1 and \d", path)  # backslashes are text, not regex groups
    new_one = "<!-- begin:one -->\nnew body with \\1 and \\d\n<!-- end:one -->"
    assert path.read_text() == f"{header.rstrip()}\n\n{new_one}\n\n{two}\n\nhand-written note\n"


def test_write_section_defaults_to_benchmarks_md(tmp_path, monkeypatch):
    target = tmp_path / "BENCHMARKS.md"
    target.write_text("# Benchmarks\n\n<!-- begin:s -->\nold\n<!-- end:s -->\n")
    monkeypatch.setattr(bm, "BENCHMARKS_FILE", target)
    assert bm.write_section("s", "new") == target
    assert target.read_text() == "# Benchmarks\n\n<!-- begin:s -->\nnew\n<!-- end:s -->\n"


def test_time_fn_rotates_argument_sets_and_counts_calls():
    calls = []
    out = bm.time_fn(lambda x: calls.append(x) or jnp.zeros(()), [(0,), (1,), (2,)], warmup=2, iters=4)
    # first (compile) call on set 0, warm-up on sets 0, 1, then iters rotating from set 0
    assert calls == [0, 0, 1, 0, 1, 2, 0]
    assert set(out) == {"median_s", "min_s", "compile_s"} and 0 <= out["min_s"] <= out["median_s"]
    with pytest.raises(ValueError, match="at least one argument set"):
        bm.time_fn(lambda: None, [])


def test_compiled_flops_of_a_matmul():
    compiled = jax.jit(jnp.matmul).lower(jnp.ones((8, 16)), jnp.ones((16, 4))).compile()
    assert bm.compiled_flops(compiled) == 2 * 8 * 16 * 4

    class OldJax:  # older JAX returns a list with one dict per computation
        def cost_analysis(self):
            return [{"flops": 7.0}]

    assert bm.compiled_flops(OldJax()) == 7.0
