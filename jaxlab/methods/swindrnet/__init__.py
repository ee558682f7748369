"""SwinDRNet and DREDS (Dai et al., ECCV 2022; swindrnet.md): depth restoration of specular and transparent
objects from RGB and raw depth, trained on a DREDS-like simulator.

    jaxlab train  --config swindrnet:tiny                  # CPU: simulated 64x64 scenes, a small Swin
    jaxlab report --config swindrnet:tiny                  # RMSE / REL / MAE / deltas raw vs restored, PNGs
    jaxlab train  --config swindrnet:paper --config.data.source=dreds:/data/DREDS/CatKnown
    jaxlab convert swin_tiny_patch4_window7_224.pth swin_t.npz --kind swin   # then --config.model.pretrained=swin_t.npz

Pieces: model.py (two Swin streams from jaxlab/models/swin.py, cross-attention fusion per stage, two
UPerNet heads from jaxlab/models/upernet.py, d = c0 * raw + c1 * initial), losses.py (L1 + 0.1 normal +
0.6 Sobel on both outputs, 0.4 on the initial depth, object 1.0 / background 0.4), metrics.py (RMSE, REL,
MAE, delta 1.05 / 1.10 / 1.25 per region, per frame), jaxlab/data/synthetic/dreds.py and jaxlab/data/rgbd.py
(synthetic:dreds, shipped:stereo_rgbd, dreds:<root>, rgbd_tfds:<name>), task.py (the method on
jaxlab.train.supervised), convert.py (public Swin checkpoints -> .npz), report.py, bench.py.

Faithful to the paper and PKU-EPIC/DREDS SwinDRNet/ (networks/*.py, trainer.py, utils/): mmseg-style Swin
(pad to window multiples, shift also on the 7x7 stage, -100 mask, 169-entry bias tables, patch merging
order x0, x1, x2, x3, stage LayerNorms, drop-path 0.2), UPerNet (PPM 1, 2, 3, 6; FPN; BatchNorm; 512
channels; Dropout2d 0.1; bilinear, align_corners False), the loss and metrics of the released code. The
fusion follows the paper (cross attention used); `model.fusion="released"` reproduces the released
block, whose attention output is discarded (see model.py).

What is inferred: the simulator (DREDS renders with Blender and simulates IR stereo; here scenes are
ray-cast and the sensor's artefacts drawn directly: sizes are our choice), the RGB augmentation's
strengths, the "ts" region (transparent or specular pixels; the paper reports per material subset),
torch's default init for the convolutions the released code leaves alone (patch embedding: flax's
lecun_normal), and the CPU config's sizes.
"""

from jaxlab.methods.swindrnet.task import build, get_model, load_pretrained, sources  # noqa: F401
from jaxlab.methods.swindrnet.report import report  # noqa: F401
from jaxlab.methods.swindrnet.bench import bench  # noqa: F401
