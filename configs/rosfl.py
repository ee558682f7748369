"""RoS-FL (rosfl.md): three-part split-federated RED-CNN with DWCS, CT restoration across scanners.

    jaxlab train --config rosfl:tiny --workdir /tmp/rosfl       # CPU: 4 clients, 64x64 phantoms, 8 rounds
    jaxlab train --config rosfl:paper --workdir ...               # the paper's scale (accelerator)

Clients: HyperFed's protocols 1-4 (fan beam; views, detectors, spacings, distances, dose) rescaled to
the image (jaxlab.methods.rosfl.task). Options: rosfl.dwcs_parts=("body",) is the released code's
DWCS (head and tail are not corrected), () disables DWCS; rosfl.laplace_scale=0.01 adds DC-SFL's
Laplace noise to the head and tail weights.

Variants:
  tiny   64x64 phantoms, 32 train / 8 test per client, views / 8, detectors / 4, I0 / 50, RED-CNN with
         16 channels (96 in the paper), batch 4, Adam lr 1e-3 (the paper's 1e-4 needs its 500 rounds),
         8 rounds.
  paper  256x256 phantoms, 96 channels, batch 1, Adam lr 1e-4 wd 1e-8, 500 rounds, full protocols.
"""

from jaxlab.config import Config, base_config, parse_arg

VARIANTS = ("tiny", "paper")


def get_config(arg=None):
    arg = parse_arg(arg, variant="tiny")
    if arg.variant not in VARIANTS:
        raise ValueError(f"unknown variant {arg.variant!r}: {', '.join(VARIANTS)}")
    tiny = arg.variant == "tiny"
    c = base_config()
    c.method = "rosfl"
    c.mesh.data = 1  # a round runs on one device (the clients are vmapped inside it)
    c.model.update(name="red_cnn", features=16 if tiny else 96, conv_impl="im2col" if tiny else "lax")
    c.rosfl = Config(num_clients=4, local_epochs=1, mu=1e-4, dwcs_lr=1e-4, dwcs_parts=("head", "body", "tail"),
                     laplace_scale=0.0)
    c.data.update(source="generated:ct_ellipses", batch_size=4 if tiny else 1,
                  eval_batch_size=32 if tiny else 64)
    c.data.update(image_size=64 if tiny else 256, train_per_client=32 if tiny else 400,
                  test_per_client=8 if tiny else 16, view_factor=8 if tiny else 1, det_factor=4 if tiny else 1,
                  dose_factor=50.0 if tiny else 1.0, electronic_std=2.0, ellipses=6, value=1.0,
                  filter="ramp")
    c.optimizer.update(name="adam", lr=1e-3 if tiny else 1e-4, weight_decay=1e-8)
    rounds = 8 if tiny else 500
    c.train.update(steps=rounds, log_every=1, eval_every=max(1, rounds // 4), checkpoint_every=min(5, rounds),
                   best_metric="psnr", best_mode="max")
    return c
