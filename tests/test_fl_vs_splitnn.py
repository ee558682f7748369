"""FL vs SplitNN (fl_vs_splitnn.md): model sizes from the spec, a short report run, bytes = the formulas."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.config import load_config
from jaxlab.methods import fl_vs_splitnn as M
from jaxlab import methods
from jaxlab.models.cnn1d import ECGFLNet, ECGSplitNNClient, ECGSplitNNServer
from jaxlab.models.mobilenet_cifar import BLOCKS, MobileNetCifar, MobileNetClient, MobileNetServer
from jaxlab.models.resnet_cifar import ResNet20Client, ResNet20Server, resnet20, shortcut_a
from jaxlab.cli import model_info
from jaxlab.train import checkpoint as ckpt
from jaxlab.train.loop import build_run
from jaxlab.train.state import param_count
from tests.helpers import xla_flags

ROOT = Path(__file__).resolve().parent.parent

CONV7, CONV5 = 1 * 16 * 7 + 16, 16 * 16 * 5 + 16  # 128, 1,296
FC2 = 128 * 5 + 5


def _init(model, x):
    return model.init(jax.random.key(0), x)["params"]


@pytest.mark.parametrize("length, flat", [(128, 16 * 24), (130, 16 * 25)])
def test_fl_model_parameter_count(length, flat):
    """128 -> conv7 122 -> pool 61 -> 3 x conv5 49 -> pool 24; the reference's 130-sample beats give 25 x 16 = 400."""
    params = _init(ECGFLNet(), jnp.zeros((2, length, 1)))
    assert params["fc1"]["kernel"].shape == (flat, 128)
    assert param_count(params) == CONV7 + 3 * CONV5 + flat * 128 + 128 + FC2
    assert ECGFLNet().apply({"params": params}, jnp.zeros((3, length, 1))).shape == (3, 5)


def test_splitnn_halves_parameter_counts_and_cut():
    x = jnp.zeros((2, 128, 1))
    client, server = ECGSplitNNClient(), ECGSplitNNServer()
    cp = _init(client, x)
    activation = client.apply({"params": cp}, x)
    assert activation.shape == (2, 64, 16) and activation[0].size == 1024  # d = 1,024 floats a sample
    sp = _init(server, activation)
    assert param_count(cp) == CONV7 + CONV5 == 1424
    assert param_count(sp) == 3 * CONV5 + 512 * 128 + 128 + FC2 == 70197
    assert server.apply({"params": sp}, activation).shape == (2, 5)


def _train_cmd(workdir, paradigm="fl"):
    return [sys.executable, "-m", "jaxlab.cli", "train", "--config", "fl_vs_splitnn:tiny", "--workdir", str(workdir),
            "--config.data.options.scale=0.05", "--config.train.steps=6", "--config.train.checkpoint_every=2",
            "--config.train.progress=False", f"--config.fl.paradigm={paradigm}", "--config.fl.distribution=non-iid"]


@pytest.mark.multiprocess
def test_federated_run_killed_and_resumed_is_bit_identical(tmp_path):
    """`jaxlab train` of FedAvg rounds through the trainer: SIGKILL after a checkpoint, rerun, and the
    final state (global model, every client's Adam state, the round counter) equals a straight run's."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    proc = subprocess.Popen(_train_cmd(killed), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not any(p.name.isdigit() for p in (killed / "checkpoints").glob("*")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    for workdir in (killed, straight):
        subprocess.run(_train_cmd(workdir), env=env, cwd=ROOT, check=True, capture_output=True)
    config = load_config("fl_vs_splitnn:tiny", ["data.options.scale=0.05", "train.steps=6", "mesh.data=1",
                                                 "fl.distribution='non-iid'"])
    method = methods.build(config)
    abstract = build_run(config, method).abstract_state(0)
    a, b = (ckpt.Checkpointer(d, asynchronous=False).restore(abstract) for d in (killed, straight))
    assert int(a.step) == int(b.step) == 6 and int(a.extra.round) == 6
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_info_reports_the_reference_fl_model():
    info = model_info(load_config("fl_vs_splitnn:tiny", ["data.options.scale=0.05", "mesh.data=1"]))
    assert info["trainable_parameters"] == 55_989  # Linear(400, 128): the reference's 130-sample input


@pytest.fixture(scope="module")
def short_report(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fl_vs_splitnn")
    config = load_config("fl_vs_splitnn:tiny", ["data.options.scale=0.05", "report.rounds=1",
                                                 "report.seeds=(0, 1)"])
    config.report.distributions = config.report.distributions[2:]  # non-iid: 5 clients, one class each
    return config, workdir, M.report(config, workdir)


def test_short_report_writes_its_files(short_report):
    _, workdir, result = short_report
    for name in ("report.md", "report.json", "report.png"):
        assert (workdir / name).stat().st_size > 0
    assert [r["name"] for r in result["rows"]] == ["non-iid"]
    assert len(result["findings"]) == 3 and all(isinstance(f["holds"], bool) for f in result["findings"])
    text = (workdir / "report.md").read_text()
    assert "| paper finding |" in text and ("yes" in text or "NO" in text)
    assert "mean ± std over seeds 0, 1" in text and "(mean of 2 seeds;" in text
    for row in result["rows"]:
        for p in ("FL", "SplitNN"):
            finals = [s["accuracy"] for s in row[p]["by_seed"]]
            assert [s["seed"] for s in row[p]["by_seed"]] == [0, 1]
            assert row[p]["mean"]["accuracy"] == pytest.approx(np.mean(finals))
            assert finals[0] == row[p]["final"]["accuracy"]  # the row's curves are seed 0's
    hist = result["rows"][0]["label_histogram"]  # one class per client
    assert all(sum(c > 0 for c in row) == 1 for row in hist)


def test_report_bytes_equal_the_spec_formulas(short_report):
    """FL per round = 2 K |W| b; SplitNN per epoch = sum_k n_k (2 d b + l) + 2 K |W_c| b (b = 4, l = 8, d = 1,024)."""
    config, _, result = short_report
    rounds = config.report.rounds
    for r in result["rows"]:
        k, n = r["num_clients"], sum(r["client_sizes"])
        assert all(s % config.data.batch_size == 0 for s in r["client_sizes"])
        fl, sp = r["FL"], r["SplitNN"]
        assert fl["params"] == 55989 and sp["client_params"] == 1424
        assert fl["bytes_formula"] == fl["bytes_measured"] == rounds * 2 * k * 55989 * 4
        expected = rounds * (n * (2 * 1024 * 4 + 8) + 2 * k * 1424 * 4)
        assert sp["bytes_formula"] == sp["bytes_measured"] == expected
        assert sp["bytes_measured_by_kind"]["activations"] == rounds * n * 1024 * 4



RESNET20_CONVS = 432 + 6 * 2304 + 4608 + 5 * 9216 + 18432 + 5 * 36864
RESNET20_BNS = 2 * (7 * 16 + 6 * 32 + 6 * 64)


def mobilenet_counts():
    """(client, server) params of the CIFAR MobileNet from its layer list: convs keep their bias,
    BN has 2C params (and 2C running statistics)."""
    conv = lambda cin, cout, k, groups=1: k * k * (cin // groups) * cout + cout
    client = conv(3, 32, 3) + 64 + conv(32, 32, 3, 32) + 64
    server, cin = conv(32, 64, 1) + 128, 64
    for cout, _ in BLOCKS[1:]:
        server += conv(cin, cin, 3, cin) + 2 * cin + conv(cin, cout, 1) + 2 * cout
        cin = cout
    return client, server + 1024 * 10 + 10


def test_cifar_models_parameter_counts_and_cuts():
    """ResNet-20: conv 432 + 18 convs (16: 6 x 2,304; 32: 4,608 + 5 x 9,216; 64: 18,432 + 5 x 36,864),
    19 BN x 2C, fc 650; option A shortcuts have no parameters. The split moves no parameter: client
    (stem + stage 1 block 1 conv 1) + server = ResNet-20. MobileNet counted from its block list."""
    x = jnp.ones((2, 32, 32, 3))
    resnet = RESNET20_CONVS + RESNET20_BNS + 650
    m_client, m_server = mobilenet_counts()
    expected = {resnet20(): (resnet, (2, 10)),
                ResNet20Client(): (432 + 32 + 2304 + 32, (2, 32, 32, 16)),
                MobileNetCifar(): (m_client + m_server, (2, 10)),
                MobileNetClient(): (m_client, (2, 32, 32, 32))}
    for model, (count, shape) in expected.items():
        variables = model.init(jax.random.key(0), x)
        assert param_count(variables["params"]) == count, type(model).__name__
        out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                   rngs={"dropout": jax.random.key(1)})
        assert out.shape == shape and "batch_stats" in updates
    for server, count in ((ResNet20Server(), resnet - 2800), (MobileNetServer(), m_server)):
        cut = jnp.ones((2, 32, 32, 16 if isinstance(server, ResNet20Server) else 32))
        variables = server.init(jax.random.key(0), cut)
        assert param_count(variables["params"]) == count
        assert server.apply(variables, cut).shape == (2, 10)
    y = shortcut_a(jnp.ones((1, 32, 32, 16)), 32, 2)
    assert y.shape == (1, 16, 16, 32) and float(y[..., :8].sum()) == 0 and float(y[..., 8:24].min()) == 1
    with pytest.raises(ValueError, match="cut"):
        ResNet20Server().init(jax.random.key(0), jnp.ones((1, 32, 32, 3)))


def test_mobilenet_halves_compose_to_the_whole_model():
    """Client then server with the whole model's parameters gives the whole model's logits."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    whole = MobileNetCifar().init(jax.random.key(0), x)
    pick = lambda names: {c: {k: v for k, v in whole[c].items() if k in names} for c in whole}
    client_names = {"stem_conv", "stem_bn", "block1_dw_conv", "block1_dw_bn"}
    cut = MobileNetClient().apply(pick(client_names), x)
    server_names = set(whole["params"]) - client_names
    logits = MobileNetServer().apply(pick(server_names | set(whole["batch_stats"]) - client_names), cut)
    np.testing.assert_allclose(logits, MobileNetCifar().apply(whole, x), rtol=1e-5, atol=1e-5)


def test_resnet20_split_is_the_reference_split():
    """The server finishes block 1 with an identity shortcut from the cut, then ResNet-20's tail under
    the same names. With block 1 switched off in ResNet-20 (zero convs and BN scales: the block passes
    its input), an identity second conv on the client and a zero conv in the server, the split model
    computes exactly ResNet-20."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    whole = jax.tree_util.tree_map(np.asarray, resnet20().init(jax.random.key(0), x))
    zero = lambda tree: jax.tree_util.tree_map(np.zeros_like, tree)
    block1 = whole["params"]["stage1_block1"]
    whole["params"]["stage1_block1"] = zero(block1)
    identity = np.zeros((3, 3, 16, 16), np.float32)
    identity[1, 1] = np.eye(16)
    bn_identity = {"scale": np.ones(16, np.float32), "bias": np.zeros(16, np.float32)}
    client = {"params": {"conv1": whole["params"]["conv1"], "bn1": whole["params"]["bn1"],
                         "conv2": {"kernel": identity}, "bn2": bn_identity},
              "batch_stats": {"bn1": whole["batch_stats"]["bn1"],
                              "bn2": {"mean": np.zeros(16, np.float32), "var": np.full(16, 1 - 1e-5, np.float32)}}}
    tail = lambda c: {k: v for k, v in whole[c].items() if k not in ("conv1", "bn1", "stage1_block1")}
    server = {"params": {**tail("params"), "conv2": zero(block1["Conv_1"]), "bn2": zero(block1["BatchNorm_1"])},
              "batch_stats": {**tail("batch_stats"), "bn2": whole["batch_stats"]["stage1_block1"]["BatchNorm_1"]}}
    split = ResNet20Server().apply(server, ResNet20Client().apply(client, x))
    np.testing.assert_allclose(split, resnet20().apply(whole, x), rtol=1e-5, atol=1e-5)




def test_cifar10_loader_under_tfds_mock_data():
    import tensorflow_datasets as tfds

    config = load_config("fl_vs_splitnn:resnet20", ["data.data_dir=/nonexistent", "data.options.limit=6"])
    with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
        data = M.load_images(config, "train")
    assert data["x"].shape == (6, 32, 32, 3) and data["x"].dtype == "float32"
    assert data["y"].shape == (6,) and data["y"].max() < 10
    np.testing.assert_allclose(data["x"].mean(axis=(0, 1, 2)), 0, atol=1e-4)  # train-split normalisation
    np.testing.assert_allclose(data["x"].std(axis=(0, 1, 2)), 1, atol=1e-3)


@pytest.fixture(scope="module")
def resnet20_report(tmp_path_factory):
    """One round of the ResNet-20 cut on 480 real digit images (32x32 RGB), long-tailed over 2 clients."""
    workdir = tmp_path_factory.mktemp("fl_vs_splitnn_resnet20")
    config = load_config("fl_vs_splitnn:resnet20_tiny", ["data.options.limit=480", "report.rounds=1"])
    config.report.distributions = config.report.distributions[1:2]  # imbalanced: 2 clients, long tail
    return config, M.report(config, workdir)


def test_resnet20_report_bytes_count_batchnorm_statistics(resnet20_report):
    """FL messages carry ResNet-20's 269,722 params and 1,376 BN running statistics; SplitNN relays the
    client's 2,800 params and 64 statistics and sends d = 32*32*16 floats a sample each way."""
    config, result = resnet20_report
    assert [r["name"] for r in result["rows"]] == ["imbalanced"]
    for r in result["rows"]:
        k, n = r["num_clients"], sum(r["client_sizes"])
        fl, sp = r["FL"], r["SplitNN"]
        assert fl["params"] == 269_722 and sp["client_params"] == 2_800 and sp["cut_shape"] == [32, 32, 16]
        assert fl["bytes_formula"] == fl["bytes_measured"] == 2 * k * (269_722 + 1_376) * 4
        assert sp["bytes_formula"] == sp["bytes_measured"] == n * (2 * 16_384 * 4 + 8) + 2 * k * (2_800 + 64) * 4
        assert r["test_size"] == 359  # every digits test image, though 359 is not a multiple of the eval batch
    hist = np.asarray(result["rows"][0]["label_histogram"]).sum(0)  # long tail: class 0 >= ... >= class 9
    assert hist[0] > 3 * hist[9] and np.all(np.diff(hist) <= 1)

