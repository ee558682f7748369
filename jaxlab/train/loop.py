"""The one training loop: config -> task -> sharded state -> jitted step -> metrics and checkpoints.

Resume is exact: the state is restored from the latest checkpoint, batch `step` is a pure function of
(data seed, step) and the step's key is fold_in(key(seed), step), so a killed-and-restarted run ends
bit-identical (on CPU) to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxlab.config import Config, ConfigError
from jaxlab.data.pipeline import TrainBatches, eval_batches
from jaxlab.methods.base import Task, build_task
from jaxlab.train import checkpoint as ckpt
from jaxlab.train import mesh as mesh_lib
from jaxlab.train.metrics import MetricWriter, Progress, plot_curves, read_metrics, summary_table
from jaxlab.train.optim import make_optimizer
from jaxlab.train.state import TrainState, param_count, split_variables
from jaxlab.train.step import compute_dtype, jit_train_step, make_eval_step, make_train_step


class NonFiniteError(FloatingPointError):
    """Raised when a step produced a non-finite loss or gradient; the message names the step."""


@dataclasses.dataclass
class Run:
    """Everything built from a config that the loop, eval, info and bench share."""

    config: Config
    task: Task
    mesh: Any
    tx: Any
    state: TrainState
    state_sharding: Any
    batch_sharding: Any
    train_batches: TrainBatches
    example_batch: dict
    train_step: Any  # jitted step(state, batch, rng) -> (state, metrics), state donated
    eval_step: Any  # jitted eval_step(state, batch) -> masked sums


def check_config(config: Config) -> None:
    t = config.train
    if t.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"train.on_nonfinite={t.on_nonfinite!r} must be 'stop' or 'skip'")
    for key in ("steps", "log_every", "eval_every", "checkpoint_every", "accum_steps"):
        if t[key] < 1 and key != "steps":
            raise ConfigError(f"train.{key} must be >= 1, got {t[key]}")
    if config.data.batch_size % t.accum_steps:
        raise ConfigError(
            f"data.batch_size={config.data.batch_size} is not divisible by train.accum_steps={t.accum_steps}"
        )
    compute_dtype(t.compute_dtype)


def build_run(config: Config) -> Run:
    """Builds the task, mesh, optimizer and the initial (replicated) state."""
    check_config(config)
    task = build_task(config)
    mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.model)
    batch_sharding = mesh_lib.batch_sharding(mesh)
    data_devices = mesh.shape[mesh_lib.DATA]
    if config.data.batch_size % data_devices:
        raise ConfigError(
            f"data.batch_size={config.data.batch_size} does not split over the {data_devices} devices "
            "of the mesh's data axis; pick a multiple or set --config.mesh.data"
        )
    tx = task.optimizer or make_optimizer(config.optimizer, config.train.steps)
    batches = TrainBatches(task.train_source, config.data.batch_size, config.data.seed, batch_sharding,
                           task.transform)
    example = batches.local_batch(0)

    def init_state(rng):
        params, model_state = split_variables(task.init(rng, example))
        return TrainState.create(params, model_state, tx)

    abstract = jax.eval_shape(init_state, jax.random.PRNGKey(config.seed))
    state_sharding = jax.tree_util.tree_map(lambda _: mesh_lib.replicated(mesh), abstract)
    state = jax.jit(init_state, out_shardings=state_sharding)(jax.random.PRNGKey(config.seed))
    dtype = compute_dtype(config.train.compute_dtype)
    train_step = jit_train_step(
        make_train_step(task.loss_fn, tx, accum_steps=config.train.accum_steps, dtype=dtype,
                        grad_fn=task.grad_fn),
        state_sharding, batch_sharding,
    )
    eval_step = make_eval_step(task.eval_fn, dtype=dtype)
    return Run(config, task, mesh, tx, state, state_sharding, batch_sharding, batches, example,
               train_step, eval_step)


def step_key(seed: int, step: int) -> jax.Array:
    return jax.random.fold_in(jax.random.PRNGKey(seed), step)


def eval_key(seed: int, batch_index: int) -> jax.Array:
    """Eval randomness (e.g. DP noise at test time): fixed per (seed, eval batch), apart from training's."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), 0xE7A1), batch_index)


def evaluate_state(run: Run, state: TrainState) -> dict[str, float]:
    if run.task.eval_source is None:
        return {}
    totals: dict[str, float] = {}
    batches = eval_batches(run.task.eval_source, run.config.data.eval_batch_size, run.batch_sharding,
                           run.task.transform)
    for index, batch in enumerate(batches):
        for k, v in run.eval_step(state, batch, eval_key(run.config.seed, index)).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    count = totals.pop("count")
    return {k: v / count for k, v in totals.items()}


def _best_eval(workdir: Path, metric: str, mode: str) -> dict[str, float]:
    """The best eval value of `metric` over the whole run (resumed parts included), from metrics.jsonl."""
    values = [r[metric] for r in read_metrics(workdir) if r["split"] == "eval" and metric in r]
    if not metric or not values:
        return {}
    return {f"best_eval_{metric}": max(values) if mode == "max" else min(values)}


def _first_bad_step(pending: list[tuple[int, dict]]) -> int | None:
    for step, metrics in pending:
        if not bool(metrics["finite"]):
            return step
    return None


def train(config: Config, workdir: str | Path) -> dict[str, Any]:
    """Trains (or resumes) `config` in `workdir`. Returns the final summary."""
    workdir = Path(workdir)
    run = build_run(config)
    t = config.train
    checkpointer = ckpt.Checkpointer(workdir, keep=t.keep_checkpoints, best_metric=t.best_metric or None,
                                     best_mode=t.best_mode, asynchronous=t.async_checkpoints)
    state = run.state
    start = checkpointer.latest_step() or 0
    if start:
        state = checkpointer.restore(ckpt.abstract_like(state), start)
        print(f"[jaxlab] resumed from step {start} in {workdir}", flush=True)
    writer = MetricWriter(workdir, resume_step=start)
    step_fn = run.train_step
    end = t.steps
    progress = Progress(start, t.steps, config.data.batch_size, disable=not t.progress)
    pending: list[tuple[int, dict]] = []
    eval_metrics: dict[str, float] = {}
    last_train: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        for step, batch in run.train_batches.iterate(start, end):
            state, metrics = step_fn(state, batch, step_key(config.seed, step))
            done = step + 1
            pending.append((done, metrics))
            at_log = done % t.log_every == 0 or done == end
            at_eval = done % t.eval_every == 0 or done == t.steps
            at_ckpt = done % t.checkpoint_every == 0 or done == end
            if not (at_log or at_eval or at_ckpt):
                continue
            bad = _first_bad_step(pending)
            if bad is not None and t.on_nonfinite == "stop":
                checkpointer.wait()
                kept = checkpointer.latest_step()
                raise NonFiniteError(
                    f"non-finite loss or gradient at step {bad}; training stopped. The last good "
                    f"checkpoint (step {kept}) is kept in {workdir / 'checkpoints'}."
                )
            last_train = {k: float(np.mean([float(m[k]) for _, m in pending])) for k in pending[-1][1]
                          if k != "finite"}
            last_train["nonfinite_steps"] = float(sum(not bool(m["finite"]) for _, m in pending))
            writer.write(done, "train", last_train)
            progress.update(done, last_train)
            pending.clear()
            if at_eval:
                eval_metrics = evaluate_state(run, state)
                writer.write(done, "eval", eval_metrics)
            if at_ckpt:
                checkpointer.save(done, state, eval_metrics if at_eval else None)
    finally:
        progress.close()
        checkpointer.close()
        writer.close()
    elapsed = time.perf_counter() - t0
    steps_run = end - start
    summary = {
        "method": config.method,
        "steps": end,
        "params": param_count(state.params),
        "wall_s": round(elapsed, 2),
        "steps_per_s": steps_run / elapsed if elapsed > 0 else float("nan"),
        **{f"train_{k}": v for k, v in last_train.items()},
        **{f"eval_{k}": v for k, v in eval_metrics.items()},
        **_best_eval(workdir, t.best_metric, t.best_mode),
        "workdir": str(workdir),
    }
    if jax.process_index() == 0 and end == t.steps:
        plot = plot_curves(workdir)
        summary["curves"] = str(plot) if plot else ""
        print(summary_table(summary), flush=True)
    return summary


def restore_for_eval(config: Config, workdir: str | Path, which: str = "latest") -> tuple[Run, TrainState]:
    run = build_run(config)
    checkpointer = ckpt.Checkpointer(workdir, best_metric=config.train.best_metric or None,
                                     best_mode=config.train.best_mode, asynchronous=False)
    try:
        state = checkpointer.restore(ckpt.abstract_like(run.state), which=which)
    finally:
        checkpointer.close()
    return run, state


def evaluate(config: Config, workdir: str | Path, which: str = "latest") -> dict[str, float]:
    run, state = restore_for_eval(config, workdir, which)
    metrics = evaluate_state(run, state)
    metrics["step"] = int(state.step)
    return metrics
