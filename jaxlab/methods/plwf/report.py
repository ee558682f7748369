"""The PLwF report: every method of config.report.methods, under every protocol of config.report.protocols,
for every seed of config.report.seeds, each a resumable trainer run under
<workdir>/<protocol>/<method>-seed<s>. From each run's evaluations at the end of every task it builds the
accuracy matrix, then average accuracy, forgetting and backward transfer (mean ± std over the seeds), a
table across methods, heat maps of the seed-mean matrices (report.png) and the paper's findings in kind
(checked on means over the seeds, reported, not assumed).

Rows (config.report.methods): finetune, ewc, lwf (plain sum), lwf_ca (LwF with credit assignment),
plwf (credit assignment, global), plwf_per_layer, plwf_sum (the ablation without credit assignment), joint.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np

from jaxlab.methods.plwf.metrics import accuracy_matrix, summarize
from jaxlab.report import Finding, findings_table, markdown_table, mean_std, write_report

ROWS = {
    "finetune": {"method": "finetune"},
    "ewc": {"method": "ewc"},
    "lwf": {"method": "lwf", "credit": "sum"},
    "lwf_ca": {"method": "lwf", "credit": "global"},
    "plwf": {"method": "plwf", "credit": "global"},
    "plwf_per_layer": {"method": "plwf", "credit": "per_layer"},
    "plwf_sum": {"method": "plwf", "credit": "sum"},
    "joint": {"method": "joint"},
}
NAMES = {"finetune": "Fine-tuning", "ewc": "EWC", "lwf": "LwF", "lwf_ca": "LwF + CA", "plwf": "PLwF",
         "plwf_per_layer": "PLwF (per-layer CA)", "plwf_sum": "PLwF w/o CA (sum)", "joint": "Joint (upper bound)"}
METRICS = ("average_accuracy", "forgetting", "backward_transfer")


def row_config(config, row: str, protocol: str, seed: int):
    """The trainer config of one report run: the row's cl overrides, the protocol, the seed."""
    if row not in ROWS:
        raise ValueError(f"report.methods holds {row!r}; known rows: {', '.join(ROWS)}")
    c = copy.deepcopy(config)
    c.seed = int(seed)
    c.data.seed = int(seed)
    c.cl.update(protocol=protocol, **ROWS[row])
    return c


def task_evals(method, records: list[dict]) -> list[dict]:
    """The eval records at the end of every task stage ("task<t>"), in task order."""
    from jaxlab.train.method import stage_bounds

    ends = [end for stage, (_, end) in zip(method.stages, stage_bounds(method.stages))
            if stage.name.startswith("task")]
    by_step = {r["step"]: r for r in records if r["split"] == "eval"}
    missing = [e for e in ends if e not in by_step]
    if missing:
        raise ValueError(f"the run has no evaluation at the end of the task stages ending at steps {missing}")
    return [by_step[e] for e in ends]


def run_one(config, row: str, protocol: str, seed: int, workdir: Path) -> dict:
    """Trains (or resumes) one row through the trainer; returns its accuracy matrix and metrics."""
    from jaxlab.methods.plwf.task import build_method
    from jaxlab.train.loop import train
    from jaxlab.train.metrics import read_metrics

    c = row_config(config, row, protocol, seed)
    run_dir = workdir / protocol / f"{row}-seed{seed}"
    method = build_method(c)
    train(c, run_dir, method)
    r = accuracy_matrix(task_evals(method, read_metrics(run_dir)), protocol)
    saved = json.loads((run_dir / "summary.json").read_text())
    return {"seed": seed, "matrix": r.tolist(), **summarize(r), "wall_s": float(saved["wall_s"])}


def run_rows(config, workdir: Path) -> dict:
    """{protocol: {row: {"by_seed": [...], "mean": {...}, "std": {...}, "mean_matrix": (T, T)}}}."""
    seeds = [int(s) for s in config.report.seeds]
    if not seeds:
        raise ValueError("report.seeds is empty: give at least one seed, e.g. --config.report.seeds='(0,)'")
    out: dict = {}
    for protocol in config.report.protocols:
        out[protocol] = {}
        for row in config.report.methods:
            runs = [run_one(config, row, protocol, s, workdir) for s in seeds]
            out[protocol][row] = {
                "by_seed": runs,
                "mean": {k: float(np.mean([r[k] for r in runs])) for k in METRICS},
                "std": {k: float(np.std([r[k] for r in runs])) for k in METRICS},
                "mean_matrix": np.mean([r["matrix"] for r in runs], axis=0).tolist(),  # NaN above the diagonal
            }
    return out


def check_findings(results: dict) -> list[dict]:
    """The paper's claims in kind: PLwF forgets less than fine-tuning and than LwF and reaches a higher
    average accuracy than LwF; credit assignment raises average accuracy (PLwF and LwF against their plain
    sums). Means over the seeds, per protocol. (Joint training is shown in the table, not checked.)"""
    out = []
    for protocol, rows in results.items():
        def compare(a: str, b: str, key: str, lower: bool, claim: str):
            if a not in rows or b not in rows:
                return
            x, y = rows[a]["mean"][key], rows[b]["mean"][key]
            pairs = [(p[key], q[key]) for p, q in zip(rows[a]["by_seed"], rows[b]["by_seed"])]
            wins = sum((p < q) if lower else (p > q) for p, q in pairs)
            ties = sum(p == q for p, q in pairs)
            detail = (f"{NAMES[a]} {100 * x:.2f}% vs {NAMES[b]} {100 * y:.2f}% "
                      f"(better in {wins}, tied in {ties} of {len(pairs)} seeds)")
            out.append(Finding(f"{protocol}-incremental: {claim}", detail, bool(x < y if lower else x > y)))

        compare("plwf", "finetune", "forgetting", True, "PLwF forgets less than fine-tuning")
        compare("plwf", "lwf", "forgetting", True, "PLwF forgets less than LwF")
        compare("plwf", "lwf", "average_accuracy", False, "PLwF average accuracy > LwF")
        compare("plwf", "plwf_sum", "average_accuracy", False, "credit assignment raises PLwF's average accuracy")
        compare("lwf_ca", "lwf", "average_accuracy", False, "credit assignment raises LwF's average accuracy")
    return [f.as_dict() for f in out]


def format_report(result: dict) -> str:
    """Markdown: one table per protocol (rows: methods; columns: average accuracy, forgetting, BWT as
    mean ± std % over the seeds, train seconds), then the findings."""
    seeds = result["seeds"]
    parts = [f"PLwF and baselines on {result['source']}: {result['num_tasks']} tasks x "
             f"{result['classes_per_task']} classes, {result['steps_per_task']} steps a task, "
             f"seeds {', '.join(map(str, seeds))} (mean ± std over seeds, %)\n"]
    header = ["method", "average accuracy", "forgetting", "backward transfer", "train s (seed mean)"]
    for protocol, rows in result["results"].items():
        table = [[NAMES[row], *(mean_std([r[k] for r in x["by_seed"]], percent=True) for k in METRICS),
                  f"{np.mean([r['wall_s'] for r in x['by_seed']]):.1f}"] for row, x in rows.items()]
        parts.append(f"{protocol}-incremental\n\n{markdown_table(header, table)}\n")
    parts.append(findings_table(result["findings"]) + "\n")
    return "\n".join(parts)


def plot_report(results: dict, path: Path) -> None:
    """Heat maps of the seed-mean accuracy matrices: one row per protocol, one panel per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxlab.methods.plwf.metrics import draw_matrix
    from jaxlab.report import save_figure

    protocols = list(results)
    cols = max(len(rows) for rows in results.values())
    fig, axes = plt.subplots(len(protocols), cols, figsize=(2.8 * cols, 2.8 * len(protocols)), squeeze=False)
    for i, protocol in enumerate(protocols):
        for j, (row, x) in enumerate(results[protocol].items()):
            draw_matrix(axes[i][j], np.asarray(x["mean_matrix"]), f"{NAMES[row]} ({protocol}-IL)")
        for j in range(len(results[protocol]), cols):
            axes[i][j].axis("off")
    save_figure(fig, path)


def report(config, workdir: str | Path) -> dict:
    """Runs every row, writes report.md, report.json, report.png under workdir; returns the result."""
    workdir = Path(workdir)
    results = run_rows(config, workdir)
    result = {"source": config.data.source, "num_tasks": int(config.cl.num_tasks),
              "classes_per_task": int(config.cl.classes_per_task), "steps_per_task": int(config.cl.steps_per_task),
              "seeds": [int(s) for s in config.report.seeds], "results": results,
              "findings": check_findings(results)}
    write_report(workdir, result, format_report(result), lambda path: plot_report(results, path))
    return result
