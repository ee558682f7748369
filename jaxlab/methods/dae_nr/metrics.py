"""DAE-NR's measures: reconstruction (MSE, PSNR, SSIM), neural prediction (per-neuron correlation and its
noise-corrected form) and representational similarity analysis (RSA).

Reconstruction: mse, psnr and ssim per image, from jaxlab.metrics (shared with the CT methods).

Neural prediction (numpy, S stimuli, N neurons, R repeats):
- correlation(pred, resp): Pearson r over stimuli per neuron, (N,).
- normalized_correlation(pred, trials): CC_norm of Schoppe et al. 2016, Cov(mean response, pred) /
  sqrt(SP Var(pred)) with the signal power SP = (Var(sum_r y_r) - sum_r Var(y_r)) / (R (R - 1)): the
  correlation with the noise-free response, so a perfect model of the rates scores 1 however noisy the
  trials. A neuron with SP <= 0 (no measurable signal) gets NaN.

RSA (numpy, float64):
- rdm(features (S, D)): 1 - Pearson r between the stimuli's feature vectors, (S, S); a stimulus whose
  features are constant (a silent layer) correlates 0 with every other.
- rsa(a, b): Spearman rho between the upper triangles (above the diagonal) of two RDMs; ranks with ties
  averaged.
- permutation_test: the stimulus labels of one RDM permuted (rows and columns together) n times; p =
  (1 + #{rho_perm >= rho}) / (1 + n), one-sided (Nili et al. 2014).
- bootstrap_ci: stimuli resampled with replacement, both RDMs restricted to the sample, pairs of a
  stimulus with its own copy left out; the percentile interval of rho.
"""

from __future__ import annotations

import numpy as np

from jaxlab.metrics import gaussian_window, mse, psnr, ssim  # noqa: F401  (reconstruction: shared measures)


# --- neural prediction ----------------------------------------------------------------------------------


def correlation(prediction: np.ndarray, response: np.ndarray) -> np.ndarray:
    """Pearson r over stimuli per neuron: (S, N) x2 -> (N,); NaN for a constant column."""
    p = np.asarray(prediction, np.float64)
    r = np.asarray(response, np.float64)
    p, r = p - p.mean(0), r - r.mean(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (p * r).sum(0) / np.sqrt((p * p).sum(0) * (r * r).sum(0))


def signal_power(trials: np.ndarray) -> np.ndarray:
    """Schoppe et al.'s signal power per neuron from trials (S, R, N): (N,)."""
    y = np.asarray(trials, np.float64)
    repeats = y.shape[1]
    if repeats < 2:
        raise ValueError(f"signal power needs at least 2 repeats per stimulus, got trials of shape {y.shape}")
    total = y.sum(1).var(0)
    per_trial = y.var(0).sum(0)
    return (total - per_trial) / (repeats * (repeats - 1))


def normalized_correlation(prediction: np.ndarray, trials: np.ndarray) -> np.ndarray:
    """CC_norm per neuron (module docstring): prediction (S, N), trials (S, R, N) -> (N,)."""
    p = np.asarray(prediction, np.float64)
    mean = np.asarray(trials, np.float64).mean(1)
    cov = ((p - p.mean(0)) * (mean - mean.mean(0))).mean(0)
    sp = signal_power(trials)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sp > 0, cov / np.sqrt(np.where(sp > 0, sp, 1.0) * p.var(0)), np.nan)


# --- RSA ------------------------------------------------------------------------------------------------


def rdm(features: np.ndarray) -> np.ndarray:
    """Representational dissimilarity matrix 1 - Pearson r between stimuli: (S, ...) -> (S, S) float64."""
    f = np.asarray(features, np.float64).reshape(len(features), -1)
    f = f - f.mean(1, keepdims=True)
    norm = np.linalg.norm(f, axis=1)
    f = f / np.where(norm > 0, norm, 1.0)[:, None]
    d = 1.0 - f @ f.T
    np.fill_diagonal(d, 0.0)
    return d


def upper(matrix: np.ndarray) -> np.ndarray:
    """The entries above the diagonal of a square matrix, row by row: (S, S) -> (S (S - 1) / 2,)."""
    return matrix[np.triu_indices(len(matrix), k=1)]


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1D array, tied values given the mean of their ranks."""
    values = np.asarray(values)
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.r_[True, sorted_values[1:] != sorted_values[:-1]]
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    last = np.r_[first[1:], len(values)] - 1
    out = np.empty(len(values), np.float64)
    out[order] = (first[group] + last[group]) / 2.0 + 1.0
    return out


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rho of two 1D arrays (Pearson r of their tie-averaged ranks)."""
    return _pearson(ranks(a), ranks(b))


def rsa(rdm_a: np.ndarray, rdm_b: np.ndarray) -> float:
    """Spearman rho between the upper triangles of two (S, S) RDMs."""
    if rdm_a.shape != rdm_b.shape or rdm_a.ndim != 2 or rdm_a.shape[0] != rdm_a.shape[1]:
        raise ValueError(f"rsa needs two square RDMs of one shape, got {rdm_a.shape} and {rdm_b.shape}")
    return spearman(upper(rdm_a), upper(rdm_b))


def rank_matrix(matrix: np.ndarray) -> np.ndarray:
    """The symmetric matrix of the ranks 1..P of `matrix`'s P upper-triangle entries (0 on the diagonal):
    the rank-transformed RDM that RSA compares (and that figures show, divided by P)."""
    s = len(matrix)
    i, j = np.triu_indices(s, k=1)
    out = np.zeros((s, s))
    out[i, j] = out[j, i] = ranks(matrix[i, j])
    return out


def permutation_test(rdm_a: np.ndarray, rdm_b: np.ndarray, permutations: int = 1000,
                     seed: int = 0) -> tuple[float, float, np.ndarray]:
    """(rho, one-sided p, null rhos (permutations,)) with rdm_a's stimulus labels permuted (module
    docstring). Permuting relabels the same values, so the ranks are computed once."""
    rho = rsa(rdm_a, rdm_b)
    ra, rb = rank_matrix(rdm_a), upper(rank_matrix(rdm_b))
    rng = np.random.default_rng(seed)
    null = np.empty(permutations)
    for k in range(permutations):
        p = rng.permutation(len(ra))
        null[k] = _pearson(upper(ra[np.ix_(p, p)]), rb)
    return rho, float((1 + np.sum(null >= rho)) / (1 + permutations)), null


def bootstrap_ci(rdm_a: np.ndarray, rdm_b: np.ndarray, samples: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the RSA rho over stimuli resampled with replacement (module docstring)."""
    rng = np.random.default_rng(seed)
    s = len(rdm_a)
    rhos = np.empty(samples)
    for k in range(samples):
        idx = rng.integers(0, s, s)
        i, j = np.triu_indices(s, k=1)
        keep = idx[i] != idx[j]
        a, b = rdm_a[idx[i[keep]], idx[j[keep]]], rdm_b[idx[i[keep]], idx[j[keep]]]
        rhos[k] = spearman(a, b)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(rhos, [tail, 100 - tail])
    return float(lo), float(hi)
