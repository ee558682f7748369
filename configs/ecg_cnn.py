"""ECG beat classifier, the 1D CNN of split_ecg.md trained whole (the default experiment).

Variants:
  tiny      CPU: synthetic beats at half the paper's balanced set, 3,000 steps (~15 epochs, well under a minute).
  paper     the paper's setting: balanced set (26,490 beats, 50/50 split), Adam 1e-3, batch 32, 400 epochs.
  imbalanced  the natural MIT-BIH class ratio (scaled to 1/8), otherwise as tiny but longer.
  mitbih    real MIT-BIH beats from a file you prepared: --config.data.source=file:/path/mitbih.npz
Options: n_convs=2..8 (client conv layers), e.g. configs/ecg_cnn.py:tiny,n_convs=4
"""

from jaxlab.config import base_config, parse_arg

PAPER_TRAIN_BEATS = 13245  # half of 26,490


def get_config(arg=None):
    arg = parse_arg(arg, ("tiny", "paper", "imbalanced", "mitbih"), variant="tiny", n_convs=2)
    c = base_config()
    c.method = "ecg_cnn"
    c.model.update(n_convs=arg.n_convs, num_classes=5, double_softmax=False, dp_epsilon=0.0)
    c.data.update(source="synthetic:ecg_beats", batch_size=32, eval_batch_size=512)
    c.data.options.update(balance="balanced", scale=1.0)
    c.optimizer.update(name="adam", lr=1e-3)
    c.train.update(best_metric="accuracy", best_mode="max")

    if arg.variant == "tiny":
        c.data.options.scale = 0.5
        c.train.update(steps=3000, log_every=50, eval_every=500, checkpoint_every=500)
    elif arg.variant == "paper":
        steps_per_epoch = PAPER_TRAIN_BEATS // c.data.batch_size
        c.train.update(steps=400 * steps_per_epoch, log_every=100, eval_every=5 * steps_per_epoch,
                       checkpoint_every=5 * steps_per_epoch)
    elif arg.variant == "imbalanced":
        c.data.options.update(balance="mitbih", scale=0.125)
        c.train.update(steps=2000, log_every=50, eval_every=500, checkpoint_every=500)
    elif arg.variant == "mitbih":
        c.data.source = "file:mitbih_beats.npz"
        c.data.options = {"test_fraction": 0.5}
        c.train.update(steps=400 * (PAPER_TRAIN_BEATS // 32), log_every=100, eval_every=2000,
                       checkpoint_every=2000)
    return c
