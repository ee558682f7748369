"""Process-level tests: SIGKILL mid-run then resume is bit-exact; two processes joined by
jax.distributed train and agree on the parameters."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxlab import methods
from jaxlab.train import checkpoint as ckpt
from jaxlab.train.loop import build_run
from tests.helpers import TINY_ECG, tiny_ecg_config, xla_flags

ROOT = Path(__file__).resolve().parent.parent
RESUME_ARGS = ["train.steps=300", "train.checkpoint_every=25", "data.batch_size=256", "model.n_convs=6"]


def _train_cmd(workdir, *overrides):
    cmd = [sys.executable, "-m", "jaxlab.cli", "train", "--config", "ecg_cnn:tiny", "--workdir", str(workdir)]
    return cmd + [f"--config.{o}" for o in (*TINY_ECG, *overrides)]


def _env(devices=1):
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices))


def _final_params(workdir, config):
    abstract = build_run(config, methods.build(config)).abstract_state(0)
    state = ckpt.Checkpointer(workdir, asynchronous=False).restore(abstract)
    return int(state.step), jax.tree_util.tree_leaves(state.params)


@pytest.mark.multiprocess
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    proc = subprocess.Popen(_train_cmd(killed, *RESUME_ARGS), env=_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.isdigit() for p in (killed / "checkpoints").glob("*")):
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    kept = ckpt.Checkpointer(killed, asynchronous=False).latest_step()
    assert kept is not None and kept < 300
    subprocess.run(_train_cmd(killed, *RESUME_ARGS), env=_env(), cwd=ROOT, check=True, capture_output=True)
    subprocess.run(_train_cmd(straight, *RESUME_ARGS), env=_env(), cwd=ROOT, check=True, capture_output=True)
    config = tiny_ecg_config(*RESUME_ARGS, "mesh.data=1")
    step_a, params_a = _final_params(killed, config)
    step_b, params_b = _final_params(straight, config)
    assert step_a == step_b == 300
    for a, b in zip(params_a, params_b):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


SCRIPT = """
import sys, numpy as np, jax
from jaxlab.train import distributed
assert distributed.initialize()
from jaxlab import methods
from jaxlab.config import load_config
from jaxlab.train.loop import train, build_run
from jaxlab.train import checkpoint as ckpt
config = load_config("ecg_cnn:tiny", sys.argv[2:])
method = methods.build(config)
train(config, sys.argv[1], method)
state = ckpt.Checkpointer(sys.argv[1], asynchronous=False).restore(build_run(config, method).abstract_state(0))
leaves = [np.asarray(x.addressable_data(0)) for x in jax.tree_util.tree_leaves(state.params)]
np.savez(f"{sys.argv[1]}/params_{jax.process_index()}.npz", *leaves)
print("process", jax.process_index(), "of", jax.process_count(), "devices", jax.device_count())
"""


@pytest.mark.multiprocess
def test_two_processes_train_and_agree(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    overrides = [*TINY_ECG, "train.steps=15", "train.eval_every=15", "train.checkpoint_every=15"]
    out = subprocess.run(
        [sys.executable, str(ROOT / "launch/local_multiprocess.py"), "-n", "2", "--devices-per-process", "2",
         "--", sys.executable, str(script), str(tmp_path / "run"), *overrides],
        env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:]
    assert "process 0 of 2 devices 4" in out.stdout and "process 1 of 2 devices 4" in out.stdout
    p0 = np.load(tmp_path / "run/params_0.npz")
    p1 = np.load(tmp_path / "run/params_1.npz")
    assert len(p0.files) == 8
    for k in p0.files:
        np.testing.assert_array_equal(p0[k], p1[k])
    # and the same training on one process with the same 4 devices gives the same parameters
    single = subprocess.run(
        [sys.executable, "-c", SCRIPT.replace("assert distributed.initialize()", ""), str(tmp_path / "one"),
         *overrides], env=_env(4), cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    p = np.load(tmp_path / "one/params_0.npz")
    for k in p0.files:
        np.testing.assert_allclose(p0[k], p[k], rtol=1e-4, atol=1e-6)
