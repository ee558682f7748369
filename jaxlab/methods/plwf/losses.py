"""PLwF's losses on the multi-head network (jaxlab.models.multihead): new-task cross-entropy under either
protocol, knowledge distillation from frozen snapshots (all snapshots in ONE vmapped forward), the EWC
penalty and the per-example diagonal Fisher.

Snapshots are stacked on a leading axis K (snapshot k = the network after task k):
    {"backbone": <backbone params, every leaf (K, ...)>,
     "head": {"kernel": (K, D, C), "bias": (K, C)}            # head k of snapshot k (the head it learned)
     "latest_heads": {"kernel": (K, D, C), "bias": (K, C)}}   # heads 0..K-1 of the latest snapshot
with the backbone's collections (BatchNorm statistics) stacked the same way.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlab.losses import softmax_cross_entropy
from jaxlab.models.multihead import backbone_features, head_logits

PyTree = dict


def protocol_logits(logits: jax.Array, batch: dict, protocol: str) -> tuple[jax.Array, jax.Array]:
    """(B, T, C) logits of T heads -> (per-example logits, target) of the protocol:
    "task" (task-incremental): the head of the example's task, target its label within the task: (B, C);
    "class" (class-incremental): all T heads as one T*C-way classifier, target task * C + label: (B, T*C)."""
    b, t, c = logits.shape
    task = jnp.clip(batch["task"], 0, t - 1)
    if protocol == "task":
        return jnp.take_along_axis(logits, task[:, None, None], axis=1)[:, 0], batch["label"]
    if protocol == "class":
        return logits.reshape(b, t * c), batch["task"] * c + batch["label"]
    raise ValueError(f"cl.protocol={protocol!r} is not one of 'task', 'class'")


def new_task_ce(logits: jax.Array, batch: dict, protocol: str) -> jax.Array:
    """Mean cross-entropy of (B, T, C) logits on the batch's examples under the protocol (a scalar)."""
    per_example, target = protocol_logits(logits, batch, protocol)
    return softmax_cross_entropy(per_example, target).mean()


def distillation(student: jax.Array, teacher: jax.Array, temperature: float) -> jax.Array:
    """Hinton / LwF distillation of (..., K, C) student logits towards (..., K, C) teacher logits at
    temperature T: KL(softmax(teacher / T) || softmax(student / T)) summed over the K heads, mean over the
    leading (batch) axes. Same gradient as LwF's modified cross-entropy (they differ by the teacher's
    entropy, a constant); 0 when the student matches the teacher."""
    log_p = jax.nn.log_softmax(teacher.astype(jnp.float32) / temperature, axis=-1)
    log_q = jax.nn.log_softmax(student.astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)  # (..., K)
    return kl.sum(-1).mean()


def snapshot_logits(backbone: nn.Module, snapshots: PyTree, collections: PyTree,
                    x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Every snapshot on inputs x (B, ...) in one vmapped forward (evaluation mode) ->
    own (K, B, C): head k of snapshot k on its own features; latest (K, B, C): the latest snapshot's
    heads 0..K-1 on the latest snapshot's features."""

    def one(params, colls):
        return backbone_features(backbone, params, colls, x, train=False)[0]

    feats = jax.vmap(one)(snapshots["backbone"], collections)  # (K, B, D)
    own = jnp.einsum("kbd,kdc->kbc", feats, snapshots["head"]["kernel"]) + snapshots["head"]["bias"][:, None]
    latest = jnp.moveaxis(head_logits(snapshots["latest_heads"], feats[-1]), 1, 0)  # (K, B, C)
    return own, latest


def snapshot_logits_loop(backbone: nn.Module, snapshots: PyTree, collections: PyTree,
                         x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """snapshot_logits as a Python loop over the snapshots (the reference the tests hold it to)."""
    k = snapshots["head"]["bias"].shape[0]
    own = []
    for i in range(k):
        params = jax.tree_util.tree_map(lambda a: a[i], snapshots["backbone"])
        colls = jax.tree_util.tree_map(lambda a: a[i], collections)
        feats = backbone_features(backbone, params, colls, x, train=False)[0]
        head = jax.tree_util.tree_map(lambda a: a[i], snapshots["head"])
        own.append(feats @ head["kernel"] + head["bias"])
        if i == k - 1:
            latest = [feats @ snapshots["latest_heads"]["kernel"][j] + snapshots["latest_heads"]["bias"][j]
                      for j in range(k)]
    return jnp.stack(own), jnp.stack(latest)


def plwf_distillation(student: jax.Array, own: jax.Array, latest: jax.Array, *, temperature: float,
                      dense: bool, latest_too: bool) -> jax.Array:
    """The distillation term of PLwF / LwF on old heads 0..K-1.

    student (B, T, C) the network's logits (T >= K heads); own, latest (K, B, C) from snapshot_logits.
    dense (PLwF): head k distilled from snapshot k, the model that learned task k; latest_too adds LwF's
    term (every old head distilled from the latest snapshot); dense False is LwF alone."""
    if own.shape[0] > student.shape[1] or own.shape != latest.shape:
        raise ValueError(f"distillation: {own.shape[0]} snapshots for a network of {student.shape[1]} heads, or "
                         f"own {own.shape} and latest {latest.shape} logits differ; need K <= T, both (K, B, C)")
    old = student[:, :own.shape[0]]  # (B, K, C)
    loss = jnp.zeros((), jnp.float32)
    if dense:
        loss = loss + distillation(old, jnp.moveaxis(own, 0, 1), temperature)
    if latest_too or not dense:
        loss = loss + distillation(old, jnp.moveaxis(latest, 0, 1), temperature)
    return loss


def ewc_penalty(params: PyTree, fisher: PyTree, fisher_anchor: PyTree) -> jax.Array:
    """0.5 * sum F (theta - a)^2 with F = sum_k F_k and a = sum_k F_k theta_k / F (where F > 0): the sum of
    Kirkpatrick et al.'s per-task penalties 0.5 * sum_k F_k (theta - theta_k)^2 up to a constant (same
    gradient), stored as one quadratic. fisher_anchor holds sum_k F_k theta_k."""

    def leaf(p, f, fa):
        anchor = jnp.where(f > 0, fa / jnp.where(f > 0, f, 1.0), p)
        return jnp.sum(f * (p - jax.lax.stop_gradient(anchor)) ** 2)

    return 0.5 * sum(jax.tree_util.tree_leaves(jax.tree_util.tree_map(leaf, params, fisher, fisher_anchor)))


def per_example_fisher(log_probs_fn, params: PyTree, batch: dict, kind: str) -> PyTree:
    """Diagonal Fisher summed over the batch: sum_b E_y[(d log p(y | x_b) / d theta)^2].

    log_probs_fn(params, example) -> ((M,) log-probabilities of one example under the protocol, its
    target class). kind "expected": the expectation over y ~ p(y | x) computed exactly (M backward passes per
    example; Kirkpatrick et al.'s Fisher); "empirical": y = the true label; "max_pred": y = the predicted
    class (FACIL's default)."""
    if kind not in ("expected", "empirical", "max_pred"):
        raise ValueError(f"cl.fisher={kind!r} is not one of 'expected', 'empirical', 'max_pred'")

    def one(example):
        log_p, target = log_probs_fn(params, example)
        grad_of = jax.grad(lambda p, y: log_probs_fn(p, example)[0][y])
        if kind == "expected":
            probs = jax.lax.stop_gradient(jnp.exp(log_p))
            sq = jax.lax.map(lambda y: jax.tree_util.tree_map(jnp.square, grad_of(params, y)),
                             jnp.arange(log_p.shape[0]))
            return jax.tree_util.tree_map(lambda s: jnp.tensordot(probs, s, axes=1), sq)
        y = target if kind == "empirical" else jnp.argmax(log_p)
        return jax.tree_util.tree_map(jnp.square, grad_of(params, y))

    per = jax.vmap(one)(batch)
    return jax.tree_util.tree_map(lambda f: f.sum(0), per)
