"""Continual-learning metrics from the accuracy matrix R (T, T): R[i, j] = accuracy on task j's test set
after training on tasks 0..i (NaN above the diagonal: task j not yet seen, its head does not exist).

    average accuracy  A_T = mean_j R[T-1, j]                                   (after the last task)
    forgetting        F_T = mean_{j<T-1} max_{l in j..T-2} R[l, j] - R[T-1, j]    (Chaudhry et al. 2018)
    backward transfer BWT = mean_{j<T-1} R[T-1, j] - R[j, j]                    (Lopez-Paz & Ranzato 2017)

The matrix is read from the trainer's eval records: the evaluation at the end of task i's stage holds
"acc_<protocol>/<j>" for every seen task j (see jaxlab.methods.plwf.task.eval_finish).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

PROTOCOLS = ("task", "class")


def accuracy_matrix(evals: Sequence[Mapping[str, float]], protocol: str) -> np.ndarray:
    """evals[i]: the eval metrics after task i (T of them) -> R (T, T), NaN where j > i. A seen task
    missing from evals[i] is an error naming it."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r} is not one of {PROTOCOLS}")
    t = len(evals)
    out = np.full((t, t), np.nan)
    for i, metrics in enumerate(evals):
        for j in range(i + 1):
            key = f"acc_{protocol}/{j}"
            if key not in metrics:
                raise KeyError(f"the evaluation after task {i} has no {key!r}; it has {sorted(metrics)}")
            out[i, j] = float(metrics[key])
    return out


def _check(r: np.ndarray) -> np.ndarray:
    r = np.asarray(r, np.float64)
    if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] < 1:
        raise ValueError(f"an accuracy matrix must be square (T, T) with T >= 1, got shape {r.shape}")
    return r


def average_accuracy(r: np.ndarray) -> float:
    """Mean accuracy over all tasks after the last one."""
    r = _check(r)
    return float(r[-1].mean())


def forgetting(r: np.ndarray) -> float:
    """Average forgetting over the tasks before the last (0.0 for a single task)."""
    r = _check(r)
    t = r.shape[0]
    if t == 1:
        return 0.0
    return float(np.mean([r[j:t - 1, j].max() - r[t - 1, j] for j in range(t - 1)]))


def backward_transfer(r: np.ndarray) -> float:
    """BWT (negative: forgetting; 0.0 for a single task)."""
    r = _check(r)
    t = r.shape[0]
    if t == 1:
        return 0.0
    return float(np.mean([r[t - 1, j] - r[j, j] for j in range(t - 1)]))


def summarize(r: np.ndarray) -> dict[str, float]:
    return {"average_accuracy": average_accuracy(r), "forgetting": forgetting(r),
            "backward_transfer": backward_transfer(r)}


def draw_matrix(ax, r: np.ndarray, title: str) -> None:
    """A heat map of R on ax: accuracy % after task i (rows) on task j (columns), the value in each cell."""
    r = 100 * np.asarray(r, np.float64)
    ax.imshow(np.ma.masked_invalid(r), vmin=0, vmax=100, cmap="viridis")
    for (i, j), v in np.ndenumerate(r):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="white" if v < 60 else "black")
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("evaluated on task", fontsize=7)
    ax.set_ylabel("after training task", fontsize=7)
    ax.set_xticks(range(r.shape[1]))
    ax.set_yticks(range(r.shape[0]))


def plot_matrices(matrices: Mapping[str, np.ndarray], path: str | Path) -> Path:
    """One heat map per name (draw_matrix) in a row, saved as PNG at path."""
    from jaxlab.report import save_figure, subplots

    fig, axes = subplots(len(matrices), panel_size=(3.4, 3.2))
    for ax, (name, r) in zip(axes, matrices.items()):
        draw_matrix(ax, r, name)
    return save_figure(fig, path)
