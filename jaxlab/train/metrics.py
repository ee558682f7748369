"""Metrics out of a run: JSON lines always, TensorBoard where tensorboardX is installed, a terminal
progress bar, a summary table and PNG curves at the end. Only process 0 writes."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np


def _scalar(v: Any) -> float:
    return float(np.asarray(v))


class MetricWriter:
    """Appends {"step", "split", name: value} lines to <workdir>/metrics.jsonl (+ TensorBoard events)."""

    def __init__(self, workdir: str | Path, *, resume_step: int = 0, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self.tb = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(Path(workdir) / "tensorboard"))
            except ImportError:
                self.tb = None

    def _truncate_after(self, step: int) -> None:
        """A resumed run rewrites the steps after its checkpoint: drop their stale lines (and a torn last
        line left by a crash mid-write)."""
        if not self.path.exists():
            return
        kept = [line for line, record in _parse_lines(self.path) if record["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        values = {k: _scalar(v) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": int(step), "split": split, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{split}/{k}", v, int(step))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _parse_lines(path: Path) -> list[tuple[str, dict]]:
    """(line, record) for each line of a metrics.jsonl. A line that does not parse (normally the last,
    torn by a crash while it was written) is dropped with a one-line note naming it."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    out = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            what = "the torn last line" if number == len(lines) else f"the unreadable line {number}"
            print(f"[jaxlab] {path}: dropped {what} ({line[:60]!r}); a run stopped while writing it?",
                  file=sys.stderr, flush=True)
            continue
        out.append((line, record))
    return out


def read_metrics(workdir: str | Path) -> list[dict]:
    """The records of <workdir>/metrics.jsonl in order ([] when there is none); a torn last line is
    dropped."""
    path = Path(workdir) / "metrics.jsonl"
    return [record for _, record in _parse_lines(path)] if path.exists() else []


class Progress:
    """A tqdm bar over steps showing loss, examples/s and ETA (process 0 only)."""

    def __init__(self, start: int, total: int, examples_per_step: int, disable: bool = False):
        from tqdm.auto import tqdm

        self.examples_per_step = examples_per_step
        self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, mininterval=0.5,
                        disable=disable or jax.process_index() != 0)
        self.last_step, self.last_time = start, time.perf_counter()
        self.examples_per_second = math.nan

    def update(self, step: int, metrics: dict[str, float]) -> None:
        now = time.perf_counter()
        if step > self.last_step:
            self.examples_per_second = (step - self.last_step) * self.examples_per_step / (now - self.last_time)
        self.bar.update(step - self.bar.n)
        shown = {k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "accuracy")}
        self.bar.set_postfix(**shown, ex_s=f"{self.examples_per_second:.0f}")
        self.last_step, self.last_time = step, now

    def close(self) -> None:
        self.bar.close()


def summary_table(rows: dict[str, Any]) -> str:
    width = max(len(k) for k in rows)
    lines = [f"{'':-<{width + 2}}{'':-<24}"]
    for k, v in rows.items():
        shown = f"{v:.6g}" if isinstance(v, float) else str(v)
        lines.append(f"{k:<{width}}  {shown}")
    lines.append(lines[0])
    return "\n".join(lines)


def plot_curves(workdir: str | Path, filename: str = "curves.png") -> Path | None:
    """One panel per metric name, train and eval lines; the last value per step wins."""
    records = read_metrics(workdir)
    if not records or jax.process_index() != 0:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[str, dict[int, float]]] = {}
    for r in records:
        for k, v in r.items():
            if k not in ("step", "split", "finite", "nonfinite_steps"):
                series.setdefault(k, {}).setdefault(r["split"], {})[r["step"]] = v
    names = sorted(series)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        for split, points in sorted(series[name].items()):
            steps = sorted(points)
            ax.plot(steps, [points[s] for s in steps], marker="o" if split == "eval" else None,
                    markersize=3, label=split)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    path = Path(workdir) / filename
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
