"""FL vs SplitNN (Gao et al. 2020, fl_vs_splitnn.md): one paradigm through the trainer, or the comparison.

    jaxlab train  --config fl_vs_splitnn:tiny --config.fl.paradigm=splitnn --config.fl.distribution=non-iid
    jaxlab info   --config fl_vs_splitnn:tiny              # the FL ECG model: 55,989 parameters
    jaxlab report --config fl_vs_splitnn:tiny              # ECG beats, both paradigms, every distribution
    jaxlab report --config fl_vs_splitnn:resnet20_tiny     # ResNet-20 cut, offline images
    jaxlab report --config fl_vs_splitnn:resnet20 --config.data.data_dir=/path/to/tfds   # CIFAR-10

ECG

Distributions: iid (balanced set, 2 clients, IID slices); imbalanced (natural MIT-BIH class ratio
N 71,732 / L 8,036 / R 7,231 / A 2,491 / V 6,559 from the synthetic generator, 2 clients, IID slices,
test set with the same ratio); non-iid (balanced set, 5 clients holding one class each).
FL: FedAvg, client Adam 1e-3 (state kept across rounds), batch 32, 1 local epoch a round; SplitNN:
vanilla, clients in turn with weight relay, Adam 1e-3 on both halves. Budget: `rounds` FL rounds =
`rounds` SplitNN epochs (each sees every training beat once per round).

Variants:
  tiny   CPU: synthetic beats at 1/4 of the balanced set (3,311 train beats) and an imbalanced set of
         ~3,400 train beats, 40 rounds, seeds 0, 1, 2 (about 5 minutes). Under one class per client FL
         needs more than 10 rounds to pull away from chance (at 10 both sit near 20%), and which paradigm
         ends ahead varies from seed to seed (SplitNN's clients in turn usually overwrite each other, but
         not always), so accuracies are means over seeds.
  paper  the paper's scale: balanced set (13,245 train beats), imbalanced ~13,250 train beats, 400 rounds,
         seeds 0, 1, 2.

CIFAR-10 (the ResNet-20 and MobileNet cuts; the reference's SGD lr 1e-3 momentum 0.9, cross-entropy on
logits; batch 4 at paper scale as in the reference's DataLoaders, 32 in the tiny variants). Distributions: iid (2 clients); imbalanced (a long-tailed training set,
class c kept in proportion to 10^(-c/9), i.e. 10:1 from class 0 to class 9, 2 clients, balanced test
set); non-iid (10 clients holding one class each).
  resnet20, mobilenet             tfds:cifar10 prepared under data.data_dir (50,000 / 10,000), 100 rounds.
  resnet20_tiny, mobilenet_tiny   offline: the real scikit-learn digits (1,437 train / 360 test) resized
                                  to 32x32 RGB, 5 rounds (a few minutes on a 2-core CPU).
  Image variants run seed 0 only (--config.report.seeds="(0, 1, 2)" for more).

Model options (every variant):
  model.conv_impl="im2col"   convolutions as patches @ kernel (jaxlab.models.layers.Conv): same parameters
                             and values as "lax", much faster inside the clients' scans on XLA CPU.
  model.clients_train_in_eval_mode=False   True reproduces the official CIFAR clients, which call
                             model.eval() before training: the modules the clients train (the whole model in
                             FL, the client half in SplitNN) run in evaluation mode in their training steps,
                             so BatchNorm normalises with frozen running statistics that are never updated
                             and Dropout is off; the SplitNN server trains in training mode, as there.
                             False (default) is the paper's normal training. No effect on the ECG models
                             (no BatchNorm, no Dropout).
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


LONG_TAIL = tuple(10 ** (-c / 9) for c in range(10))  # CIFAR-10-LT profile, imbalance factor 10


def image_distributions() -> list:
    return [
        Config(name="iid", scheme="iid", num_clients=2, options=Config()),
        Config(name="imbalanced", scheme="imbalanced", num_clients=2, options=Config(ratios=LONG_TAIL)),
        Config(name="non-iid", scheme="shards", num_clients=10, options=Config(classes_per_client=1)),
    ]


VARIANTS = ("tiny", "paper", "resnet20", "resnet20_tiny", "mobilenet", "mobilenet_tiny")


def get_config(arg=None):
    arg = parse_arg(arg, VARIANTS, variant="tiny")
    c = base_config()
    c.method = "fl_vs_splitnn"
    # `jaxlab train` trains one paradigm on one distribution (a step = a round); `jaxlab report` trains both
    # on every distribution. chunk_size 0: all clients in one vmapped chunk.
    c.fl = Config(local_epochs=1, chunk_size=0, paradigm="fl", distribution="iid")
    # A round runs on one device: with the trainer's state and batch replicated over a data axis of N
    # devices, every device would compute the whole round (N times the work and memory).
    c.mesh.data = 1
    c.model.update(conv_impl="im2col", clients_train_in_eval_mode=False)
    if arg.variant not in ("tiny", "paper"):
        return _image_config(c, arg.variant)
    c.model.update(name="ecg", num_classes=5, double_softmax=False)
    c.data.update(source="synthetic:ecg_beats", batch_size=32, eval_batch_size=512)
    c.optimizer.update(name="adam", lr=1e-3)
    scale, rounds = (0.25, 40) if arg.variant == "tiny" else (1.0, 400)
    c.data.options.update(scale=scale, test_fraction=0.5)
    c.model.fl_input_length = 130  # the reference FL model's Linear(400, 128) reads 130-sample beats
    c.report = Config(rounds=rounds, seeds=(0, 1, 2), bytes_ratio=10.0, distributions=distributions())
    return _train_config(c)


def _train_config(c):
    """`jaxlab train` of one paradigm: report.rounds rounds, evaluated every round, checkpoints every 5."""
    rounds = c.report.rounds
    c.train.update(steps=rounds, log_every=1, eval_every=1, checkpoint_every=min(5, rounds),
                   best_metric="accuracy", best_mode="max")
    return c


def _image_config(c, variant: str):
    model, tiny = variant.removesuffix("_tiny"), variant.endswith("_tiny")
    c.model.update(name=model, num_classes=10, double_softmax=False)
    c.optimizer.update(name="momentum", lr=1e-3, momentum=0.9)
    c.data.update(source="shipped:digits" if tiny else "tfds:cifar10", batch_size=32 if tiny else 4,
                  eval_batch_size=512)
    c.data.options.update(limit=0)  # 0 = every example
    c.report = Config(rounds=5 if tiny else 100, seeds=(0,), bytes_ratio=10.0,
                      distributions=image_distributions())
    return _train_config(c)
