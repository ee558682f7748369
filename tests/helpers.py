"""Small shared pieces for the tests."""

from __future__ import annotations

from jaxlab.config import load_config

# The suite is dominated by XLA compilation on CPU (every test compiles its own small programs; few run
# long), and LLVM's optimisation passes are most of that: at level 0 a test file compiles about 1.7x
# faster (tests/test_plwf.py: 250 s -> 146 s on 2 loaded cores) while its steps run a little slower.
# XLA's HLO passes are unchanged, so results agree with the default build within float tolerance.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process (or a process a test starts) with `devices` fake CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"

TINY_ECG = [
    "data.options.scale=0.05",
    "train.progress=False",
    "train.log_every=5",
    "train.eval_every=20",
    "train.checkpoint_every=20",
]


def tiny_ecg_config(*overrides: str, steps: int = 20):
    return load_config("ecg_cnn:tiny", [*TINY_ECG, f"train.steps={steps}", *overrides])
