"""The DAE-NR report: the paper's regimes trained through the trainer over seeds, measured on held-out
stimuli, with the RSA statistics and RDM images.

`jaxlab report --config dae_nr:tiny` trains, for every seed of config.report.seeds, the regimes of
config.report.regimes as resumable trainer runs under <workdir>/<regime>-seed<s>. alpha = 0
("autoencoder") is the post-hoc run's first stage when both are asked for (the same config, seed and
steps give the same encoder): its checkpoint at the stage boundary is measured, no run repeats it. A seed
sets the initialisation and the batch order; the stimuli and the population (data.seed) stay the same.

Per regime and seed, on the eval stimuli: reconstruction MSE / PSNR / SSIM; mean per-neuron correlation
and CC_norm (trained readouts only: alpha = 0 has none); RSA rho between the mapped layer's RDM and the
population's, its permutation p-value and bootstrap 95% interval over stimuli. Context rows: the RSA of
the pixels themselves with the population, and (simulated data) of the noise-free rates with the measured
responses, the most any model can reach. Files: report.md / report.json / report.png (bars per regime)
and rdms.png (the RDMs of seed 0, stimuli ordered by the population's first principal component).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from jaxlab.methods.dae_nr import metrics as M
from jaxlab.methods.dae_nr.task import build, get_model, measure
from jaxlab.report import Finding, findings_table, markdown_table, mean_std, plot_bars, save_figure, subplots
from jaxlab.report import write_report

NAMES = {"autoencoder": "alpha = 0 (autoencoder)", "posthoc": "post-hoc readout (frozen encoder)",
         "joint": "joint (DAE-NR)", "neural": "neural loss only"}
KEYS = ("recon_mse", "psnr", "ssim", "corr", "corr_norm", "rsa", "rsa_p", "rsa_lo", "rsa_hi")


def regime_config(config, regime: str, seed: int):
    """The trainer config of one report run: the regime, the seed, quiet, evaluated and checkpointed at
    the end of every stage (checkpoint_every = train.steps keeps the post-hoc run's stage boundary)."""
    c = copy.deepcopy(config)
    c.seed = int(seed)
    c.dae.regime = regime
    steps = int(config.train.steps)
    total = steps + (int(config.dae.readout_steps) if regime == "posthoc" else 0)
    c.train.update(eval_every=total, checkpoint_every=steps, keep_checkpoints=total // steps + 2,
                   best_metric="", progress=False)
    return c


def rsa_statistics(rdm_model: np.ndarray, rdm_population: np.ndarray, config, seed: int) -> dict:
    """{"rsa", "rsa_p", "rsa_lo", "rsa_hi"}: rho, its permutation p and bootstrap interval."""
    rho, p, _ = M.permutation_test(rdm_model, rdm_population, int(config.report.permutations), seed=seed)
    lo, hi = M.bootstrap_ci(rdm_model, rdm_population, int(config.report.bootstraps), seed=seed)
    return {"rsa": rho, "rsa_p": p, "rsa_lo": lo, "rsa_hi": hi}


def run_seed(config, seed: int, workdir: Path) -> dict:
    """{regime: (metrics, mapped-layer RDM)} of one seed (module docstring)."""
    from jaxlab.train.loop import restore_for_eval, train

    regimes = list(config.report.regimes)
    runs = [r for r in regimes if not (r == "autoencoder" and "posthoc" in regimes)]
    out = {}
    for regime in runs:
        c = regime_config(config, regime, seed)
        method = build(c)
        run_dir = workdir / f"{regime}-seed{seed}"
        train(c, run_dir, method)
        measured = {regime: None}
        if regime == "posthoc" and "autoencoder" in regimes:
            measured["autoencoder"] = int(c.train.steps)
        for name, step in measured.items():
            state = restore_for_eval(c, run_dir, method, "latest" if step is None else step)[1]
            out[name] = measure_state(c, state, neural=name != "autoencoder", seed=seed)
    return {r: out[r] for r in regimes}


def measure_state(config, state, *, neural: bool, seed: int) -> tuple[dict, np.ndarray]:
    """(metrics with RSA statistics, the mapped layer's RDM) of a trained state on the eval stimuli."""
    from jaxlab.methods.dae_nr.task import sources

    _, eval_source = sources(config)
    arrays = eval_source.get(np.arange(len(eval_source)))
    model = get_model(config.model, int(np.asarray(arrays["response"]).shape[-1]))
    metrics, extra = measure(model, state.params, arrays, neural=neural,
                             batch_size=int(config.data.eval_batch_size), neural_kind=config.dae.neural_loss)
    metrics.update(rsa_statistics(extra["rdm_model"], extra["rdm_population"], config, seed))
    return metrics, extra["rdm_model"]


def context(config) -> dict:
    """The population's RDM, the pixel baseline's RSA and (simulated data) the noise ceiling."""
    from jaxlab.methods.dae_nr.task import sources

    _, eval_source = sources(config)
    arrays = eval_source.get(np.arange(len(eval_source)))
    population = M.rdm(arrays["response"])
    out = {"rdm_population": population, "rdm_pixels": M.rdm(arrays["image"]),
           "stimuli": int(len(population)), "neurons": int(np.asarray(arrays["response"]).shape[-1])}
    out["rsa_pixels"] = rsa_statistics(out["rdm_pixels"], population, config, 0)
    if "rate" in arrays:
        out["rsa_rates"] = M.rsa(M.rdm(arrays["rate"]), population)
    centred = arrays["response"] - arrays["response"].mean(0)
    out["order"] = np.argsort(np.linalg.svd(centred, full_matrices=False)[0][:, 0])
    return out


def summarise(per_seed: list[dict], regimes) -> dict:
    """{regime: {"by_seed": [metrics], "mean": {key: mean}, "std": {key: std}}} over the seeds."""
    out = {}
    for regime in regimes:
        rows = [seed_result[regime][0] for seed_result in per_seed]
        keys = [k for k in rows[0] if k in KEYS or k.startswith("rsa_layer")]
        out[regime] = {"by_seed": rows, "mean": {k: float(np.mean([r[k] for r in rows])) for k in keys},
                       "std": {k: float(np.std([r[k] for r in rows])) for k in keys}}
    return out


def check_findings(summary: dict) -> list[Finding]:
    """The abstract's claims, means over seeds: joint training improves reconstruction and RSA over
    alpha = 0 ('both' needs the two), RSA more than the neural loss alone (when that regime ran), and
    neural prediction over the post-hoc readout."""
    out = []
    if "joint" not in summary or "autoencoder" not in summary:
        return out
    j, a = summary["joint"], summary["autoencoder"]

    def compare(key, better, claim):
        wins = sum(better(x[key], y[key]) for x, y in zip(j["by_seed"], a["by_seed"]))
        detail = (f"joint {j['mean'][key]:.5f} vs alpha=0 {a['mean'][key]:.5f} (better in {wins} of "
                  f"{len(j['by_seed'])} seeds)")
        return Finding(claim, detail, bool(better(j["mean"][key], a["mean"][key])))

    recon = compare("recon_mse", lambda x, y: x < y, "joint training improves reconstruction (lower MSE)")
    rsa = compare("rsa", lambda x, y: x > y, "joint training increases RSA with the population")
    out += [recon, rsa]
    out.append(Finding("joint training improves both measures",
                       f"reconstruction: {yes(recon)}, RSA: {yes(rsa)}", recon.holds and rsa.holds))
    if "neural" in summary:
        n = summary["neural"]
        out.append(Finding("the neural loss alone raises RSA less than joint training",
                           f"RSA joint {j['mean']['rsa']:.5f} vs neural only {n['mean']['rsa']:.5f}",
                           bool(j["mean"]["rsa"] > n["mean"]["rsa"])))
    if "posthoc" in summary:
        p = summary["posthoc"]
        out.append(Finding("joint predicts neurons better than a post-hoc readout",
                           f"mean r joint {j['mean']['corr']:.3f} vs post-hoc {p['mean']['corr']:.3f}",
                           bool(j["mean"]["corr"] > p["mean"]["corr"])))
    return out


def yes(finding: Finding) -> str:
    return "yes" if finding.holds else "no"


def format_report(result: dict) -> str:
    """report.md: the setting, the regimes' table (mean ± std over seeds), context and findings."""
    s, ctx = result["summary"], result["context"]
    header = ["regime", "recon MSE", "PSNR (dB)", "SSIM", "neuron r", "CC_norm", "RSA rho",
              "RSA 95% CI (mean)", "perm. p (max)"]
    rows = []
    for regime, r in s.items():
        seeds = r["by_seed"]

        def cell(key, digits=4, rows=seeds):
            return mean_std([x[key] for x in rows], digits=digits) if key in rows[0] else "—"

        ci = f"[{r['mean']['rsa_lo']:.3f}, {r['mean']['rsa_hi']:.3f}]"
        rows.append([NAMES.get(regime, regime), cell("recon_mse", 5), cell("psnr", 2), cell("ssim", 3),
                     cell("corr", 3), cell("corr_norm", 3), cell("rsa", 3), ci,
                     f"{max(x['rsa_p'] for x in seeds):.4f}"])
    c = result["config"]
    lines = [
        "# DAE-NR: reconstruction, neural prediction and RSA by training regime", "",
        f"Data `{c['source']}`: {ctx['stimuli']} held-out stimuli, {ctx['neurons']} neurons; encoder "
        f"{c['features']}, layer {c['mapped_layer']} mapped by a {c['readout']} readout; alpha {c['alpha']}, "
        f"{c['neural_loss']} neural loss; {c['steps']} steps per stage; seeds {c['seeds']}; RSA p from "
        f"{c['permutations']} permutations, CI from {c['bootstraps']} bootstrap samples over stimuli.", "",
        markdown_table(header, rows), "",
        f"Context: RSA of the pixels with the population {ctx['rsa_pixels']['rsa']:.3f}"
        + (f"; noise-free rates vs measured responses (ceiling) {ctx['rsa_rates']:.3f}"
           if "rsa_rates" in ctx else "") + ".",
    ]
    if "autoencoder" in s and "posthoc" in s:
        lines.append("alpha = 0 and the post-hoc regime share their encoder and decoder (the post-hoc run's "
                     "first stage), so their reconstruction and RSA are the same numbers.")
    layer_keys = sorted(k for k in next(iter(s.values()))["mean"] if k.startswith("rsa_layer"))
    layer_rows = [[NAMES.get(regime, regime)]
                  + [mean_std([x[k] for x in r["by_seed"]], digits=3) for k in layer_keys]
                  for regime, r in s.items()]
    lines += ["", "RSA rho of every encoder layer (the mapped one is in the table above):", "",
              markdown_table(["regime"] + [k.replace("rsa_layer", "layer ") for k in layer_keys], layer_rows)]
    lines += ["", findings_table(result["findings"]), ""]
    return "\n".join(lines)


def plot_report(result: dict, path: Path) -> None:
    """report.png: one panel per measure (recon MSE, neuron r, RSA), bars = regimes' means over seeds."""
    s = result["summary"]
    fig, axes = subplots(3)
    for ax, (key, title) in zip(axes, (("recon_mse", "reconstruction MSE"), ("corr", "mean neuron r"),
                                       ("rsa", "RSA rho (mapped layer)"))):
        names = [r for r in s if key in s[r]["mean"]]
        plot_bars(ax, names, [s[r]["mean"][key] for r in names], title=title, rotation=20)
    save_figure(fig, path)


def plot_rdms(ctx: dict, rdms: dict, path: Path) -> Path:
    """rdms.png: the population's RDM, the pixels' and each regime's mapped layer (seed 0), rank-transformed
    to [0, 1] (what the Spearman RSA compares; one colour scale for all), stimuli in the population's
    first-PC order."""
    panels = {"population": ctx["rdm_population"], "pixels": ctx["rdm_pixels"], **rdms}
    fig, axes = subplots(len(panels), panel_size=(3.2, 3.2))
    order = ctx["order"]
    for ax, (name, matrix) in zip(axes, panels.items()):
        shown = M.rank_matrix(matrix[np.ix_(order, order)])
        ax.imshow(shown / shown.max(), cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    return save_figure(fig, path)


def report(config, workdir) -> dict:
    """Runs the regimes over the seeds and writes the report (module docstring). Returns the result."""
    workdir = Path(workdir)
    seeds = [int(s) for s in config.report.seeds]
    if not seeds or not config.report.regimes:
        raise ValueError("report.seeds and report.regimes must be non-empty, "
                         "e.g. --config.report.seeds='(0,)'")
    per_seed = [run_seed(config, seed, workdir) for seed in seeds]
    ctx = context(config)
    summary = summarise(per_seed, config.report.regimes)
    result = {
        "config": {"source": config.data.source, "features": list(config.model.features),
                   "mapped_layer": config.model.mapped_layer, "readout": config.model.readout,
                   "alpha": config.dae.alpha, "neural_loss": config.dae.neural_loss,
                   "steps": config.train.steps, "readout_steps": config.dae.readout_steps, "seeds": seeds,
                   "permutations": config.report.permutations, "bootstraps": config.report.bootstraps},
        "summary": summary,
        "context": {k: v for k, v in ctx.items() if not k.startswith("rdm") and k != "order"},
        "findings": [f.as_dict() for f in check_findings(summary)],
    }
    write_report(workdir, result, format_report(result), lambda p: plot_report(result, p))
    plot_rdms(ctx, {NAMES.get(r, r).split(" (")[0]: per_seed[0][r][1] for r in config.report.regimes},
              workdir / "rdms.png")
    return result
