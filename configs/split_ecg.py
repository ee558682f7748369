"""Split learning of the ECG 1D CNN, leakage (dCor, DTW) and mitigations (split_ecg.md).

Variants:
  tiny    CPU: synthetic beats at 1/4 scale, 1,500 steps a setting; report on 2/3/4/8 conv and DP eps 10/5/1
          over 1,000 test beats.
  paper   the paper's protocol (balanced set of 26,490 beats, Adam 1e-3, batch 32, 400 epochs); report on
          2/3/4/8 conv and DP eps 10/7/5/3/1 over 10,000 beats.
Options: n_convs=2..8 and epsilon=<Laplace DP epsilon, 0 = none> for a single run:
    jaxlab train  --config split_ecg:tiny,n_convs=4
    jaxlab report --config split_ecg:tiny
"""

from jaxlab.config import Config, load_config, parse_arg

CONV_SETTINGS = (("2 conv", 2, 0.0), ("3 conv", 3, 0.0), ("4 conv", 4, 0.0), ("8 conv", 8, 0.0))


def get_config(arg=None):
    arg = parse_arg(arg, ("tiny", "paper"), variant="tiny", n_convs=2, epsilon=0.0)
    c = load_config(f"ecg_cnn:{arg.variant},n_convs={arg.n_convs}")
    c.method = "split_ecg"
    c.model.dp_epsilon = float(arg.epsilon)
    if arg.variant == "tiny":
        c.data.options.scale = 0.25
        c.train.update(steps=1500, log_every=100, eval_every=500, checkpoint_every=500)
        dp = (10.0, 5.0, 1.0)
        beats = 1000
    else:
        dp = (10.0, 7.0, 5.0, 3.0, 1.0)
        beats = 10000
    settings = CONV_SETTINGS + tuple((f"DP eps={e:g}", 2, e) for e in dp)
    c.report = Config(settings=settings, leakage_beats=beats)
    return c
