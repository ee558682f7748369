"""AV-Net of audio-visual guided video inpainting (av_inpainting.md): AV attention + pseudo-classes.

Variants:
  tiny    CPU: synthetic audio-visual clips (64x64, 4 classes, one silent distractor, 0.25 s of audio at
          16 kHz), ResNet-18 at widths 8..64 with the map at stride 8 (8x8 maps: at stride 16 a 4x4 map did
          not localise on every seed), 600 steps (300 attention, then 2 rounds of K-means + 150 steps of an
          Eq. 1 and an Eq. 2 update), Adam 1e-3 (x0.1 at step 500), batch 32; 3-5 min a run on a 2-core CPU
          shared with other jobs. Localises the sounding object on 3 of 3 seeds (pointing 2.5-6x chance).
  paper   the paper's AV-Net: full ResNet-18 branches (22,521,365 parameters), 224x224 frames, 1 s of
          audio (80 x 201 log-mel), K = 10, Adam 1e-4 (MUSIC; AVE: --config.optimizer.lr=5e-5), batch 32,
          4 epochs of AVE's 4,143 clips with lr x0.1 after 2 (1 attention epoch, then 3 alternating
          epochs, re-clustered at each). Data: --config.data.source=av_folder:/path/AVE (see
          jaxlab.data.av_clips); the synthetic clips at 224x224 otherwise.
Report: jaxlab report --config configs/av_net.py:tiny --workdir /tmp/av_net_report (seeds config.report.seeds).
"""

from jaxlab.config import Config, base_config, parse_arg

AVE_TRAIN_CLIPS = 4143


def get_config(arg=None):
    arg = parse_arg(arg, ("tiny", "paper"), variant="tiny")
    c = base_config()
    c.method = "av_net"
    c.model.update(widths=(64, 128, 256, 512), embed_dim=128, num_classes=10, init_scale=5.0, conv_impl="lax",
                   map_stride=16)
    c.audio = Config(sample_rate=16000, n_fft=256, win_seconds=0.010, hop_seconds=0.005, n_mels=80, fmin=0.0,
                     fmax=None, top_db=80.0, amin=1e-10, pad_mode="reflect", norm_mean=-40.0, norm_std=40.0)
    c.data.update(source="synthetic:av_clips", batch_size=32, eval_batch_size=64)
    c.data.options.update(num_clips=512, num_classes=8, num_frames=5, size=224, window_seconds=1.0, fps=8.0,
                          distractors=1, audio_noise=0.3)
    c.optimizer.update(name="adam", lr=1e-4)
    c.av_net = Config(threshold=0.07, attention_steps=0, rounds=1, round_steps=0, cluster_clips=256,
                      cluster_chunk=32, kmeans_iters=30, lr_decay_step=0, lr_decay=0.1)
    c.train.update(best_metric="pointing", best_mode="max")
    c.report = Config(seeds=(0, 1, 2), examples=6)

    if arg.variant == "tiny":
        c.model.update(widths=(8, 16, 32, 64), num_classes=4, map_stride=8)
        c.data.options.update(num_clips=512, num_classes=4, num_frames=2, size=64, window_seconds=0.25)
        c.data.eval_batch_size = 128
        c.optimizer.lr = 1e-3
        c.av_net.update(attention_steps=300, rounds=2, round_steps=150, cluster_clips=256, lr_decay_step=500)
        c.train.update(steps=600, log_every=50, eval_every=200, checkpoint_every=200)
    elif arg.variant == "paper":
        epoch = AVE_TRAIN_CLIPS // c.data.batch_size
        c.av_net.update(attention_steps=epoch, rounds=3, round_steps=epoch, lr_decay_step=2 * epoch)
        c.train.update(steps=4 * epoch, log_every=50, eval_every=epoch, checkpoint_every=epoch // 2)
    return c
