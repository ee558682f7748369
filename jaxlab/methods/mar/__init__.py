"""MAR: masked action recognition with VideoMAE pre-training (Qing et al., arXiv 2207.11660; mar.md).

A VideoMAE video ViT (jaxlab.models.vit_video) runs on the visible tokens only: pre-training
("pretrain" stage) with 90% tube masking and a normalised-pixel MSE on the masked tokens; MAR fine-tuning
("finetune" stage) with 50% cell running masking, the bridging classifier on the visible tokens and
L = soft-target CE + w * masked MSE (the decoder kept from pre-training). The two stages run in one
run, or in two runs joined by `train.init_from=<pretrain workdir> train.init_parts=(encoder, decoder)`.

Faithful to the paper and the official code (alibaba-mmai-research/Masked-Action-Recognition,
MCG-NJU/VideoMAE). Paper by default; the released code's behaviour behind named flags:
- mar.official_lr_groups: the released optimizer groups (norms and biases of the encoder blocks take
  lr multiplier 1, not the layer-decayed one); default: VideoMAE's layer decay on every block
  parameter.
- mar.spatial_repeat / mar.temporal_shuffle: the released training randomisation (both on in every
  released config, and by default here).
Inferred or simplified (said here, and in the report):
- Warm-up is linear from 0 (trainer's warmup_cosine), the cosine runs from the warm-up's end to
  optimizer.end_lr; the released code warms up from 1e-6 and runs the cosine over the whole schedule.
- Host-side augmentation of the released recipe (RandAugment, random erasing, multi-scale crops,
  repeated augmentation) is not reproduced; mixup / cutmix / label smoothing are (on device).
- The bridging head's unused `mask_token` of the released code is not a parameter here.
- The decoder's mask token starts as VideoMAE's (truncated normal, std 0.02); MAR loads it from the
  pre-training checkpoint.

Report (`jaxlab report --config mar:tiny`, report.py): the tiny experiment (accuracy at the fixed test
mask and with all tokens) and the compute accounting (analytic and XLA FLOPs per clip of full-token
fine-tuning vs MAR for ViT-B / ViT-L / ViT-H, against the paper's -53% and 14.5%).
Weights: `jaxlab convert checkpoint.pth weights.npz` (convert.py), then
`--config.train.init_from=weights.npz`.
"""

from __future__ import annotations

from jaxlab.data.sources import get_source
from jaxlab.data.synthetic import actions  # noqa: F401  (registers synthetic:actions)
from jaxlab.data import video  # noqa: F401  (registers video:<root> and shipped:skimage_gif)
from jaxlab.methods.mar.report import bench, report
from jaxlab.methods.mar.task import MARTask, build_method


def sources(config):
    """(train, eval) sources of config.data."""
    d = config.data
    options = {k: v for k, v in dict(d.options).items()}
    return tuple(get_source(d.source, split, seed=d.seed, data_dir=d.data_dir, features=("video", "label"),
                            **options) for split in ("train", "test"))


def build(config):
    train_source, eval_source = sources(config)
    return build_method(config, train_source, eval_source)


__all__ = ["MARTask", "bench", "build", "build_method", "report", "sources"]
