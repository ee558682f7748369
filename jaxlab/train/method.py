"""The method contract: what a method supplies to the one trainer (jaxlab.train.loop).

    method.init_state(rng, example_batch) -> State        # named parts (jaxlab.train.state)
    method.train_step(state, batch, rng) -> (state, metrics)   # pure; the trainer jits, shards, donates
    method.eval_step(state, batch, rng) -> {name: (B,) per-example values}
    method.stages -> (Stage, ...)                          # () = one stage of config.train.steps

Everything else (jit with shardings and donation, the loop, checkpoints of the whole state, exact
resume inside any stage, init_from, the non-finite stop, metrics, evaluation, progress, summary,
curves, `jaxlab info` and `jaxlab bench`) is the trainer's. A supervised method writes only its loss
and uses jaxlab.train.supervised to get all of this; a federated method's batch is a round's stacked
client data and its train_step is the round.

Metrics from a step are scalars; "finite" (bool), if present, says whether the step was good (the
trainer stops or counts skipped steps on it); "loss" is shown on the progress bar.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxlab.data.sources import Source
from jaxlab.train.state import PyTree, State

StepFn = Callable[[State, Any, jax.Array], tuple[State, dict[str, jax.Array]]]
EvalStepFn = Callable[[State, Any, jax.Array], dict[str, jax.Array]]
Transform = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Stage:
    """One phase of a run: `steps` steps of `train_step` on `train_source` (None: the method's).

    enter(state, rng) -> state runs once when the stage begins (jitted): snapshot a teacher, attach and
    initialise exits, reset an optimizer. It may change the state's structure; the trainer derives each
    stage's state layout from init_state and the enters before it, so a run killed in any stage resumes
    exactly. `trains` names the parts the step updates (documentation and `jaxlab info`; the step
    enforces it)."""

    name: str
    steps: int
    train_step: StepFn | None = None  # None: the method's train_step
    train_source: Source | None = None
    eval_source: Source | None = None
    eval_step: EvalStepFn | None = None
    enter: Callable[[State, jax.Array], State] | None = None
    trains: Sequence[str] = ()


@dataclasses.dataclass(frozen=True)
class Method:
    """What a method supplies; see the module docstring.

    train_source / eval_source: sources of examples that the trainer batches (config.data.batch_size,
    sharded on the mesh's data axis), mapped by `transform` on the host. A method whose batch is not a
    batch of examples (a federated round's stacked client data) supplies `train_batches(mesh) ->`
    an object with `batch(step)`, `local_batch(step)`, `iterate(start, end)` and `sharding`
    (jaxlab.data.pipeline.TrainBatches is the model), and evaluates with `evaluate(state) -> metrics`.
    apply_fn(state, batch) -> outputs: the forward pass, for FLOP counts in `jaxlab info`.
    param_groups(state) -> {name: params}: what `jaxlab info` counts (default: every part's params).
    eval_finish(means) -> metrics: turns the eval means of eval_step's values into the reported metrics
    (balanced accuracy from per-class indicator means, PSNR from MSE); default: the means themselves.
    """

    name: str
    init_state: Callable[[jax.Array, Any], State]
    train_step: StepFn
    train_source: Source | None = None
    eval_source: Source | None = None
    eval_step: EvalStepFn | None = None
    transform: Transform | None = None
    stages: Sequence[Stage] = ()
    apply_fn: Callable[[State, Any], Any] | None = None
    train_batches: Callable[[Any], Any] | None = None
    evaluate: Callable[[State], dict[str, float]] | None = None
    param_groups: Callable[[State], dict[str, PyTree]] | None = None
    eval_finish: Callable[[dict[str, float]], dict[str, float]] | None = None


def resolve_stages(method: Method, steps: int) -> list[Stage]:
    """The run's stages with every field filled from the method's defaults; one stage of `steps`
    steps when the method declares none."""
    stages = list(method.stages) or [Stage("train", steps)]
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique, got {names}")
    out = []
    for s in stages:
        if s.steps < 0:
            raise ValueError(f"stage {s.name!r} has {s.steps} steps; a stage needs >= 0")
        out.append(dataclasses.replace(
            s,
            train_step=s.train_step if s.train_step is not None else method.train_step,
            train_source=s.train_source if s.train_source is not None else method.train_source,
            eval_source=s.eval_source if s.eval_source is not None else method.eval_source,
            eval_step=s.eval_step if s.eval_step is not None else method.eval_step,
        ))
    return out


def stage_bounds(stages: Sequence[Stage]) -> list[tuple[int, int]]:
    """[(first step, end step)) of each stage in the run's global step count."""
    bounds, start = [], 0
    for s in stages:
        bounds.append((start, start + s.steps))
        start += s.steps
    return bounds


def stage_of(done: int, stages: Sequence[Stage]) -> int:
    """Index of the last stage entered once `done` steps have run (-1 before any step: no stage entered).

    A stage is entered when its first step begins, so at a boundary the finished stage is current."""
    if done == 0:
        return -1
    for i, (start, end) in enumerate(stage_bounds(stages)):
        if start < done <= end:
            return i
    raise ValueError(f"step {done} is past the run's {stage_bounds(stages)[-1][1]} steps")
