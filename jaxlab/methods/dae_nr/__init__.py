"""DAE-NR (Ran et al., arXiv 2111.15309, dae_nr.md): a deep autoencoder with neural responses.

The same natural images go to a convolutional autoencoder and to (here simulated, or your recorded)
visual-cortex neurons; a readout maps one encoder layer to the neurons' responses, trained with the
reconstruction: L = ||x - x_hat||^2 + alpha L_neural. The paper's claim: only joint learning improves
both the reconstruction and the representational similarity between model layer and neurons.

    jaxlab train  --config dae_nr:tiny [--config.dae.regime=autoencoder|posthoc|joint|neural]
    jaxlab report --config dae_nr:tiny      # the three regimes over seeds: table, RDM PNGs

Pieces: task.py (model parts, loss, the regimes as trainer stages, evaluate), metrics.py (MSE, PSNR, SSIM,
per-neuron and noise-corrected correlation, RDMs, Spearman, permutation test, bootstrap CI), report.py;
jaxlab/models/autoencoder.py (encoder, decoder, factorised and linear readouts); jaxlab/data/neural.py
(simulated Gabor population on scikit-image patches; `neural:<path>` for recordings).

What is inferred. No official code exists and only the abstract was reachable, so everything below the
abstract's level is our choice: the architecture (stride-2 conv encoder / transposed-conv decoder, sigmoid
output), which layer is mapped (a config choice, layer 1 by default), the Klindt et al. 2017 factorised
readout with a softplus output (the spec's formula; an L1 penalty is available, off by default), the
reconstruction term as a per-pixel mean (the paper writes a squared norm; only alpha's scale differs),
alpha = 0.1, the Poisson NLL default, Adam 1e-3 with the readout at 1e-2 (its own optimizer section, the
same in every regime), the post-hoc regime's readout trained on the neural loss alone for
as many steps as the joint run, the "neural" regime (neural loss alone, not among the issue's three),
RSA on the mapped layer's activations against the trial-averaged population responses of the held-out
stimuli, CC_norm (Schoppe et al. 2016) as the noise-corrected correlation, a one-sided permutation test
(Nili et al. 2014) and a percentile bootstrap over stimuli, and the whole simulated population
(jaxlab/data/neural.py) standing in for the mouse recordings.
"""

from jaxlab.methods.dae_nr.task import (  # noqa: F401
    NEURAL_LOSSES,
    REGIMES,
    Model,
    build,
    make_loss,
    measure,
    neural_loss,
    poisson_nll,
    sources,
    stage_plan,
)
from jaxlab.methods.dae_nr.report import check_findings, format_report, plot_rdms, report  # noqa: F401
