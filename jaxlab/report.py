"""The shared report pieces of every paper's `jaxlab report`: files, tables, means over seeds, findings, plots.

A method's report computes a JSON-able result, formats it as markdown and draws one figure; this module
writes the three files (report.json, report.md, report.png) in one call and holds the pieces the
formatting and the figure are made of:
- markdown tables (jaxlab.benchmarking.markdown_table, re-exported) and "m ± s" over seeds (mean_std);
- paper findings as records (Finding: claim, detail, holds) and their table with yes / NO;
- small matplotlib helpers (Agg backend, no display needed): a row of panels, curves per series, bars per
  setting, and saving a figure as PNG.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxlab.benchmarking import markdown_table

__all__ = [
    "Finding", "findings_table", "markdown_table", "mean_std", "plot_bars", "plot_curves", "pyplot",
    "save_figure", "subplots", "write_report", "yes_no",
]

# --- files ------------------------------------------------------------------------------------------------


def _to_builtin(x: Any) -> Any:
    """json.dumps fallback: numpy scalars and arrays as Python numbers and lists, Findings as dicts."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Finding):
        return x.as_dict()
    raise TypeError(f"report result holds a value of type {type(x).__name__}, which JSON cannot store: "
                    f"{x!r}")


def write_report(
    workdir: str | Path,
    result: Mapping[str, Any],
    markdown: str,
    plot: Callable[[Path], None] | None = None,
    *,
    echo: bool = True,
) -> dict[str, Path]:
    """Writes workdir/report.json (result, indented), workdir/report.md (markdown) and, when `plot` is
    given, workdir/report.png (plot(path) draws and saves the figure there). Creates workdir; prints the
    markdown when echo. Returns {"json": path, "md": path[, "png": path]}."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    paths = {"json": workdir / "report.json", "md": workdir / "report.md"}
    paths["json"].write_text(json.dumps(result, indent=2, default=_to_builtin))
    paths["md"].write_text(markdown)
    if plot is not None:
        paths["png"] = workdir / "report.png"
        plot(paths["png"])
    if echo:
        print(markdown, flush=True)
    return paths


# --- numbers ----------------------------------------------------------------------------------------------


def mean_std(values: Sequence[float], *, percent: bool = False, digits: int = 2) -> str:
    """"m ± s" over seeds: mean and population std (numpy's default, ddof=0) of `values`, times 100 when
    percent, with `digits` decimals; one value gives "m" alone (no spread to show)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"mean_std needs a non-empty 1D sequence of values, got shape {x.shape}")
    scale = 100.0 if percent else 1.0
    text = f"{scale * x.mean():.{digits}f}"
    return text if x.size == 1 else f"{text} ± {scale * x.std():.{digits}f}"


# --- findings ---------------------------------------------------------------------------------------------


def yes_no(holds: bool) -> str:
    """"yes" or "NO" (capitals so that a finding that fails stands out in a table)."""
    return "yes" if holds else "NO"


@dataclasses.dataclass(frozen=True)
class Finding:
    """A paper's claim checked on this run: the claim, what was measured, and whether the claim holds."""

    claim: str
    detail: str
    holds: bool

    def as_dict(self) -> dict[str, Any]:
        """{"finding": claim, "detail": detail, "holds": holds}: the form report.json stores."""
        return {"finding": self.claim, "detail": self.detail, "holds": bool(self.holds)}


def findings_table(
    findings: Iterable[Finding | Mapping[str, Any]],
    header: Sequence[str] = ("paper finding", "here", "holds"),
) -> str:
    """Markdown table with one row per finding: claim | detail | yes/NO. Takes Findings or their dicts
    (as read back from report.json)."""
    rows = []
    for f in findings:
        f = f.as_dict() if isinstance(f, Finding) else f
        rows.append([f["finding"], f["detail"], yes_no(f["holds"])])
    return markdown_table(list(header), rows)


# --- plots ------------------------------------------------------------------------------------------------


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only: works without a display); for figures the
    helpers below do not lay out (grids of images)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def subplots(panels: int, *, panel_size: tuple[float, float] = (4.2, 3.4),
             figsize: tuple[float, float] | None = None):
    """(figure, list of `panels` axes) in one row; figsize defaults to panels * panel_size wide."""
    if panels < 1:
        raise ValueError(f"a figure needs at least one panel, got panels={panels}")
    figsize = figsize or (panel_size[0] * panels, panel_size[1])
    fig, axes = pyplot().subplots(1, panels, figsize=figsize, squeeze=False)
    return fig, list(axes[0])


def plot_curves(
    ax,
    curves: Mapping[str, Sequence[float]],
    *,
    styles: Mapping[str, str] | None = None,
    scale: float = 1.0,
    title: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
) -> None:
    """One line per series on ax: curves[name] = (T,) values drawn at x = 1..T, times `scale` (100 for
    percentages), with styles[name] (a matplotlib format such as "C0-") where given; a legend."""
    for name, values in curves.items():
        y = scale * np.asarray(values, dtype=np.float64)
        ax.plot(np.arange(1, len(y) + 1), y, (styles or {}).get(name, "-"), label=name)
    if title:
        ax.set_title(title)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.legend()


def plot_bars(
    ax,
    names: Sequence[str],
    values: Sequence[float],
    *,
    colors: Sequence[str] | None = None,
    title: str | None = None,
    rotation: float = 45,
) -> None:
    """One bar per setting on ax: names (N,) under the bars (rotated by `rotation` degrees), values (N,)."""
    if len(names) != len(values):
        raise ValueError(f"plot_bars: {len(names)} names but {len(values)} values")
    ax.bar(list(names), list(values), color=list(colors) if colors is not None else None)
    if title:
        ax.set_title(title)
    ax.tick_params(axis="x", rotation=rotation)


def save_figure(fig, path: str | Path, *, dpi: int = 90) -> Path:
    """Lays out `fig`, saves it as PNG at `path` and closes it (figures are not kept open). Returns path."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return Path(path)
