"""The multi-exit backdoor as stages of one trainer run (multiexit_backdoor.md; BackdoorDynamicDNN).

State parts: "backbone" (the CNN: params + BatchNorm statistics) and, once converted, "ics" (the
internal classifiers, jaxlab.models.exits.ExitHeads: their own tree, so strip / re-attach never touch
the backbone). Stages (each `epochs` passes over its training set, steps = epochs * ceil(N / batch)):
  clean   train the backbone on clean data (final exit CE); SGD lr 0.01 momentum 0.9, wd 1e-4 (5e-4
          VGG), x0.1 at the milestone epochs [20, 40] of 70. attack.kind="ordinary" trains it on the
          poisoned set instead (an ordinarily backdoored model: the positive control for the defenses).
  ics     enter: attach fresh ICs (SDN conversion), backbone frozen. Train the ICs only: sum over ICs
          of CE (final exit excluded), Adam lr 0.01, x0.1 at epoch 15 of 25.
  poison  enter: snapshot the clean model ("clean_backbone", "clean_ics", frozen), ICs frozen, the
          backbone trains (Adam lr 1e-4, wd 1e-4 / 5e-4 VGG) on the poisoned set: with M outputs and
          e = floor(attack.split * M) (0.6), outputs 0..e-1 CE toward label_poison (the target for the
          poisoned examples, the true label otherwise), outputs e..M-1 CE toward the true label, summed
          (attack.weighting="paper"); "reference" reproduces backdoor_sdn.py's running sum, where deep
          output k adds the last shallow CE plus the deep CEs up to k (later terms weigh more).
  victim  enter: keep the attacker's ICs as "attacker_ics" (frozen, for the report), strip the ICs
          (the released vanilla model is the backbone alone), attach fresh ones and train them on clean
          data with the backbone frozen (Adam lr 0.002, wd 1e-5 / 5e-4 VGG).
Frozen-backbone IC training runs the backbone in evaluation mode (model.frozen_bn="eval": its BatchNorm
statistics stay as they are, the paper's freezing); "train" is the reference's model.train(): batch
statistics normalise and the running statistics move (and VGG's Dropout is on).
Images are in [0, 1]; the models normalise them with the clean train split's channel statistics.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlab.losses import softmax_cross_entropy
from jaxlab.methods.backdoor import data as bdata
from jaxlab.methods.backdoor.triggers import TRIGGERS, trigger_affine
from jaxlab.models.exits import POOLINGS, ExitHeads, count_macs, early_exit, placement
from jaxlab.models.mobilenet_cifar import MobileNetBlocks
from jaxlab.models.resnet_cifar import TAPS, ResNetCifarBlocks
from jaxlab.models.vgg_cifar import VGG16BN
from jaxlab.train.method import Method, Stage
from jaxlab.train.optim import make_optimizer, part_config
from jaxlab.train.state import Part, State, split_variables
from jaxlab.train.step import make_train_step

ARCHS = ("resnet", "vgg16", "mobilenet")
STAGES = ("clean", "ics", "poison", "victim")
KINDS = ("multiexit", "ordinary")
WEIGHTINGS = ("paper", "reference")
BACKBONE, ICS = "backbone", "ics"


def make_backbone(m) -> nn.Module:
    """The multi-exit backbone of config.model (arch resnet: ResNet-(6n+2) with n = blocks_per_stage)."""
    if m.arch == "resnet":
        if m.tap not in TAPS:
            raise ValueError(f"model.tap={m.tap!r} must be one of {TAPS}")
        return ResNetCifarBlocks(m.blocks_per_stage, m.num_classes, m.tap, m.conv_impl)
    if m.arch == "vgg16":
        return VGG16BN(m.num_classes, conv_impl=m.conv_impl)
    if m.arch == "mobilenet":
        return MobileNetBlocks(m.num_classes, m.conv_impl)
    raise ValueError(f"model.arch={m.arch!r} must be one of {ARCHS}")


def arch_name(m) -> str:
    """SDN's name for the architecture (its sparse IC masks are keyed by it)."""
    if m.arch == "resnet":
        return f"resnet{6 * m.blocks_per_stage + 2}"
    return m.arch


class MultiExitModel:
    """A backbone, its ICs and the input normalisation, as pure functions of the parts' trees."""

    def __init__(self, config, mean, std):
        m = config.model
        if m.pooling not in POOLINGS:
            raise ValueError(f"model.pooling={m.pooling!r} must be one of {POOLINGS}")
        self.backbone = make_backbone(m)
        self.image_shape = (m.image_size, m.image_size, 3)
        x = jnp.zeros((1, *self.image_shape))
        shapes = jax.eval_shape(lambda: self.backbone.init(jax.random.key(0), x))
        _, taps = jax.eval_shape(self.backbone.apply, shapes, x)
        self.tap_shapes = [t.shape[1:] for t in taps]
        tap_macs = None
        if m.placement == "sdn" and arch_name(m) not in ("resnet56", "vgg16", "mobilenet"):
            tap_macs = [count_macs(lambda v, x, k=k: self.backbone.apply(v, x, upto=k), shapes, x)
                        for k in range(len(taps))] + [count_macs(self.backbone.apply, shapes, x)]
        self.heads = ExitHeads(m.num_classes, placement(m.placement, len(taps), arch_name(m), tap_macs),
                               m.pooling)
        self.num_exits = len(self.heads.placement) + 1
        self.mean, self.std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)

    def normalize(self, images):
        return (images - self.mean) / self.std

    def init_backbone(self, rng) -> tuple:
        """(params, collections) of a fresh backbone."""
        return split_variables(self.backbone.init(rng, jnp.zeros((1, *self.image_shape))))

    def init_heads(self, rng):
        """Fresh IC params for the backbone's taps."""
        taps = [jnp.zeros((1, *s)) for s in self.tap_shapes]
        return self.heads.init(rng, taps)["params"]

    def backbone_apply(self, params, collections, images, *, train=False, rng=None):
        """images (B, S, S, 3) in [0, 1] -> (final logits, taps, updated collections (train) or the same)."""
        variables = {"params": params, **collections}
        x = self.normalize(images)
        if not train:
            final, taps = self.backbone.apply(variables, x, train=False)
            return final, taps, collections
        (final, taps), updates = self.backbone.apply(variables, x, train=True, rngs={"dropout": rng},
                                                     mutable=list(collections))
        return final, taps, {**collections, **updates}

    def exits(self, backbone_params, collections, ic_params, images, *, train=False, rng=None):
        """(M, B, C) logits of every exit (ICs by tap, then the final exit) and the collections."""
        final, taps, collections = self.backbone_apply(backbone_params, collections, images, train=train, rng=rng)
        ics = self.heads.apply({"params": ic_params}, taps)
        return jnp.stack([*ics, final]), collections

    def exits_pruned(self, backbone_params, collections, ic_params, images, channel_mask):
        """(M, B, C) logits (evaluation mode) with the last block's channels multiplied by channel_mask (C,)
        (fine-pruning): the final exit and any IC on the last block read the pruned activation.
        ic_params None: the final exit alone, (1, B, C)."""
        _, taps, _ = self.backbone_apply(backbone_params, collections, images)
        last = taps[-1]
        if isinstance(self.backbone, VGG16BN):  # the last tap is FC block 1's output: fc2, ReLU, fc3
            pruned = last * channel_mask
            dense = lambda name, x: x @ backbone_params[name]["kernel"] + backbone_params[name]["bias"]  # noqa: E731
            final = dense("fc3", nn.relu(dense("fc2", pruned)))
        else:  # global average pool then fc (a ResNet's pre-ReLU tap gets its ReLU first)
            if isinstance(self.backbone, ResNetCifarBlocks) and self.backbone.tap == "pre_relu":
                last = nn.relu(last)
            pruned = last * channel_mask
            fc = backbone_params["fc"]
            final = pruned.mean(axis=(1, 2)) @ fc["kernel"] + fc["bias"]
        if ic_params is None:  # a vanilla model: its final exit only, (1, B, C)
            return final[None]
        ics = self.heads.apply({"params": ic_params}, [*taps[:-1], pruned])
        return jnp.stack([*ics, final])


def exit_split(num_exits: int, split: float) -> int:
    """e = floor(split * M): outputs 0..e-1 are the shallow ones (the reference's int(len(output) * 0.6))."""
    return int(math.floor(num_exits * split + 1e-9))


def poison_objective(logits, label_true, label_poison, split: float, weighting: str):
    """The backbone-poisoning loss. logits (M, B, C); see the module docstring (stage poison)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"attack.weighting={weighting!r} must be one of {WEIGHTINGS}")
    e = exit_split(logits.shape[0], split)
    ces = [softmax_cross_entropy(logits[k], label_poison if k < e else label_true).mean()
           for k in range(logits.shape[0])]
    if weighting == "paper":
        return sum(ces)
    total = sum(ces[:e], jnp.zeros(()))
    running = ces[e - 1] if e > 0 else jnp.zeros(())
    for ce in ces[e:]:
        running = running + ce
        total = total + running
    return total


def stage_optimizer(config, stage: str, steps_per_epoch: int) -> optax.GradientTransformation:
    """The optimizer of `stage` from config.optimizer's section of that name, torch-style: SGD weight
    decay added to the gradient (as Adam's already is), and the learning rate x0.1 at each of
    config.stages.<stage>.milestones (epochs), counted from the stage's first step."""
    cfg = part_config(config.optimizer, stage)
    tx = make_optimizer(cfg, max(1, config.stages[stage].epochs * steps_per_epoch))
    if cfg.name in ("sgd", "momentum") and cfg.weight_decay:
        tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay), tx)
    milestones = config.stages[stage].milestones
    if milestones:
        schedule = optax.piecewise_constant_schedule(1.0, {int(m) * steps_per_epoch: 0.1 for m in milestones})
        tx = optax.chain(tx, optax.scale_by_schedule(schedule))
    return tx


def strip_exits(state: State) -> State:
    """The state without its ICs (the released vanilla model)."""
    return state.replace(parts={k: v for k, v in state.parts.items() if k != ICS})


def attach_exits(state: State, model: MultiExitModel, rng, tx) -> State:
    """Fresh ICs (trained by `tx`) attached to the frozen backbone."""
    backbone = state.parts[BACKBONE]
    return state.replace_parts(**{BACKBONE: Part.frozen(backbone.params, backbone.collections),
                                  ICS: Part.create(model.init_heads(rng), tx)})


def check_config(config) -> None:
    a, m = config.attack, config.model
    if a.trigger not in TRIGGERS:
        raise ValueError(f"attack.trigger={a.trigger!r} must be one of {TRIGGERS}")
    if a.kind not in KINDS:
        raise ValueError(f"attack.kind={a.kind!r} must be one of {KINDS}")
    if not 0 <= a.target < m.num_classes:
        raise ValueError(f"attack.target={a.target} is not a class of model.num_classes={m.num_classes}")
    if not 0.0 <= a.poison_rate < 1.0:
        raise ValueError(f"attack.poison_rate={a.poison_rate} must be in [0, 1)")
    if m.frozen_bn not in ("eval", "train"):
        raise ValueError(f"model.frozen_bn={m.frozen_bn!r} must be 'eval' or 'train'")
    missing = [s for s in STAGES if s not in config.stages]
    if missing:
        raise ValueError(f"config.stages lacks {missing}; stages: {STAGES}")


def build(config) -> Method:
    """The attack as one run of four stages (module docstring)."""
    return build_with_model(config)[0]


def build_with_model(config) -> tuple[Method, MultiExitModel]:
    """build(config) and the MultiExitModel its steps use (for the report and the defenses)."""
    check_config(config)
    train_clean = bdata.clean_source(config, "train")
    test = bdata.clean_source(config, "test")
    poisoned = bdata.poisoned_source(config)
    model = MultiExitModel(config, *bdata.channel_stats(config))
    spe = -(-len(train_clean) // config.data.batch_size)
    txs = {s: stage_optimizer(config, s, spe) for s in STAGES}
    a = config.attack
    bn_train = config.model.frozen_bn == "train"

    def init_state(rng, batch):
        params, collections = model.init_backbone(rng)
        return State.create({BACKBONE: Part.create(params, txs["clean"], collections)})

    def clean_loss(params, collections, batch, rng):
        final, _, new = model.backbone_apply(params[BACKBONE], collections[BACKBONE], batch["image"],
                                             train=True, rng=rng)
        label = batch["label_poison"]
        loss = softmax_cross_entropy(final, label).mean()
        return loss, ({BACKBONE: new}, {"accuracy": jnp.mean(final.argmax(-1) == label)})

    def ic_loss(params, collections, batch, rng):
        logits, new = model.exits(params[BACKBONE], collections[BACKBONE], params[ICS], batch["image"],
                                  train=bn_train, rng=rng)
        loss = sum(softmax_cross_entropy(logits[k], batch["label"]).mean() for k in range(model.num_exits - 1))
        return loss, ({BACKBONE: new}, {"first_exit_accuracy": jnp.mean(logits[0].argmax(-1) == batch["label"])})

    def poison_loss(params, collections, batch, rng):
        logits, new = model.exits(params[BACKBONE], collections[BACKBONE], params[ICS], batch["image"],
                                  train=True, rng=rng)
        loss = poison_objective(logits, batch["label"], batch["label_poison"], a.split, a.weighting)
        return loss, ({BACKBONE: new}, {"final_accuracy": jnp.mean(logits[-1].argmax(-1) == batch["label"])})

    def enter_ics(state, rng):
        return attach_exits(state, model, rng, txs["ics"])

    def enter_poison(state, rng):
        bb, ics = state.parts[BACKBONE], state.parts[ICS]
        return state.replace_parts(**{
            "clean_backbone": Part.frozen(bb.params, bb.collections), "clean_ics": Part.frozen(ics.params),
            BACKBONE: Part.create(bb.params, txs["poison"], bb.collections), ICS: Part.frozen(ics.params)})

    def enter_victim(state, rng):
        attacker = Part.frozen(state.parts[ICS].params)
        return attach_exits(strip_exits(state), model, rng, txs["victim"]).replace_parts(attacker_ics=attacker)

    def steps(stage):
        return config.stages[stage].epochs * spe

    ic_step = make_train_step(ic_loss, {ICS: txs["ics"]}, trains=(ICS,))
    victim_step = make_train_step(ic_loss, {ICS: txs["victim"]}, trains=(ICS,))
    clean_step = make_train_step(clean_loss, {BACKBONE: txs["clean"]}, trains=(BACKBONE,))
    poison_step = make_train_step(poison_loss, {BACKBONE: txs["poison"]}, trains=(BACKBONE,))
    ordinary = a.kind == "ordinary"  # the positive control: poisoned clean stage, no poisoning stage
    stages = (
        Stage("clean", steps("clean"), clean_step, poisoned if ordinary else train_clean, trains=(BACKBONE,)),
        Stage("ics", steps("ics"), ic_step, train_clean, enter=enter_ics, trains=(ICS,)),
        *(() if ordinary else (Stage("poison", steps("poison"), poison_step, poisoned, enter=enter_poison,
                                     trains=(BACKBONE,)),)),
        Stage("victim", steps("victim"), victim_step, train_clean, enter=enter_victim, trains=(ICS,)),
    )
    eval_step = make_eval_step(model, config)

    def param_groups(state):
        groups = {BACKBONE: state.parts[BACKBONE].params}
        ics = state.parts[ICS].params if ICS in state.parts else jax.eval_shape(model.init_heads, jax.random.key(0))
        groups[f"{ICS} ({len(model.heads.placement)}, {config.model.placement})"] = ics
        return groups

    def apply_fn(state, batch):
        bb = state.parts[BACKBONE]
        return model.backbone_apply(bb.params, bb.collections, batch["image"])[0]

    return Method(name="backdoor", init_state=init_state, train_step=clean_step, train_source=train_clean,
                  eval_source=test, eval_step=eval_step, stages=stages, apply_fn=apply_fn,
                  param_groups=param_groups, eval_finish=finish_rates), model


def make_eval_step(model: MultiExitModel, config):
    """eval_step(state, batch, rng) -> per-example values (B,): "final_acc", "final_asr" (the vanilla
    model: the backbone's final exit), "nontarget" (the image is not of the target class), and once ICs
    are attached, "exit<k>_acc" / "exit<k>_asr" per exit and "tau<t>_acc" / "tau<t>_asr" / "tau<t>_exit"
    for early exit from exit 0 at each of config.eval.taus. *_asr values are counted over non-target
    images only (finish_rates divides by their share)."""
    a = config.attack
    scale, offset = (jnp.asarray(v) for v in trigger_affine(a.trigger, model.image_shape, a.watermark_opacity))

    def eval_step(state, batch, rng):
        images, label = batch["image"], batch["label"]
        nontarget = (label != a.target).astype(jnp.float32)
        triggered = images * scale + offset
        bb = state.parts[BACKBONE]
        both = jnp.concatenate([images, triggered])
        if ICS in state.parts:
            logits, _ = model.exits(bb.params, bb.collections, state.parts[ICS].params, both)
        else:
            logits = model.backbone_apply(bb.params, bb.collections, both)[0][None]
        clean, trig = jnp.split(logits, 2, axis=1)
        values = {"nontarget": nontarget}

        def record(prefix, clean_pred, trig_pred):
            values[f"{prefix}_acc"] = (clean_pred == label).astype(jnp.float32)
            values[f"{prefix}_asr"] = (trig_pred == a.target) * nontarget

        record("final", clean[-1].argmax(-1), trig[-1].argmax(-1))
        if ICS in state.parts:
            for k in range(model.num_exits - 1):
                record(f"exit{k}", clean[k].argmax(-1), trig[k].argmax(-1))
            for tau in config.eval.taus:
                exit_clean, pred_clean = early_exit(clean, tau)
                _, pred_trig = early_exit(trig, tau)
                record(f"tau{tau}", pred_clean, pred_trig)
                values[f"tau{tau}_exit"] = exit_clean.astype(jnp.float32)
        return values

    return eval_step


def finish_rates(means: dict) -> dict:
    """Eval means -> metrics: every *_asr mean divided by the share of non-target images."""
    share = means.get("nontarget", 1.0)
    return {k: (v / share if k.endswith("_asr") else v) for k, v in means.items() if k != "nontarget"}


def exit_outputs(model: MultiExitModel, state: State, images: np.ndarray, *, ics: str = ICS,
                 backbone: str = BACKBONE, batch_size: int = 256) -> np.ndarray:
    """(M, N, C) float32 logits of every exit of the state's `backbone` with its `ics` part on images
    (N, S, S, 3) in [0, 1], in batches (jitted)."""
    bb, heads = state.parts[backbone], state.parts[ics]
    fn = jax.jit(lambda imgs: model.exits(bb.params, bb.collections, heads.params, imgs)[0])
    return np.concatenate([np.asarray(fn(images[i:i + batch_size]))
                           for i in range(0, len(images), batch_size)], axis=1)
