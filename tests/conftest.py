"""Test-wide setup, before jax is imported: 8 fake CPU devices so sharding tests run anywhere, and one
persistent compilation cache for this test run (its xdist workers and the processes the tests start
share it), so the kill-and-resume tests' repeated runs compile each program once. XLA compiles at LLVM
optimisation level 0 (tests.helpers.FAST_COMPILE: the suite is mostly compile time)."""

import os
import tempfile

from tests.helpers import xla_flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", xla_flags(8) if os.environ["JAX_PLATFORMS"] == "cpu" else "")
_run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"jaxlab-tests-{_run}"))
