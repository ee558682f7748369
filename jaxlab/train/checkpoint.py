"""Checkpoints with orbax: asynchronous, atomic (orbax writes to a temporary name and renames), the last
N kept under <workdir>/checkpoints and the best one (by an eval metric) under <workdir>/best.

A kept checkpoint is trusted only once it restores: `restore_latest_valid` walks the kept steps newest
first and falls back past any that fail (truncated or missing array files, garbled metadata, a tree or
shape that does not match the state), printing one line per skipped step, and sets the skipped ones aside
under <workdir>/checkpoints-skipped so that the resumed run can write those steps again.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxlab.errors import UserError

SKIPPED_DIR = "checkpoints-skipped"


class CheckpointError(UserError):
    """A checkpoint that was asked for (or every kept one) cannot be restored; the message says why."""

    exit_code = 1


class NoCheckpointError(CheckpointError, FileNotFoundError):
    """No checkpoint of the kind asked for exists."""


class Checkpointer:
    def __init__(
        self,
        workdir: str | Path,
        *,
        keep: int = 3,
        best_metric: str | None = None,
        best_mode: str = "max",
        asynchronous: bool = True,
        read_only: bool = False,
    ):
        """`read_only` (for eval) creates no folders and never moves a checkpoint."""
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self.workdir = Path(workdir).absolute()
        self.best_metric = best_metric
        self.read_only = read_only
        self.latest = ocp.CheckpointManager(
            self.workdir / "checkpoints",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=not read_only, enable_async_checkpointing=asynchronous
            ),
            item_handlers=ocp.StandardCheckpointHandler(),
        )
        self.best = None
        if best_metric:
            self._set_aside_unreadable_metrics(self.workdir / "best")
            self.best = ocp.CheckpointManager(
                self.workdir / "best",
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=1,
                    create=not read_only,
                    best_fn=lambda metrics: float(metrics[best_metric]),
                    best_mode=best_mode,
                    # two async managers finalising at once collide on orbax's multi-host barriers
                    enable_async_checkpointing=asynchronous and jax.process_count() == 1,
                ),
                item_handlers=ocp.StandardCheckpointHandler(),
            )

    def latest_step(self) -> int | None:
        """The newest kept step as orbax lists it (a folder that finished writing), or None. Reads nothing
        inside the step, so a damaged one does not make it fail; `restore_latest_valid` validates."""
        try:
            return self.latest.latest_step()
        except Exception as err:  # noqa: BLE001  (a listing error is reported, not fatal)
            print(f"[jaxlab] cannot list the checkpoints in {self.latest.directory}: {short_reason(err)}",
                  file=sys.stderr, flush=True)
            return None

    def best_step(self) -> int | None:
        """The kept step with the best `best_metric`, or None (also when no best checkpoints are kept)."""
        return None if self.best is None else self.best.best_step()

    def all_steps(self) -> list[int]:
        return sorted(self.latest.all_steps())

    def save(self, step: int, state: Any, eval_metrics: dict | None = None) -> None:
        self.latest.save(step, args=ocp.args.StandardSave(state))
        if self.best is not None and eval_metrics and self.best_metric in eval_metrics:
            metrics = {k: float(v) for k, v in eval_metrics.items()}
            if jax.process_count() > 1:
                self.latest.wait_until_finished()
            self.best.save(step, args=ocp.args.StandardSave(state), metrics=metrics)

    def restore(self, abstract_state: Any, step: int | None = None, which: str = "latest") -> Any:
        """Restores into the shapes/dtypes/shardings of `abstract_state` (jax.ShapeDtypeStruct leaves).

        which="latest": `step` (default: the newest kept) from checkpoints/; which="best": `step`
        (default: the best kept) from best/. Raises NoCheckpointError when there is none and
        CheckpointError (naming the step and the reason) when it does not restore.
        """
        if which not in ("latest", "best"):
            raise ValueError(f"which must be 'latest' or 'best', got {which!r}")
        if which == "best" and self.best is None:
            raise NoCheckpointError(
                f"no best checkpoints are kept in {self.workdir}: the run needs train.best_metric set "
                "(use --which latest)"
            )
        manager = self.best if which == "best" else self.latest
        if step is None:
            step = manager.best_step() if which == "best" else manager.latest_step()
        if step is None:
            raise NoCheckpointError(f"no {which} checkpoint under {manager.directory}")
        if step not in manager.all_steps():
            raise NoCheckpointError(f"no {which} checkpoint of step {step} under {manager.directory}; "
                                    f"kept steps: {sorted(manager.all_steps())}")
        state, reason = _try_restore(manager, step, abstract_state)
        if reason is not None:
            raise CheckpointError(f"{which} checkpoint step {step} in {manager.directory} cannot be "
                                  f"restored: {reason}")
        return state

    def restore_latest_valid(
        self, abstract_state: Any | Callable[[int], Any], *, set_aside: bool = True
    ) -> tuple[int, Any] | tuple[None, None]:
        """The newest kept step that restores, as (step, state); (None, None) when none is kept.

        `abstract_state` is the state's abstract pytree, or a function step -> abstract pytree (for runs
        whose state layout depends on the stage). Each step that fails is named on stderr with the
        reason, and the previous one is tried. With `set_aside` (resume; not for read-only eval) the
        skipped steps are moved to <workdir>/checkpoints-skipped/ once an older one restored, so the
        resumed run can save those steps again (orbax skips a save of a step it still lists). Raises
        CheckpointError, moving nothing, when steps are kept but none restores.
        """
        steps = sorted(self.latest.all_steps(), reverse=True)
        if not steps:
            return None, None
        skipped: list[tuple[int, str]] = []
        for step in steps:
            abstract = abstract_state(step) if callable(abstract_state) else abstract_state
            state, reason = _try_restore(self.latest, step, abstract)
            reason = _agreed_reason(reason)
            if reason is None:
                if skipped and set_aside and not self.read_only:
                    self._set_aside([s for s, _ in skipped], self.latest)
                return step, state
            skipped.append((step, reason))
            print(f"[jaxlab] skipping checkpoint step {step} in {self.latest.directory}: {reason}",
                  file=sys.stderr, flush=True)
        by_reason: dict[str, list[int]] = {}
        for s, r in skipped:
            by_reason.setdefault(r, []).append(s)
        listed = "; ".join(f"step{'s' if len(ss) > 1 else ''} {', '.join(map(str, ss))}: {r}"
                           for r, ss in by_reason.items())
        raise CheckpointError(
            f"none of the {len(steps)} kept checkpoints in {self.latest.directory} restores ({listed}). "
            "If the config changed, run with the one that wrote them; to start over, move that workdir away."
        )

    def _set_aside(self, steps: list[int], manager: ocp.CheckpointManager) -> None:
        """Moves step folders of `manager` to <workdir>/checkpoints-skipped/<folder>-<step> (process 0),
        then re-lists the steps on every process."""
        manager.wait_until_finished()
        if jax.process_index() == 0:
            target = self.workdir / SKIPPED_DIR
            target.mkdir(parents=True, exist_ok=True)
            for step in steps:
                source = Path(manager.directory) / str(step)
                dest = target / f"{Path(manager.directory).name}-{step}"
                n = 1
                while dest.exists():
                    dest, n = target / f"{Path(manager.directory).name}-{step}.{n}", n + 1
                try:
                    shutil.move(str(source), str(dest))
                    print(f"[jaxlab] moved the skipped checkpoint step {step} to {dest}", file=sys.stderr,
                          flush=True)
                except OSError as err:
                    print(f"[jaxlab] could not move the skipped checkpoint {source} aside: {err}",
                          file=sys.stderr, flush=True)
        _sync("jaxlab_checkpoint_set_aside")
        manager.reload()

    def _set_aside_unreadable_metrics(self, directory: Path) -> None:
        """orbax reads every best step's metrics when it opens best/ and fails on a garbled one: such a
        step is moved aside (read-only: refused with a CheckpointError naming it)."""
        if not directory.is_dir():
            return
        bad = []
        for step_dir in directory.iterdir():
            metrics = step_dir / "metrics" / "metrics"
            if not (step_dir.name.isdigit() and metrics.is_file()):
                continue
            try:
                json.loads(metrics.read_text())
            except (ValueError, OSError) as err:
                bad.append(step_dir)
                print(f"[jaxlab] best checkpoint step {step_dir.name} has unreadable metrics ({metrics}: "
                      f"{short_reason(err)})", file=sys.stderr, flush=True)
        if bad and self.read_only:
            raise CheckpointError(f"best checkpoint {bad[0]} has unreadable metrics; use --which latest")
        if bad and jax.process_index() == 0:
            target = self.workdir / SKIPPED_DIR
            target.mkdir(parents=True, exist_ok=True)
            for step_dir in bad:
                shutil.move(str(step_dir), str(target / f"best-{step_dir.name}"))
        if bad:
            _sync("jaxlab_checkpoint_best_metrics")

    def describe_latest(self) -> str:
        """One sentence for messages: which checkpoint is kept, or that none was written."""
        step = self.latest_step()
        if step is None:
            return f"No checkpoint was written in {self.latest.directory}."
        return f"The last checkpoint (step {step}) is kept in {self.latest.directory}."

    def wait(self) -> None:
        self.latest.wait_until_finished()
        if self.best is not None:
            self.best.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.latest.close()
        if self.best is not None:
            self.best.close()


def _try_restore(manager: ocp.CheckpointManager, step: int, abstract: Any) -> tuple[Any, str | None]:
    """(state, None) when step restores into `abstract`, else (None, a one-line reason). The saved tree
    is compared with `abstract` first (from the step's metadata), so a mismatch reads no array."""
    _quiet_abandoned_restore_noise()
    reason = _mismatch_reason(manager, step, abstract)
    if reason is not None:
        return None, reason
    try:
        state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as err:  # noqa: BLE001  (any failure means: not usable, say why)
        return None, short_reason(err)
    return state, None


def _agreed_reason(reason: str | None) -> str | None:
    """In a multi-process run a step counts as restored only if it restored on every process."""
    if jax.process_count() == 1:
        return reason
    from jax.experimental import multihost_utils

    failed = multihost_utils.process_allgather(np.array(reason is not None))
    if reason is None and np.any(failed):
        return "it failed to restore on another process"
    return reason


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _mismatch_reason(manager: ocp.CheckpointManager, step: int, abstract: Any) -> str | None:
    """Names the leaves that differ between the saved tree and `abstract` (missing, unexpected, other
    shape), or None when the metadata cannot be read or shows no difference."""
    try:
        metadata = manager.item_metadata(step)
        saved = ocp.tree.to_flat_dict(getattr(metadata, "tree", metadata), sep=".")
    except Exception:  # noqa: BLE001  (unreadable metadata: the restore's error says why)
        return None
    wanted = ocp.tree.to_flat_dict(abstract, sep=".")
    if not saved:
        return None

    def listed(names):
        names = sorted(names)
        return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")

    missing, unexpected = set(wanted) - set(saved), set(saved) - set(wanted)
    shapes = [f"{k} saved {tuple(saved[k].shape)} vs {tuple(wanted[k].shape)}" for k in sorted(wanted)
              if k in saved and hasattr(saved[k], "shape") and hasattr(wanted[k], "shape")
              and tuple(saved[k].shape) != tuple(wanted[k].shape)]
    parts = ([f"not in the checkpoint: {listed(missing)}"] if missing else []) + (
        [f"only in the checkpoint: {listed(unexpected)}"] if unexpected else []) + (
        [f"shape of {'; '.join(shapes[:3])}"] if shapes else [])
    if not parts:
        return None
    return "its tree does not match this run's state (" + "; ".join(parts) + "), a changed model config?"


def short_reason(err: BaseException, limit: int = 240) -> str:
    """'<ExceptionType>: <first line>', without tensorstore's driver prefixes, at most `limit` chars."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = re.sub(r'Error opening "\w+" driver: ', "", text)
    text = re.sub(r' in OCDBT database at local file "[^"]*"', "", text)
    text = re.sub(r'local file "(?:[^"]*/)?([^"/]+)"', r"file \1", text)
    text = re.sub(r"\s*\[tensorstore_spec(\[\d+\])?=.*$", "", text)
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _quiet_abandoned_restore_noise() -> None:
    """A failed orbax restore leaves tensorstore reads in flight; when they finish they print tracebacks
    through sys.unraisablehook ('RuntimeError: Event loop is closed', or an orbax read coroutine that
    raised after its restore was given up). Drops exactly those (the failure itself was reported);
    everything else goes to the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "_jaxlab_drops_abandoned_restores", False):
        return

    def hook(unraisable):
        err, obj = unraisable.exc_value, unraisable.object
        code = getattr(obj, "cr_code", None)
        if isinstance(err, RuntimeError) and str(err) == "Event loop is closed":
            return
        if code is not None and "orbax" in code.co_filename:
            return
        previous(unraisable)

    hook._jaxlab_drops_abandoned_restores = True
    sys.unraisablehook = hook


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing `tree`, for restoring into the same layout."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )
