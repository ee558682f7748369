"""SwinDRNet as a method: one short trainer run that beats the raw depth on specular / transparent pixels,
the data sources on tiny data the tests write, and `jaxlab convert --kind swin` into either stream."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.config import load_config
from jaxlab.data.sources import get_source
from jaxlab.methods import swindrnet
from jaxlab.data.rgbd import FEATURES

TINY = ["model.embed_dim=8", "model.depths=(2,)", "model.num_heads=(1,)", "model.window=4",
        "model.head_channels=16", "model.pool_scales=(1,2)", "data.options.size=32", "data.options.n_train=64",
        "data.options.n_test=16", "data.batch_size=8", "data.eval_batch_size=16", "optimizer.lr=3e-3",
        "optimizer.warmup_steps=5", "train.steps=40", "train.eval_every=40", "train.checkpoint_every=40",
        "train.progress=False", "swindrnet.augment=0.0", "mesh.data=1"]


def test_a_short_run_restores_depth_better_than_the_raw_sensor(tmp_path):
    from jaxlab.train.loop import train

    config = load_config("swindrnet:tiny", TINY)
    summary = train(config, tmp_path / "run", swindrnet.build(config))
    restored, raw = summary["eval_ts/rmse"], summary["eval_raw/ts/rmse"]
    assert restored < 0.7 * raw, (restored, raw)
    assert summary["eval_object/rmse"] < summary["eval_raw/object/rmse"]
    assert np.isfinite(summary["eval_all/d125"]) and 0 <= summary["eval_all/d125"] <= 1


def test_synthetic_and_stereo_sources_serve_the_features():
    train = get_source("synthetic:dreds", "train", seed=0, features=FEATURES, n_train=3, size=(16, 24))
    test = get_source("synthetic:dreds", "test", seed=0, n_test=2, size=16)
    rows = train.get(np.arange(3))
    assert rows["rgb"].shape == (3, 16, 24, 3) and rows["material"].dtype == np.uint8
    assert not np.array_equal(test.get(np.arange(1))["depth"], get_source(
        "synthetic:dreds", "test", seed=0, n_test=2, size=(16, 24)).get(np.arange(1))["depth"][:, :, :16])
    stereo = get_source("shipped:stereo_rgbd", "test", features=FEATURES, size=24).get(np.arange(1))
    depth = stereo["depth"][0]
    valid = depth > 0
    assert valid.mean() > 0.8 and 1.0 < np.median(depth[valid]) < 5.0  # metres: the motorcycle ~2-3 m
    assert np.all(stereo["raw_depth"][0][~valid] == 0)


def test_dreds_folder_source_reads_written_frames(tmp_path):
    import imageio.v3 as iio

    scene = tmp_path / "test" / "00001"
    scene.mkdir(parents=True)
    rng = np.random.default_rng(0)
    gt = rng.uniform(0.5, 1.0, (6, 8)).astype(np.float32)
    for i in range(2):
        iio.imwrite(scene / f"000{i}_color.png", rng.integers(0, 255, (6, 8, 3), dtype=np.uint8))
        np.save(scene / f"000{i}_simDepthImage.npy", gt * 1.1)
        iio.imwrite(scene / f"000{i}_depth_120.png", np.round(gt * 1000).astype(np.uint16))  # millimetres
        mask = np.zeros((6, 8), np.uint8)
        mask[1:3, 1:4], mask[4:, 5:] = 7, 9
        iio.imwrite(scene / f"000{i}_mask.png", mask)
        (scene / f"000{i}_meta.txt").write_text("7 1 2\n9 4 3\n")  # index label material (DREDS: 2 transp.)
    source = get_source(f"dreds:{tmp_path}", "test", features=FEATURES, size=(6, 8))
    rows = source.get(np.arange(2))
    assert len(source) == 2 and rows["rgb"].shape == (2, 6, 8, 3)
    np.testing.assert_allclose(rows["depth"][0], np.round(gt * 1000) / 1000, atol=1e-6)
    np.testing.assert_allclose(rows["raw_depth"][1], gt * 1.1, rtol=1e-6)
    assert (rows["material"][0][1:3, 1:4] == 3).all() and (rows["material"][0][4:, 5:] == 2).all()
    assert (rows["material"][0][0] == 0).all()
    np.testing.assert_allclose(rows["intrinsics"][0], [446.31 * 8 / 640, 446.31 * 6 / 360, 3.5, 2.5], rtol=1e-6)
    with pytest.raises(Exception, match="no folder"):
        get_source(f"dreds:{tmp_path / 'nowhere'}", "test")


def test_nyu_depth_v2_through_the_tfds_data_source():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE):
        source = get_source("rgbd_tfds:nyu_depth_v2", "train", features=FEATURES, size=16, data_dir="/nonexistent")
        rows = source.get(np.arange(2))
    assert rows["rgb"].shape == (2, 16, 16, 3) and rows["depth"].shape == (2, 16, 16)
    holes = (rows["raw_depth"] == 0) & (rows["depth"] > 0)
    assert 0.02 < holes.mean() < 0.3


def torch_swin_state_dict(embed, depths, heads, window, classes, rng):
    """A state dict shaped as microsoft/Swin-Transformer's (torch layouts, buffers included)."""
    sd = {"patch_embed.proj.weight": (embed, 3, 4, 4), "patch_embed.proj.bias": (embed,),
          "patch_embed.norm.weight": (embed,), "patch_embed.norm.bias": (embed,)}
    for i, (depth, h) in enumerate(zip(depths, heads)):
        c = embed * 2**i
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            sd.update({p + "norm1.weight": (c,), p + "norm1.bias": (c,), p + "attn.qkv.weight": (3 * c, c),
                       p + "attn.qkv.bias": (3 * c,), p + "attn.relative_position_bias_table": ((2 * window - 1) ** 2, h),
                       p + "attn.relative_position_index": (window**2, window**2), p + "attn.proj.weight": (c, c),
                       p + "attn.proj.bias": (c,), p + "norm2.weight": (c,), p + "norm2.bias": (c,),
                       p + "mlp.fc1.weight": (4 * c, c), p + "mlp.fc1.bias": (4 * c,),
                       p + "mlp.fc2.weight": (c, 4 * c), p + "mlp.fc2.bias": (c,)})
            if j % 2:
                sd[p + "attn_mask"] = (4, window**2, window**2)
        if i < len(depths) - 1:
            sd.update({f"layers.{i}.downsample.reduction.weight": (2 * c, 4 * c),
                       f"layers.{i}.downsample.norm.weight": (4 * c,), f"layers.{i}.downsample.norm.bias": (4 * c,)})
    last = embed * 2 ** (len(depths) - 1)
    sd.update({"norm.weight": (last,), "norm.bias": (last,), "head.weight": (classes, last), "head.bias": (classes,)})
    return {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in sd.items()}


def test_convert_swin_checkpoint_into_either_stream(tmp_path):
    from jaxlab.cli import main
    from jaxlab.methods.swindrnet.model import SwinDRNet
    from jaxlab.methods.swindrnet.task import load_pretrained

    sd = torch_swin_state_dict(8, (2, 2), (1, 2), 2, 5, np.random.default_rng(0))
    np.savez(tmp_path / "sd.npz", **sd)
    assert main(["convert", "--kind", "swin", str(tmp_path / "sd.npz"), str(tmp_path / "swin.npz")]) == 0
    net = SwinDRNet(embed_dim=8, depths=(2, 2), num_heads=(1, 2), window=2, head_channels=8, pool_scales=(1,))
    rgb, raw = jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 16, 16))
    shapes = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), rgb, raw))  # no compile: shapes only
    variables = jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.5, s.dtype), shapes)
    params = load_pretrained(variables["params"], str(tmp_path / "swin.npz"), streams=("backbone_xyz_branch",))
    depth_stream, rgb_stream = params["backbone_xyz_branch"], params["backbone_rgb_branch"]
    np.testing.assert_array_equal(depth_stream["layers_1"]["blocks_1"]["attn"]["qkv"]["kernel"],
                                  sd["layers.1.blocks.1.attn.qkv.weight"].T)
    np.testing.assert_array_equal(depth_stream["layers_0"]["downsample"]["reduction"]["kernel"],
                                  sd["layers.0.downsample.reduction.weight"].T)
    np.testing.assert_array_equal(depth_stream["layers_0"]["blocks_0"]["norm1"]["scale"],
                                  sd["layers.0.blocks.0.norm1.weight"])
    np.testing.assert_array_equal(depth_stream["layers_0"]["blocks_0"]["attn"]["relative_position_bias_table"],
                                  sd["layers.0.blocks.0.attn.relative_position_bias_table"])
    # the patch embedding computes torch's Conv2d(stride 4) on a random image
    image = np.random.default_rng(1).normal(size=(1, 8, 8, 3)).astype(np.float32)
    kernel, bias = depth_stream["patch_embed"]["proj"]["kernel"], depth_stream["patch_embed"]["proj"]["bias"]
    got = jax.lax.conv_general_dilated(image, kernel, (4, 4), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    patches = image.reshape(1, 2, 4, 2, 4, 3).transpose(0, 1, 3, 5, 2, 4)  # B, y, x, C, ky, kx
    want = np.einsum("byxcij,dcij->byxd", patches, sd["patch_embed.proj.weight"]) + sd["patch_embed.proj.bias"]
    np.testing.assert_allclose(np.asarray(got) + bias, want, rtol=1e-5, atol=1e-5)
    # the other stream and the stage norms (not in an ImageNet checkpoint) are untouched
    assert (np.asarray(rgb_stream["patch_embed"]["proj"]["kernel"]) == 0.5).all()
    assert (np.asarray(depth_stream["norm1"]["scale"]) == 0.5).all()
    with pytest.raises(ValueError, match="not Swin backbone keys"):
        from jaxlab.methods.swindrnet.convert import convert_state_dict

        convert_state_dict({"decode_head.conv_seg.weight": np.zeros((1, 2, 1, 1))})


def test_report_tables_and_findings_from_a_result():
    from jaxlab.methods.swindrnet.metrics import METRICS, REGIONS
    from jaxlab.methods.swindrnet.report import check_findings, format_report, per_frame_rmse

    metrics = {f"{p}{r}/{k}": 0.5 if p == "raw/" else 0.1 for p in ("", "raw/", "initial/") for r in REGIONS
               for k in METRICS}
    metrics["object/rmse"] = 0.7  # worse than raw there: that finding must fail
    findings = check_findings(metrics)
    assert [f.holds for f in findings] == [True, False]
    gt = np.ones((2, 2, 2), np.float32)
    frames = {"depth": gt, "raw_depth": gt * np.array([0.0, 1.0])[None, None], "material": np.zeros((2, 2, 2), np.int32)}
    frames["material"][0, 0, 0] = 3
    rows = per_frame_rmse(frames, {"depth": gt * 1.1})
    assert rows[1]["ts"] is None and rows[0]["ts"] == pytest.approx((1.0, 0.1))
    result = {"config_name": "x", "test_frames": 2, "steps": 1, "batch_size": 2, "train_wall_s": 1.0,
              "wall_s": 2.0, "fusion": "paper", "metrics": metrics, "findings": findings, "per_frame": rows,
              "real": {"raw": {"all/rmse": 0.01}, "restored": {"all/rmse": 0.02}}}
    text = format_report(result)
    assert "| ts | restored | 0.1 |" in text and "| NO |" in text and "1.0000 -> 0.1000" in text
