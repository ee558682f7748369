"""FL vs SplitNN (fl_vs_splitnn.md): model sizes from the spec, a short report run, bytes = the formulas."""

import jax
import jax.numpy as jnp
import pytest

from jaxlab.config import load_config
from jaxlab.methods import fl_vs_splitnn as M
from jaxlab.methods.base import build_task
from jaxlab.models.cnn1d import ECGFLNet, ECGSplitNNClient, ECGSplitNNServer
from jaxlab.train.state import param_count

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


def test_train_points_to_report():
    with pytest.raises(ValueError, match="jaxlab report"):
        build_task(load_config("fl_vs_splitnn:tiny"))


@pytest.fixture(scope="module")
def short_report(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fl_vs_splitnn")
    config = load_config("fl_vs_splitnn:tiny", ["data.options.scale=0.05", "report.rounds=1"])
    return config, workdir, M.report(config, workdir)


def test_short_report_writes_its_files(short_report):
    _, workdir, result = short_report
    for name in ("report.md", "report.json", "report.png"):
        assert (workdir / name).stat().st_size > 0
    assert [r["name"] for r in result["rows"]] == ["iid", "imbalanced", "non-iid"]
    assert len(result["findings"]) == 5 and all(isinstance(f["holds"], bool) for f in result["findings"])
    text = (workdir / "report.md").read_text()
    assert "| paper finding |" in text and ("yes" in text or "NO" in text)
    hist = result["rows"][2]["label_histogram"]  # one class per client
    assert all(sum(c > 0 for c in row) == 1 for row in hist)


def test_report_bytes_equal_the_spec_formulas(short_report):
    """FL per round = 2 K |W| b; SplitNN per epoch = sum_k n_k (2 d b + l) + 2 K |W_c| b (b = 4, l = 8, d = 1,024)."""
    config, _, result = short_report
    rounds = config.report.rounds
    for r in result["rows"]:
        k, n = r["num_clients"], sum(r["client_sizes"])
        assert all(s % config.data.batch_size == 0 for s in r["client_sizes"])
        fl, sp = r["FL"], r["SplitNN"]
        assert fl["params"] == 53941 and sp["client_params"] == 1424
        assert fl["bytes_formula"] == fl["bytes_measured"] == rounds * 2 * k * 53941 * 4
        expected = rounds * (n * (2 * 1024 * 4 + 8) + 2 * k * 1424 * 4)
        assert sp["bytes_formula"] == sp["bytes_measured"] == expected
        assert sp["bytes_measured_by_kind"]["activations"] == rounds * n * 1024 * 4


def test_cifar_models_parameter_counts_and_cuts():
    """ResNet-20: conv 432 + 18 convs (16: 6 x 2,304; 32: 4,608 + 5 x 9,216; 64: 18,432 + 5 x 36,864),
    19 BN x 2C, fc 650; option A shortcuts have no parameters."""
    from jaxlab.models.resnet_cifar import MobileNetClient, ResNet20Client, resnet20, shortcut_a

    x = jnp.ones((2, 32, 32, 3))
    convs = 432 + 6 * 2304 + 4608 + 5 * 9216 + 18432 + 5 * 36864
    bns = 2 * (7 * 16 + 6 * 32 + 6 * 64)
    expected = {resnet20(): (convs + bns + 650, (2, 10)),
                ResNet20Client(): (432 + 32 + 2304 + 32, (2, 32, 32, 16)),
                MobileNetClient(): (864 + 64 + 288 + 64, (2, 32, 32, 32))}
    for model, (count, shape) in expected.items():
        variables = model.init(jax.random.key(0), x)
        assert param_count(variables["params"]) == count, type(model).__name__
        out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        assert out.shape == shape and "batch_stats" in updates
    y = shortcut_a(jnp.ones((1, 32, 32, 16)), 32, 2)
    assert y.shape == (1, 16, 16, 32) and float(y[..., :8].sum()) == 0 and float(y[..., 8:24].min()) == 1


def test_cifar10_loader_under_tfds_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
        data = M.load_cifar10("/nonexistent", "train", limit=6)
    assert data["x"].shape == (6, 32, 32, 3) and data["x"].dtype == "float32"
    assert data["y"].shape == (6,) and data["y"].max() < 10
