"""Backdoor attack on dynamic multi-exit networks (Dong et al. 2023, multiexit_backdoor.md): clean
training, SDN conversion and IC training, backbone poisoning with frozen ICs, stripping, and the victim's
re-attachment and IC training, as four stages of one run; the report adds the metrics and the defenses.

    jaxlab train  --config backdoor:tiny --workdir runs/backdoor
    jaxlab info   --config backdoor:resnet56_cifar10        # backbone 855,770 + ICs (27, dense) 161,550
    jaxlab report --config backdoor:tiny --workdir runs/backdoor_report
    jaxlab report --config backdoor:resnet56_cifar10 --config.data.data_dir=/path/to/tfds

Variants:
  tiny   CPU minutes: scikit-learn digits upsampled to 32x32x3 (1,437 train / 360 test), ResNet-8 (one
         block a stage, 3 ICs + final: e = floor(0.6 * 4) = 2 shallow outputs), poison rate 0.1,
         epochs clean 12 (x0.1 at 8) / ics 4 / poison 8 / victim 4, poisoning at Adam lr 1e-3.
  <arch>_<dataset>   the paper: arch resnet56 | vgg16 | mobilenet; dataset cifar10 (tfds:cifar10,
         target 9), svhn (tfds:svhn_cropped, target 9), gtsrb (folder:<root>/<class>/<image> resized to
         32x32, 43 classes, target 18), tinyimagenet (folder, 64x64, 200 classes, target 20); epochs
         clean 70 (milestones 20, 40) / ics 25 (15) / poison 5 / victim 5, batch 128, poison rate 0.01.

Flags (paper default first):
  model.placement  dense | sdn (SDN's sparse ICs at ~15..90% of the cost, pooling usually "mix")
  model.pooling    avg | mix (SDN's learnable alpha * max + (1 - alpha) * avg)
  model.tap        output | pre_relu (ResNet: the reference's ICs read the block's pre-ReLU sum)
  model.frozen_bn  eval | train (the reference trains ICs in model.train(): backbone BN statistics move)
  attack.weighting paper | reference (backdoor_sdn.py's running-sum weighting of the deep outputs)
  attack.trigger   checkerboard | square | watermark;  attack.poison_rate, attack.target, attack.split
  attack.kind      multiexit | ordinary (poisoned data in the clean stage, no poisoning stage: the
                   defenses' positive control)
"""

from jaxlab.config import Config, base_config, parse_arg

ARCHS = {"resnet56": ("resnet", 9), "vgg16": ("vgg16", 0), "mobilenet": ("mobilenet", 0)}
DATASETS = {  # source, num_classes, image size, target, data options
    "cifar10": ("tfds:cifar10", 10, 32, 9, {}),
    "svhn": ("tfds:svhn_cropped", 10, 32, 9, {}),
    "gtsrb": ("folder:~/data/gtsrb", 43, 32, 18, {"image_size": (32, 32)}),
    "tinyimagenet": ("folder:~/data/tiny-imagenet-200", 200, 64, 20, {"image_size": (64, 64)}),
}
VARIANTS = ("tiny",) + tuple(f"{a}_{d}" for a in ARCHS for d in DATASETS)


def stage(epochs: int, milestones=()) -> Config:
    return Config(epochs=epochs, milestones=tuple(milestones))


def get_config(arg=None):
    arg = parse_arg(arg, VARIANTS, variant="tiny")
    c = base_config()
    c.method = "backdoor"
    c.mesh.data = 1
    c.model = Config(arch="resnet", blocks_per_stage=9, num_classes=10, image_size=32, placement="dense",
                     pooling="avg", tap="output", frozen_bn="eval", conv_impl="lax")
    c.attack = Config(kind="multiexit", trigger="checkerboard", target=9, poison_rate=0.01, split=0.6,
                      weighting="paper", watermark_opacity=0.4, seed=0)
    c.stages = Config(clean=stage(70, (20, 40)), ics=stage(25, (15,)), poison=stage(5), victim=stage(5))
    c.optimizer.update(name="adam", lr=1e-3)
    wd = 1e-4
    c.optimizer.clean = Config(name="momentum", lr=0.01, momentum=0.9, weight_decay=wd)
    c.optimizer.ics = Config(name="adam", lr=0.01, weight_decay=wd)
    c.optimizer.poison = Config(name="adam", lr=1e-4, weight_decay=wd)
    c.optimizer.victim = Config(name="adam", lr=0.002, weight_decay=1e-5)
    c.eval = Config(taus=(0.5, 0.9))
    c.defense = Config(nc_epochs=1000, nc_lr=0.1, nc_init_cost=1e-3, nc_batch=32, nc_images=1000, nc_norm="l1",
                       nc_init="random", nc_cost_from_zero=True, nc_patience=5, nc_early_stop_patience=25,
                       strip_overlays=32, strip_images=200, strip_frr=0.01, prune_fractions=(0.2, 0.4, 0.6, 0.8),
                       prune_max_drop=0.05, ft_epochs=2, ft_batch=64, ft_lr=1e-4, ft_images=2048,
                       dftnd_seeds=10, dftnd_steps=1000, dftnd_step_size=0.1, dftnd_eps=1.0, dftnd_threshold=100.0,
                       control_trigger="square",
                       tau=0.5)
    c.report = Config(seeds=(0,), taus=(0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99), starts=(0, 1),
                      defenses=True)
    c.data.update(batch_size=128, eval_batch_size=500)
    c.data.options.update(limit=0)  # > 0: the first examples of each split only (tests)
    if arg.variant == "tiny":
        c.model.update(blocks_per_stage=1)
        c.data.update(source="shipped:digits", batch_size=64, eval_batch_size=360)
        c.attack.update(poison_rate=0.1)
        c.stages = Config(clean=stage(12, (8,)), ics=stage(4), poison=stage(8), victim=stage(4))
        c.optimizer.poison.lr = 1e-3
        c.defense.update(nc_epochs=100, nc_images=128, strip_images=100, strip_overlays=16)
        c.report.starts = (0, 1, 2)
    else:
        arch, dataset = arg.variant.split("_")
        name, blocks = ARCHS[arch]
        source, classes, size, target, options = DATASETS[dataset]
        c.model.update(arch=name, blocks_per_stage=blocks or 9, num_classes=classes, image_size=size)
        c.data.update(source=source)
        c.data.options.update(**options)
        c.attack.target = target
        if arch == "vgg16":
            for s in ("clean", "ics", "poison", "victim"):
                c.optimizer[s].weight_decay = 5e-4
    c.train.update(steps=1, log_every=20, eval_every=10_000, checkpoint_every=10_000, progress=False)
    return c
