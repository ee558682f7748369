"""HyperFed's RED-CNN variant with FiLM modulation (Zi-YuanYang/HyperFed models/hyperfed_RED.py
`RED_CNN2`): RED-CNN (jaxlab.models.red_cnn: 5x5 kernels, stride 1, no padding, F = 96 channels)
post-processing the FBP image, modulated by gamma / beta `(B, K)`, K = 2F + 1 (193 for F = 96):

    gamma[0:F],  beta[0:F]    after every encoder conv (conv1..conv5, before its ReLU)
    gamma[F:2F], beta[F:2F]   after tconv1..tconv4 (before the residual additions)
    gamma[2F],   beta[2F]     after tconv5, before the global residual and the final ReLU

The projector enters only through the FBP input (the released RED variant has no data-fidelity step).
Parameters: those of jaxlab.models.red_cnn.RedCNN with the same conv / tconv names (`part_param_counts`).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from jaxlab.models.red_cnn import FEATURES, _conv, _tconv, part_param_counts


def film_slices(features: int = FEATURES) -> dict[str, slice]:
    return {"encoder": slice(0, features), "decoder": slice(features, 2 * features),
            "output": slice(2 * features, 2 * features + 1)}


class FilmRedCNN(nn.Module):
    """x `(B, H, W, 1)`, gamma / beta `(B, 2F + 1)` -> `(B, H, W, 1)`."""

    features: int = FEATURES
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, x: jax.Array, gamma: jax.Array, beta: jax.Array) -> jax.Array:
        f, impl = self.features, self.conv_impl
        if gamma.shape != (x.shape[0], 2 * f + 1) or beta.shape != gamma.shape:
            raise ValueError(f"FilmRedCNN: gamma {gamma.shape}, beta {beta.shape} must be (B, 2F + 1) = "
                             f"{(x.shape[0], 2 * f + 1)}")
        s = film_slices(f)

        def film(h, name):
            return h * gamma[:, None, None, s[name]] + beta[:, None, None, s[name]]

        def enc(h, name):
            return nn.relu(film(_conv(f, name, impl)(h), "encoder"))

        def dec(h, name):
            return film(_tconv(f, name, impl)(h), "decoder")

        out = enc(enc(x, "conv1"), "conv2")
        residual_2 = out
        out = enc(enc(out, "conv3"), "conv4")
        residual_3 = out
        out = enc(out, "conv5")
        out = dec(out, "tconv1") + residual_3
        out = dec(nn.relu(out), "tconv2")
        out = dec(nn.relu(out), "tconv3") + residual_2
        out = dec(nn.relu(out), "tconv4")
        out = film(_tconv(1, "tconv5", impl)(nn.relu(out)), "output")
        return nn.relu(out + x)



def param_count(features: int = FEATURES) -> int:
    """The same parameters as RED-CNN's (the FiLM vectors come from outside)."""
    return int(sum(part_param_counts(features).values()))
