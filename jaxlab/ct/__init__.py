"""CT physics in pure JAX: geometries, projector A and its exact transpose, FBP, phantoms, low dose.

    from jaxlab import ct
    geom = ct.fan_beam(360, 256, 128, det_spacing=0.03, pixel_size=0.02, s2r=4.0, d2r=3.0)
    sino = ct.project(image, geom)                # A,   (..., H, W) -> (..., V, D)
    back = ct.backproject(sino, geom)             # A^T, the exact transpose (jax.linear_transpose)
    recon = ct.fbp(ct.low_dose(key, sino, 1e5), geom, "hann")

- geometry: parallel beam; fan beam with a flat (equi-spaced) or arc (equi-angular) detector;
  `from_protocol` takes HyperFed's protocol vector; `stack_geometries` pads and masks geometries of
  different view / detector counts into one batch for `jax.vmap`.
- projector: Joseph's ray-driven projector (linear interpolation per row / column crossing) written
  as gathers and chunked over views; A^T is its linear transpose, so AD through either uses the other.
- fbp: ramp, Shepp-Logan, cosine and Hann filters; fan-beam pre-weights and distance weights
  (Kak & Slaney ch. 3); full scans.
- phantom: ellipse phantoms (Shepp-Logan, random) rasterised, and their closed-form sinograms for
  any geometry.
- noise: Poisson(I0 exp(-Ax)) + electronic Gaussian noise, log transform.
- bench: `python -m jaxlab.ct.bench` times A and A^T against skimage.transform.radon.
"""

from jaxlab.ct.fbp import FILTERS, fbp, filter_sinogram, weighted_backproject
from jaxlab.ct.geometry import (Geometry, fan_beam, from_protocol, pad_geometry, parallel_beam,
                                pixel_centres, rays, stack_geometries)
from jaxlab.ct.noise import log_transform, low_dose, transmission_counts
from jaxlab.ct.phantom import ellipse_image, ellipse_sinogram, random_ellipses, shepp_logan_ellipses
from jaxlab.ct.projector import backproject, operator_norm, project

__all__ = [
    "FILTERS", "Geometry", "backproject", "ellipse_image", "ellipse_sinogram", "fan_beam", "fbp",
    "filter_sinogram", "from_protocol", "log_transform", "low_dose", "operator_norm", "pad_geometry",
    "parallel_beam", "pixel_centres", "project", "random_ellipses", "rays", "shepp_logan_ellipses", "stack_geometries",
    "transmission_counts", "weighted_backproject",
]
