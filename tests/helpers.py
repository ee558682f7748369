"""Small shared pieces for the tests."""

from __future__ import annotations

from jaxlab.config import load_config

TINY_ECG = [
    "data.options.scale=0.05",
    "train.progress=False",
    "train.log_every=5",
    "train.eval_every=20",
    "train.checkpoint_every=20",
]


def tiny_ecg_config(*overrides: str, steps: int = 20):
    return load_config("ecg_cnn:tiny", [*TINY_ECG, f"train.steps={steps}", *overrides])
