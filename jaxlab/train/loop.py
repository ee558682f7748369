"""The one training loop: config + method -> sharded state -> jitted steps, stage by stage -> metrics
and checkpoints.

Resume is exact: the state is restored from the latest checkpoint (in the layout of the stage it was
saved in), batch `i` of a stage is a pure function of (data seed, stage, i) and a step's key is
fold_in(key(seed), global step), so a killed-and-restarted run ends bit-identical (on CPU) to an
uninterrupted one, whichever stage it was killed in. A stage's `enter` runs with key
fold_in(fold_in(key(seed), STAGE_SALT), stage index) when its first step begins.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxlab.config import Config, ConfigError, check_numbers
from jaxlab.data.pipeline import TrainBatches, eval_batches
from jaxlab.errors import UserError
from jaxlab.train import checkpoint as ckpt
from jaxlab.train import mesh as mesh_lib
from jaxlab.train.init_from import load_parts, read_arrays
from jaxlab.train.method import Method, Stage, resolve_stages, stage_bounds, stage_of
from jaxlab.train.metrics import MetricWriter, Progress, plot_curves, read_metrics, summary_table
from jaxlab.train.state import State, param_count
from jaxlab.train.step import compute_dtype, jit_train_step, make_masked_eval
from jaxlab.train.workdir import WorkdirLock, compare_config, save_config

STAGE_SALT = 0x57A6E


class NonFiniteError(UserError, FloatingPointError):
    """Raised when a step produced a non-finite loss or gradient; the message names the step."""


def check_config(config: Config) -> None:
    """Every number and choice a run uses, checked before anything is built or compiled."""
    check_numbers(config)
    if config.train.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"train.on_nonfinite={config.train.on_nonfinite!r} must be 'stop' or 'skip'")
    try:
        compute_dtype(config.train.compute_dtype)
    except ValueError as err:
        raise ConfigError(f"train.{err}") from None


@dataclasses.dataclass
class Run:
    """Everything built from a config and a method that the loop, eval, info and bench share."""

    config: Config
    method: Method
    mesh: Any
    stages: list[Stage]
    batch_sharding: Any
    example_batch: Any
    state: State  # the initial state (before any stage is entered), replicated over the mesh
    _cache: dict = dataclasses.field(default_factory=dict)

    @property
    def bounds(self) -> list[tuple[int, int]]:
        return stage_bounds(self.stages)

    @property
    def total_steps(self) -> int:
        return self.bounds[-1][1]

    def batches(self, index: int):
        """The training batches of stage `index` (their step 0 is the stage's first step)."""
        if ("batches", index) not in self._cache:
            self._cache[("batches", index)] = make_batches(self.config, self.method, self.stages[index],
                                                           self.mesh, self.batch_sharding)
        return self._cache[("batches", index)]

    def sharding(self, tree) -> Any:
        return jax.tree_util.tree_map(lambda _: mesh_lib.replicated(self.mesh), tree)

    def abstract_state(self, index: int) -> Any:
        """The state's layout once stages 0..index have been entered (index -1: the initial state)."""
        def entered(state):
            for i in range(index + 1):
                state = self._enter_fn(i)(state)
            return state

        shapes = jax.eval_shape(entered, self.state)
        return jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, self.sharding(shapes))

    def _enter_fn(self, index: int):
        stage = self.stages[index]
        if stage.enter is None:
            return lambda state: state
        key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(self.config.seed), STAGE_SALT), index)
        return lambda state: stage.enter(state, key)

    def enter(self, index: int, state: State) -> State:
        if self.stages[index].enter is None:
            return state
        abstract = self.abstract_state(index)
        shardings = jax.tree_util.tree_map(lambda a: a.sharding, abstract)
        return jax.jit(self._enter_fn(index), out_shardings=shardings)(state)

    def train_step(self, index: int):
        """Stage `index`'s step, jitted once: state replicated in and out (donated), batch sharded."""
        if ("step", index) not in self._cache:
            abstract = self.abstract_state(index)
            sharding = jax.tree_util.tree_map(lambda a: a.sharding, abstract)
            self._cache[("step", index)] = jit_train_step(self.stages[index].train_step, sharding,
                                                          self.batches(index).sharding)
        return self._cache[("step", index)]

    def eval_step(self, index: int):
        if ("eval", index) not in self._cache:
            self._cache[("eval", index)] = make_masked_eval(self.stages[index].eval_step)
        return self._cache[("eval", index)]


def make_batches(config: Config, method: Method, stage: Stage, mesh, batch_sharding):
    if method.train_batches is not None:
        return method.train_batches(mesh)
    if stage.train_source is None:
        raise ValueError(f"method {method.name!r} gives no training data for stage {stage.name!r}")
    return TrainBatches(stage.train_source, config.data.batch_size, config.data.seed, batch_sharding,
                        method.transform)


def build_run(config: Config, method: Method) -> Run:
    """The mesh, the stages and the initial (replicated) state of `method` under `config`."""
    check_config(config)
    mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.model)
    batch_sharding = mesh_lib.batch_sharding(mesh)
    data_devices = mesh.shape[mesh_lib.DATA]
    if method.train_batches is None and config.data.batch_size % data_devices:
        raise ConfigError(
            f"data.batch_size={config.data.batch_size} does not split over the {data_devices} devices "
            "of the mesh's data axis; pick a multiple or set --config.mesh.data"
        )
    evaluates_batches = method.evaluate is None and method.eval_source is not None  # else it evaluates itself
    if evaluates_batches and config.data.eval_batch_size % data_devices:
        raise ConfigError(
            f"data.eval_batch_size={config.data.eval_batch_size} does not split over the {data_devices} "
            "devices of the mesh's data axis; pick a multiple or set --config.mesh.data"
        )
    stages = resolve_stages(method, config.train.steps)
    example = make_batches(config, method, stages[0], mesh, batch_sharding).local_batch(0)
    rng = jax.random.PRNGKey(config.seed)
    abstract = jax.eval_shape(method.init_state, rng, example)
    sharding = jax.tree_util.tree_map(lambda _: mesh_lib.replicated(mesh), abstract)
    state = jax.jit(method.init_state, out_shardings=sharding)(rng, example)
    return Run(config, method, mesh, stages, batch_sharding, example, state)


def step_key(seed: int, step: int) -> jax.Array:
    return jax.random.fold_in(jax.random.PRNGKey(seed), step)


def eval_key(seed: int, batch_index: int) -> jax.Array:
    """Eval randomness (e.g. DP noise at test time): fixed per (seed, eval batch), apart from training's."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), 0xE7A1), batch_index)


def evaluate_state(run: Run, state: State, index: int | None = None) -> dict[str, float]:
    """Metrics of `state` on stage `index`'s eval data (default: the last stage's): the method's own
    evaluate, or the masked mean of its eval_step over every eval example."""
    if run.method.evaluate is not None:
        return dict(run.method.evaluate(state))
    index = len(run.stages) - 1 if index is None else index
    stage = run.stages[index]
    if stage.eval_source is None or stage.eval_step is None:
        return {}
    totals: dict[str, float] = {}
    batches = eval_batches(stage.eval_source, run.config.data.eval_batch_size, run.batch_sharding,
                           run.method.transform)
    step = run.eval_step(index)
    for i, batch in enumerate(batches):
        for k, v in step(state, batch, eval_key(run.config.seed, i)).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    count = totals.pop("count")
    means = {k: v / count for k, v in totals.items()}
    return run.method.eval_finish(means) if run.method.eval_finish else means


def _best_eval(workdir: Path, metric: str, mode: str) -> dict[str, float]:
    """The best eval value of `metric` over the whole run (resumed parts included), from metrics.jsonl."""
    values = [r[metric] for r in read_metrics(workdir) if r["split"] == "eval" and metric in r]
    if not metric or not values:
        return {}
    return {f"best_eval_{metric}": max(values) if mode == "max" else min(values)}


def _first_bad_step(pending: list[tuple[int, dict]]) -> int | None:
    for step, metrics in pending:
        if "finite" in metrics and not bool(metrics["finite"]):
            return step
    return None


def initial_state(run: Run) -> State:
    """The fresh state, with train.init_from's parts loaded when set."""
    t = run.config.train
    if not t.init_from:
        return run.state
    arrays = read_arrays(t.init_from, tuple(t.init_rename))
    state = load_parts(run.state, arrays, tuple(t.init_parts), t.init_from)
    print(f"[jaxlab] initialised parts {list(t.init_parts) or sorted(run.state.params)} from {t.init_from}",
          flush=True)
    return state


def train(config: Config, workdir: str | Path, method: Method, *,
          allow_config_change: bool = False) -> dict[str, Any]:
    """Trains (or resumes) `method` under `config` in `workdir`, stage by stage. Returns the summary.

    The workdir is locked for the run (a second run into it stops at once); its config.json is compared
    with `config` (model or data changes refuse unless allow_config_change; others are logged) and
    rewritten; resume takes the newest checkpoint that restores, skipping damaged ones."""
    workdir = Path(workdir)
    check_config(config)
    with WorkdirLock(workdir):
        for change in compare_config(workdir, config, allow_config_change):
            print(f"[jaxlab] config changed since the last run in {workdir}: {change}", flush=True)
        run = build_run(config, method)
        if jax.process_index() == 0:
            save_config(workdir, config)
        return _train(run, workdir)


def _train(run: Run, workdir: Path) -> dict[str, Any]:
    config, method, t = run.config, run.method, run.config.train
    total = run.total_steps
    checkpointer = ckpt.Checkpointer(workdir, keep=t.keep_checkpoints, best_metric=t.best_metric or None,
                                     best_mode=t.best_mode, asynchronous=t.async_checkpoints)
    kept = checkpointer.latest_step() or 0
    if kept > total:
        checkpointer.close()
        raise ConfigError(f"{workdir} holds a checkpoint of step {kept}, past this run's {total} steps "
                          f"(train.steps); raise the steps or use another --workdir")
    start, state = checkpointer.restore_latest_valid(lambda step: run.abstract_state(stage_of(step, run.stages)))
    if start:
        print(f"[jaxlab] resumed from step {start} in {workdir}", flush=True)
    else:
        start, state = 0, initial_state(run)
    writer = MetricWriter(workdir, resume_step=start)
    progress = Progress(start, total, config.data.batch_size, disable=not t.progress)
    eval_metrics: dict[str, float] = {}
    last_train: dict[str, float] = {}
    skipped = 0
    t0 = time.perf_counter()
    try:
        current = stage_of(start, run.stages)
        for index, (begin, end) in enumerate(run.bounds):
            if end < start or (end == start and index <= current):
                continue  # finished; a zero-step stage at the resume step is still entered below
            if index > current:
                state = run.enter(index, state)
                if len(run.stages) > 1:
                    print(f"[jaxlab] stage {index + 1}/{len(run.stages)}: {run.stages[index].name} "
                          f"(steps {begin + 1}..{end})", flush=True)
            state, eval_metrics, last_train, bad = _run_stage(
                run, index, state, max(start, begin), end, checkpointer, writer, progress, workdir,
                eval_metrics, last_train)
            skipped += bad
    finally:
        progress.close()
        checkpointer.close()
        writer.close()
    elapsed = time.perf_counter() - t0
    steps_run = total - start
    groups = run.method.param_groups(state) if run.method.param_groups else state.params
    summary = {
        "method": method.name,
        "steps": total,
        "params": param_count(groups),
        "wall_s": round(elapsed, 2),
        "steps_per_s": steps_run / elapsed if elapsed > 0 else float("nan"),
        **{f"train_{k}": v for k, v in last_train.items()},
        **{f"eval_{k}": v for k, v in eval_metrics.items()},
        **_best_eval(workdir, t.best_metric, t.best_mode),
        "workdir": str(workdir),
    }
    if jax.process_index() == 0:
        plot = plot_curves(workdir)
        summary["curves"] = str(plot) if plot else ""
        print(summary_table(summary), flush=True)
        if steps_run:  # a run that trained (not a no-op resume of a finished one) records its summary
            (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    if steps_run and skipped * 2 > steps_run:
        raise NonFiniteError(f"{skipped} of the {steps_run} steps run were non-finite and skipped "
                             f"(train.on_nonfinite='skip'); the run did not train")
    if "loss" in eval_metrics and not np.isfinite(eval_metrics["loss"]):
        raise NonFiniteError(f"the final eval loss is {eval_metrics['loss']}; the trained state is not usable")
    return summary


def _run_stage(run, index, state, start, end, checkpointer, writer, progress, workdir, eval_metrics,
               last_train):
    """Steps start..end-1 of stage `index`; returns (state, eval metrics, train metrics, skipped steps)."""
    config, t = run.config, run.config.train
    begin = run.bounds[index][0]
    step_fn = run.train_step(index)
    pending: list[tuple[int, dict]] = []
    skipped = 0
    for local, batch in run.batches(index).iterate(start - begin, end - begin):
        step = begin + local
        state, metrics = step_fn(state, batch, step_key(config.seed, step))
        done = step + 1
        pending.append((done, metrics))
        at_end = done == end
        at_log = done % t.log_every == 0 or at_end
        at_eval = done % t.eval_every == 0 or at_end
        at_ckpt = done % t.checkpoint_every == 0 or at_end
        if not (at_log or at_eval or at_ckpt):
            continue
        bad = _first_bad_step(pending)
        if bad is not None and t.on_nonfinite == "stop":
            checkpointer.wait()
            kept = checkpointer.latest_step()
            where = (f"The last good checkpoint (step {kept}) is kept in {workdir / 'checkpoints'}."
                     if kept is not None else "No checkpoint was written before it.")
            raise NonFiniteError(f"non-finite loss or gradient at step {bad}; training stopped. {where}")
        names = [k for k in pending[-1][1] if k != "finite"]
        last_train = {k: float(np.mean([float(m[k]) for _, m in pending])) for k in names}
        nonfinite = sum("finite" in m and not bool(m["finite"]) for _, m in pending)
        skipped += nonfinite
        last_train["nonfinite_steps"] = float(nonfinite)
        writer.write(done, "train", last_train)
        progress.update(done, last_train)
        pending.clear()
        if at_eval:
            eval_metrics = evaluate_state(run, state, index)
            writer.write(done, "eval", eval_metrics)
        if at_ckpt:
            checkpointer.save(done, state, eval_metrics if at_eval else None)
    return state, eval_metrics, last_train, skipped


def restore_for_eval(config: Config, workdir: str | Path, method: Method, which: str | int = "latest", *,
                     allow_config_change: bool = False) -> tuple[Run, State]:
    """The run and its `which` ("latest": the newest that restores; "best"; or a step number, e.g. the
    end of a stage) checkpointed state."""
    check_config(config)
    for change in compare_config(workdir, config, allow_config_change):
        print(f"[jaxlab] config differs from the run's in {workdir}: {change}", flush=True)
    run = build_run(config, method)
    checkpointer = ckpt.Checkpointer(workdir, best_metric=config.train.best_metric or None,
                                     best_mode=config.train.best_mode, asynchronous=False, read_only=True)
    layout = lambda step: run.abstract_state(stage_of(step, run.stages))  # noqa: E731
    try:
        if isinstance(which, int):
            if which not in checkpointer.all_steps():
                raise ckpt.NoCheckpointError(f"no checkpoint of step {which} in {Path(workdir) / 'checkpoints'} "
                                             f"(steps kept: {checkpointer.all_steps()})")
            state = checkpointer.restore(layout(which), which)
        elif which == "best":
            step = checkpointer.best_step()
            state = checkpointer.restore(layout(step) if step is not None else None, step, which="best")
        else:
            step, state = checkpointer.restore_latest_valid(layout, set_aside=False)
            if step is None:
                raise ckpt.NoCheckpointError(f"no checkpoint in {Path(workdir) / 'checkpoints'}")
    finally:
        checkpointer.close()
    return run, state


def evaluate(config: Config, workdir: str | Path, method: Method, which: str = "latest", *,
             allow_config_change: bool = False) -> dict[str, float]:
    run, state = restore_for_eval(config, workdir, method, which, allow_config_change=allow_config_change)
    step = int(state.step)
    metrics = evaluate_state(run, state, max(stage_of(step, run.stages), 0))
    metrics["step"] = step
    return metrics


