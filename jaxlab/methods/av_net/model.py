"""AV-Net (av_inpainting.md; official models/avnet.py): which image regions sound like the audio.

    f_V = ResNet18_V(frames)      (B, h, w, 512), layer4 stride 1: 224x224 -> 14x14
    f_A = GMP(ResNet18_A(logmel)) (B, 512)
    e_V = conv1x1(ReLU(conv1x1(f_V))), 512 -> 128 -> 128;  e_A = FC(ReLU(FC(f_A))), 512 -> 128 -> 128
    M(a, v) = sigmoid(scale * <e_V / |e_V|, e_A / |e_A|>)   (B, h, w), scale learnable, init 5
    score = GMP(M) (B,);  y_V = Linear(GAP(f_V)), y_A = Linear(f_A), 512 -> K pseudo-classes

Frames enter as RGB in [0, 1] and are normalised to ImageNet statistics inside (the official inpainting
trainer re-normalises its frames before calling AV-Net); the audio enters as the normalised log-mel
(jaxlab.audio.audio_features: (B, n_mels, frames)). The scale is the official 1x1 conv without bias
(one weight). Projection layers use PyTorch's default init; the classifiers N(0, 0.01) weights and zero
biases (the official init_classifier).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlab.models.resnet18 import RESNET18_WIDTHS, ResNet18
from jaxlab.models.vit_video import torch_default_bias, torch_default_kernel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLASSIFIER_INIT = nn.initializers.normal(0.01)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(|x|, eps) over the last axis (torch.nn.functional.normalize)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _torch_dense(features: int, fan_in: int) -> nn.Dense:
    return nn.Dense(features, kernel_init=torch_default_kernel, bias_init=torch_default_bias(fan_in))


class AVNet(nn.Module):
    """The module docstring's network. widths: the ResNet-18 stage widths (the paper: 64..512);
    map_stride: 16 as the paper (224 -> 14x14), 8 for small frames (layer3 of the visual branch at stride
    1 too: 64 -> 8x8; the audio branch is unchanged, its map is max-pooled)."""

    widths: Sequence[int] = RESNET18_WIDTHS
    embed_dim: int = 128
    num_classes: int = 10
    init_scale: float = 5.0
    normalize_frames: bool = True
    conv_impl: str = "lax"
    map_stride: int = 16  # the visual map's stride: 16 (the paper's layer4 stride 1) or 8 (layer3 too)

    def setup(self):
        width = self.widths[-1]
        if self.map_stride not in (8, 16):
            raise ValueError(f"AVNet map_stride must be 16 (the paper) or 8 (layer3 stride 1), got {self.map_stride}")
        self.visual = ResNet18(self.widths, layer4_stride=1, layer3_stride=self.map_stride // 8, in_channels=3,
                               conv_impl=self.conv_impl)
        self.audio = ResNet18(self.widths, layer4_stride=1, in_channels=1, conv_impl=self.conv_impl)
        self.conv1_v = _torch_dense(self.embed_dim, width)  # a 1x1 conv on (B, h, w, C)
        self.conv2_v = _torch_dense(self.embed_dim, self.embed_dim)
        self.fc1_a = _torch_dense(self.embed_dim, width)
        self.fc2_a = _torch_dense(self.embed_dim, self.embed_dim)
        self.scale = self.param("scale", nn.initializers.constant(self.init_scale), ())
        self.classifier_v = nn.Dense(self.num_classes, kernel_init=CLASSIFIER_INIT)
        self.classifier_a = nn.Dense(self.num_classes, kernel_init=CLASSIFIER_INIT)

    def encode_visual(self, frames: jax.Array, train: bool = False) -> jax.Array:
        """(B, H, W, 3) in [0, 1] -> f_V (B, H / s, W / s, widths[-1]), s = map_stride."""
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"AVNet frames must be (batch, height, width, 3) in [0, 1], got {frames.shape}")
        if self.normalize_frames:
            frames = (frames - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
        return self.visual(frames, train)

    def encode_audio(self, audio_logmel: jax.Array, train: bool = False) -> jax.Array:
        """(B, n_mels, frames) normalised log-mel -> f_A (B, widths[-1]) (global max pool of layer4)."""
        if audio_logmel.ndim != 3:
            raise ValueError(f"AVNet audio must be (batch, n_mels, frames), got {audio_logmel.shape}")
        return self.audio(audio_logmel[..., None], train).max(axis=(1, 2))

    def attend(self, visual_features: jax.Array, audio_features: jax.Array) -> dict[str, jax.Array]:
        """Embeddings, the map M (B, h, w), its logit scale * cosine, and score = GMP(M) with its logit."""
        visual_embedding = l2_normalize(self.conv2_v(nn.relu(self.conv1_v(visual_features))))
        audio_embedding = l2_normalize(self.fc2_a(nn.relu(self.fc1_a(audio_features))))
        logits = self.scale * jnp.einsum("bhwc,bc->bhw", visual_embedding, audio_embedding)
        score_logit = logits.max(axis=(1, 2))  # GMP(sigmoid(x)) = sigmoid(GMP(x)): sigmoid is increasing
        return {"visual_embedding": visual_embedding, "audio_embedding": audio_embedding,
                "map_logits": logits, "attention_map": nn.sigmoid(logits),
                "score_logit": score_logit, "score": nn.sigmoid(score_logit)}

    def classify(self, visual_features: jax.Array, audio_features: jax.Array) -> dict[str, jax.Array]:
        """Pseudo-class logits y_V = Linear(GAP(f_V)), y_A = Linear(f_A), each (B, num_classes)."""
        return {"visual_logits": self.classifier_v(visual_features.mean(axis=(1, 2))),
                "audio_logits": self.classifier_a(audio_features)}

    def __call__(self, audio_logmel: jax.Array, frames: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """audio_logmel (B, n_mels, frames), frames (B, H, W, 3) in [0, 1] -> {attention_map (B, h, w) in
        (0, 1), map_logits, score (B,), score_logit, visual_features (B, h, w, C), audio_features (B, C),
        visual_embedding (B, h, w, 128), audio_embedding (B, 128), visual_logits, audio_logits (B, K)}."""
        visual_features = self.encode_visual(frames, train)
        audio_features = self.encode_audio(audio_logmel, train)
        if visual_features.shape[0] != audio_features.shape[0]:
            raise ValueError(f"AVNet: {frames.shape[0]} frames but {audio_logmel.shape[0]} audio clips")
        return {"visual_features": visual_features, "audio_features": audio_features,
                **self.attend(visual_features, audio_features), **self.classify(visual_features, audio_features)}

    def with_mismatched(self, audio_logmel: jax.Array, frames: jax.Array, train: bool = False):
        """(__call__'s dict for the matched pairs, attend's dict for frame i with audio i + 1 (mod B)):
        one pass of each branch gives the positives and negatives of the attention loss (Eq. 1)."""
        matched = self(audio_logmel, frames, train)
        shifted = jnp.roll(matched["audio_features"], -1, axis=0)
        return matched, self.attend(matched["visual_features"], shifted)
