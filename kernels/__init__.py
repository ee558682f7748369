"""Pallas kernels with an XLA reference and a dispatcher each (importable as `jaxlab.kernels`).

Each op folder holds reference.py (the math, plain XLA), pallas.py (the kernel), api.py (dispatch:
implementation="auto" | "pallas" | "xla") and bench.py (a table written to BENCHMARKS.md).
"""
