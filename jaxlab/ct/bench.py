"""`python -m jaxlab.ct.bench [--quick] [--no-write]`: the projector A and back-projector A^T against
skimage.transform.radon / iradon.

Rows: image size N x N, V views over 180 degrees (parallel; fan beam over 360 degrees), D detector
bins, dtype (float32, bfloat16). Columns: median wall time of one jitted call of A (`project`), A^T
(`backproject`, its exact transpose) and FBP (`fbp`, ramp), and, for parallel-beam float32 rows, the
same of skimage's radon and iradon (float64, NumPy/Cython, one CPU thread) with the relative L2 gap
between the two sinograms. Fan-beam rows have no skimage counterpart (skimage is parallel-beam only).
Timings follow jaxlab.benchmarking (compile excluded, warm-up, rotation over 3 inputs, median). The
table goes to BENCHMARKS.md section `ct-projector-<platform>`; on a GPU run the same command there.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab import benchmarking as bm
from jaxlab import ct

FULL = ((65, 90), (129, 180), (257, 360))  # odd N: skimage rotates about pixel N // 2, ours about the centre
QUICK = ((65, 90), (129, 180))
HEADER = ("geometry", "N", "V", "D", "dtype", "A ms", "A^T ms", "FBP ms", "skimage radon ms",
          "skimage iradon ms", "A / radon speed-up", "|A x - radon x| / |radon x|")


def _geometry(kind: str, n: int, views: int) -> ct.Geometry:
    if kind == "parallel":
        return ct.parallel_beam(views, n, n)
    return ct.fan_beam(2 * views, n + n // 2, n, det_spacing=1.5, pixel_size=1.0, s2r=2.0 * n, d2r=1.5 * n,
                       detector=kind.removeprefix("fan_"))


def _phantoms(geom: ct.Geometry, count: int = 3) -> list[jax.Array]:
    radius = 0.45 * min(geom.image_shape)
    return [ct.ellipse_image(ct.random_ellipses(jax.random.key(i), 6, radius), geom) for i in range(count)]


def _skimage_row(images: list[np.ndarray], geom: ct.Geometry, iters: int):
    from skimage.transform import iradon, radon

    theta = np.rad2deg(np.asarray(geom.angles))
    sinos = [radon(x, theta, circle=True) for x in images]
    t_radon = bm.time_fn(lambda x: radon(x, theta, circle=True).shape, [(x,) for x in images],
                         warmup=1, iters=iters)
    t_iradon = bm.time_fn(lambda s: iradon(s, theta, circle=True).shape, [(s,) for s in sinos],
                          warmup=1, iters=iters)
    return t_radon["median_s"], t_iradon["median_s"], sinos[0].T


def bench_row(kind: str, n: int, views: int, dtype, iters: int) -> list:
    geom = _geometry(kind, n, views)
    images = [x.astype(dtype) for x in _phantoms(geom)]
    sinos = [ct.project(x, geom) for x in images]
    t_a = bm.time_fn(ct.project, [(x, geom) for x in images], iters=iters)["median_s"]
    t_at = bm.time_fn(ct.backproject, [(s, geom) for s in sinos], iters=iters)["median_s"]
    t_fbp = bm.time_fn(ct.fbp, [(s, geom) for s in sinos], iters=iters)["median_s"]
    row = [kind, n, geom.n_views, geom.n_det, jnp.dtype(dtype).name, 1e3 * t_a, 1e3 * t_at, 1e3 * t_fbp]
    if kind != "parallel" or dtype != jnp.float32:
        return row + [None, None, None, None]
    host = [np.asarray(x, np.float64) for x in images]
    t_radon, t_iradon, reference = _skimage_row(host, geom, max(3, iters // 4))
    gap = float(np.linalg.norm(np.asarray(sinos[0]) - reference) / np.linalg.norm(reference))
    return row + [1e3 * t_radon, 1e3 * t_iradon, t_radon / t_a, gap]


def run(quick: bool = False, write: bool = True) -> str:
    """Times every row, prints the table and (unless write=False) writes its BENCHMARKS.md section."""
    iters = 5 if quick else 20
    load = os.getloadavg()[0]
    rows = []
    for n, views in QUICK if quick else FULL:
        for kind in ("parallel", "fan_flat", "fan_arc"):
            for dtype in (jnp.float32, jnp.bfloat16):
                rows.append(bench_row(kind, n, views, dtype, iters))
                print(bm.markdown_table(HEADER, rows[-1:]).splitlines()[-1], flush=True)
    body = "\n".join([
        "## CT projector (jaxlab.ct): A, A^T and FBP vs skimage.transform.radon / iradon",
        "",
        bm.environment_line(),
        "",
        "Joseph ray-driven A as gathers, chunked over views; A^T its exact transpose (scatter-add); FBP "
        "pixel-driven (gathers). skimage: float64, parallel beam only, circle=True. Medians of "
        f"{iters} calls (skimage: {max(3, iters // 4)}), compile excluded. `python -m jaxlab.ct.bench"
        f"{' --quick' if quick else ''}`. Host load average at start {load:.1f} (other processes share the "
        "cores when it exceeds the core count: times are then inflated and noisy).",
        "",
        bm.markdown_table(HEADER, rows),
    ])
    print(body)
    if write:
        bm.write_section(f"ct-projector-{bm.platform_name()}", body)
    return body


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sizes up to 129 and fewer repetitions")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    run(quick=args.quick, write=not args.no_write)


if __name__ == "__main__":
    main()
