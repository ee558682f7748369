"""VideoMAE pre-training alone (the stage before MAR fine-tuning): 90% tube masking, normalised-pixel MSE
on the masked tokens, the encoder on the visible tokens only (jaxlab.methods.mar, stage "pretrain").

Variants (the settings live in configs/mar.py; this file names the pre-training runs):
  tiny                          CPU: the tiny MAR model's pre-training on procedural action clips (200 steps)
  k400_b / k400_l / ssv2_b / ssv2_l
                                ViT-B / ViT-L, 16x224x224, batch 256, 800 epochs of Kinetics-400 or
                                Something-Something v2 (VideoMAE's default schedule; AdamW (0.9, 0.95),
                                lr 1.5e-4 x batch / 256, 40 warm-up epochs); --config.data.source=video:<root>
Fine-tune afterwards with MAR:
  jaxlab train --config mar:k400_b --config.train.init_from=<this run's workdir>
"""

from jaxlab.config import load_config, parse_arg

SSV2_TRAIN = 168_913
PAPER = {"k400_b": "B", "k400_l": "L", "ssv2_b": "B", "ssv2_l": "L"}


def get_config(arg=None):
    arg = parse_arg(arg, ("tiny", *PAPER), variant="tiny")
    if arg.variant == "tiny":
        return load_config("mar:pretrain_tiny")
    c = load_config(f"mar:variant=pretrain_b,size={PAPER[arg.variant]}")
    if arg.variant.startswith("ssv2"):  # SSv2: segment sampling, its own clip count and 174 classes
        steps_per_epoch = SSV2_TRAIN // c.data.batch_size
        c.model.num_classes = 174
        c.data.options.update(sampling="segment", stride=2)
        c.pretrain.optimizer.update(warmup_steps=40 * steps_per_epoch)
        c.train.update(steps=800 * steps_per_epoch, eval_every=20 * steps_per_epoch,
                       checkpoint_every=steps_per_epoch)
    return c
