"""JAX's persistent compilation cache as the jaxlab command sets it up: written by one process, read
back by the next, off with a flag or an environment variable. No timings asserted: cache hits and misses
are counted from JAX's own monitoring events."""

import json
import os
import subprocess
import sys
from pathlib import Path

from jaxlab import compile_cache

ROOT = Path(__file__).resolve().parents[1]

SNIPPET = """
import json
from jaxlab import compile_cache
compile_cache.setup()
import jax, jax.numpy as jnp
def f(x):
    for _ in range(5):
        x = jnp.tanh(x @ x.T) + 1.0
    return x.sum()
jax.jit(jax.grad(f))(jnp.ones((8, 8))).block_until_ready()
print(json.dumps(compile_cache.counts()))
"""


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", compile_cache.ENV)}
    env.update(extra)
    return env


def _counts(cache_dir) -> dict:
    out = subprocess.run([sys.executable, "-c", SNIPPET], env=_env(JAXLAB_COMPILE_CACHE=str(cache_dir)),
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_cache_written_by_one_process_is_read_by_the_next(tmp_path):
    first = _counts(tmp_path / "cache")
    assert first["cache_misses"] >= 1 and first["cache_hits"] == 0
    assert any((tmp_path / "cache").iterdir())
    second = _counts(tmp_path / "cache")
    assert second["cache_hits"] >= 1 and second["cache_misses"] == 0


def test_cli_writes_the_cache_and_the_flag_turns_it_off(tmp_path):
    args = [sys.executable, "-m", "jaxlab.cli", "info", "--config", "ecg_cnn:tiny", "--config.data.options.scale=0.02"]
    on, off = tmp_path / "on", tmp_path / "off"
    subprocess.run(args, env=_env(JAXLAB_COMPILE_CACHE=str(on)), capture_output=True, check=True, cwd=ROOT)
    assert any(on.iterdir())
    subprocess.run([*args, "--no-compile-cache"], env=_env(JAXLAB_COMPILE_CACHE=str(off)), capture_output=True,
                   check=True, cwd=ROOT)
    assert not off.exists()


def test_where_the_cache_lives(monkeypatch, tmp_path):
    for name in ("JAX_COMPILATION_CACHE_DIR", compile_cache.ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.configured_dir() == tmp_path / "xdg" / "jaxlab" / "xla"
    assert compile_cache.configured_dir(disabled=True) is None
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.configured_dir() is None
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
    assert compile_cache.configured_dir() == tmp_path / "mine"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))  # JAX's own variable wins
    assert compile_cache.configured_dir() == tmp_path / "jax"
