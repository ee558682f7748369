"""The multi-exit backdoor report (`jaxlab report --config backdoor:tiny`, multiexit_backdoor.md).

Trains the attack (one four-stage trainer run per seed of config.report.seeds, resumable under
workdir/seed<k>) and, when config.report.defenses, an ordinarily backdoored model (attack.kind
"ordinary", workdir/ordinary: the defenses' positive control). Measures on the test split: clean
accuracy and ASR of the vanilla models (clean CNN, released poisoned CNN) and of the multi-exit models
(clean SDN, attacker's SDN, victim's SDN) per exit and by early exit across tau and start exit, with the
exit distribution and average MACs; runs Neural Cleanse, STRIP, DF-TND and fine-pruning (seed config.report.
seeds[0]) against the released vanilla model, the victim's multi-exit model (early exit at defense.tau
from exit 0), the clean CNN before poisoning (negative control) and the positive control. Writes
report.md (tables, findings), report.json and report.png (exit-wise ASR and accuracy curves).
"""

from __future__ import annotations

import copy
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab import report as R
from jaxlab.methods.backdoor import defenses as D
from jaxlab.methods.backdoor.analysis import evaluate_state
from jaxlab.methods.backdoor.data import load_split
from jaxlab.methods.backdoor.task import BACKBONE, ICS, build_with_model
from jaxlab.methods.backdoor.triggers import apply_trigger

FINDING_MARGIN = 0.20  # early-exit ASR must beat the clean model's by 20 points to count as "far above"
BASE_SLACK = 0.05  # the vanilla ASR is "near the base rate" within 5 points of the clean CNN's


def seed_config(config, seed: int):
    c = copy.deepcopy(config)
    c.seed = int(seed)
    c.attack.seed = int(seed)
    return c


def ordinary_config(config):
    """The positive control: poisoned data in the clean stage, no poisoning stage, with the trigger
    defense.control_trigger; its vanilla model is what the defenses see, so its ICs are attached but not
    trained."""
    c = copy.deepcopy(config)
    c.attack.kind = "ordinary"
    c.attack.trigger = config.defense.control_trigger
    c.stages.ics.epochs = c.stages.victim.epochs = 0
    return c


def train_and_restore(config, workdir: Path):
    """Trains (or resumes) config's run in workdir; returns (state, model)."""
    from jaxlab.train.loop import restore_for_eval, train

    method, model = build_with_model(config)
    train(config, workdir, method)
    _, state = restore_for_eval(config, workdir, method)
    return state, model


def _classifiers(config, state, model):
    bb = state.parts[BACKBONE]

    def vanilla(images):
        return model.backbone_apply(bb.params, bb.collections, images)[0]

    if ICS not in state.parts:  # a vanilla model (the positive control's run restores without ICs)
        return vanilla, None

    def exits(images):
        return model.exits(bb.params, bb.collections, state.parts[ICS].params, images)[0]

    return vanilla, D.multi_exit_classifier(exits, config.defense.tau, 0)


def run_defenses(config, state, model, images, labels, name_prefix: str, multi_exit: bool = True) -> list[dict]:
    """Neural Cleanse, STRIP, DF-TND and fine-pruning against the state's vanilla model (named name_prefix) and
    (multi_exit, when the state has ICs) its victim multi-exit model. One dict per model."""
    d, a = config.defense, config.attack
    multi_exit = multi_exit and ICS in state.parts
    vanilla, early = _classifiers(config, state, model)
    triggered = apply_trigger(images, a.trigger, a.watermark_opacity).astype(np.float32)
    keep = labels != a.target
    n_strip = min(d.strip_images, len(images) // 2)
    overlays = images[len(images) - d.strip_overlays:]
    rows = []
    targets = [(f"{name_prefix} vanilla (final exit)", vanilla)]
    if multi_exit:
        targets.append((f"victim multi-exit (early exit, tau {d.tau})", early))
    bb = state.parts[BACKBONE]

    def features(x):  # the penultimate representation: the last block's output, globally average-pooled
        last = model.backbone_apply(bb.params, bb.collections, x)[1][-1]
        last = jax.nn.relu(last) if config.model.tap == "pre_relu" else last
        return last.mean(axis=(1, 2)) if last.ndim == 4 else last

    noise = np.random.default_rng(config.seed).random((d.dftnd_seeds, *images.shape[1:])).astype(np.float32)
    order = D.prune_order(model.backbone_apply(bb.params, bb.collections, jnp.asarray(images[:256]))[1][-1])
    for label, classify in targets:
        nc = D.neural_cleanse(classify, images[: d.nc_images], model.heads.num_classes, epochs=d.nc_epochs,
                              lr=d.nc_lr, init_cost=d.nc_init_cost, batch_size=d.nc_batch, norm=d.nc_norm,
                              init=d.nc_init, cost_from_zero=d.nc_cost_from_zero, patience=d.nc_patience,
                              early_stop_patience=d.nc_early_stop_patience, seed=config.seed)
        clean_scores = D.strip_scores(classify, images[:n_strip], overlays)
        trig_scores = D.strip_scores(classify, triggered[:n_strip][keep[:n_strip]], overlays)
        strip = D.strip_decision(clean_scores, trig_scores, d.strip_frr)
        dft = D.df_tnd(jax.jit(classify), features, noise, steps=d.dftnd_steps, step_size=d.dftnd_step_size,
                       eps=d.dftnd_eps, threshold=d.dftnd_threshold)
        dft = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in dft.items()}
        rows.append({"model": label, "nc_anomaly_index": nc["anomaly_index"],
                     "nc_flagged": nc["flagged"], "nc_detected": nc["detected"],
                     "nc_target_flagged": a.target in nc["flagged"], "nc_norms": nc["norms"].tolist(),
                     "nc_smallest": int(np.argmin(nc["norms"])), "nc_epochs": nc["epochs"].tolist(),
                     "strip": strip, "dftnd": dft})
    ics = state.parts[ICS].params if multi_exit else None

    def pruned(params, images, mask):
        return model.exits_pruned(params, bb.collections, ics, images, mask)

    curve = D.pruning_curve(jax.jit(lambda im, mask: pruned(bb.params, im, mask)), images, labels, triggered,
                            a.target, order, d.prune_fractions)
    fraction = D.prune_fraction(curve, d.prune_max_drop)
    mask = jnp.asarray(D.channel_mask(order, fraction))
    train_x, train_y = load_split(config, "train")
    tuned = D.fine_tune(lambda p, im: model.exits_pruned(p, bb.collections, None, im, mask)[-1], bb.params,
                        train_x[: d.ft_images], train_y[: d.ft_images], epochs=d.ft_epochs, batch_size=d.ft_batch,
                        lr=d.ft_lr, seed=config.seed)
    after = D.exit_rates(jax.jit(lambda im: pruned(tuned, im, mask)), images, labels, triggered, a.target)
    pruned_row = next(r for r in curve if r["fraction"] == fraction)
    summary = lambda r: {"final_accuracy": float(r["accuracy"][-1]), "final_asr": float(r["asr"][-1]),  # noqa: E731
                         "exit0_asr": float(r["asr"][0])}
    for row in rows:  # the vanilla row judged at its final exit, the early-exit row at exit 0
        decision = D.fine_pruning_decision(curve, after, exit_index=0 if row["model"].startswith("victim") else -1)
        row["fine_pruning"] = {"curve": [{"fraction": r["fraction"], **summary(r)} for r in curve],
                               "fraction": fraction, "pruned": summary(pruned_row), "fine_tuned": summary(after),
                               **decision}
    return rows


def check_findings(results: list[dict]) -> list[R.Finding]:
    """The paper's claim in kind, on the mean over seeds: clean accuracy kept, vanilla ASR near the clean
    CNN's (base rate), and the victim's best early-exit ASR far above the clean SDN's."""
    mean = lambda f: float(np.mean([f(r) for r in results]))  # noqa: E731
    clean_acc = mean(lambda r: r["clean"]["vanilla_accuracy"])
    released_acc = mean(lambda r: r["victim"]["vanilla_accuracy"])
    base, vanilla = mean(lambda r: r["clean"]["vanilla_asr"]), mean(lambda r: r["victim"]["vanilla_asr"])
    victim_exit = mean(lambda r: max(r["victim"]["exit_asr"][:-1]))
    clean_exit = mean(lambda r: max(r["clean"]["exit_asr"][:-1]))
    return [
        R.Finding("clean accuracy kept by the released model", f"{100 * released_acc:.1f}% vs clean CNN "
                  f"{100 * clean_acc:.1f}%", released_acc >= clean_acc - 0.05),
        R.Finding("vanilla ASR near the base rate", f"released {100 * vanilla:.1f}% vs clean CNN {100 * base:.1f}%",
                  vanilla <= base + BASE_SLACK),
        R.Finding("victim's early exits far above it", f"best IC ASR {100 * victim_exit:.1f}% vs clean SDN "
                  f"{100 * clean_exit:.1f}%", victim_exit >= clean_exit + FINDING_MARGIN),
    ]


def format_report(config, results: list[dict], defenses: list[dict], findings) -> str:
    pct = lambda v: f"{100 * float(v):.1f}"  # noqa: E731
    seeds = list(config.report.seeds)
    lines = [f"# Backdoor on multi-exit networks: {config.model.arch} on {config.data.source}, trigger "
             f"{config.attack.trigger}, target {config.attack.target}, poison rate {config.attack.poison_rate}, "
             f"seeds {seeds}", ""]
    rows = []
    for name in ("clean", "attacker", "victim"):
        if name not in results[0]:
            continue
        rows.append([f"{name} vanilla (final exit)", R.mean_std([r[name]["vanilla_accuracy"] for r in results], percent=True),
                     R.mean_std([r[name]["vanilla_asr"] for r in results], percent=True), "-", "100"])
        for i, row in enumerate(results[0][name]["early_exit"]):
            vals = [r[name]["early_exit"][i] for r in results]
            rows.append([f"{name} multi-exit, from exit {row['start']}, tau {row['tau']}",
                         R.mean_std([v["accuracy"] for v in vals], percent=True),
                         R.mean_std([v["asr"] for v in vals], percent=True),
                         f"{np.mean([np.dot(np.arange(len(v['exit_share_clean'])), v['exit_share_clean']) for v in vals]):.2f}",
                         pct(np.mean([v["macs_ratio"] for v in vals]))])
    lines += ["## Clean accuracy and ASR (%)", "",
              R.markdown_table(["model / policy", "clean acc", "ASR", "mean exit (clean)", "MACs % of full"], rows), ""]
    m = results[0]["num_exits"]
    exit_rows = [[name] + [R.mean_std([r[name][key][k] for r in results], percent=True) for k in range(m)]
                 for name in ("clean", "attacker", "victim") if name in results[0]
                 for key in ("exit_asr",)]
    acc_rows = [[f"{name} acc"] + [R.mean_std([r[name]["exit_accuracy"][k] for r in results], percent=True)
                                   for k in range(m)] for name in ("clean", "victim") if name in results[0]]
    lines += ["## Exit-wise ASR and accuracy (%) (exits 0..M-2 are ICs, M-1 the final exit)", "",
              R.markdown_table(["model"] + [str(k) for k in range(m)], exit_rows + acc_rows), ""]
    if defenses:
        def removes(verdict):
            return "n/a (ASR < 20% before)" if verdict is None else R.yes_no(verdict)

        def fp(d, key):
            r = d["fine_pruning"][key]
            return f"{pct(r['final_accuracy'])} / {pct(r['final_asr'])} / {pct(r['exit0_asr'])}"

        def nc_smallest(d):
            norms = sorted(d["nc_norms"])
            return f"{d['nc_smallest']} ({norms[0]:.1f}; next {norms[1]:.1f}, median {np.median(norms):.1f})"

        drows = [[d["model"], f"{pct(d['fine_pruning']['curve'][0]['final_accuracy'])} / "
                  f"{pct(d['fine_pruning']['curve'][0]['final_asr'])} / {pct(d['fine_pruning']['curve'][0]['exit0_asr'])}",
                  f"{d['nc_anomaly_index']:.2f}", str(d["nc_flagged"]), R.yes_no(d["nc_detected"]),
                  R.yes_no(d["nc_target_flagged"]), nc_smallest(d), pct(d["strip"]["far"]), R.yes_no(d["strip"]["detected"]),
                  f"{d['dftnd']['top']} (+{d['dftnd']['increase'][d['dftnd']['top']]:.1f}; {d['dftnd']['anomaly_index']:.2f})",
                  R.yes_no(d["dftnd"]["detected"]), R.yes_no(config.attack.target in d["dftnd"]["flagged"]),
                  f"{pct(d['fine_pruning']['fraction'])}: {fp(d, 'pruned')}", fp(d, "fine_tuned"),
                  removes(d["fine_pruning"]["removed"])] for d in defenses]
        frr = pct(config.defense.strip_frr)
        lines += ["## Defenses", "",
                  "Accuracy / ASR columns: final exit clean accuracy / final exit ASR / exit-0 ASR (%; exit 0 is the "
                  "first IC when the model has ICs, else the final exit). NC: Neural Cleanse (anomaly index of the "
                  "smallest mask, classes flagged at index > 2, whether the target is among them); STRIP: share of "
                  f"triggered inputs missed (FAR) at FRR {frr}%; DF-TND: the class whose logit rises most when noise images "
                  "are driven (PGD) to maximise the penultimate features, flagged at MAD anomaly index > 2; fine-pruning: the last block's channels pruned "
                  "(largest fraction keeping clean accuracy), then fine-tuned on clean data; it removes the backdoor "
                  "when the ASR (the victim's: exit 0, where early exit answers; else the final exit's) falls below "
                  "half with clean accuracy down < 10 points.", "",
                  R.markdown_table(["model", "acc / ASR / exit-0 ASR", "NC anomaly index", "NC flagged",
                                    "NC: backdoored", "NC names the target",
                                    "NC smallest mask: class (L1; next, median)", f"STRIP FAR % (FRR {frr}%)",
                                    "STRIP detects", "DF-TND top class (logit increase; anomaly index)",
                                    "DF-TND detects", "DF-TND names the target", "pruned (fraction %: acc / ASR / exit-0 ASR)",
                                    "fine-tuned: acc / ASR / exit-0 ASR", "fine-pruning removes"], drows),
                  ""]
    lines += ["## Findings", "", R.findings_table(findings), ""]
    return "\n".join(lines)


def plot_report(results: list[dict], path: Path) -> None:
    fig, (ax_asr, ax_acc) = R.subplots(2)
    curves = {name: np.mean([r[name]["exit_asr"] for r in results], 0) for name in ("clean", "attacker", "victim")
              if name in results[0]}
    R.plot_curves(ax_asr, curves, scale=100, title="exit-wise ASR", xlabel="exit (1 = first IC, last = final)", ylabel="ASR %")
    accs = {name: np.mean([r[name]["exit_accuracy"] for r in results], 0) for name in curves}
    R.plot_curves(ax_acc, accs, scale=100, title="exit-wise clean accuracy", xlabel="exit (1 = first IC, last = final)",
                  ylabel="accuracy %")
    R.save_figure(fig, path)


def report(config, workdir: str | Path) -> dict:
    """Trains and measures (module docstring); returns {"results", "defenses", "findings"}."""
    workdir = Path(workdir)
    images, labels = load_split(config, "test")
    results, defenses = [], []
    for seed in config.report.seeds:
        c = seed_config(config, seed)
        state, model = train_and_restore(c, workdir / f"seed{seed}")
        results.append(evaluate_state(c, state, model, images, labels))
        if config.report.defenses and seed == config.report.seeds[0]:
            defenses += run_defenses(c, state, model, images, labels, "released")
            if "clean_backbone" in state.parts:  # the negative control: the clean CNN before poisoning
                clean = state.replace_parts(**{BACKBONE: state.parts["clean_backbone"]})
                defenses += run_defenses(c, clean, model, images, labels, "clean (before poisoning)",
                                         multi_exit=False)
    if config.report.defenses:
        c = ordinary_config(seed_config(config, config.report.seeds[0]))
        state, model = train_and_restore(c, workdir / "ordinary")
        defenses += run_defenses(c, state, model, images, labels, "ordinary backdoor", multi_exit=False)
    findings = check_findings(results)
    markdown = format_report(config, results, defenses, findings)
    out = {"results": results, "defenses": defenses, "findings": [f.as_dict() for f in findings]}
    R.write_report(workdir, out, markdown, lambda p: plot_report(results, p))
    return out
