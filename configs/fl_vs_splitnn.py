"""FL vs SplitNN on ECG beats (Gao et al. 2020, fl_vs_splitnn.md); report-only:

    jaxlab report --config fl_vs_splitnn:tiny

Distributions: iid (balanced set, 2 clients, IID slices); imbalanced (natural MIT-BIH class ratio
N 71,732 / L 8,036 / R 7,231 / A 2,491 / V 6,559 from the synthetic generator, 2 clients, IID slices,
test set with the same ratio); non-iid (balanced set, 5 clients holding one class each).
FL: FedAvg, client Adam 1e-3 (state kept across rounds), batch 32, 1 local epoch a round; SplitNN:
vanilla, clients in turn with weight relay, Adam 1e-3 on both halves. Budget: `rounds` FL rounds =
`rounds` SplitNN epochs (each sees every training beat once per round).

Variants:
  tiny   CPU: synthetic beats at 1/4 of the balanced set (3,311 train beats) and an imbalanced set of
         ~3,400 train beats, 10 rounds (about a minute).
  paper  the paper's scale: balanced set (13,245 train beats), imbalanced ~13,250 train beats, 400 rounds.
"""

from jaxlab.config import Config, base_config, parse_arg

MITBIH_SCALE_PER_BALANCED = 26_490 / 96_049  # natural-ratio set as large as the balanced one


def distributions() -> list:
    """scale_factor multiplies data.options.scale (the mitbih set is scaled to the balanced set's size)."""
    return [
        Config(name="iid", balance="balanced", scale_factor=1.0, scheme="iid", num_clients=2, options=Config()),
        Config(name="imbalanced", balance="mitbih", scale_factor=MITBIH_SCALE_PER_BALANCED, scheme="iid",
               num_clients=2, options=Config()),
        Config(name="non-iid", balance="balanced", scale_factor=1.0, scheme="shards", num_clients=5,
               options=Config(classes_per_client=1)),
    ]


def get_config(arg=None):
    arg = parse_arg(arg, variant="tiny")
    if arg.variant not in ("tiny", "paper"):
        raise ValueError(f"unknown variant {arg.variant!r}: tiny, paper")
    c = base_config()
    c.method = "fl_vs_splitnn"
    c.model.update(num_classes=5, double_softmax=False)
    c.data.update(source="synthetic:ecg_beats", batch_size=32, eval_batch_size=512)
    c.optimizer.update(name="adam", lr=1e-3)
    c.fl = Config(local_epochs=1)
    scale, rounds = (0.25, 10) if arg.variant == "tiny" else (1.0, 400)
    c.data.options.update(scale=scale, test_fraction=0.5)
    c.report = Config(rounds=rounds, bytes_ratio=10.0, distributions=distributions())
    return c
