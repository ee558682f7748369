"""The av_inpainting report: the paper's ablation (baseline, + AV attention loss, + AV pseudo-class loss,
both), with the control arm "+ audio only" (audio at the bottleneck, no AV loss), on stroke and object
masks, over seeds, with example frames.

`jaxlab report --config av_inpainting:tiny --workdir W`:
1. trains the AV-Net once (configs/av_net.py of the same variant, seed 0) in W/av_net, unless
   config.inpaint.av_net_workdir names a trained one;
2. for every mask kind in config.report.masks, arm and seed in config.report.seeds: trains the inpainting
   network on that kind of mask (the release trains one model per kind) in W/<kind>-<arm>-seed<s>, all
   arms from the same AV-Net;
3. measures every run on the first report.eval_clips test clips with the fixed evaluation masks (shipped
   as W/eval_masks.npz): PSNR (RGB), SSIM (grayscale, x100 as the paper), VFID (metrics.py: fixed random
   3D-conv features) and E_warp (x1000; TV-L1 flows and occlusion masks of the real clips, W/flows.npz);
4. writes report.md / report.json, report.png (PSNR per arm and mask kind) and examples.png (middle frames
   of the first clips: masked input, baseline, both AV losses, ground truth, for each mask kind).
Arms: baseline = STTN alone (no audio anywhere); audio = STTN with the AV-Net's audio feature at the
bottleneck and both AV loss weights 0 (separates the audio input from the losses); the AV arms (att, cls,
both) add the audio at the bottleneck (model.audio_bottleneck as configured) and their loss weights
(inpaint.av_att, inpaint.av_cls). Without model.audio_bottleneck (released=True) the audio arm is the
baseline and is not run.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from jaxlab.methods.av_inpainting import metrics as VM
from jaxlab.methods.av_inpainting.task import build, eval_masks, frame_scores, inpaint_all, make_inpainter, sources
from jaxlab.report import Finding, findings_table, markdown_table, mean_std, plot_bars, save_figure, subplots
from jaxlab.report import write_report

ARMS = ("baseline", "audio", "att", "cls", "both")
ARM_NAMES = {"baseline": "baseline (STTN)", "audio": "+ audio bottleneck, no AV losses",
             "att": "+ AV attention loss", "cls": "+ AV pseudo-class loss", "both": "+ both AV losses"}
KEYS = ("psnr", "ssim", "vfid", "e_warp")


def arm_config(config, arm: str, masks: str, seed: int, av_net_workdir: str):
    """The trainer config of one report run (module docstring)."""
    c = copy.deepcopy(config)
    c.seed = int(seed)
    att, cls = float(config.inpaint.av_att), float(config.inpaint.av_cls)
    c.inpaint.update(train_masks=masks, av_net_workdir=av_net_workdir,
                     av_att=att if arm in ("att", "both") else 0.0, av_cls=cls if arm in ("cls", "both") else 0.0)
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; arms: {ARMS}")
    if arm == "baseline":
        c.model.audio_bottleneck = False
    steps = int(c.train.steps)
    c.train.update(eval_every=steps, checkpoint_every=steps, best_metric="", progress=False)
    c.inpaint.eval_clips = min(int(c.inpaint.eval_clips), 4)  # the trainer's own eval: a glance only
    return c


def report_arms(config) -> tuple[str, ...]:
    """The arms the report runs: ARMS, less "audio" when the config has no audio bottleneck."""
    return tuple(a for a in ARMS if a != "audio" or bool(config.model.audio_bottleneck))


def train_av_net(config, workdir: Path) -> str:
    """The AV-Net's workdir: config.inpaint.av_net_workdir, else one trained here (av_net's config of
    the same variant, the data options of this config, report.av_net_steps when set)."""
    if config.inpaint.av_net_workdir:
        return str(config.inpaint.av_net_workdir)
    from jaxlab.config import load_config
    from jaxlab.methods.av_net import build as build_av_net
    from jaxlab.train.loop import train

    variant = "paper" if int(config.data.options.size) >= 224 else "tiny"
    c = load_config(f"av_net:{variant}")
    c.model = copy.deepcopy(config.av_net.model)
    c.audio = copy.deepcopy(config.av_net.audio)
    c.data.source = config.data.source
    c.train.progress = False
    if config.report.av_net_steps:
        scale = int(config.report.av_net_steps) / int(c.train.steps)
        for key in ("attention_steps", "round_steps", "lr_decay_step"):
            c.av_net[key] = max(1, int(round(int(c.av_net[key]) * scale)))
        c.train.steps = int(c.av_net.attention_steps) + int(c.av_net.rounds) * int(c.av_net.round_steps)
        c.train.update(eval_every=c.train.steps, checkpoint_every=c.train.steps)
    out = workdir / "av_net"
    train(c, out, build_av_net(c))
    return str(out)


def measure(config, state, arrays: dict, holes: np.ndarray, flows) -> tuple[dict, np.ndarray]:
    """({psnr, ssim (x100), vfid, e_warp (x1000)}, composites (N, T, H, W, 3)) of a trained state."""
    model = make_inpainter(config)
    videos = inpaint_all(model, state, arrays, holes, int(config.data.eval_batch_size))
    scores = frame_scores(videos, arrays["frames"])
    e_warp = np.mean([VM.warp_error(v, f, m) for v, f, m in zip(videos, *flows)])
    return ({"psnr": float(scores["psnr"].mean()), "ssim": 100 * float(scores["ssim"].mean()),
             "vfid": VM.vfid(videos, arrays["frames"]), "e_warp": 1000 * float(e_warp)}, videos)


def real_flows(arrays: dict, workdir: Path) -> tuple[np.ndarray, np.ndarray]:
    """TV-L1 flows and non-occlusion masks of every real eval clip, cached in workdir/flows.npz."""
    path = workdir / "flows.npz"
    if path.exists():
        saved = np.load(path)
        if saved["flows"].shape[0] == len(arrays["frames"]):
            return saved["flows"], saved["masks"]
    pairs = [VM.flows_and_occlusion(v) for v in arrays["frames"]]
    flows, masks = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    np.savez_compressed(path, flows=flows, masks=masks)
    return flows, masks


def summarise(rows: list[dict]) -> dict:
    """{kind: {arm: {"by_seed": [metrics], "mean": {...}, "std": {...}}}}."""
    out: dict = {}
    for r in rows:
        out.setdefault(r["masks"], {}).setdefault(r["arm"], {"by_seed": []})["by_seed"].append(r["metrics"])
    for arms in out.values():
        for s in arms.values():
            s["mean"] = {k: float(np.mean([m[k] for m in s["by_seed"]])) for k in KEYS}
            s["std"] = {k: float(np.std([m[k] for m in s["by_seed"]])) for k in KEYS}
    return out


def check_findings(summary: dict) -> list[Finding]:
    """The paper's claim in kind: both AV losses beat the baseline (PSNR, SSIM up, VFID down), most on
    object masks; and, where the audio arm ran, that the gain is the losses' (both beats the audio arm on
    PSNR and SSIM); means over seeds, with the per-seed wins in the detail."""
    out = []
    gains = {}
    for kind, arms in summary.items():
        if "both" not in arms or "baseline" not in arms:
            continue
        b, a = arms["both"], arms["baseline"]
        wins = sum(x["psnr"] > y["psnr"] for x, y in zip(b["by_seed"], a["by_seed"]))
        gains[kind] = b["mean"]["psnr"] - a["mean"]["psnr"]
        better = (b["mean"]["psnr"] > a["mean"]["psnr"], b["mean"]["ssim"] > a["mean"]["ssim"],
                  b["mean"]["vfid"] < a["mean"]["vfid"])
        detail = (f"PSNR {b['mean']['psnr']:.2f} vs {a['mean']['psnr']:.2f} (higher in {wins} of "
                  f"{len(b['by_seed'])} seeds), SSIM {b['mean']['ssim']:.2f} vs {a['mean']['ssim']:.2f}, VFID "
                  f"{b['mean']['vfid']:.4f} vs {a['mean']['vfid']:.4f}")
        out.append(Finding(f"both AV losses beat the baseline on {kind} masks (PSNR, SSIM and VFID)", detail,
                           all(better)))
        if "audio" in arms:
            u = arms["audio"]
            wins = sum(x["psnr"] > y["psnr"] for x, y in zip(b["by_seed"], u["by_seed"]))
            out.append(Finding(
                f"on {kind} masks the gain is the AV losses', not the audio input: both beat + audio only "
                f"(PSNR and SSIM)",
                f"PSNR {b['mean']['psnr']:.2f} vs {u['mean']['psnr']:.2f} (higher in {wins} of {len(b['by_seed'])} "
                f"seeds; baseline {a['mean']['psnr']:.2f}), SSIM {b['mean']['ssim']:.2f} vs {u['mean']['ssim']:.2f}",
                b["mean"]["psnr"] > u["mean"]["psnr"] and b["mean"]["ssim"] > u["mean"]["ssim"]))
    if "object" in gains and "stroke" in gains:
        out.append(Finding("the PSNR gain is larger on object masks than on stroke masks",
                           f"object {gains['object']:+.2f} dB, stroke {gains['stroke']:+.2f} dB",
                           gains["object"] > gains["stroke"]))
    return out


def format_report(result: dict) -> str:
    s, c = result["summary"], result["config"]
    header = ["masks", "arm", "PSNR (dB)", "SSIM (x100)", "VFID", "E_warp (x1000)"]
    rows = []
    for kind, arms in s.items():
        for arm, r in arms.items():
            seeds = r["by_seed"]
            rows.append([kind, ARM_NAMES[arm], mean_std([x["psnr"] for x in seeds]),
                         mean_std([x["ssim"] for x in seeds]), mean_std([x["vfid"] for x in seeds], digits=4),
                         mean_std([x["e_warp"] for x in seeds], digits=3)])
    lines = [
        "# Audio-visual guided video inpainting: the AV losses' ablation", "",
        f"Data `{c['source']}` ({c['eval_clips']} test clips of {c['frames']} frames at {c['size']}x{c['size']}; "
        f"hole fraction: stroke {c['hole_stroke']:.3f}, object {c['hole_object']:.3f}); STTN channels "
        f"{c['channels']}, {c['num_blocks']} blocks; {c['steps']} steps of batch {c['batch_size']} per run, one "
        f"model per mask kind and arm; weights l1 {c['l1']}, adv {c['adv']}, av_att {c['av_att']}, av_cls "
        f"{c['av_cls']}; seeds {c['seeds']} (mean ± std); AV-Net `{c['av_net']}`.", "",
        markdown_table(header, rows), "",
        "VFID: Fréchet distance of fixed random 3D-conv features (not the paper's I3D; comparable only within "
        "this table). E_warp: flow warping error with TV-L1 flows of the real clips. Evaluation masks: "
        "eval_masks.npz.", "",
        findings_table(result["findings"]), "",
    ]
    return "\n".join(lines)


def plot_psnr(summary: dict, path: Path) -> None:
    fig, axes = subplots(len(summary))
    for ax, (kind, arms) in zip(axes, summary.items()):
        plot_bars(ax, [ARM_NAMES[a] for a in arms], [r["mean"]["psnr"] for r in arms.values()],
                  title=f"PSNR (dB), {kind} masks")
        values = [r["mean"]["psnr"] for r in arms.values()]
        ax.set_ylim(min(values) - 0.5, max(values) + 0.5)
    save_figure(fig, path)


def plot_examples(arrays: dict, holes: dict, videos: dict, count: int, path: Path) -> None:
    """Middle frames of the first `count` clips: per mask kind, input with the hole grey, baseline, both,
    ground truth. videos[(kind, arm)] (N, T, H, W, 3)."""
    kinds = [k for k in holes if (k, "baseline") in videos and (k, "both") in videos]
    columns = ["masked input", "baseline", "+ both AV losses", "ground truth"]
    plt_fig, axes = subplots(len(columns) * len(kinds), panel_size=(1.8, 1.8 * count))
    mid = arrays["frames"].shape[1] // 2
    for k, kind in enumerate(kinds):
        hole = holes[kind][:count, mid]
        truth = arrays["frames"][:count, mid]
        panels = [truth * (1 - hole) + 0.5 * hole, videos[(kind, "baseline")][:count, mid],
                  videos[(kind, "both")][:count, mid], truth]
        for j, (name, images) in enumerate(zip(columns, panels)):
            ax = axes[k * len(columns) + j]
            ax.imshow(np.clip(np.concatenate(list(images), 0), 0, 1))
            ax.set_title(f"{kind}: {name}", fontsize=7)
            ax.axis("off")
    save_figure(plt_fig, path)


def report(config, workdir) -> dict:
    """Runs the ablation (module docstring); returns the result written to report.json."""
    from jaxlab.train.loop import restore_for_eval, train

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    av_dir = train_av_net(config, workdir)
    _, eval_source = sources(config)
    arrays = eval_source.get(np.arange(min(len(eval_source), int(config.report.eval_clips))))
    holes = eval_masks(config, arrays)
    np.savez_compressed(workdir / "eval_masks.npz", **{k: v[..., 0].astype(np.uint8) for k, v in holes.items()})
    flows = real_flows(arrays, workdir)
    rows, videos = [], {}
    for kind in config.report.masks:
        for arm in report_arms(config):
            for seed in config.report.seeds:
                c = arm_config(config, arm, kind, seed, av_dir)
                run_dir = workdir / f"{kind}-{arm}-seed{seed}"
                method = build(c)
                train(c, run_dir, method)
                _, state = restore_for_eval(c, run_dir, method)
                metrics, out = measure(c, state, arrays, holes[kind], flows)
                rows.append({"masks": kind, "arm": arm, "seed": int(seed), "metrics": metrics})
                if seed == config.report.seeds[0]:
                    videos[(kind, arm)] = out
    summary = summarise(rows)
    o = config.data.options
    result = {
        "config": {"source": config.data.source, "eval_clips": len(arrays["frames"]), "frames": int(o.num_frames),
                   "size": int(o.size), "channels": list(config.model.channels),
                   "num_blocks": int(config.model.num_blocks), "steps": int(config.train.steps),
                   "batch_size": int(config.data.batch_size), "seeds": list(config.report.seeds),
                   **{k: float(config.inpaint[k]) for k in ("l1", "adv", "av_att", "av_cls")}, "av_net": av_dir,
                   **{f"hole_{k}": float(v.mean()) for k, v in holes.items()}},
        "runs": rows, "summary": summary, "findings": check_findings(summary),
    }
    markdown = format_report(result)
    paths = write_report(workdir, result, markdown, lambda p: plot_psnr(summary, p))
    if any((k, "baseline") in videos and (k, "both") in videos for k in holes):
        plot_examples(arrays, holes, videos, int(config.report.examples), workdir / "examples.png")
        paths["examples"] = workdir / "examples.png"
    return result
