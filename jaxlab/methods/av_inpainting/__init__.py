"""Audio-visual guided video inpainting (Kim, Jung, Kim, Yoon, ICASSP 2022; av_inpainting.md), second half:
an STTN inpainting network with a T-PatchGAN, guided by the frozen AV-Net of jaxlab.methods.av_net through an
AV attention loss and an AV pseudo-class consistency loss.

    jaxlab train  --config av_net:tiny --workdir runs/av_net
    jaxlab train  --config av_inpainting:tiny --config.inpaint.av_net_workdir=runs/av_net
    jaxlab report --config av_inpainting:tiny      # AV-Net, then baseline / +audio / +att / +cls / both, two mask kinds

Pieces: jaxlab/models/sttn.py (generator, discriminator, spectral norm), task.py (parts, steps, evaluation),
losses.py, masks.py (stroke and object masks), metrics.py (VFID, E_warp), report.py.

Faithful to kyuyeonpooh/Audio-Visual-Deep-Video-Inpainting (models/sttn.py, core/trainer.py, core/loss.py)
and researchmm/STTN: the architecture, init N(0, 0.02), hinge loss with the discriminator's loss halved, L1 on
the raw prediction normalised by the hole / valid fractions, the AV losses on the composite, the AV-Net
frozen in eval mode, D then G on every iteration. Paper over release (the release behind flags, see
configs/av_inpainting.py `released=True`): 8 distinct blocks (release: one block shared), the attention mask
applied (release: a non-in-place masked_fill), the pseudo-class loss (release: not implemented), audio at the
bottleneck (release: none), per-clip discriminator input (release: the batch as one video), weights 1 / 0.01 /
2 / 1 (release: av_att 5).

Inferred: where the audio enters (the encoder output, each frame with its own window's f_A, fused by a 1x1
conv + LeakyReLU back to the hidden width); the pseudo-class loss's soft target (softmax of the frozen audio
classifier); stroke masks drawn by the DeepFill v2 recipe (the release's 6,000 I-mask PNGs are not public);
object masks from the sounding object's silhouette dilated by 2 px (the paper's S-masks come from the AV
map's top 20%); the discriminator's power iteration once per D step on the real and fake halves together
(PyTorch runs one per forward call: two in the release's D update, one more in its G update; here G's
forward reuses the stored u, v, so a generator step leaves the discriminator part exactly as it was);
the D and G updates of a step draw their stroke masks with different keys; VFID's features (metrics.py).
"""

from jaxlab.methods.av_inpainting.task import (  # noqa: F401
    Guide,
    Inpainter,
    av_net_guide,
    build,
    eval_masks,
    frame_scores,
    inpaint_all,
    make_inpainter,
    make_steps,
)
from jaxlab.methods.av_inpainting.report import ARMS, check_findings, format_report, report  # noqa: F401,E402
