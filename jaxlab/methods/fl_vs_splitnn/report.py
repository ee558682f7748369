"""The FL vs SplitNN report: both paradigms trained through the trainer for every distribution and seed.

`jaxlab report --config fl_vs_splitnn:tiny` trains, for every data distribution of
config.report.distributions (IID, class imbalance, one class per client) and every seed of
config.report.seeds, FL and SplitNN for the same budget (`rounds` FL rounds of one local epoch =
`rounds` SplitNN epochs), each as a resumable trainer run under <workdir>/<distribution>/<paradigm>-seed<s>
(evaluated after every round). From the runs' metrics it records test accuracy per round, bytes by kind
(measured from the arrays that cross, and from the spec's formulas), wall time and memory, writes
report.md / report.json / report.png, and checks the paper's findings in kind, accuracies compared as
means over the seeds: under one class per client, which paradigm ends ahead changes from seed to seed.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.benchmarking import markdown_table, peak_device_memory_bytes, peak_host_memory_bytes
from jaxlab.federated import split as S
from jaxlab.federated.partition import label_histogram
from jaxlab.methods.fl_vs_splitnn import task as T
from jaxlab.report import write_report
from jaxlab.train.metrics import read_metrics
from jaxlab.train.state import param_count

PARADIGM_NAMES = {"fl": "FL", "splitnn": "SplitNN"}


def paradigm_config(config, dist_name: str, paradigm: str, seed: int):
    """The trainer config of one report run: `rounds` steps, logged and evaluated every round, one
    checkpoint at the end (resumable), no best-checkpoint tracking."""
    c = copy.deepcopy(config)
    c.seed = int(seed)
    c.fl.update(paradigm=paradigm, distribution=dist_name)
    rounds = int(config.report.rounds)
    c.train.update(steps=rounds, log_every=1, eval_every=1, checkpoint_every=rounds, best_metric="",
                   progress=False)
    return c


def model_facts(config, s: T.Setup, paradigm: str) -> dict:
    """Bytes per round by the spec's formula, parameter counts, the cut's shape (SplitNN) and the bytes
    of the state a client keeps (its weights, statistics and optimizer state) of one paradigm."""
    key, x0 = jax.random.PRNGKey(0), jnp.asarray(s.train["x"][:1])
    tx = T.make_tx(config)
    def init(module, x):  # shapes only: nothing is computed
        return jax.eval_shape(lambda k, x: T.init_variables(module, k, x), key, x)

    if paradigm == "fl":
        params, model_state = init(s.models.whole, x0)
        return {"bytes_formula_per_round": S.fl_round_bytes(len(s.parts), param_count(params) + param_count(model_state)),
                "params": param_count(params), "client_params": param_count(params),
                "client_state_bytes": T.tree_bytes(params) + T.tree_bytes(model_state)
                + T.tree_bytes(jax.eval_shape(tx.init, params))}
    cp, cs = init(s.models.client, x0)
    cut = jax.eval_shape(lambda p, st: T.forward(s.models.client, p, st, x0, None, False)[0], cp, cs)
    sp, _ = init(s.models.server, cut)
    per_round = S.splitnn_epoch_bytes([len(p) for p in s.parts], int(np.prod(cut.shape[1:])),
                                      param_count(cp) + param_count(cs))
    return {"bytes_formula_per_round": per_round, "params": param_count(cp) + param_count(sp),
            "client_params": param_count(cp), "cut_shape": list(cut.shape[1:]),
            "client_state_bytes": T.tree_bytes(cp) + T.tree_bytes(cs) + T.tree_bytes(jax.eval_shape(tx.init, cp))}


def run_paradigm(config, dist_name: str, paradigm: str, seed: int, workdir: Path) -> dict:
    """Trains (or resumes) one paradigm through the trainer and reads its curve and bytes back."""
    from jaxlab.train.loop import train

    c = paradigm_config(config, dist_name, paradigm, seed)
    run_dir = workdir / dist_name / f"{paradigm}-seed{seed}"
    method = T.build(c)
    summary = train(c, run_dir, method)
    records = read_metrics(run_dir)
    curve = [{"round": r["step"], "accuracy": r["accuracy"], "balanced_accuracy": r["balanced_accuracy"]}
             for r in records if r["split"] == "eval"]
    train_records = [r for r in records if r["split"] == "train"]
    for point, r in zip(curve, train_records):
        point["loss"] = r["loss"]
    measured = {}
    for r in train_records:
        for k, v in r.items():
            if k.startswith("bytes_"):
                measured[k[6:]] = measured.get(k[6:], 0) + int(v)
    facts = model_facts(c, T.setup(c), paradigm)
    saved = json.loads((run_dir / "summary.json").read_text())
    rounds = int(config.report.rounds)
    return {"curve": curve, "final": curve[-1], **facts, "bytes_measured": sum(measured.values()),
            "bytes_measured_by_kind": measured, "bytes_formula": facts["bytes_formula_per_round"]["total"] * rounds,
            "wall_s": float(saved["wall_s"]), "steady_round_s": float(saved["wall_s"]) / rounds,
            "peak_host_bytes_after": peak_host_memory_bytes(), "peak_device_bytes_after": peak_device_memory_bytes(),
            "workdir": str(run_dir), "steps": summary["steps"]}


def run_seeds(config, dist, workdir: Path) -> dict:
    """Both paradigms for every seed of config.report.seeds (a seed sets the client partition, the
    initialisation and the batch order; the data stay the same). Returns the first seed's row (its curves,
    bytes, times and memory), with, per paradigm, "by_seed": the final and best test accuracies of every
    seed and its accuracy averaged over the rounds (the area under its learning curve: convergence speed
    as well as accuracy), "mean" and "std" of those over the seeds, and "mean_curve": the test accuracy
    per round averaged over the seeds."""
    if not config.report.seeds:
        raise ValueError("report.seeds is empty: give at least one seed, e.g. --config.report.seeds='(0,)'")
    seeds = [int(s) for s in config.report.seeds]
    first = T.setup(paradigm_config(config, dist.name, "fl", seeds[0]))
    k = config.model.num_classes
    row = {"name": dist.name, "num_clients": len(first.parts), "client_sizes": [len(p) for p in first.parts],
           "label_histogram": label_histogram(first.parts, first.train["y"], k).tolist(),
           "test_size": len(first.test["y"]), "seeds": seeds}
    keys = ("accuracy", "balanced_accuracy", "best_accuracy", "accuracy_over_rounds")
    for paradigm, name in PARADIGM_NAMES.items():
        runs = [run_paradigm(config, dist.name, paradigm, seed, workdir) for seed in seeds]
        curves = np.asarray([[p["accuracy"] for p in r["curve"]] for r in runs])  # (seeds, rounds)
        by_seed = [{"seed": seed, **r["final"], "best_accuracy": float(curve.max()),
                    "accuracy_over_rounds": float(curve.mean())}
                   for seed, r, curve in zip(seeds, runs, curves)]
        row[name] = {**runs[0], "by_seed": by_seed,
                     "mean": {key: float(np.mean([b[key] for b in by_seed])) for key in keys},
                     "std": {key: float(np.std([b[key] for b in by_seed])) for key in keys},
                     "mean_curve": curves.mean(0).tolist()}
    return row


def check_findings(rows: list[dict], bytes_ratio: float) -> list[dict]:
    """The paper's findings in kind, from the bytes and from the two sides of its "learning performance"
    (model accuracy and convergence speed): the final test accuracy and the test accuracy averaged over
    the rounds, each as a mean over the seeds. Returns jaxlab.report.Finding dicts
    ({"finding", "detail", "holds"})."""
    from jaxlab.report import Finding

    by = {r["name"]: r for r in rows}
    out = []

    def ahead(r, first: str, second: str, key: str, what: str) -> Finding:
        a, b = r[first]["mean"][key], r[second]["mean"][key]
        wins = sum(x[key] > y[key] for x, y in zip(r[first]["by_seed"], r[second]["by_seed"]))
        seeds = len(r[first]["by_seed"])
        detail = f"{first} {100 * a:.2f}% vs {second} {100 * b:.2f}%"
        if seeds > 1:
            detail += f" (mean of {seeds} seeds; {first} ahead in {wins} of {seeds})"
        return Finding(f"{r['name']}: {first} {what} > {second}", detail, bool(a > b))

    for name, first, second in (("imbalanced", "SplitNN", "FL"), ("non-iid", "FL", "SplitNN")):
        if name in by:
            out.append(ahead(by[name], first, second, "accuracy", "final accuracy"))
            out.append(ahead(by[name], first, second, "accuracy_over_rounds", "accuracy averaged over rounds"))
    for r in rows:
        ratio = r["SplitNN"]["bytes_measured"] / r["FL"]["bytes_measured"]
        out.append(Finding(f"{r['name']}: FL sends >= {bytes_ratio:g}x fewer bytes than SplitNN",
                           f"SplitNN/FL = {ratio:.1f}x", bool(ratio >= bytes_ratio)))
    return [f.as_dict() for f in out]


def report(config, workdir: str | Path) -> dict:
    """Runs every distribution, writes report.md, report.json, report.png under workdir; returns the result."""
    workdir = Path(workdir)
    rows = [run_seeds(config, dist, workdir) for dist in config.report.distributions]
    result = {"model": config.model.name, "source": config.data.source, "rounds": int(config.report.rounds),
              "seeds": [int(s) for s in config.report.seeds], "rows": rows,
              "findings": check_findings(rows, float(config.report.bytes_ratio))}
    text = format_report(result)
    write_report(workdir, result, text, lambda path: plot_report(rows, path))
    return result


def format_report(result: dict) -> str:
    """Markdown: one row per distribution and paradigm (accuracies as mean ± std over the seeds, bytes,
    times, memory), then the findings with yes / NO."""
    from jaxlab.report import findings_table, mean_std

    seeds = result["seeds"]

    def pm(x: dict, key: str) -> str:  # mean (± std over the seeds) as a percentage
        return mean_std([b[key] for b in x["by_seed"]], percent=True)

    header = ["distribution", "paradigm", "clients", "final test acc %", "balanced acc %", "best acc %",
              "acc over rounds %", "bytes sent (measured)", "bytes (formula)", "train s", "s / round",
              "client state KiB", "peak host RSS MiB"]
    rows = []
    for r in result["rows"]:
        for p in ("FL", "SplitNN"):
            x = r[p]
            rows.append([r["name"], p, r["num_clients"], pm(x, "accuracy"), pm(x, "balanced_accuracy"),
                         pm(x, "best_accuracy"), pm(x, "accuracy_over_rounds"),
                         f"{x['bytes_measured']:,}", f"{x['bytes_formula']:,}", f"{x['wall_s']:.2f}",
                         f"{x['steady_round_s']:.3f}", f"{x['client_state_bytes'] / 1024:.1f}",
                         f"{x['peak_host_bytes_after'] / 2**20:.0f}"])
    findings = findings_table(result["findings"])
    over = (f"mean ± std over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}")
    return (f"FL vs SplitNN, {result['model']} on {result['source']}, {result['rounds']} FL rounds (1 local epoch) vs "
            f"{result['rounds']} SplitNN epochs\n\n{markdown_table(header, rows)}\n\n"
            f"Accuracies: {over} (a seed sets the client partition, the initialisation and the batch order); "
            "acc over rounds = test accuracy averaged over every round (convergence speed and accuracy). "
            f"Bytes, times and memory: seed {seeds[0]}; train s is the trainer's wall time (the first round's "
            "compilation and a test-set evaluation after every round included); peak host RSS is the process's "
            "running maximum after that paradigm.\n\n" + findings + "\n")


def plot_report(rows: list[dict], path: Path) -> None:
    """One panel per distribution: FL and SplitNN test accuracy % per round (mean curve over the seeds)."""
    from jaxlab.report import plot_curves, save_figure, subplots

    fig, axes = subplots(len(rows))
    for ax, r in zip(axes, rows):
        seeds = len(r["seeds"])
        plot_curves(ax, {p: r[p]["mean_curve"] for p in ("FL", "SplitNN")},
                    styles={"FL": "C0-", "SplitNN": "C3--"}, scale=100,
                    title=f"{r['name']} ({r['num_clients']} clients)", xlabel="FL round / SplitNN epoch",
                    ylabel=f"test accuracy % (mean of {seeds} seeds)" if seeds > 1 else "test accuracy %")
    save_figure(fig, path)
