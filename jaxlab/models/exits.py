"""Internal classifiers (ICs, early exits) for backbones that expose their blocks' outputs ("taps"), and
early-exit inference (Shallow-Deep Networks, Kaya et al. 2019; the multi-exit backdoor of Dong et al. 2023,
multiexit_backdoor.md).

A multi-exit backbone is a Flax module called as `backbone(x, train, upto=None) -> (logits, taps)`:
logits (B, num_classes) of the final exit and taps, a list of T block outputs, (B, h, w, C) maps or
(B, F) vectors (VGG's FC block); with `upto=k` it stops after tap k and returns (None, taps[:k + 1])
(jaxlab.models.resnet_cifar.ResNetCifarBlocks, vgg_cifar.VGG16BN, mobilenet_cifar.MobileNetBlocks).

The ICs live in their own parameter tree (`ExitHeads`), apart from the backbone's, so attaching,
stripping and re-attaching them never touches the backbone, and IC-only training or backbone poisoning
freezes one tree while the other trains. Outputs are ordered as in the reference: the placed ICs by
tap, then the final exit; M = number of ICs + 1.

IC (the BackdoorDynamicDNN / SDN InternalClassifier): a (B, s, s, C) tap is pooled with kernel = stride
= floor(s / 4) when s >= 4 (to 4x4 at s = 4, 8, 16, 32, 64), flattened and fed to a Linear (PyTorch's
default init); s < 4 or a vector tap: Linear on the flattened tap. pooling "avg" (the paper's dense
ICs), or "mix" (SDN's original: alpha * maxpool + (1 - alpha) * avgpool with a learnable alpha ~ U(0, 1)).
Placement: "dense" (an IC after every block: ResNet-56 27, VGG-16 14, MobileNet 13) or "sdn" (SDN's
sparse ICs at about 15, 30, 45, 60, 75 and 90% of the backbone's cost: SDN's own masks for ResNet-56,
VGG-16 and MobileNet, and for other depths the taps whose cumulative multiply-accumulates are nearest
to those fractions, which is inferred).

Early exit: from exit `start` on, the first exit whose max softmax probability exceeds tau answers,
otherwise the final exit (the reference's test_threshold: strictly greater).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.models.layers import Conv
from jaxlab.models.resnet_cifar import TorchLinear

POOLINGS = ("avg", "mix")
PLACEMENTS = ("dense", "sdn")
SDN_FRACTIONS = (0.15, 0.30, 0.45, 0.60, 0.75, 0.90)
# Shallow-Deep-Networks network_architectures.py, add_ic per block (1 = an IC after that block)
SDN_MASKS = {
    "resnet56": (0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0),
    "vgg16": (0, 1, 0, 1, 0, 1, 1, 0, 1, 1, 0, 0, 0, 0),
    "mobilenet": (0, 0, 1, 0, 1, 0, 1, 0, 1, 0, 0, 1, 0),
}


def pool_kernel(size: int) -> int | None:
    """The IC's pooling kernel for an s x s tap: floor(s / 4) if s >= 4, else None (no pooling)."""
    return size // 4 if size >= 4 else None


class InternalClassifier(nn.Module):
    """One IC. tap (B, s, s, C) or (B, F) -> logits (B, num_classes); see the module docstring."""

    num_classes: int
    pooling: str = "avg"

    @nn.compact
    def __call__(self, tap: jax.Array) -> jax.Array:
        if self.pooling not in POOLINGS:
            raise ValueError(f"IC pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if tap.ndim == 4:
            k = pool_kernel(tap.shape[1])
            if k is not None:
                avg = nn.avg_pool(tap, (k, k), (k, k))
                if self.pooling == "mix":
                    alpha = self.param("alpha", nn.initializers.uniform(1.0), (1,))
                    avg = alpha * nn.max_pool(tap, (k, k), (k, k)) + (1 - alpha) * avg
                tap = avg
        elif tap.ndim != 2:
            raise ValueError(f"an IC reads a (B, s, s, C) map or a (B, F) vector, got {tap.shape}")
        return TorchLinear(self.num_classes, name="linear")(tap.reshape(tap.shape[0], -1))


class ExitHeads(nn.Module):
    """The ICs at tap indices `placement` (sorted). taps: the backbone's T taps -> list of len(placement)
    logits (B, num_classes). Parameters: {"ic<tap index>": ...}."""

    num_classes: int
    placement: tuple[int, ...]
    pooling: str = "avg"

    @nn.compact
    def __call__(self, taps: Sequence[jax.Array]) -> list[jax.Array]:
        if any(not 0 <= t < len(taps) for t in self.placement) or list(self.placement) != sorted(set(self.placement)):
            raise ValueError(f"IC placement {self.placement} must be increasing tap indices below {len(taps)}")
        return [InternalClassifier(self.num_classes, self.pooling, name=f"ic{t}")(taps[t])
                for t in self.placement]


def placement(kind: str, num_taps: int, arch: str = "", tap_macs: Sequence[float] | None = None) -> tuple[int, ...]:
    """Tap indices that get an IC: "dense" every tap; "sdn" SDN's mask for arch (resnet56, vgg16,
    mobilenet) when it fits, else the taps whose cumulative cost (tap_macs: MACs to reach each tap, the
    last entry the whole backbone's) is nearest to SDN_FRACTIONS of the whole."""
    if kind == "dense":
        return tuple(range(num_taps))
    if kind != "sdn":
        raise ValueError(f"IC placement must be one of {PLACEMENTS}, got {kind!r}")
    mask = SDN_MASKS.get(arch)
    if mask is not None and len(mask) == num_taps:
        return tuple(i for i, m in enumerate(mask) if m)
    if tap_macs is None:
        raise ValueError(f"'sdn' placement for {arch or 'this backbone'} ({num_taps} taps) needs the taps' costs")
    cost = np.asarray(tap_macs, np.float64)
    fractions = cost[:num_taps] / cost[-1]
    return tuple(sorted({int(np.abs(fractions - f).argmin()) for f in SDN_FRACTIONS}))


def exit_logits(backbone: nn.Module, heads: nn.Module, backbone_vars, head_params, x: jax.Array, *,
                train: bool = False, rngs=None, mutable=False):
    """(M, B, num_classes) logits of every exit (ICs then final). With `mutable` (e.g. ["batch_stats"]),
    returns (logits, the backbone's updated collections)."""
    out = backbone.apply(backbone_vars, x, train=train, rngs=rngs, mutable=mutable)
    (final, taps), updates = out if mutable else (out, None)
    ics = heads.apply({"params": head_params}, taps)
    logits = jnp.stack([*ics, final])
    return (logits, updates) if mutable else logits


def early_exit(logits: jax.Array, tau: float, start: int = 0) -> tuple[jax.Array, jax.Array]:
    """Early-exit inference over precomputed exits. logits (M, B, C), tau, start exit index ->
    (exit index (B,) in [start, M - 1], prediction (B,)): the first exit >= start whose max softmax
    exceeds tau, else the final exit M - 1."""
    num_exits = logits.shape[0]
    if not 0 <= start < num_exits:
        raise ValueError(f"start exit {start} is outside the {num_exits} exits")
    probs = jax.nn.softmax(logits[start:].astype(jnp.float32), axis=-1)
    confident = probs.max(-1) > tau  # (M - start, B)
    confident = confident.at[-1].set(True)
    chosen = start + jnp.argmax(confident, axis=0)
    preds = logits.argmax(-1)  # (M, B)
    return chosen, jnp.take_along_axis(preds, chosen[None], axis=0)[0]


# ----------------------------------------------------------------------------------------- costs


def count_macs(fn, *args, **kwargs) -> float:
    """Multiply-accumulates of one call of `fn(*args, **kwargs)` (shapes only: run under eval_shape)
    in its Conv and Dense layers (jaxlab.models.layers.Conv, nn.Conv, nn.Dense, TorchLinear), summed over
    the batch."""
    total = [0.0]

    def interceptor(next_fun, a, kw, context):
        out = next_fun(*a, **kw)
        module = context.module
        if context.method_name != "__call__":
            return out
        if isinstance(module, Conv | nn.Conv):
            x = a[0]
            ks = module.kernel_size
            taps = int(np.prod((ks,) if isinstance(ks, int) else ks))
            total[0] += out.size * taps * x.shape[-1] / module.feature_group_count
        elif isinstance(module, nn.Dense | TorchLinear):
            total[0] += out.size * a[0].shape[-1]
        return out

    def run(*a, **kw):
        with nn.intercept_methods(interceptor):
            return fn(*a, **kw)

    jax.eval_shape(run, *args, **kwargs)
    return total[0]


def exit_costs(backbone: nn.Module, heads: ExitHeads, backbone_vars, head_params, image_shape) -> dict:
    """Per-input MACs of a multi-exit model on (H, W, C) images: {"tap": (T,) MACs of the backbone up to
    each tap, "ic": (n_ics,) MACs of each IC alone, "final": the whole backbone}."""
    x = jnp.zeros((1, *image_shape), jnp.float32)
    _, taps = jax.eval_shape(lambda v, x: backbone.apply(v, x), backbone_vars, x)
    tap_macs = [count_macs(lambda v, x, k=k: backbone.apply(v, x, upto=k), backbone_vars, x)
                for k in range(len(taps))]
    final = count_macs(lambda v, x: backbone.apply(v, x), backbone_vars, x)
    taps = [jnp.zeros(t.shape, t.dtype) for t in taps]
    ic = []
    for t in heads.placement:
        one = ExitHeads(heads.num_classes, (t,), heads.pooling)
        ic.append(count_macs(lambda p, ts: one.apply({"params": {f"ic{t}": p}}, ts), head_params[f"ic{t}"], taps))
    return {"tap": np.array(tap_macs), "ic": np.array(ic), "final": float(final)}


def exit_path_macs(costs: dict, placement: Sequence[int], start: int = 0) -> np.ndarray:
    """(M,) per-input MACs of answering at each exit when early exit starts at `start`: the backbone up to
    the exit's tap (the whole backbone for the final exit) plus every IC evaluated on the way (exits
    start..k; all of them before the final exit answers)."""
    ic = np.asarray(costs["ic"], np.float64)
    out = []
    for k in range(len(placement) + 1):
        evaluated = ic[start:k + 1].sum() if k >= start else 0.0
        backbone = costs["tap"][placement[k]] if k < len(placement) else costs["final"]
        out.append(backbone + evaluated)
    return np.array(out)
