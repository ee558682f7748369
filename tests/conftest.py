"""Test-wide setup, before jax is imported: 8 fake CPU devices so sharding tests run anywhere, and one
persistent compilation cache for this test run (its xdist workers and the processes the tests start
share it), so the kill-and-resume tests' repeated runs compile each program once."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"jaxlab-tests-{_run}"))
