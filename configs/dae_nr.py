"""DAE-NR (dae_nr.md): a convolutional autoencoder whose encoder layer is mapped to neural responses.

    jaxlab train  --config dae_nr:tiny                            # joint training on the simulated population
    jaxlab train  --config dae_nr:tiny --config.dae.regime=posthoc   # autoencoder, then the readout on it
    jaxlab report --config dae_nr:tiny                            # the three regimes over seeds, RDM PNGs
    jaxlab train  --config dae_nr:allen --config.data.source=neural:/path/allen_natural_scenes.npz

Variants:
  tiny    CPU: 32x32 patches of scikit-image's photos, 64 simulated Gabor neurons (10 Poisson repeats), 2,000
          train / 200 test stimuli; encoder (16, 32, 8) channels (code 4x4x8), layer 1 (8x8x32) mapped by a
          factorised readout; 1,500 steps of batch 32 per stage; report over seeds 0, 1, 2.
  paper   accelerator scale (the paper's hyper-parameters are not known; inferred): 64x64 patches, 200
          neurons, 20,000 train stimuli shown once, 118 test stimuli with 50 repeats (the Allen
          natural-scenes protocol), encoder (32, 64, 128, 16), layer 2 mapped, 20,000 steps of batch 64
          per stage.
  allen   your recordings (`neural:<path>`, see jaxlab/data/neural.py): images resized to 64x64, 20% of
          the stimuli held out, MSE neural loss (dF/F can be negative), otherwise as paper.
Options: readout=factorized|linear, mapped_layer=<int>, regime=autoencoder|posthoc|joint|neural,
e.g. configs/dae_nr.py:tiny,readout=linear,mapped_layer=0
"""

from jaxlab.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, ("tiny", "paper", "allen"), variant="tiny", readout="factorized", mapped_layer=None,
                    regime="joint")
    c = base_config()
    c.method = "dae_nr"
    c.model.update(features=(16, 32, 8), mapped_layer=1, readout=arg.readout, conv_impl="lax")
    # alpha weighs the neural loss against the per-pixel reconstruction MSE (inferred: not in the abstract)
    c.dae = {"regime": arg.regime, "alpha": 0.1, "neural_loss": "poisson", "readout_steps": 1500,
             "readout_l1": 0.0}
    c.data.update(source="synthetic:neural_population", batch_size=32, eval_batch_size=200)
    c.data.options.update(n_train=2000, n_test=200, num_neurons=64, patch=32, repeats=10, mean_rate=1.0)
    c.optimizer.update(name="adam", lr=1e-3)
    # the readout's own optimizer section, the same in every regime: at 1e-3 the factorised readout fits
    # slowly (tiny post-hoc, seed 0: neuron r 0.43 after 1,500 steps, 0.69 after 6,000); at 1e-2 r is 0.81
    # after 1,500
    c.optimizer.readout = {"lr": 1e-2}
    c.train.update(steps=1500, log_every=100, eval_every=500, checkpoint_every=500)
    c.report = {"regimes": ("autoencoder", "posthoc", "joint"), "seeds": (0, 1, 2), "permutations": 1000,
                "bootstraps": 1000}

    if arg.variant == "tiny":
        pass
    elif arg.variant in ("paper", "allen"):
        c.model.update(features=(32, 64, 128, 16), mapped_layer=2)
        c.dae.readout_steps = 20000
        c.data.update(batch_size=64, eval_batch_size=128)
        c.data.options.update(n_train=20000, n_test=118, num_neurons=200, patch=64, repeats=50,
                              train_repeats=1)
        c.train.update(steps=20000, log_every=200, eval_every=2000, checkpoint_every=2000)
        if arg.variant == "allen":
            c.data.source = "neural:allen_natural_scenes.npz"
            c.data.options = {"keys": None, "image_size": (64, 64), "test_fraction": 0.2}
            c.data.update(batch_size=16, eval_batch_size=8)
            c.dae.neural_loss = "mse"
    if arg.mapped_layer is not None:
        c.model.mapped_layer = int(arg.mapped_layer)
    return c
