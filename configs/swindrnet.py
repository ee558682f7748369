"""SwinDRNet (swindrnet.md): RGB-D depth restoration of specular and transparent objects.

    jaxlab train  --config swindrnet:tiny
    jaxlab report --config swindrnet:tiny      # raw vs restored per region, example depth maps (PNG)
    jaxlab train  --config swindrnet:paper --config.data.source=dreds:/data/DREDS/CatKnown \
                  --config.model.pretrained=swin_t.npz

Variants:
  tiny    CPU: the DREDS-like simulator at 64x64 (512 train / 64 held-out scenes), Swin streams of width 32
          with depths (2, 2, 2, 2) and heads (1, 2, 4, 8), window 4 (stage maps 16, 8, 4, 2), UPerNet heads of
          64 channels, no drop-path; AdamW 1e-3 with 50 warm-up steps and poly decay, batch 16, 400 steps.
  paper   224x224, two Swin-T streams (ImageNet weights via model.pretrained), heads of 512 channels,
          AdamW 1e-4 (betas 0.9, 0.999, wd 0.01), batch 8, 500 warm-up steps then poly(1.0); 20 epochs of
          DREDS CatKnown (100,200 frames) = 250,500 steps.
Options: fusion=paper|released, size=tiny|small|base (paper variant), e.g. swindrnet:paper,fusion=released
"""

from jaxlab.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, ("tiny", "paper"), variant="tiny", fusion="paper", size="tiny")
    c = base_config()
    c.method = "swindrnet"
    c.model.update(size=arg.size, embed_dim=None, depths=None, num_heads=None, window=7, drop_path_rate=0.2,
                   head_channels=512, pool_scales=(1, 2, 3, 6), fusion=arg.fusion, fusion_heads=1,
                   attention_impl="auto", pretrained="")
    # loss weights of the released trainer (normal 0.1, gradient 0.6, initial 0.4, object 1.0, background 0.4)
    c.swindrnet = {"loss_weights": {"normal": 0.1, "gradient": 0.6, "initial": 0.4, "object": 1.0,
                                    "background": 0.4},
                   "augment": 0.2}
    c.data.update(source="synthetic:dreds", batch_size=8, eval_batch_size=16)
    # the simulator holds its frames in memory (2,000 at 224 px: about 2 GB); the paper trains on DREDS
    # CatKnown (100,200 frames): --config.data.source=dreds:/path/to/DREDS/CatKnown
    c.data.options.update(n_train=2000, n_test=200, size=224)
    c.optimizer.update(name="adamw", lr=1e-4, b1=0.9, b2=0.999, weight_decay=0.01, schedule="warmup_poly",
                       warmup_steps=500, poly_power=1.0, end_lr=0.0)
    c.train.update(steps=250500, log_every=100, eval_every=10000, checkpoint_every=5000)
    c.report = {"examples": 3, "seeds": (0,)}

    if arg.variant == "tiny":
        c.model.update(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window=4, drop_path_rate=0.0,
                       head_channels=64)
        c.data.update(batch_size=16, eval_batch_size=64)
        c.data.options.update(n_train=512, n_test=64, size=64)
        c.optimizer.update(lr=1e-3, warmup_steps=50)
        c.train.update(steps=400, log_every=50, eval_every=400, checkpoint_every=400)
    return c
