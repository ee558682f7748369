"""RoS-FL (Yang et al., arXiv 2212.06378; DC-SFL, JBHI 2023): three-part split-federated U-shaped
networks with a dynamic weight correction strategy. Spec: shared/papers/rosfl.md; official code:
Zi-YuanYang/DC-SFL (main.py, Server_Model.py).

Here: the RED-CNN three-part split on jaxlab.federated.chain (`split`), DWCS (`dwcs`, all three parts by
default, the released code's body-only behaviour behind `parts=("body",)`), the vmapped round with
equal-weight averaging, optional Laplace noise on head/tail and byte accounting (`round`), and the
trainer method on CT restoration with per-client scanners built with jaxlab.ct (`task.build`;
configs/rosfl.py; model.name "red_cnn" or "unet" with the U-Net split `split.unet_parts`,
jaxlab.models.unet), and its segmentation variant (rosfl.task="segmentation": thresholded phantoms as
masks, `split.bce_dice_loss`, Dice / IoU per client), FedAvg and SplitFed V1 baselines on the engine
(rosfl.algorithm="fedavg" / "splitfed"), and `report` (RoS-FL with / without DWCS vs FedAvg vs SplitFed
vs local-only vs centralised on CT restoration).
Inferred (not in the spec or code): round 0 applies no DWCS and w_prev starts at the initial weights
(as the released code's pre-models do).
"""

from jaxlab.methods.rosfl import dwcs
from jaxlab.methods.rosfl.report import report
from jaxlab.methods.rosfl.round import RosflState, init, make_round, round_bytes_formula
from jaxlab.methods.rosfl.task import build, make_clients
from jaxlab.methods.rosfl.split import (bce_dice_loss, cut_sizes, init_red_cnn, init_unet, mse_loss,
                                        red_cnn_parts, unet_parts)

__all__ = ["RosflState", "bce_dice_loss", "build", "make_clients", "cut_sizes", "dwcs", "init", "init_red_cnn",
           "make_round", "mse_loss", "red_cnn_parts", "report", "round_bytes_formula", "init_unet", "unet_parts"]
