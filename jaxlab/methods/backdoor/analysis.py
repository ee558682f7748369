"""Metrics of the multi-exit backdoor from every exit's logits on clean and triggered test images:
per-exit clean accuracy and attack success rate (ASR: the share of non-target test images that the
trigger sends to the target class), early exit across tau and start exit (accuracy, ASR, exit
distribution, average MACs per input), for each multi-exit model a run's final state holds:

  clean     the clean CNN with the attacker's clean-trained ICs (before poisoning: the base rate)
  attacker  the poisoned backbone with the attacker's frozen ICs
  victim    the released (poisoned) backbone with the victim's fresh, clean-trained ICs
The vanilla model is the final exit of a backbone (clean or released).
"""

from __future__ import annotations

import numpy as np

from jaxlab.methods.backdoor.task import BACKBONE, ICS, MultiExitModel, exit_outputs
from jaxlab.methods.backdoor.triggers import apply_trigger
from jaxlab.models.exits import early_exit, exit_costs, exit_path_macs

MODELS = {"clean": ("clean_backbone", "clean_ics"), "attacker": (BACKBONE, "attacker_ics"),
          "victim": (BACKBONE, ICS)}


def per_exit(logits: np.ndarray, labels: np.ndarray, target: int | None = None) -> np.ndarray:
    """(M,) accuracy of every exit on logits (M, N, C); with `target`, the ASR instead: the share of
    the non-target examples (labels != target) predicted as target."""
    preds = logits.argmax(-1)
    if target is None:
        return (preds == labels).mean(axis=1)
    keep = labels != target
    return (preds[:, keep] == target).mean(axis=1)


def early_exit_rows(clean: np.ndarray, triggered: np.ndarray, labels: np.ndarray, target: int, taus,
                    starts, path_macs=None) -> list[dict]:
    """One row per (start, tau): accuracy and exit distribution on clean images, ASR and exit distribution
    on triggered non-target images, and (path_macs(start) -> (M,) MACs per exit) average MACs per input."""
    keep = labels != target
    rows = []
    num_exits = clean.shape[0]
    for start in starts:
        for tau in taus:
            exits_c, preds_c = (np.asarray(v) for v in early_exit(clean, tau, start))
            exits_t, preds_t = (np.asarray(v) for v in early_exit(triggered[:, keep], tau, start))
            row = {"start": int(start), "tau": float(tau), "accuracy": float((preds_c == labels).mean()),
                   "asr": float((preds_t == target).mean()),
                   "exit_share_clean": np.bincount(exits_c, minlength=num_exits) / len(exits_c),
                   "exit_share_triggered": np.bincount(exits_t, minlength=num_exits) / len(exits_t)}
            if path_macs is not None:
                macs = path_macs(start)
                row["avg_macs"] = float(macs[exits_c].mean())
                row["macs_ratio"] = row["avg_macs"] / float(macs[-1])
            rows.append(row)
    return rows


def evaluate_state(config, state, model: MultiExitModel, images: np.ndarray, labels: np.ndarray) -> dict:
    """Every multi-exit model of a finished run's state on test images (N, S, S, 3) in [0, 1]:
    {name: {"exit_accuracy" (M,), "exit_asr" (M,), "vanilla_accuracy", "vanilla_asr", "early_exit": rows}}
    plus "costs" (MACs per exit path from exit 0) and "num_exits"."""
    a = config.attack
    triggered = apply_trigger(images, a.trigger, a.watermark_opacity).astype(np.float32)
    bb = state.parts[BACKBONE]
    costs = exit_costs(model.backbone, model.heads, {"params": bb.params, **bb.collections},
                       state.parts[ICS].params, model.image_shape)
    path = lambda start: exit_path_macs(costs, model.heads.placement, start)  # noqa: E731
    out = {"num_exits": model.num_exits, "costs": {"exit_macs": path(0), "final_macs": costs["final"]}}
    for name, (backbone, ics) in MODELS.items():
        if backbone not in state.parts or ics not in state.parts:
            continue
        clean = exit_outputs(model, state, images, backbone=backbone, ics=ics)
        trig = exit_outputs(model, state, triggered, backbone=backbone, ics=ics)
        acc, asr = per_exit(clean, labels), per_exit(trig, labels, a.target)
        out[name] = {"exit_accuracy": acc, "exit_asr": asr, "vanilla_accuracy": float(acc[-1]),
                     "vanilla_asr": float(asr[-1]),
                     "early_exit": early_exit_rows(clean, trig, labels, a.target, config.report.taus,
                                                   [s for s in config.report.starts if s < model.num_exits],
                                                   path)}
    return out
