"""The AV-Net report (`jaxlab report --config configs/av_net.py:tiny --workdir ...`, av_inpainting.md).

Trains AV-Net once per seed of config.report.seeds (the data fixed, the initialisation and batches
varying) under workdir/seed_<s> (resumable), evaluates the trained network and the same network before
training on the held-out clips (middle frame of each), and checks in kind what AV-Net is for: the map
localises the sounding object (pointing above chance, map higher inside than outside the object),
prefers the sounding object to the silent distractor, matched pairs are told from mismatched ones, and
the audio and visual pseudo-class heads agree. Example maps of the first seed go to report.png.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jax
import numpy as np

from jaxlab import report as R
from jaxlab.methods.av_net.task import attention_map

METRICS = (
    ("match_accuracy", "matched vs mismatched acc"),
    ("pointing", "pointing"),
    ("pointing_chance", "pointing chance"),
    ("map_inside", "map inside object"),
    ("map_outside", "map outside object"),
    ("map_contrast", "inside - outside"),
    ("sounding_over_distractor", "sounding > silent object"),
    ("class_agreement", "y_A / y_V agreement"),
)


def seed_config(config, seed: int):
    """A copy of config with the run seed `seed` (initialisation, batch order, K-means); data unchanged."""
    c = copy.deepcopy(config)
    c.seed = int(seed)
    return c


def example_maps(config, state, count: int) -> dict[str, np.ndarray]:
    """The first `count` held-out clips' middle frames, sounding-object masks and AV maps (B, h, w)."""
    from jaxlab.methods.av_net import audio_input, build, front_end, model_from_config

    method = build(config)
    rows = method.eval_source.get(np.arange(min(count, len(method.eval_source))))
    middle = rows["frames"].shape[1] // 2
    frames, audio = rows["frames"][:, middle], rows["audio"][:, middle]
    part = state.parts["av_net"]
    model, params = model_from_config(config), front_end(config)
    maps = jax.jit(lambda p, c, a, f: attention_map(p, c, audio_input(a, params), f, model=model))(
        part.params, part.collections, audio, frames)
    return {"frames": frames, "object_mask": rows["object_mask"][:, middle], "maps": np.asarray(maps),
            "label": rows["label"]}


def findings(rows: list[dict], num_classes: int) -> list[R.Finding]:
    """The checks of the module docstring, each required on every seed."""
    def every(test):
        return all(test(r["trained"]) for r in rows)

    def values(metric):
        return R.mean_std([r["trained"][metric] for r in rows], digits=3)

    return [
        R.Finding("the AV map points at the sounding object (above chance)",
                  f"pointing {values('pointing')} vs chance {values('pointing_chance')}",
                  every(lambda m: m["pointing"] > m["pointing_chance"])),
        R.Finding("the map is higher on the sounding object than off it",
                  f"inside - outside {values('map_contrast')}", every(lambda m: m["map_contrast"] > 0)),
        R.Finding("the map prefers the sounding object to a silent one",
                  f"rate {values('sounding_over_distractor')} (0.5 = no preference)",
                  every(lambda m: m["sounding_over_distractor"] > 0.5)),
        R.Finding("matched audio-frame pairs are told from mismatched ones",
                  f"accuracy {values('match_accuracy')} (0.5 = chance)",
                  every(lambda m: m["match_accuracy"] > 0.6)),
        R.Finding("the audio and visual pseudo-class heads agree",
                  f"agreement {values('class_agreement')} (chance ~ {1 / num_classes:.2f})",
                  every(lambda m: m["class_agreement"] > 2 / num_classes)),
    ]


def report(config, workdir: str | Path) -> dict:
    """Trains and evaluates each seed, writes report.md / report.json / report.png (module docstring)."""
    from jaxlab import methods
    from jaxlab.train.loop import evaluate_state, restore_for_eval, train

    workdir = Path(workdir)
    rows, examples = [], None
    for seed in config.report.seeds:
        c = seed_config(config, seed)
        method = methods.build(c)
        run_dir = workdir / f"seed_{seed}"
        train(c, run_dir, method)
        run, state = restore_for_eval(c, run_dir, method)
        rows.append({"seed": int(seed), "trained": evaluate_state(run, state),
                     "untrained": evaluate_state(run, run.state, 0)})
        if examples is None:
            examples = example_maps(c, state, int(config.report.examples))
    result = {"rows": rows, "findings": findings(rows, int(config.model.num_classes)),
              "seeds": [int(s) for s in config.report.seeds]}
    R.write_report(workdir, result, format_report(result), lambda path: plot_examples(examples, path))
    return result


def format_report(result: dict) -> str:
    """Markdown: metrics (mean ± std over seeds) trained vs untrained, then the findings."""
    rows = result["rows"]
    table = R.markdown_table(
        ["metric (held-out clips)", "trained", "untrained"],
        [[label, R.mean_std([r["trained"][k] for r in rows], digits=3),
          R.mean_std([r["untrained"][k] for r in rows], digits=3)] for k, label in METRICS])
    return (f"AV-Net localisation, seeds {result['seeds']}\n\n{table}\n\n"
            f"{R.findings_table(result['findings'])}\n")


def plot_examples(examples: dict[str, np.ndarray], path: Path) -> None:
    """Two rows: frames with the sounding object's outline; the AV maps upsampled over the frames."""
    plt = R.pyplot()
    n = len(examples["frames"])
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.6), squeeze=False)
    size = examples["frames"].shape[1]
    for i in range(n):
        frame, mask, amap = examples["frames"][i], examples["object_mask"][i], examples["maps"][i]
        axes[0, i].imshow(frame)
        axes[0, i].contour(mask, levels=[0.5], colors="w", linewidths=1)
        axes[0, i].set_title(f"class {int(examples['label'][i])}", fontsize=8)
        axes[1, i].imshow(frame)
        axes[1, i].imshow(amap, cmap="jet", alpha=0.5, vmin=0, vmax=1, extent=(0, size, size, 0),
                          interpolation="bilinear")
        axes[1, i].contour(mask, levels=[0.5], colors="w", linewidths=1)
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[1, 0].set_ylabel("AV map")
    R.save_figure(fig, path)
