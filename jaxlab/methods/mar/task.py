"""MAR's parts, steps and stages on the one trainer.

Parts: "encoder" (VideoEncoder), "decoder" (MAEDecoder with its encoder_to_decoder and mask token),
"classifier" (BridgingClassifier with its encoder_to_cls_decoder).

Stages (config.mar.stages, in order; each may be run alone and joined by train.init_from):
- "pretrain" (VideoMAE): tube masking at mar.pretrain_ratio (0.9), encoder on the visible tokens,
  decoder, MSE on the masked tokens' normalised pixels; optimizer config.pretrain.optimizer.
- "finetune" (MAR): cell running masking at mar.mask_ratio (0.5), mixup/cutmix soft targets with label
  smoothing, L = soft-target CE(bridging classifier) + mar.mae_weight * masked MSE(decoder); optimizers
  config.optimizer (AdamW, cosine with warm-up, layer-wise decay on the encoder; per-part sections
  optimizer.decoder / optimizer.classifier). Entering it after "pretrain" keeps the pre-trained
  encoder and decoder parameters exactly, gives every part a fresh fine-tuning optimizer and
  initialises the classifier.
Evaluation (finetune): accuracy and CE at the fixed cell running test mask (the decoder is not run),
and accuracy with all tokens visible; (pretrain): masked MSE at a fixed tube mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.config import Config, ConfigError
from jaxlab.kernels.masked_attention import visible_indices
from jaxlab.methods.mar import masking
from jaxlab.methods.mar.losses import masked_mse, mix_batch, pixel_targets, soft_cross_entropy
from jaxlab.models.vit_video import MARModelConfig, VideoGeometry, init_modules
from jaxlab.train.method import Method, Stage
from jaxlab.train.optim import part_optimizer
from jaxlab.train.state import Part, State
from jaxlab.train.step import cast_floating, compute_dtype, make_train_step

STAGES = ("pretrain", "finetune")
PRETRAIN_PARTS = ("encoder", "decoder")
FINETUNE_PARTS = ("encoder", "decoder", "classifier")
OFFICIAL_LR_RULES = (("norm", 1.0), ("bias$", 1.0))  # MAR's optimizer.py: norms and biases undecayed


def model_config(config: Config) -> MARModelConfig:
    m = config.model
    geometry = VideoGeometry(m.num_frames, m.image_size, m.patch_size, m.tubelet_size, 3)
    geometry.check()
    return MARModelConfig(
        geometry=geometry, dim=m.dim, depth=m.depth, heads=m.heads, drop_path=m.drop_path,
        decoder_dim=m.decoder_dim, decoder_depth=m.decoder_depth, decoder_heads=m.decoder_heads,
        cls_dim=m.cls_dim, cls_depth=m.cls_depth, cls_heads=m.cls_heads, cls_dropout=m.cls_dropout,
        num_classes=m.num_classes, implementation=m.attention)


def stage_steps(config: Config) -> dict[str, int]:
    """{stage: steps}: train.steps is the whole run; pretrain gets mar.pretrain_steps of it when both run."""
    stages = tuple(config.mar.stages)
    if stages not in (("pretrain",), ("finetune",), STAGES):
        raise ConfigError(f"mar.stages={stages!r} must be ('pretrain',), ('finetune',) or ('pretrain', 'finetune')")
    if len(stages) == 1:
        return {stages[0]: config.train.steps}
    pre = config.mar.pretrain_steps
    if not 0 < pre < config.train.steps:
        raise ConfigError(f"mar.pretrain_steps={pre} must be in (0, train.steps={config.train.steps})")
    return {"pretrain": pre, "finetune": config.train.steps - pre}


def finetune_optimizer_config(config: Config) -> Config:
    """config.optimizer, with MAR's released lr groups on the encoder when mar.official_lr_groups."""
    cfg = Config(config.optimizer.to_dict())
    if config.mar.official_lr_groups:
        encoder = cfg.get("encoder", Config())
        encoder["lr_rules"] = OFFICIAL_LR_RULES + tuple(encoder.get("lr_rules", cfg.lr_rules))
        cfg["encoder"] = encoder
    return cfg


def make_transform(mean, std):
    """Host batch transform: uint8 (or [0, 1] float) frames -> normalised float32; labels int32."""
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def transform(batch):
        video = np.asarray(batch["video"])
        video = video.astype(np.float32) / 255.0 if video.dtype == np.uint8 else video.astype(np.float32)
        out = {"video": (video - mean) / std}
        if "label" in batch:
            out["label"] = np.asarray(batch["label"]).astype(np.int32)
        return out

    return transform


class MARTask:
    """The pure functions of a MAR run (module docstring); built once per config."""

    def __init__(self, config: Config):
        self.config = config
        self.mar = config.mar
        self.model = model_config(config)
        self.geometry = self.model.geometry
        self.grid = self.geometry.grid
        self.encoder = self.model.encoder()
        self.pretrain_encoder = self.encoder.clone(drop_path=self.mar.pretrain_drop_path)
        self.decoder = self.model.decoder()
        self.classifier = self.model.classifier()
        self.steps = stage_steps(config)
        self.pre_visible = masking.num_visible(self.mar.pretrain_mask, self.grid, self.mar.pretrain_ratio)
        self.visible = masking.num_visible(self.mar.mask, self.grid, self.mar.mask_ratio)
        self.dtype = compute_dtype(config.train.compute_dtype)
        self.pre_txs = {p: part_optimizer(config.pretrain.optimizer, p, self.steps.get("pretrain", 1))
                        for p in PRETRAIN_PARTS}
        ft_cfg = finetune_optimizer_config(config)
        self.ft_txs = {p: part_optimizer(ft_cfg, p, self.steps.get("finetune", 1)) for p in FINETUNE_PARTS}

    # ---- forward pieces -------------------------------------------------------------------------
    def encode(self, params, video, mask, num_visible, *, rng=None, pretrain=False):
        """Encoder on the visible tokens of `mask`: ([B, Nv, D], visible indices [B, Nv], valid [B])."""
        visible, valid = visible_indices(mask, num_visible)
        module = self.pretrain_encoder if pretrain else self.encoder
        rngs = {"dropout": rng} if rng is not None else {}
        encoded = module.apply({"params": params}, video, visible, valid, train=rng is not None, rngs=rngs)
        return encoded, visible, valid

    def reconstruction_loss(self, decoder_params, encoded, visible, valid, video, mask):
        pred = self.decoder.apply({"params": decoder_params}, encoded, visible, valid)
        target = pixel_targets(video, self.geometry, self.mar.mean, self.mar.std, self.mar.normalize_target)
        return masked_mse(pred, target, mask)

    def classify(self, params, encoded, valid, rng=None):
        rngs = {"dropout": rng} if rng is not None else {}
        return self.classifier.apply({"params": params}, encoded, valid, train=rng is not None, rngs=rngs)

    # ---- losses over parts ----------------------------------------------------------------------
    def pretrain_loss(self, params, collections, batch, rng):
        video = batch["video"]
        mask_key, drop_key = jax.random.split(rng)
        mask = masking.train_mask(self.mar.pretrain_mask, mask_key, video.shape[0], self.grid, self.mar.pretrain_ratio)
        encoded, visible, valid = self.encode(params["encoder"], video, mask, self.pre_visible, rng=drop_key,
                                              pretrain=True)
        loss = self.reconstruction_loss(params["decoder"], encoded, visible, valid, video, mask)
        return loss, (collections, {"mae_loss": loss})

    def finetune_loss(self, params, collections, batch, rng):
        mix_key, mask_key, enc_key, cls_key = jax.random.split(rng, 4)
        m = self.mar
        video, targets = mix_batch(mix_key, batch["video"], batch["label"], self.model.num_classes,
                                   mixup_alpha=m.mixup_alpha, cutmix_alpha=m.cutmix_alpha, prob=m.mixup_prob,
                                   switch_prob=m.switch_prob, smoothing=m.label_smoothing)
        mask = masking.train_mask(m.mask, mask_key, video.shape[0], self.grid, m.mask_ratio,
                                  **self.cell_options())
        encoded, visible, valid = self.encode(params["encoder"], video, mask, self.visible, rng=enc_key)
        logits = self.classify(params["classifier"], encoded, valid, cls_key)
        ce = soft_cross_entropy(logits, targets).mean()
        metrics = {"ce": ce}
        loss = ce
        if m.mae_weight > 0:
            mse = self.reconstruction_loss(params["decoder"], encoded, visible, valid, video, mask)
            loss = ce + m.mae_weight * mse
            metrics["mae_loss"] = mse
        return loss, (collections, metrics)

    def cell_options(self) -> dict:
        if self.mar.mask != "cell_running":
            return {}
        return {"temporal_shuffle": self.mar.temporal_shuffle, "spatial_repeat": self.mar.spatial_repeat}

    # ---- evaluation -----------------------------------------------------------------------------
    def logits_at(self, params, video, kind: str, ratio: float) -> jax.Array:
        """Inference logits [B, C] with the fixed test mask of `kind` ('none': all tokens)."""
        mask = masking.eval_mask(kind, video.shape[0], self.grid, ratio, seed=self.config.seed)
        encoded, _, valid = self.encode(params["encoder"], video, mask, masking.num_visible(kind, self.grid, ratio))
        return self.classify(params["classifier"], encoded, valid)

    def finetune_eval(self, state, batch, rng):
        params = cast_floating(state.params, self.dtype)
        video = batch["video"].astype(self.dtype)
        labels = batch["label"]
        logits = self.logits_at(params, video, self.mar.mask, self.mar.mask_ratio)
        out = {"accuracy": (logits.argmax(-1) == labels).astype(jnp.float32),
               "loss": soft_cross_entropy(logits, jax.nn.one_hot(labels, self.model.num_classes))}
        if self.mar.eval_all_tokens:
            full = self.logits_at(params, video, "none", 0.0)
            out["accuracy_all_tokens"] = (full.argmax(-1) == labels).astype(jnp.float32)
        return out

    def pretrain_eval(self, state, batch, rng):
        params = cast_floating(state.params, self.dtype)
        video = batch["video"].astype(self.dtype)
        mask = masking.eval_mask(self.mar.pretrain_mask, video.shape[0], self.grid, self.mar.pretrain_ratio,
                                 seed=self.config.seed)
        encoded, visible, valid = self.encode(params["encoder"], video, mask, self.pre_visible)
        pred = self.decoder.apply({"params": params["decoder"]}, encoded, visible, valid)
        target = pixel_targets(video, self.geometry, self.mar.mean, self.mar.std, self.mar.normalize_target)
        err = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
        weights = mask.astype(jnp.float32)
        return {"mae_loss": jnp.sum(err * weights, axis=1) / jnp.sum(weights, axis=1)}

    def apply_fn(self, state, batch):
        """Inference forward for FLOP counts: MAR (encoder at the test mask + classifier) when the state
        has a classifier, else the pre-training forward (encoder + decoder at the tube mask)."""
        if "classifier" in state.parts:
            return self.logits_at(state.params, batch["video"], self.mar.mask, self.mar.mask_ratio)
        return self.pretrain_eval(state, batch, None)["mae_loss"]

    # ---- state and stages -----------------------------------------------------------------------
    def init_params(self, rng, parts):
        return init_modules(self.model, rng, self.visible, parts)

    def init_state(self, rng, batch):
        first = tuple(self.config.mar.stages)[0]
        parts = PRETRAIN_PARTS if first == "pretrain" else FINETUNE_PARTS
        txs = self.pre_txs if first == "pretrain" else self.ft_txs
        params = self.init_params(rng, parts)
        return State.create({p: Part.create(params[p], txs[p]) for p in parts})

    def enter_finetune(self, state, rng):
        """Pre-trained encoder and decoder kept exactly, fresh fine-tuning optimizers, a new classifier."""
        classifier = self.init_params(rng, ("classifier",))["classifier"]
        return state.replace_parts(
            encoder=Part.create(state.parts["encoder"].params, self.ft_txs["encoder"]),
            decoder=Part.create(state.parts["decoder"].params, self.ft_txs["decoder"]),
            classifier=Part.create(classifier, self.ft_txs["classifier"]))

    def stages(self, train_source, eval_source) -> tuple[Stage, ...]:
        t = self.config.train
        out = []
        for name in self.config.mar.stages:
            if name == "pretrain":
                step = make_train_step(self.pretrain_loss, self.pre_txs, accum_steps=t.accum_steps, dtype=self.dtype)
                out.append(Stage("pretrain", self.steps["pretrain"], step, train_source, eval_source,
                                 self.pretrain_eval, trains=PRETRAIN_PARTS))
            else:
                trains = FINETUNE_PARTS if self.mar.mae_weight > 0 else ("encoder", "classifier")
                step = make_train_step(self.finetune_loss, self.ft_txs, trains=trains, accum_steps=t.accum_steps,
                                       dtype=self.dtype)
                enter = self.enter_finetune if len(self.config.mar.stages) > 1 else None
                out.append(Stage("finetune", self.steps["finetune"], step, train_source, eval_source,
                                 self.finetune_eval, enter=enter, trains=trains))
        return tuple(out)

    def param_groups(self, state) -> dict:
        """Parameter trees to count: encoder (backbone), decoder, bridging classifier (shapes from the
        config where the state does not hold it yet)."""
        groups = dict(state.params)
        for part in FINETUNE_PARTS:
            if part not in groups:
                groups[part] = jax.eval_shape(lambda: self.init_params(jax.random.PRNGKey(0), (part,)))[part]
        return {p: groups[p] for p in FINETUNE_PARTS}


def build_method(config: Config, train_source, eval_source) -> Method:
    task = MARTask(config)
    stages = task.stages(train_source, eval_source)
    return Method(
        name="mar", init_state=task.init_state, train_step=stages[0].train_step, train_source=train_source,
        eval_source=eval_source, eval_step=stages[-1].eval_step, transform=make_transform(config.mar.mean, config.mar.std),
        stages=stages, apply_fn=task.apply_fn, param_groups=task.param_groups)
