"""The ECG model against the spec, the CLI commands, and the default experiment end to end."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.cli import main, model_info
from jaxlab.models.cnn1d import ECGClient, ECGSplitCNN
from jaxlab import methods
from jaxlab.train.loop import train
from jaxlab.train.state import param_count
from tests.helpers import tiny_ecg_config

ROOT = Path(__file__).resolve().parent.parent


def test_ecg_model_parameter_counts_and_cut_shape_match_spec():
    x = jnp.zeros((2, 128, 1))
    params = ECGSplitCNN().init(jax.random.PRNGKey(0), x)["params"]
    # Conv1d(1,16,7): 16*7+16; Conv1d(16,16,5): 16*16*5+16; Linear 512->128; Linear 128->5
    assert param_count(params["client"]) == 128 + 1296
    assert param_count(params["server"]) == 512 * 128 + 128 + 128 * 5 + 5
    cut = ECGClient().apply({"params": params["client"]}, x)
    assert cut.shape == (2, 32, 16)  # (B, 16, 32) in PyTorch layout = 512 floats at the cut
    for n in (3, 8):
        p = ECGSplitCNN(n_convs=n).init(jax.random.PRNGKey(0), x)["params"]
        assert param_count(p["client"]) == 128 + 1296 * (n - 1)


def test_info_reports_params_per_module_and_flops():
    info = model_info(tiny_ecg_config("mesh.data=1"))
    assert info["trainable_parameters"] == 67733
    assert info["parameters_per_module"] == {"client": 1424, "server": 66309}
    assert info["input_shapes"]["signal"] == [None, 128, 1]
    # conv1 2*7*16*128 + conv2 2*5*16*16*64 + dense 2*512*128 + 2*128*5 MACs-as-FLOPs, plus elementwise
    analytic = 2 * 7 * 16 * 128 + 2 * 5 * 16 * 16 * 64 + 2 * 512 * 128 + 2 * 128 * 5
    assert analytic <= info["forward_flops_per_example"] <= 1.3 * analytic
    # backward = weight grads (1x) + input grads (1x, none for the input itself); Adam adds O(params / batch)
    backward = 2 * analytic - 2 * 7 * 16 * 128
    assert analytic + backward <= info["train_step_flops_per_example"] <= 1.3 * (analytic + backward)
    sharded = model_info(tiny_ecg_config("mesh.data=8"))  # 4 examples a device share the whole update
    assert info["train_step_flops_per_example"] < sharded["train_step_flops_per_example"] < 2 * (
        analytic + backward)


def test_cli_config_error_exit_code(capsys):
    assert main(["info", "--config", "ecg_cnn:tiny", "--config.optimizer.lrr=1"]) == 2
    assert "Did you mean 'lr'" in capsys.readouterr().err


def test_cli_list_and_info_json():
    out = subprocess.run([sys.executable, "-m", "jaxlab.cli", "list"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert "ecg_cnn" in out and "ecg_beats" in out and "pydicom_ecg" in out
    out = subprocess.run([sys.executable, "-m", "jaxlab.cli", "info", "--json", "--config.data.options.scale=0.02"],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert json.loads(out)["trainable_parameters"] == 67733


def test_cli_train_eval_and_bench(tmp_path):
    common = ["--config", "ecg_cnn:tiny", "--workdir", str(tmp_path / "run"),
              "--config.data.options.scale=0.05", "--config.train.steps=30", "--config.train.progress=False"]
    assert main(["train", *common]) == 0
    assert main(["eval", *common, "--which", "best"]) == 0
    bench_md = tmp_path / "BENCH.md"
    from jaxlab import cli

    body = cli.bench_train("ecg_cnn:tiny", ["data.options.scale=0.05"], steps=5, write=False)
    assert "examples/s" in body and "jax " + jax.__version__ in body
    assert not bench_md.exists()


def test_default_experiment_learns_the_synthetic_ecg_task(tmp_path):
    config = tiny_ecg_config("data.options.scale=0.2", "train.eval_every=400", "train.log_every=100",
                             steps=400)
    summary = train(config, tmp_path, methods.build(config))
    assert summary["eval_accuracy"] > 0.85  # 5 classes: chance is 0.2 (balanced) / 0.23 (largest class)
    assert np.isfinite(summary["train_loss"])
