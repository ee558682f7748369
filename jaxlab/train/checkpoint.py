"""Checkpoints with orbax: asynchronous, atomic (orbax writes to a temporary name and renames), the last
N kept under <workdir>/checkpoints and the best one (by an eval metric) under <workdir>/best."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(
        self,
        workdir: str | Path,
        *,
        keep: int = 3,
        best_metric: str | None = None,
        best_mode: str = "max",
        asynchronous: bool = True,
    ):
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        workdir = Path(workdir).absolute()
        self.best_metric = best_metric
        self.latest = ocp.CheckpointManager(
            workdir / "checkpoints",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=asynchronous
            ),
        )
        self.best = None
        if best_metric:
            self.best = ocp.CheckpointManager(
                workdir / "best",
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=1,
                    create=True,
                    best_fn=lambda metrics: float(metrics[best_metric]),
                    best_mode=best_mode,
                    # two async managers finalising at once collide on orbax's multi-host barriers
                    enable_async_checkpointing=asynchronous and jax.process_count() == 1,
                ),
            )

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def save(self, step: int, state: Any, eval_metrics: dict | None = None) -> None:
        self.latest.save(step, args=ocp.args.StandardSave(state))
        if self.best is not None and eval_metrics and self.best_metric in eval_metrics:
            metrics = {k: float(v) for k, v in eval_metrics.items()}
            if jax.process_count() > 1:
                self.latest.wait_until_finished()
            self.best.save(step, args=ocp.args.StandardSave(state), metrics=metrics)

    def restore(self, abstract_state: Any, step: int | None = None, which: str = "latest") -> Any:
        """Restores into the shapes/dtypes/shardings of `abstract_state` (jax.ShapeDtypeStruct leaves)."""
        manager = self.best if which == "best" else self.latest
        if manager is None:
            raise ValueError("no best checkpoints are kept: set train.best_metric")
        if step is None:
            step = manager.best_step() if which == "best" else manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no {which} checkpoint under {manager.directory}")
        return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def wait(self) -> None:
        self.latest.wait_until_finished()
        if self.best is not None:
            self.best.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.latest.close()
        if self.best is not None:
            self.best.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing `tree`, for restoring into the same layout."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )
