"""MAR (masked action recognition) with VideoMAE pre-training, jaxlab.methods.mar.

Variants:
  tiny        CPU: procedural action clips (synthetic:actions, 4 motion classes, 8 frames of 32x32), a
              ViT far smaller than S (dim 64, depth 4, heads 4; patch 8, tubelet 2 -> 4x4x4 = 64 tokens),
              pre-training then MAR fine-tuning in one run (a few hundred steps).
  k400_b / k400_l / ssv2_b / ssv2_l
              the paper's fine-tuning settings (ViT-B / ViT-L, 16x224x224, 50% cell running masking;
              base lr, layer decay, batch per GPU x 8 GPUs and epochs from the spec's table), fine-tuning
              only: start from VideoMAE weights with --config.train.init_from=... (converted .npz or a
              pre-training run) and point --config.data.source=video:<root> at your clips (until then a
              small procedural stand-in at 16x224x224 is the data, for `jaxlab info` and smoke runs).
  pretrain_tiny  the tiny model's VideoMAE pre-training alone (200 steps); fine-tune it in a second run with
              --config mar:tiny --config.mar.stages="('finetune',)" --config.train.init_from=<its workdir>
              --config.train.init_parts="('encoder','decoder')"
  pretrain_b  VideoMAE pre-training of ViT-B (90% tube masking, 800 epochs of K400; size=L for ViT-L).
Options: size=S|B|L|H for the paper variants' backbone, e.g. configs/mar.py:k400_b.
"""

from jaxlab.config import Config, base_config, parse_arg
from jaxlab.models.vit_video import DECODER_SIZES, DROP_PATH, ENCODER_SIZES
from jaxlab.train.optim import default_optimizer_config

K400_TRAIN, SSV2_TRAIN = 240_436, 168_913  # training clips
PAPER = {  # setting: (base lr, layer decay, batch per GPU, epochs, mae weight, classes, train clips, size)
    "k400_b": (1e-3, 0.65, 8, 100, 0.01, 400, K400_TRAIN, "B"),
    "k400_l": (5e-4, 0.75, 4, 60, 0.01, 400, K400_TRAIN, "L"),
    "ssv2_b": (1e-3, 0.75, 16, 40, 0.1, 174, SSV2_TRAIN, "B"),
    "ssv2_l": (2.5e-4, 0.75, 2, 40, 0.1, 174, SSV2_TRAIN, "L"),
}
GPUS = 8


def _model(size: str, **over) -> Config:
    dim, depth, heads = ENCODER_SIZES[size]
    ddim, ddepth, dheads = DECODER_SIZES[size]
    m = Config(size=size, num_frames=16, image_size=224, patch_size=16, tubelet_size=2, dim=dim, depth=depth,
               heads=heads, drop_path=DROP_PATH[size], decoder_dim=ddim, decoder_depth=ddepth,
               decoder_heads=dheads, cls_dim=512, cls_depth=2, cls_heads=4, cls_dropout=0.1, num_classes=400,
               attention="auto")
    m.update(**over)
    return m


def _stand_in_data(c: Config, batch: int) -> None:
    """Paper variants read your clips (--config.data.source=video:<root>, <root>/{train,test}.csv); until
    then a small procedural stand-in at the paper's input size (16 x 224 x 224) lets `jaxlab info` and
    smoke runs work offline. The sampling options apply to video: sources."""
    c.data.update(source="synthetic:actions", batch_size=batch, eval_batch_size=batch)
    c.data.options = Config(keys=None, num_frames=16, size=224, classes=8, train_clips=batch, test_clips=batch)


def get_config(arg=None):
    arg = parse_arg(arg, ("tiny", "pretrain_tiny", *PAPER, "pretrain_b"), variant="tiny", size="")
    c = base_config()
    c.method = "mar"
    c.mar = Config(
        stages=("pretrain", "finetune"), pretrain_steps=0,
        pretrain_mask="tube", pretrain_ratio=0.9, pretrain_drop_path=0.0,
        mask="cell_running", mask_ratio=0.5, temporal_shuffle=True, spatial_repeat=True,
        mae_weight=0.01, normalize_target=True,
        mixup_alpha=0.8, cutmix_alpha=1.0, mixup_prob=1.0, switch_prob=0.5, label_smoothing=0.1,
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        official_lr_groups=False, eval_all_tokens=True,
    )
    # VideoMAE pre-training optimizer: AdamW (0.9, 0.95), wd 0.05, cosine with warm-up
    c.pretrain = Config(optimizer=default_optimizer_config())
    c.pretrain.optimizer.update(name="adamw", lr=1.5e-4, b1=0.9, b2=0.95, weight_decay=0.05,
                                schedule="warmup_cosine", end_lr=1e-5)
    # MAR fine-tuning: AdamW, wd 0.05, cosine to 1e-6 with warm-up, layer-wise decay on the encoder
    c.optimizer.update(name="adamw", lr=1e-3, b1=0.9, b2=0.999, weight_decay=0.05, schedule="warmup_cosine",
                       end_lr=1e-6, layer_decay=0.75)
    c.optimizer.decoder = Config(layer_decay=0.0)
    c.optimizer.classifier = Config(layer_decay=0.0)
    c.data.update(source="synthetic:actions", batch_size=32, eval_batch_size=64)
    c.train.update(best_metric="accuracy", best_mode="max")

    if arg.variant in ("tiny", "pretrain_tiny"):
        c.model = _model("S", num_frames=8, image_size=32, patch_size=8, tubelet_size=2, dim=64, depth=4, heads=4,
                         drop_path=0.0, decoder_dim=32, decoder_depth=1, decoder_heads=2, cls_dim=64, cls_depth=2,
                         cls_heads=4, cls_dropout=0.1, num_classes=4)
        c.model.size = "tiny"
        c.data.options.update(classes=4, num_frames=8, size=32, train_clips=2048, test_clips=512)
        c.mar.update(pretrain_steps=20, mae_weight=0.1, mixup_alpha=0.0, cutmix_alpha=0.0)
        c.pretrain.optimizer.update(lr=1e-3, warmup_steps=10)
        c.optimizer.update(lr=1e-3, warmup_steps=20, end_lr=1e-5, layer_decay=0.75)
        c.data.update(batch_size=32, eval_batch_size=128)
        c.train.update(steps=400, log_every=25, eval_every=100, checkpoint_every=100)
        if arg.variant == "pretrain_tiny":  # VideoMAE pre-training alone; fine-tune with init_from
            c.mar.update(stages=("pretrain",))
            c.train.update(steps=200, best_metric="mae_loss", best_mode="min")
    elif arg.variant in PAPER:
        lr, decay, per_gpu, epochs, weight, classes, clips, size = PAPER[arg.variant]
        c.model = _model(arg.size or size, num_classes=classes)
        c.mar.update(stages=("finetune",), mae_weight=weight)
        batch = per_gpu * GPUS
        steps_per_epoch = clips // batch
        _stand_in_data(c, batch)
        c.data.options.update(sampling="interval" if classes == 400 else "segment", stride=4 if classes == 400 else 2)
        c.optimizer.update(lr=lr, layer_decay=decay, warmup_steps=5 * steps_per_epoch)
        c.train.update(steps=epochs * steps_per_epoch, log_every=50, eval_every=5 * steps_per_epoch,
                       checkpoint_every=steps_per_epoch, init_parts=("encoder", "decoder"))
    elif arg.variant == "pretrain_b":
        c.model = _model(arg.size or "B")
        c.mar.update(stages=("pretrain",))
        batch, epochs = 256, 800
        steps_per_epoch = K400_TRAIN // batch
        _stand_in_data(c, batch)
        c.data.options.update(sampling="interval", stride=4)
        c.pretrain.optimizer.update(lr=1.5e-4 * batch / 256, warmup_steps=40 * steps_per_epoch)
        c.train.update(steps=epochs * steps_per_epoch, log_every=50, eval_every=20 * steps_per_epoch,
                       checkpoint_every=steps_per_epoch, best_metric="mae_loss", best_mode="min")
    return c
