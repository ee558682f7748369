"""Low-dose CT simulation on a sinogram of line integrals p = A x.

Model (per detector reading, independent): counts N = Poisson(I0 exp(-p)) + e, e ~ Normal(0,
electronic_std^2) (electronic noise, in counts); so E[N] = I0 exp(-p), Var[N] = I0 exp(-p) +
electronic_std^2. The log transform back to line integrals is -log(max(N, floor) / I0), the floor
(default 1 count) keeping photon starvation and negative readings finite. I0 is HyperFed's dose
entry of the protocol vector (incident photons per detector bin).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.jit
def transmission_counts(key: jax.Array, sino: jax.Array, I0: float | jax.Array,  # noqa: N803
                        electronic_std: float | jax.Array = 0.0) -> jax.Array:
    """Noisy detector counts `(..., V, D)` float32 for line integrals `sino` at dose I0."""
    k_poisson, k_gauss = jax.random.split(key)
    expected = I0 * jnp.exp(-sino.astype(jnp.float32))
    counts = jax.random.poisson(k_poisson, expected).astype(jnp.float32)
    return counts + electronic_std * jax.random.normal(k_gauss, sino.shape, jnp.float32)


def log_transform(counts: jax.Array, I0: float | jax.Array, floor: float = 1.0) -> jax.Array:  # noqa: N803
    """Line integrals -log(max(counts, floor) / I0)."""
    return -jnp.log(jnp.maximum(counts, floor) / I0)


@jax.jit
def low_dose(key: jax.Array, sino: jax.Array, I0: float | jax.Array, electronic_std: float | jax.Array = 0.0,
             floor: float = 1.0) -> jax.Array:  # noqa: N803
    """The noisy sinogram a scanner at dose I0 would measure: log_transform(transmission_counts)."""
    return log_transform(transmission_counts(key, sino, I0, electronic_std), I0, floor)
