"""The task-sequence runner as trainer stages: one stage per task (plus, for EWC, a Fisher stage after
every task but the last), a network that grows a head per task, frozen snapshots as a part of the state.

State parts:
    "network"    Part(params {"backbone", "heads" (t+1 stacked)}, its optimizer state, BatchNorm statistics)
    "snapshots"  Part.frozen(stacked snapshots of tasks 0..t-1, jaxlab.methods.plwf.losses), from task 1 on,
                 for the distillation methods (lwf, plwf)
    "ewc"        EWC, from task 1 on: Part.frozen({"fisher": sum_k F_k, "fisher_anchor": sum_k F_k theta_k})
    extra        EWC: "fisher_acc" / "fisher_count", the running sums of the current Fisher stage

Stage "task<t>" enters by snapshotting the network (distillation methods), folding the finished Fisher
stage into the EWC quadratic (ewc), adding head t and a fresh optimizer state (the optimizer is reset
per task, as continual-learning libraries create one per task); its step trains "network" only, so the
snapshots provably never change. Methods (cl.method):
    finetune  new-task cross-entropy only                     lwf    + distillation from the latest snapshot
    joint     cross-entropy on every task seen so far (upper)  plwf   + distillation of head k from snapshot k
    ewc       + the EWC penalty (diagonal Fisher)
lwf and plwf step on the pair (new-task gradient, distillation gradient) through the credit-assignment
transformation (jaxlab.methods.plwf.credit); cl.credit="sum" is the plain sum.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxlab.methods.plwf import losses as L
from jaxlab.methods.plwf.credit import cosine, credit_assignment, unpair
from jaxlab.methods.plwf.data import augment_images, image_transform, load_task_data
from jaxlab.models.multihead import (add_head, backbone_features, head_logits, init_head, make_backbone,
                                     stack_heads)
from jaxlab.train.method import Method, Stage
from jaxlab.train.optim import part_optimizer
from jaxlab.train.state import Part, State, split_variables
from jaxlab.train.step import make_train_step

METHODS = ("finetune", "lwf", "plwf", "ewc", "joint")
DISTILLING = ("lwf", "plwf")
NETWORK, SNAPSHOTS, EWC = "network", "snapshots", "ewc"


def check_cl(cl) -> None:
    """Names the bad key of config.cl and its valid values."""
    if cl.method not in METHODS:
        raise ValueError(f"cl.method={cl.method!r} is not one of {METHODS}")
    if cl.protocol not in ("task", "class"):
        raise ValueError(f"cl.protocol={cl.protocol!r} is not one of 'task', 'class'")
    if cl.class_ce not in ("seen", "current"):
        raise ValueError(f"cl.class_ce={cl.class_ce!r} is not one of 'seen', 'current'")
    if cl.temperature <= 0:
        raise ValueError(f"cl.temperature={cl.temperature} must be > 0")
    if cl.steps_per_task < 1:
        raise ValueError(f"cl.steps_per_task={cl.steps_per_task} must be >= 1")


def training_protocol(cl) -> str:
    """The classifier the new-task cross-entropy (and EWC's Fisher) uses: the protocol's, except under
    the class protocol with cl.class_ce="current" (FACIL's convention: each head trained on its own task,
    only the evaluation is task-agnostic) where it is the task's own head. Joint training, the upper
    bound, always trains the protocol's classifier (one classifier over every seen class under "class")."""
    if cl.protocol == "class" and cl.class_ce == "current" and cl.method != "joint":
        return "task"
    return cl.protocol


class Network:
    """The multi-head network's pure functions (the backbone module and the head size)."""

    def __init__(self, config):
        m = config.model
        self.backbone = make_backbone(m.backbone, widths=tuple(m.widths), blocks_per_stage=m.blocks_per_stage,
                                      conv_impl=m.conv_impl)
        self.classes = int(config.cl.classes_per_task)

    def init(self, rng: jax.Array, x: jax.Array) -> tuple[dict, dict]:
        """(params with one head, collections) for inputs like x (B, ...)."""
        kb, kh = jax.random.split(rng)
        backbone, collections = split_variables(self.backbone.init(kb, x, train=False))
        feats = jax.eval_shape(lambda: self.backbone.apply({"params": backbone, **collections}, x))
        head = init_head(kh, feats.shape[-1], self.classes)
        return {"backbone": backbone, "heads": stack_heads([head])}, collections

    def logits(self, params: dict, collections: dict, x: jax.Array, train: bool) -> tuple[jax.Array, dict]:
        """(B, ...) -> ((B, T, C) logits of all T heads, collections)."""
        feats, collections = backbone_features(self.backbone, params["backbone"], collections, x, train)
        return head_logits(params["heads"], feats), collections


def stack_snapshot(snapshots: Part | None, network: Part) -> Part:
    """The frozen snapshots with `network` (after its task k = its last head) appended as snapshot k."""
    params, heads = network.params, network.params["heads"]
    entry = {"backbone": params["backbone"], "head": jax.tree_util.tree_map(lambda h: h[-1], heads)}
    if snapshots is None:
        stacked = jax.tree_util.tree_map(lambda a: a[None], entry)
        colls = jax.tree_util.tree_map(lambda a: a[None], network.collections)
    else:
        old = {k: snapshots.params[k] for k in entry}
        stacked = jax.tree_util.tree_map(lambda s, a: jnp.concatenate([s, a[None]]), old, entry)
        colls = jax.tree_util.tree_map(lambda s, a: jnp.concatenate([s, a[None]]), snapshots.collections,
                                       network.collections)
    return Part.frozen({**stacked, "latest_heads": heads}, colls)


def grow_tree(tree: dict, new_head: dict) -> dict:
    """A tree shaped like the network's params with `new_head` appended to its heads."""
    return {**tree, "heads": add_head(tree["heads"], new_head)}


def fold_fisher(ewc: Part | None, extra: dict, params: dict, new_head: dict) -> tuple[Part, dict]:
    """EWC at the start of a task: the finished Fisher stage's mean Fisher F_t folded into the frozen
    quadratic (F += F_t, F theta += F_t theta; zeros for the new head), the running sums reset."""
    count = jnp.maximum(extra["fisher_count"], 1.0)
    f_t = jax.tree_util.tree_map(lambda a: a / count, extra["fisher_acc"])
    if ewc is None:
        ewc = Part.frozen(empty_fisher(params))
    quad = {"fisher": jax.tree_util.tree_map(jnp.add, ewc.params["fisher"], f_t),
            "fisher_anchor": jax.tree_util.tree_map(lambda fa, f, p: fa + f * p, ewc.params["fisher_anchor"],
                                                    f_t, params)}
    zero_head = jax.tree_util.tree_map(jnp.zeros_like, new_head)
    quad = {k: grow_tree(v, zero_head) for k, v in quad.items()}
    return Part.frozen(quad), empty_fisher_sums(grow_tree(params, new_head))


def empty_fisher(params: dict) -> dict:
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    return {"fisher": zeros, "fisher_anchor": zeros}


def empty_fisher_sums(params: dict) -> dict:
    """extra of an EWC run: the running Fisher sum of the current Fisher stage and its example count."""
    return {"fisher_acc": jax.tree_util.tree_map(jnp.zeros_like, params),
            "fisher_count": jnp.zeros((), jnp.float32)}


def build_method(config) -> Method:
    """The continual-learning Method of config.cl over config.data's task split (module docstring)."""
    cl = config.cl
    check_cl(cl)
    net = Network(config)
    data = load_task_data(config)
    tasks = data.split.num_tasks
    steps = int(cl.steps_per_task)
    distilling = cl.method in DISTILLING
    base_tx = part_optimizer(config.optimizer, NETWORK, steps)
    tx = optax.chain(credit_assignment(cl.credit, cl.project), base_tx) if distilling else base_tx
    transform = image_transform(tuple(config.data.mean), tuple(config.data.std), float(config.data.image_scale))

    def init_state(rng, batch):
        params, collections = net.init(rng, batch["image"][:1])
        extra = empty_fisher_sums(params) if cl.method == "ewc" else {}
        return State.create({NETWORK: Part.create(params, tx, collections)}, extra)

    def enter(t):
        def run(state: State, rng) -> State:
            network = state.parts[NETWORK]
            parts, extra = {}, state.extra
            if distilling:
                parts[SNAPSHOTS] = stack_snapshot(state.parts.get(SNAPSHOTS), network)
            feat_dim = network.params["heads"]["kernel"].shape[1]
            head = init_head(rng, feat_dim, net.classes)
            if cl.method == "ewc":
                parts[EWC], extra = fold_fisher(state.parts.get(EWC), extra, network.params, head)
            params = grow_tree(network.params, head)
            parts[NETWORK] = Part.create(params, tx, network.collections)
            return state.replace(parts={**state.parts, **parts}, extra=extra)

        return run

    stages = []
    for t in range(tasks):
        source = data.seen[t] if cl.method == "joint" else data.train[t]
        stages.append(Stage(f"task{t}", steps, train_step=train_step_for(config, net, tx, t), train_source=source,
                            eval_step=eval_step_for(config, net, t), enter=enter(t) if t else None,
                            trains=(NETWORK,)))
        if cl.method == "ewc" and t < tasks - 1:
            n_batches = int(cl.fisher_batches) or math.ceil(len(source) / config.data.batch_size)
            stages.append(Stage(f"fisher{t}", n_batches, train_step=fisher_step_for(config, net),
                                train_source=source, eval_step=eval_step_for(config, net, t), trains=()))

    def apply_fn(state, batch):
        network = state.parts[NETWORK]
        return net.logits(network.params, network.collections, batch["image"], False)[0]

    return Method(name="plwf", init_state=init_state, train_step=stages[0].train_step,
                  train_source=data.train[0], eval_source=data.test, eval_step=stages[0].eval_step,
                  transform=transform, stages=tuple(stages), apply_fn=apply_fn, eval_finish=eval_finish,
                  param_groups=lambda state: {NETWORK: state.parts[NETWORK].params})


def task_losses(config, net: Network, t: int):
    """loss(params, collections, batch, rng) -> ((new-task loss, distillation loss), (collections, metrics)) at
    task t: the two terms whose gradients the credit assignment sees (the second is 0 for methods that
    do not distil; EWC's penalty is part of the first)."""
    cl = config.cl
    protocol = training_protocol(cl)

    def losses(params, collections, batch, rng):
        if cl.augment:  # the network and every snapshot see the same augmented images
            batch = {**batch, "image": augment_images(rng, batch["image"])}
        logits, net_colls = net.logits(params[NETWORK], collections[NETWORK], batch["image"], train=True)
        ce = L.new_task_ce(logits, batch, protocol)
        per_example, target = L.protocol_logits(logits, batch, protocol)
        metrics = {"ce": ce, "accuracy": jnp.mean(per_example.argmax(-1) == target)}
        distill = jnp.zeros((), jnp.float32)
        if cl.method in DISTILLING and t > 0:
            snaps = params[SNAPSHOTS]
            own, latest = L.snapshot_logits(net.backbone, snaps, collections[SNAPSHOTS], batch["image"])
            distill = cl.lamb * L.plwf_distillation(logits, own, latest, temperature=cl.temperature,
                                                    dense=cl.method == "plwf", latest_too=cl.distill_latest)
            metrics["distill"] = distill
        new = ce
        if cl.method == "ewc" and t > 0:
            penalty = L.ewc_penalty(params[NETWORK], params[EWC]["fisher"], params[EWC]["fisher_anchor"])
            metrics["ewc_penalty"] = penalty
            new = ce + cl.ewc_lambda * penalty
        return (new, distill), ({NETWORK: net_colls}, metrics)

    return losses


def train_step_for(config, net: Network, tx, t: int):
    """Task t's train step (jaxlab.train.step.make_train_step; the snapshots enter as constants)."""
    cl = config.cl
    losses = task_losses(config, net, t)
    txs = {NETWORK: tx}

    if cl.method not in DISTILLING:
        def loss_fn(params, collections, batch, rng):
            (new, distill), aux = losses(params, collections, batch, rng)
            return new + distill, aux

        inner = make_train_step(loss_fn, txs, trains=(NETWORK,), accum_steps=config.train.accum_steps)
    else:
        if config.train.accum_steps != 1:
            raise ValueError(f"train.accum_steps={config.train.accum_steps}: cl.method={cl.method!r} steps on "
                             "a pair of gradients (credit assignment), which does not accumulate; use 1")

        def grad_fn(params, collections, batch, rng):
            def pair(network):
                (new, distill), aux = losses({**params, NETWORK: network}, collections, batch, rng)
                return jnp.stack([new, distill]), aux

            values, vjp, (colls, metrics) = jax.vjp(pair, params[NETWORK], has_aux=True)
            (paired,) = jax.vmap(vjp)(jnp.eye(2, dtype=values.dtype))  # every leaf (2, ...): [g_new, g_old]
            g_new, g_old = unpair(paired)
            metrics = {**metrics, "grad_cosine": cosine(g_new, g_old)}
            return (values.sum(), (colls, metrics)), {NETWORK: paired}

        inner = make_train_step(None, txs, trains=(NETWORK,), grad_fn=grad_fn)

    return inner


def fisher_step_for(config, net: Network):
    """EWC's Fisher stage step: adds the batch's per-example diagonal Fisher (at the current network, in
    evaluation mode) to extra["fisher_acc"]; trains nothing."""
    cl = config.cl

    protocol = training_protocol(cl)

    def log_probs(params, collections, example):
        one = jax.tree_util.tree_map(lambda a: a[None], example)
        logits, _ = net.logits(params, collections, one["image"], train=False)
        per_example, target = L.protocol_logits(logits, one, protocol)
        return jax.nn.log_softmax(per_example[0].astype(jnp.float32)), target[0]

    def step(state, batch, rng):
        network = state.parts[NETWORK]
        fisher = L.per_example_fisher(lambda p, ex: log_probs(p, network.collections, ex), network.params,
                                      {k: batch[k] for k in ("image", "task", "label")}, cl.fisher)
        extra = dict(state.extra)
        extra["fisher_acc"] = jax.tree_util.tree_map(jnp.add, extra["fisher_acc"], fisher)
        extra["fisher_count"] = extra["fisher_count"] + batch["label"].shape[0]
        mean = sum(jnp.sum(f) for f in jax.tree_util.tree_leaves(fisher)) / batch["label"].shape[0]
        return state.replace(step=state.step + 1, extra=extra), {"fisher_trace": mean, "finite": jnp.isfinite(mean)}

    return step


def eval_step_for(config, net: Network, t: int):
    """After task t (t + 1 heads): per example, whether the protocol's prediction is right, split by task
    j <= t ("acc_<protocol>/j"), with "frac/j" (the share of task j's examples; eval_finish divides)."""
    protocol = config.cl.protocol

    def eval_step(state, batch, rng):
        network = state.parts[NETWORK]
        logits, _ = net.logits(network.params, network.collections, batch["image"], train=False)
        per_example, target = L.protocol_logits(logits, batch, protocol)
        correct = (per_example.argmax(-1) == target).astype(jnp.float32)
        out = {}
        for j in range(t + 1):
            is_j = (batch["task"] == j).astype(jnp.float32)
            out[f"frac/{j}"] = is_j
            out[f"acc_{protocol}/{j}"] = correct * is_j
        return out

    return eval_step


def eval_finish(means: dict[str, float]) -> dict[str, float]:
    """Eval means -> "acc_<protocol>/j", the accuracy on every seen task j, and "accuracy", their mean."""
    out: dict[str, Any] = {}
    for key, value in means.items():
        if key.startswith("acc_"):
            frac = means[f"frac/{key.split('/')[1]}"]
            out[key] = value / frac if frac > 0 else float("nan")
    accs = list(out.values())
    out["accuracy"] = sum(accs) / len(accs) if accs else float("nan")
    return out
