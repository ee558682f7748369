"""Backend choice shared by every kernel: one place that decides Pallas vs XLA and how Pallas lowers.

- CPU: Pallas runs only in interpret mode (tests use it to run the real kernel body); "auto" picks XLA.
- GPU: a plain pallas_call lowers through Mosaic GPU, which has no dot_general lowering, so kernels
  with matmuls force the Triton lowering through its compiler params.
- TPU: Mosaic TPU with dimension semantics.
"""

from __future__ import annotations

from typing import Literal

import jax

Implementation = Literal["auto", "pallas", "xla"]
VALID_IMPLEMENTATIONS = ("auto", "pallas", "xla")


def platform() -> str:
    """The default backend's platform name: 'cpu', 'gpu' or 'tpu'."""
    name = jax.default_backend()
    return "gpu" if name in ("cuda", "rocm", "gpu") else name


def resolve_implementation(implementation: str) -> str:
    """Turns "auto" into "pallas" on GPU/TPU and "xla" on CPU; validates the name."""
    if implementation not in VALID_IMPLEMENTATIONS:
        raise ValueError(
            f"implementation={implementation!r} is not one of {VALID_IMPLEMENTATIONS}"
        )
    if implementation == "auto":
        return "pallas" if platform() in ("gpu", "tpu") else "xla"
    return implementation


def interpret_mode() -> bool:
    """Pallas must run in interpret mode where no Pallas compiler exists (CPU)."""
    return platform() == "cpu"


def compiler_params(*, num_warps: int = 4, num_stages: int = 2, dimension_semantics=None):
    """Backend compiler params for pallas_call: Triton on GPU, Mosaic on TPU, None on CPU.

    On GPU the Triton params are what select the Triton lowering (Mosaic GPU cannot lower dot_general).
    The class moved/renamed across JAX 0.10-0.12, so it is looked up defensively.
    """
    plat = platform()
    if plat == "gpu":
        from jax.experimental.pallas import triton as pltriton

        cls = getattr(pltriton, "CompilerParams", None) or pltriton.TritonCompilerParams
        return cls(num_warps=num_warps, num_stages=num_stages)
    if plat == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        cls = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams
        return cls(dimension_semantics=dimension_semantics) if dimension_semantics else cls()
    return None


def check_qkv(q, k, v, layout: str) -> None:
    """Raises ValueError naming the tensor unless q, k and v share one shape and dtype of rank
    len(layout's axes), e.g. layout="[B, T, heads, head_dim]"."""
    rank = layout.count(",") + 1
    if q.ndim != rank:
        raise ValueError(f"q must be {layout}; got q.shape={q.shape}")
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(f"{name}.shape={x.shape} must equal q.shape={q.shape}")
        if x.dtype != q.dtype:
            raise ValueError(f"{name}.dtype={x.dtype} must equal q.dtype={q.dtype}")
