"""Audio-visual guided video inpainting (av_inpainting.md): STTN + T-PatchGAN guided by a frozen AV-Net.

    jaxlab train  --config av_net:tiny --workdir runs/av_net                 # the guide first
    jaxlab train  --config av_inpainting:tiny --workdir runs/inpaint \\
                  --config.inpaint.av_net_workdir=runs/av_net
    jaxlab report --config av_inpainting:tiny --workdir runs/av_inpainting_report   # trains its own AV-Net

Variants:
  tiny    CPU: synthetic audio-visual clips (5 frames of 64x64, 4 classes, one silent distractor, 0.25 s of
          audio a frame), STTN at channels (16, 32, 64) with 2 transformer blocks (patches 16/8/4/2 on the
          16x16 map), T-PatchGAN at (16, 32, 64, 64, 64, 64), batch 4, Adam 5e-4, 150 steps; the AV-Net of av_net:tiny.
  paper   the paper's sizes: 224x224, channels (64, 128, 256), 8 blocks (patches 56/28/14/7), T-PatchGAN
          (64, 128, 256, 256, 256, 256), batch 8, Adam 1e-4 x0.1 at 150k and x0.1 again at 300k of 350k
          iterations for both parts (the release's configs/ave.yaml iter_lr_update_1 / _2; optimizer.schedule
          "piecewise"),
          1 s of audio; the AV-Net of av_net:paper. Data: --config.data.source=av_folder:/path/AVE.
Options (after the variant): released=True: the released code's settings (attention-loss weight 5.0, the
8 blocks share weights, attention mask unapplied, the discriminator sees the batch as one video, no audio
at the bottleneck); masks=stroke|object: the training masks (the release trains one model per kind).
Loss weights (paper Eq. 5): inpaint.l1 1, inpaint.adv 0.01, inpaint.av_att 2, inpaint.av_cls 1.
"""

from jaxlab.config import Config, base_config, load_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, ("tiny", "paper"), variant="tiny", released=False, masks="stroke")
    av = load_config(f"av_net:{arg.variant}")
    c = base_config()
    c.method = "av_inpainting"
    # the generator (STTN) and the discriminator (T-PatchGAN); jaxlab/models/sttn.py
    c.model.update(channels=(64, 128, 256), num_blocks=8, patch_divisors=(1, 2, 4, 8), share_blocks=False,
                   apply_mask=True, audio_bottleneck=True, disc_channels=(64, 128, 256, 256, 256, 256),
                   power_iterations=1, disc_batch_as_one_video=False)
    # the frozen AV-Net's module and audio front end (configs/av_net.py of the same variant)
    c.av_net = Config(model=av.model, audio=av.audio)
    c.inpaint = Config(
        l1=1.0, adv=0.01, av_att=2.0, av_cls=1.0,  # paper Eq. 5 (released config: av_att 5.0, no av_cls)
        av_net_workdir="",  # an av_net run's workdir (or train.init_from with init_parts=("av_net",))
        gan_schedule="sequential",  # D then G every step, as the release; "alternate": one per step
        train_masks=arg.masks, mask_bank=512, mask_seed=1234, eval_mask_seed=4321, object_dilate=2,
        eval_clips=64,  # the first clips of the test split, evaluated with both mask kinds
    )
    c.data.update(source="synthetic:av_clips", batch_size=8, eval_batch_size=16)
    c.data.options = Config(av.data.options)
    c.data.options.update(num_frames=5)
    c.optimizer.update(name="adam", lr=1e-4, b1=0.9, b2=0.999)
    c.optimizer.update(schedule="piecewise", boundaries=(150_000, 300_000), boundary_scale=0.1)  # the release's
    c.train.update(steps=350_000, log_every=100, eval_every=10_000, checkpoint_every=1_000)
    # the report's runs: seeds, mask kinds, AV-Net steps (None: av_net's own), example clips in
    # examples.png, test clips measured (PSNR, SSIM, VFID, E_warp; inpaint.eval_clips is the in-training eval)
    c.report = Config(seeds=(0, 1), masks=("stroke", "object"), av_net_steps=None, examples=3, eval_clips=64)

    if arg.variant == "tiny":
        c.model.update(channels=(16, 32, 64), num_blocks=2, disc_channels=(16, 32, 64, 64, 64, 64))
        c.data.update(batch_size=4, eval_batch_size=32)
        c.data.options.update(num_clips=256)
        c.optimizer.update(lr=5e-4, schedule="constant", boundaries=())
        c.inpaint.eval_clips = 16
        c.train.update(steps=150, log_every=25, eval_every=150, checkpoint_every=150)
        c.report.eval_clips = 32
    if arg.released:
        c.inpaint.update(av_att=5.0, av_cls=0.0)
        c.model.update(share_blocks=True, apply_mask=False, disc_batch_as_one_video=True, audio_bottleneck=False)
    return c
