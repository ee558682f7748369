"""The CPU speed mechanisms every conv model shares, and the PyTorch side-by-side bench's torch-free pieces.

- `layers.unfused` (Conv's input on the CPU backend): an exact identity for values and gradients that
  survives XLA's optimisation as a conditional (so XLA:CPU materialises the input instead of recomputing
  its producers in the backward pass's transposes).
- `jaxlab --cpu-devices N`: sets the host device count before JAX starts and says so when it is too late;
  a BatchNorm ResNet's train step with the batch split over 4 devices equals the one-device step (GSPMD
  keeps whole-batch statistics).
- the bench without torch leaves BENCHMARKS.md alone.
"""

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab import torch_bench as TB
from jaxlab.cli import _pop_cpu_devices, use_cpu_devices
from jaxlab.errors import UsageError
from jaxlab.models import layers
from jaxlab.models.resnet_cifar import ResNetCifar
from tests.helpers import FAST_COMPILE, xla_flags


def _resnet_loss_and_grads(model, variables, x, y):
    fn = jax.jit(jax.value_and_grad(lambda p: TB.jax_loss(model, p, variables["batch_stats"], x, y)[0]))
    return fn, jax.tree_util.tree_map(np.asarray, fn(variables["params"]))


def test_unfused_is_an_exact_identity_that_xla_keeps(monkeypatch):
    """unfused(x) is x, its gradient the cotangent, also under vmap with a batched token (a select), and
    with NaN tokens. A ResNet's loss and gradients are the same with and without it at Conv's input, and
    the compiled CPU program still holds the conditionals (if a future XLA folded them, this says so)."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 5, 5, 3)), jnp.float32)
    for token in (jnp.float32(0.3), jnp.float32(np.nan)):
        np.testing.assert_array_equal(layers.unfused(x, token), x)
        g = jax.grad(lambda v: (layers.unfused(v, token) * x).sum())(x)
        np.testing.assert_array_equal(g, x)
    batched = jax.vmap(layers.unfused)(x, jnp.arange(4.0))
    np.testing.assert_array_equal(batched, x)

    model = ResNetCifar(blocks_per_stage=1)
    rng = np.random.default_rng(1)
    images = rng.standard_normal((4, 8, 8, 3), dtype=np.float32)
    labels = rng.integers(0, 10, 4)
    variables = model.init(jax.random.PRNGKey(0), images, train=False)
    results = {}
    for boundary in (True, False):
        monkeypatch.setattr(layers, "CPU_FUSION_BOUNDARY", boundary)
        fn, results[boundary] = _resnet_loss_and_grads(model, variables, images, labels)
        hlo = fn.lower(variables["params"]).compile().as_text()
        assert ("conditional(" in hlo) == boundary  # one per conv forward, and their transposes backward
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                           results[True], results[False])


def test_cpu_devices_flag_is_parsed_anywhere_and_checked():
    assert _pop_cpu_devices(["--cpu-devices", "4", "train", "--config", "x"]) == (4, ["train", "--config", "x"])
    assert _pop_cpu_devices(["bench", "--cpu-devices=2", "--quick"]) == (2, ["bench", "--quick"])
    assert _pop_cpu_devices(["train"]) == (None, ["train"])
    for bad in (["--cpu-devices", "two"], ["--cpu-devices"], ["--cpu-devices=-1"]):
        with pytest.raises(UsageError, match="--cpu-devices needs a positive integer"):
            _pop_cpu_devices(bad)
    with pytest.raises(UsageError, match="positive number of devices"):
        use_cpu_devices(0)


def test_cpu_devices_sets_the_host_device_count_before_jax_starts():
    """A fresh process gets exactly N CPU devices, its other XLA flags kept; in a process whose CPU
    backend already runs (this one: 8 devices) the flag is refused with a message, not ignored."""
    code = ("import os; from jaxlab.cli import use_cpu_devices; use_cpu_devices(3); import jax; "
            "print(jax.device_count(), os.environ['XLA_FLAGS'])")
    env = {**os.environ, "XLA_FLAGS": xla_flags(8), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    count, flags = out.stdout.strip().split(" ", 1)
    assert count == "3"
    assert FAST_COMPILE in flags and flags.count("--xla_force_host_platform_device_count") == 1
    assert jax.device_count() == 8
    with pytest.raises(UsageError, match="had already started in this process with 8 device"):
        use_cpu_devices(4)


def test_resnet_step_with_the_batch_split_over_four_devices_equals_one_device():
    """The bench's jaxlab step (option-A CIFAR ResNet, BatchNorm in training mode, SGD momentum) on a
    batch sharded over 4 devices: loss, updated params and running statistics equal the one-device
    step's within float32 rounding, so --cpu-devices changes the speed, not the maths."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    model = ResNetCifar(blocks_per_stage=1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 16, 16, 3), dtype=np.float32)
    y = rng.integers(0, 10, 8)
    variables = jax.tree_util.tree_map(np.asarray, model.init(jax.random.PRNGKey(0), x[:2], train=False))
    tx, step = TB.jax_step_fn(model)
    results = {}
    for n in (1, 4):
        mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
        # device_put copies the numpy variables each time: the step donates its state
        put = lambda tree, spec: jax.device_put(tree, NamedSharding(mesh, spec))  # noqa: E731
        state = put((variables["params"], variables["batch_stats"], tx.init(variables["params"])),
                    PartitionSpec())
        *state, loss = step(*state, put(x, PartitionSpec("data")), put(y, PartitionSpec("data")))
        results[n] = jax.tree_util.tree_map(np.asarray, (state[0], state[1], loss))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
                           results[1], results[4])


def test_torch_bench_without_torch_says_so_and_writes_nothing(monkeypatch, capsys, tmp_path):
    target = tmp_path / "BENCHMARKS.md"
    target.write_text("unchanged\n")
    monkeypatch.setattr("jaxlab.benchmarking.BENCHMARKS_FILE", target)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    assert TB.run(quick=True, write=True) is None
    assert "torch is not importable" in capsys.readouterr().out
    assert target.read_text() == "unchanged\n"


def test_torch_port_agrees_with_jaxlab_when_torch_is_installed():
    """Where PyTorch is installed: jaxlab's ResNet-20 logits and gradients are as close to the transplanted
    PyTorch network's float64 results as float32 allows (ResNet-20: within 1e-4 relative)."""
    pytest.importorskip("torch")
    agree = TB.agreement("resnet20")
    assert agree["logits"] < TB.AGREE_ATOL and agree["grads"] < TB.AGREE_ATOL, agree
    assert TB.agrees(agree)
    assert not TB.agrees({**agree, "grads": 10 * TB.AGREE_ATOL + 2 * agree["torch_grads"]})
