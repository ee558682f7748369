"""MAR as a method: PyTorch-named weights through the converter and init_from, the video sources,
the optimizer groups, the pre-training -> fine-tuning hand-over, and one short tiny run that learns."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from jaxlab.config import load_config
from jaxlab.methods import mar
from jaxlab.data import video as mar_data
from jaxlab.cli import main as cli_main
from jaxlab.methods.mar.convert import convert_state_dict
from jaxlab.methods.mar.task import MARTask
from jaxlab.models.vit_video import MARModelConfig, VideoGeometry, init_modules
from jaxlab.train.init_from import load_parts, read_arrays
from jaxlab.train.optim import lr_rules_of, part_config
from jaxlab.train.state import Part, State

GEOM = VideoGeometry(num_frames=4, image_size=8, patch_size=4, tubelet_size=2, channels=3)  # 2x2x2 tokens
D, DD, DC, CLASSES = 8, 4, 8, 3


# ---------------------------------------------------------------- a PyTorch-named state dict, by hand


def torch_block(sd, prefix, dim, rng, qv=True, mar_layer=False):
    """VideoMAE Block (qv) or MAR BaseTransformerLayer (mar_layer) parameters with torch names."""
    n = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.3  # noqa: E731
    norm1, norm2 = ("norm", "norm_ffn") if mar_layer else ("norm1", "norm2")
    qkv = "to_qkv" if mar_layer else "qkv"
    fc1, fc2 = ("ffn.net.0", "ffn.net.3") if mar_layer else ("mlp.fc1", "mlp.fc2")
    sd.update({f"{prefix}{norm1}.weight": 1 + n(dim), f"{prefix}{norm1}.bias": n(dim),
               f"{prefix}attn.{qkv}.weight": n(3 * dim, dim), f"{prefix}attn.proj.weight": n(dim, dim),
               f"{prefix}attn.proj.bias": n(dim), f"{prefix}{norm2}.weight": 1 + n(dim), f"{prefix}{norm2}.bias": n(dim),
               f"{prefix}{fc1}.weight": n(4 * dim, dim), f"{prefix}{fc1}.bias": n(4 * dim),
               f"{prefix}{fc2}.weight": n(dim, 4 * dim), f"{prefix}{fc2}.bias": n(dim)})
    if mar_layer:
        sd[f"{prefix}attn.to_qkv.bias"] = n(3 * dim)
    elif qv:
        sd[f"{prefix}attn.q_bias"], sd[f"{prefix}attn.v_bias"] = n(dim), n(dim)


def mar_state_dict(seed=0):
    rng = np.random.default_rng(seed)
    n = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.3  # noqa: E731
    sd = {"backbone.patch_embed.proj.weight": n(D, 3, 2, 4, 4), "backbone.patch_embed.proj.bias": n(D),
          "backbone.norm.weight": 1 + n(D), "backbone.norm.bias": n(D),
          "encoder_to_decoder.weight": n(DD, D), "mask_token": n(1, 1, DD),
          "decoder.norm.weight": 1 + n(DD), "decoder.norm.bias": n(DD),
          "decoder.head.weight": n(GEOM.patch_dim, DD), "decoder.head.bias": n(GEOM.patch_dim),
          "encoder_to_cls_decoder.weight": n(DC, D), "cls_head.norm.weight": 1 + n(DC), "cls_head.norm.bias": n(DC),
          "cls_head.head.weight": n(CLASSES, DC), "cls_head.head.bias": n(CLASSES),
          "cls_head.mask_token": n(1, 1, DC), "pos_embed": n(1, 8, DD), "mean": n(1, 3, 1, 1, 1)}
    torch_block(sd, "backbone.blocks.0.", D, rng)
    torch_block(sd, "decoder.blocks.0.", DD, rng)
    torch_block(sd, "cls_head.blocks.0.", DC, rng, mar_layer=True)
    return sd


def np_ln(x, sd, p):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-6) * sd[p + ".weight"] + sd[p + ".bias"]


def np_torch_block(x, sd, p, heads, mar_layer=False):
    d = x.shape[-1]
    qkv_w = sd[p + ("attn.to_qkv.weight" if mar_layer else "attn.qkv.weight")]
    bias = sd[p + "attn.to_qkv.bias"] if mar_layer else np.concatenate([sd[p + "attn.q_bias"], np.zeros(d), sd[p + "attn.v_bias"]])
    h = np_ln(x, sd, p + ("norm" if mar_layer else "norm1"))
    qkv = (h @ qkv_w.T + bias).reshape(*x.shape[:2], 3, heads, d // heads).transpose(2, 0, 3, 1, 4)
    att = scipy.special.softmax(qkv[0] @ qkv[1].transpose(0, 1, 3, 2) / math.sqrt(d // heads), axis=-1)
    o = (att @ qkv[2]).transpose(0, 2, 1, 3).reshape(x.shape)
    x = x + o @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
    h = np_ln(x, sd, p + ("norm_ffn" if mar_layer else "norm2"))
    fc1, fc2 = ("ffn.net.0", "ffn.net.3") if mar_layer else ("mlp.fc1", "mlp.fc2")
    h = h @ sd[p + fc1 + ".weight"].T + sd[p + fc1 + ".bias"]
    h = 0.5 * h * (1 + scipy.special.erf(h / math.sqrt(2)))
    return x + h @ sd[p + fc2 + ".weight"].T + sd[p + fc2 + ".bias"]


def test_converted_pytorch_weights_load_and_match_a_forward_built_by_hand(tmp_path):
    sd = mar_state_dict()
    np.savez(tmp_path / "sd.npz", **sd)
    assert cli_main(["convert", str(tmp_path / "sd.npz"), str(tmp_path / "w.npz")]) == 0  # `jaxlab convert`
    config = MARModelConfig(geometry=GEOM, dim=D, depth=1, heads=2, drop_path=0.0, decoder_dim=DD, decoder_depth=1,
                            decoder_heads=2, cls_dim=DC, cls_depth=1, cls_heads=2, num_classes=CLASSES,
                            implementation="xla")
    shapes = jax.eval_shape(lambda: init_modules(config, jax.random.PRNGKey(0), 8))
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    state = State.create({p: Part.frozen(v) for p, v in zeros.items()})
    state = load_parts(state, read_arrays(str(tmp_path / "w.npz")), source="w.npz")
    video = np.random.default_rng(1).standard_normal((2, 4, 8, 8, 3)).astype(np.float32)
    visible = jnp.broadcast_to(jnp.arange(8), (2, 8))
    encoded = config.encoder().apply({"params": state.parts["encoder"].params}, video, visible)
    logits = config.classifier().apply({"params": state.parts["classifier"].params}, encoded)
    # the same forward from the PyTorch arrays, by hand
    w = sd["backbone.patch_embed.proj.weight"]
    tokens = np.stack([np.einsum("bthwc,dcthw->bd", video[:, 2 * t:2 * t + 2, 4 * i:4 * i + 4, 4 * j:4 * j + 4], w)
                       for t in range(2) for i in range(2) for j in range(2)], 1) + sd["backbone.patch_embed.proj.bias"]
    pos = np.array([[p / 10000 ** (2 * (k // 2) / D) for k in range(D)] for p in range(8)])
    pos[:, 0::2], pos[:, 1::2] = np.sin(pos[:, 0::2]), np.cos(pos[:, 1::2])
    x = np_ln(np_torch_block(tokens + pos, sd, "backbone.blocks.0.", 2), sd, "backbone.norm")
    np.testing.assert_allclose(np.asarray(encoded), x, atol=2e-4)
    h = np_torch_block(x @ sd["encoder_to_cls_decoder.weight"].T, sd, "cls_head.blocks.0.", 2, mar_layer=True)
    ref = np_ln(h.mean(1), sd, "cls_head.norm") @ sd["cls_head.head.weight"].T + sd["cls_head.head.bias"]
    np.testing.assert_allclose(np.asarray(logits), ref, atol=2e-4)
    dec = np.asarray(state.parts["decoder"].params["encoder_to_decoder"]["kernel"])
    np.testing.assert_array_equal(dec, sd["encoder_to_decoder.weight"].T)


def test_converter_names_keys_it_cannot_place():
    with pytest.raises(ValueError, match="fc_norm.weight"):
        convert_state_dict({"encoder.fc_norm.weight": np.ones(3), "backbone.norm.weight": np.ones(3)})


# ---------------------------------------------------------------- data


def test_video_folder_and_npz_clips_read_sampled_and_resized(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(2):
        clip = tmp_path / f"clip{c}"
        clip.mkdir()
        for f in range(6):
            Image.fromarray(np.full((12, 10, 3), 40 * f + c, np.uint8)).save(clip / f"{f:03d}.png")
    np.savez(tmp_path / "clip2.npz", frames=rng.uniform(0, 1, (5, 8, 8, 3)).astype(np.float32))
    (tmp_path / "train.csv").write_text("path,label\nclip0,1\nclip1,0\nclip2.npz,2\n")
    from jaxlab.data.sources import get_source

    src = get_source(f"video:{tmp_path}", "train", num_frames=3, size=4)
    batch = src.get(np.array([0, 2]))
    assert batch["video"].shape == (2, 3, 4, 4, 3) and batch["video"].dtype == np.uint8
    assert batch["label"].tolist() == [1, 2]
    assert batch["video"][0, :, 0, 0, 0].tolist() == [40, 120, 200]  # middle frames of 3 segments: 1, 3, 5
    np.testing.assert_array_equal(mar_data.sample_indices(10, 4, "interval", 2), [1, 3, 5, 7])
    with pytest.raises(FileNotFoundError, match="test.csv"):
        get_source(f"video:{tmp_path}", "test")


def test_skimage_gif_smoke_clip():
    clip = mar_data.skimage_gif("train", 0, num_frames=4, size=16)
    assert clip["video"].shape == (1, 4, 16, 16, 3) and clip["video"].std() > 0


def test_synthetic_actions_need_two_frames():
    from jaxlab.data.synthetic.actions import generate

    video, labels = generate(64, 4, 4, 16, seed=0)
    again, _ = generate(64, 4, 4, 16, seed=0)
    np.testing.assert_array_equal(video, again)
    assert np.bincount(labels).tolist() == [16] * 4
    # the first frame's mean colour does not tell left from right; the motion does
    first = video[:, 0].reshape(64, -1).mean(1)
    assert abs(first[labels == 0].mean() - first[labels == 1].mean()) < 10


# ---------------------------------------------------------------- optimizer groups and hand-over


def tiny(*overrides):
    return load_config("mar:tiny", ["data.options.train_clips=64", "data.options.test_clips=32", *overrides])


def test_layer_decay_on_the_encoder_only_and_the_official_groups():
    config = tiny()
    task = MARTask(config)
    params = jax.eval_shape(lambda: init_modules(task.model, jax.random.PRNGKey(0), 8))
    enc = lr_rules_of(part_config(config.optimizer, "encoder")).multipliers(params["encoder"])
    assert enc["blocks_3"]["mlp"]["fc1"]["kernel"] == pytest.approx(0.75)
    assert enc["blocks_0"]["attn"]["q_bias"] == pytest.approx(0.75 ** 4)
    assert enc["patch_embed"]["kernel"] == pytest.approx(0.75 ** 5) and enc["norm"]["scale"] == 1.0
    assert lr_rules_of(part_config(config.optimizer, "decoder")) is None
    from jaxlab.methods.mar.task import finetune_optimizer_config

    official = finetune_optimizer_config(tiny("mar.official_lr_groups=True"))
    enc = lr_rules_of(part_config(official, "encoder")).multipliers(params["encoder"])
    assert enc["blocks_0"]["attn"]["q_bias"] == 1.0 and enc["blocks_0"]["norm1"]["scale"] == 1.0
    assert enc["blocks_0"]["attn"]["qkv"]["kernel"] == pytest.approx(0.75 ** 4)


def test_finetune_stage_keeps_the_pretrained_weights_exactly(tmp_path):
    from jaxlab.train.init_from import flatten
    from jaxlab.train.loop import build_run, initial_state

    common = ("mesh.data=1", "data.batch_size=8", "data.eval_batch_size=32")
    config = tiny("train.steps=4", "mar.pretrain_steps=2", *common)
    run = build_run(config, mar.build(config))
    assert set(run.state.parts) == {"encoder", "decoder"}
    rng = np.random.default_rng(0)  # "pre-trained" weights: anything but the initial values
    state = run.state.replace(parts={n: p.replace(params=jax.tree_util.tree_map(
        lambda x: x + rng.standard_normal(x.shape).astype(np.float32), p.params)) for n, p in run.state.parts.items()})
    pre = {k: np.asarray(v) for k, v in flatten(state.params).items()}
    entered = run.enter(1, state)
    assert set(entered.parts) == {"encoder", "decoder", "classifier"}
    after = flatten(entered.params)
    for key, value in pre.items():
        np.testing.assert_array_equal(np.asarray(after[key]), value, err_msg=key)
    assert int(jax.tree_util.tree_leaves(entered.parts["encoder"].opt_state)[0]) == 0  # a fresh optimizer
    # two runs joined by init_from: the fine-tuning run starts from exactly those weights
    np.savez(tmp_path / "pre.npz", **{f"{n}/params/{k}": v for n, p in state.parts.items()
                                      for k, v in flatten(p.params).items()})
    ft_config = tiny("mar.stages=('finetune',)", f"train.init_from={tmp_path / 'pre.npz'}",
                     "train.init_parts=('encoder', 'decoder')", "train.steps=2", *common)
    loaded = flatten(initial_state(build_run(ft_config, mar.build(ft_config))).params)
    for key, value in pre.items():
        np.testing.assert_array_equal(np.asarray(loaded[key]), value, err_msg=key)


def test_short_tiny_run_learns_the_motion_task(tmp_path):
    """Pre-training then MAR fine-tuning of the tiny config through the trainer: the fine-tuning loss
    falls and held-out accuracy at the fixed 50% cell running mask is far above chance (25%)."""
    from jaxlab.train.loop import train
    from jaxlab.train.metrics import read_metrics

    config = load_config("mar:tiny", [
        "train.steps=250", "mar.pretrain_steps=10", "train.eval_every=1000", "train.log_every=25",
        "train.checkpoint_every=1000", "train.progress=False", "train.async_checkpoints=False", "mesh.data=1",
        "data.eval_batch_size=256"])
    summary = train(config, tmp_path, mar.build(config))
    ce = [r["ce"] for r in read_metrics(tmp_path) if r["split"] == "train" and "ce" in r]
    assert ce[-1] < 0.7 * ce[0], ce
    assert summary["eval_accuracy"] > 0.5, summary
    assert summary["eval_accuracy_all_tokens"] > 0.5, summary


def test_video_files_mp4_and_gif_are_decoded_and_sampled(tmp_path):
    """An .mp4 written with PyAV (lossless H.264 is not in every FFmpeg build: MPEG-4 part 2 at high
    quality, so values are compared within codec error) and a GIF, listed in the CSV like frame folders."""
    import av
    from PIL import Image

    levels = [20 * f + 30 for f in range(8)]  # frame f is flat grey at this level
    with av.open(str(tmp_path / "a.mp4"), "w") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        stream.options = {"qscale": "1"}
        for level in levels:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((16, 16, 3), level, np.uint8), format="rgb24")))
        out.mux(stream.encode())
    frames = [Image.fromarray(np.full((8, 8, 3), 50 * f, np.uint8)) for f in range(4)]
    frames[0].save(tmp_path / "b.gif", save_all=True, append_images=frames[1:], duration=40)
    (tmp_path / "train.csv").write_text("a.mp4,3\nb.gif,1\n")
    from jaxlab.data.sources import get_source

    src = get_source(f"video:{tmp_path}", "train", num_frames=4, size=8)
    batch = src.get(np.array([0, 1]))
    assert batch["video"].shape == (2, 4, 8, 8, 3) and batch["label"].tolist() == [3, 1]
    got = batch["video"][0].astype(float).mean(axis=(1, 2, 3))  # segments of 8 frames: middle frames 1, 3, 5, 7
    np.testing.assert_allclose(got, [levels[i] for i in (1, 3, 5, 7)], atol=4)
    assert batch["video"][1, :, 0, 0, 0].tolist() == [0, 50, 100, 150]
    with pytest.raises(FileNotFoundError, match="no video file"):
        mar_data.read_clip(tmp_path / "missing.mp4")
