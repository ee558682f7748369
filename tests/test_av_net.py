"""AV-Net (av_inpainting.md, part 1): the AV map, the parameter count, K-means and pseudo-classes, the
localisation metrics, the synthetic clips and the user AV folder source. Tiny shapes throughout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image
from scipy.io import wavfile

from jaxlab.audio import LogMelParams, audio_features
from jaxlab.config import ConfigError, load_config
from jaxlab.data.av_clips import PALETTE, class_pitch, synthetic_av_clips
from jaxlab.data.sources import DatasetNotFoundError, get_source
from jaxlab.methods.av_net import AVNet, build, reset_classifiers
from jaxlab.methods.av_net.task import (
    kmeans, localisation_values, nearest_centroid, pseudo_class_features,
)
from jaxlab.train.state import param_count

TINY = dict(widths=(4, 8, 8, 16), embed_dim=8, num_classes=3)


def dominant_hz(wave: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / sample_rate)[spectrum.argmax()])


# --- the network ----------------------------------------------------------------------------------------------


def test_av_map_shape_range_and_cosine():
    model = AVNet(**TINY)
    rng = np.random.default_rng(0)
    frames = jnp.asarray(rng.uniform(size=(3, 32, 32, 3)), jnp.float32)
    audio = audio_features(jnp.asarray(rng.standard_normal((3, 1600)), jnp.float32))  # 0.1 s -> (80, 21)

    @jax.jit
    def run(audio, frames):
        variables = model.init(jax.random.PRNGKey(0), audio, frames)
        return variables, model.apply(variables, audio, frames, method=AVNet.with_mismatched)

    variables, (out, mismatched) = run(audio, frames)
    m = np.asarray(out["attention_map"])
    assert m.shape == (3, 2, 2) and out["visual_features"].shape == (3, 2, 2, 16)  # 32 / 16, layer4 stride 1
    assert (m > 0).all() and (m < 1).all()
    assert float(variables["params"]["scale"]) == 5.0
    ev, ea = np.asarray(out["visual_embedding"], np.float64), np.asarray(out["audio_embedding"], np.float64)
    np.testing.assert_allclose(np.linalg.norm(ev, axis=-1), 1, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ea, axis=-1), 1, rtol=1e-5)
    expected = 1 / (1 + np.exp(-5 * np.einsum("bhwc,bc->bhw", ev, ea)))
    np.testing.assert_allclose(m, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out["score"]), m.reshape(3, -1).max(-1), rtol=1e-6)
    shifted = 1 / (1 + np.exp(-5 * np.einsum("bhwc,bc->bhw", ev, np.roll(ea, -1, axis=0))))  # frame i, audio i+1
    np.testing.assert_allclose(np.asarray(mismatched["attention_map"]), shifted, rtol=1e-4, atol=1e-6)
    assert out["audio_logits"].shape == out["visual_logits"].shape == (3, 3)


def resnet18_trunk_params(widths, in_channels):
    """Parameters of torchvision's ResNet-18 without avgpool / fc, counted from its definition."""
    conv = lambda k, cin, cout: k * k * cin * cout  # noqa: E731  (no bias: BN follows)
    bn = lambda c: 2 * c  # noqa: E731  (gamma, beta; running stats are not parameters)
    total = conv(7, in_channels, widths[0]) + bn(widths[0])
    cin = widths[0]
    for stage, cout in enumerate(widths):
        for block in range(2):
            total += conv(3, cin, cout) + bn(cout) + conv(3, cout, cout) + bn(cout)
            if block == 0 and (stage > 0 or cin != cout):  # stride 2 (or width change): 1x1 conv + BN shortcut
                total += conv(1, cin, cout) + bn(cout)
            cin = cout
    return total


def av_net_params(widths, embed, classes):
    c = widths[-1]
    heads = 2 * ((c * embed + embed) + (embed * embed + embed))  # visual 1x1 convs, audio FCs
    return (resnet18_trunk_params(widths, 3) + resnet18_trunk_params(widths, 1) + heads + 1  # + scale
            + 2 * (c * classes + classes))


@pytest.mark.parametrize("widths,embed,classes", [((64, 128, 256, 512), 128, 10), ((16, 32, 64, 128), 128, 4)])
def test_parameter_count_from_definition(widths, embed, classes):
    model = AVNet(widths=widths, embed_dim=embed, num_classes=classes)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 80, 201)), jnp.zeros((1, 224, 224, 3)))
    assert param_count(shapes["params"]) == av_net_params(widths, embed, classes)
    if widths[-1] == 512:
        assert resnet18_trunk_params(widths, 3) == 11_689_512 - 513_000  # torchvision resnet18 minus its fc
        assert av_net_params(widths, embed, classes) == 22_521_365  # the spec's "22.5M used weights"


# --- pseudo-classes -------------------------------------------------------------------------------------------


def test_kmeans_recovers_separable_clusters():
    rng = np.random.default_rng(1)
    means = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 5.0], [0.0, 12.0, -4.0], [-9.0, -9.0, 9.0]])
    truth = np.repeat(np.arange(4), [30, 10, 25, 15])
    points = means[truth] + rng.normal(0, 0.5, (len(truth), 3))
    centroids, assign = jax.jit(kmeans, static_argnums=(1, 3))(jnp.asarray(points), 4, jax.random.PRNGKey(3), 20)
    assign = np.asarray(assign)
    for c in range(4):  # one label per true cluster, distinct labels
        assert len(set(assign[truth == c])) == 1
    assert len(set(assign)) == 4
    for c in range(4):
        np.testing.assert_allclose(np.asarray(centroids)[assign[truth == c][0]], points[truth == c].mean(0), atol=1e-4)
    brute = np.argmin(((points[:, None] - np.asarray(centroids)[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(np.asarray(nearest_centroid(jnp.asarray(points, jnp.float32), centroids)), brute)


def test_pseudo_class_features_by_loops():
    rng = np.random.default_rng(2)
    att = rng.uniform(0, 0.15, (2, 3, 3)).astype(np.float32)
    feats = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
    expected = np.zeros((2, 4))
    for b in range(2):
        for i in range(3):
            for j in range(3):
                if att[b, i, j] > 0.07:
                    expected[b] += feats[b, i, j] / 9
    np.testing.assert_allclose(np.asarray(pseudo_class_features(att, feats, 0.07)), expected, rtol=1e-5, atol=1e-6)


def test_reset_classifiers_restarts_only_the_classifiers():
    model = AVNet(**TINY)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 80, 21)), jnp.zeros((1, 32, 32, 3)))
    params = jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, s.dtype), params["params"])
    tx = optax.adam(1e-3)
    opt_state = jax.tree_util.tree_map(lambda x: x + 7.0, tx.init(params))
    new_params, new_opt = jax.jit(lambda p, o, k: reset_classifiers(p, o, tx, k))(params, opt_state,
                                                                                  jax.random.PRNGKey(1))
    for name in ("classifier_a", "classifier_v"):
        kernel = np.asarray(new_params[name]["kernel"])
        assert 0.005 < kernel.std() < 0.02 and not np.asarray(new_params[name]["bias"]).any()
        assert not np.asarray(new_opt[0].mu[name]["kernel"]).any()
    np.testing.assert_array_equal(new_params["fc1_a"]["kernel"], params["fc1_a"]["kernel"])
    assert float(new_opt[0].mu["fc1_a"]["kernel"][0, 0]) == 7.0 and int(new_opt[0].count) == 7


# --- localisation metrics ---------------------------------------------------------------------------------------


def test_localisation_values_by_hand():
    maps = np.full((2, 2, 2), 0.1, np.float32)
    maps[0, 0, 0] = 0.9  # example 0 peaks on the top-left cell, where its object is
    maps[1, 1, 1] = 0.9  # example 1 peaks bottom-right, away from its object
    obj = np.zeros((2, 8, 8), np.float32)
    obj[:, :3, :3] = 1
    dis = np.zeros((2, 8, 8), np.float32)
    dis[0, 5:, 5:] = 1
    v = {k: np.asarray(x) for k, x in jax.jit(localisation_values)(maps, obj, dis).items()}
    full = np.asarray(jax.image.resize(jnp.asarray(maps), (2, 8, 8), "bilinear"))
    np.testing.assert_allclose(v["map_inside"], full[:, :3, :3].mean((1, 2)), rtol=1e-6)
    np.testing.assert_allclose(v["map_outside"], (full.sum((1, 2)) - full[:, :3, :3].sum((1, 2))) / 55, rtol=1e-6)
    np.testing.assert_array_equal(v["pointing"], [1, 0])
    np.testing.assert_allclose(v["pointing_chance"], [0.25, 0.25])  # the object lies in 1 of 4 cells
    np.testing.assert_array_equal(v["distractor_present"], [1, 0])
    np.testing.assert_array_equal(v["sounding_over_distractor"], [1, 0])


# --- data -----------------------------------------------------------------------------------------------------


def test_synthetic_clips_sounding_mask_and_pitch():
    opts = dict(num_clips=12, num_classes=4, num_frames=3, size=32, window_seconds=0.25, distractors=1)
    d = synthetic_av_clips("train", 0, **opts)
    assert d["frames"].shape == (12, 3, 32, 32, 3) and d["audio"].shape == (12, 3, 4000)
    assert d["frames"].min() >= 0 and d["frames"].max() <= 1
    np.testing.assert_array_equal(np.bincount(d["label"], minlength=4), [3, 3, 3, 3])
    for clip in range(12):
        label = d["label"][clip]
        for t in range(3):
            inside = d["object_mask"][clip, t] > 0
            assert inside.sum() > 10
            colour = d["frames"][clip, t][inside].mean(0)
            np.testing.assert_allclose(colour, PALETTE[label], atol=0.03)  # the silhouette is the object
            silent = d["distractor_mask"][clip, t] > 0
            assert not (silent & inside).any()
            if silent.sum() > 10:
                assert np.abs(d["frames"][clip, t][silent].mean(0) - PALETTE[label]).max() > 0.1
            assert abs(dominant_hz(d["audio"][clip, t], 16000) - class_pitch(label)) <= 8.0
        assert not np.array_equal(d["object_mask"][clip, 0], d["object_mask"][clip, 2])  # it moves
    again = synthetic_av_clips("train", 0, **opts)
    np.testing.assert_array_equal(again["frames"], d["frames"])
    assert not np.array_equal(synthetic_av_clips("test", 0, **opts)["frames"], d["frames"])


def write_av_folder(root, rate=8000):
    """Two clips of 4 frames (16x16) at 8 fps with 0.5 s wavs at `rate`: 'a' a 500 Hz tone with masks and
    label 2, 'b' a 1 kHz stereo int16 tone with no masks or label."""
    split = root / "train"
    pixels = {}
    for name, hz in (("a", 500.0), ("b", 1000.0)):
        (split / "png" / name).mkdir(parents=True)
        for i in range(4):
            image = np.full((16, 16, 3), 40 * i + (0 if name == "a" else 100), np.uint8)
            Image.fromarray(image).save(split / "png" / name / f"{i + 1:03d}.png")
            pixels[name, i] = image
        (split / "wav").mkdir(exist_ok=True)
        t = np.arange(rate // 2) / rate
        tone = 0.5 * np.sin(2 * np.pi * hz * t)
        if name == "a":
            wavfile.write(split / "wav" / "a.wav", rate, tone.astype(np.float32))
        else:
            stereo = (np.stack([tone, tone], 1) * 32767).astype(np.int16)
            wavfile.write(split / "wav" / "b.wav", rate, stereo)
    (split / "mask" / "a").mkdir(parents=True)
    for i in range(4):
        mask = np.zeros((16, 16), np.uint8)
        mask[i:i + 4, 2:6] = 255
        Image.fromarray(mask).save(split / "mask" / "a" / f"{i + 1:03d}.png")
    (split / "labels.csv").write_text("a,2\n")
    return pixels


def test_av_folder_source(tmp_path):
    pixels = write_av_folder(tmp_path)
    source = get_source(f"av_folder:{tmp_path}", "train", num_frames=2, size=16, window_seconds=0.25)
    assert len(source) == 2
    rows = source.get(np.array([0, 1]))
    assert rows["frames"].shape == (2, 2, 16, 16, 3) and rows["audio"].shape == (2, 2, 4000)
    np.testing.assert_array_equal(rows["label"], [2, -1])
    # segment sampling of 4 frames into 2: frames 1 and 3 (0-based)
    np.testing.assert_allclose(rows["frames"][0, 1], pixels["a", 3] / 255.0, atol=1e-6)
    np.testing.assert_allclose(rows["frames"][1, 0], pixels["b", 1] / 255.0, atol=1e-6)
    expected = np.zeros((16, 16))
    expected[3:7, 2:6] = 1
    np.testing.assert_array_equal(rows["object_mask"][0, 1], expected)
    assert not rows["object_mask"][1].any()
    assert abs(dominant_hz(rows["audio"][0, 0], 16000) - 500) <= 8  # resampled 8 kHz -> 16 kHz
    assert abs(dominant_hz(rows["audio"][1, 1], 16000) - 1000) <= 8
    assert np.abs(rows["audio"][1]).max() == pytest.approx(0.5, abs=0.02)  # int16 scaled, channels averaged
    (tmp_path / "train" / "wav" / "b.wav").unlink()
    with pytest.raises(Exception, match="no wav"):
        get_source(f"av_folder:{tmp_path}", "train")
    with pytest.raises(DatasetNotFoundError, match="png"):
        get_source(f"av_folder:{tmp_path}", "test")


# --- config and method ----------------------------------------------------------------------------------------


def test_configs_and_stages():
    paper = load_config("av_net:paper")
    assert tuple(paper.model.widths) == (64, 128, 256, 512) and paper.model.num_classes == 10
    assert LogMelParams(**dict(paper.audio)).num_frames(16000) == 201
    c = load_config("av_net:tiny")
    c.data.options.update(num_clips=8, num_frames=2, size=32)
    c.av_net.update(attention_steps=3, rounds=2, round_steps=2)
    c.train.steps = 7
    method = build(c)
    assert [(s.name, s.steps) for s in method.stages] == [("attention", 3), ("classes_1", 2), ("classes_2", 2)]
    assert method.stages[0].enter is None and all(s.enter is not None for s in method.stages[1:])
    c.train.steps = 8
    with pytest.raises(ConfigError, match="attention_steps"):
        build(c)


def test_map_stride_and_lr_decay_counted_in_updates():
    """map_stride 8 (the tiny config) doubles the map; the lr drop at trainer step lr_decay_step lands on
    the right update when the rounds make two updates (Eq. 1, Eq. 2) a step."""
    from jaxlab.methods.av_net import optimizer

    frames, audio = jnp.zeros((2, 32, 32, 3)), jnp.zeros((2, 80, 11))
    for stride, side in ((16, 2), (8, 4)):
        model = AVNet(**TINY, map_stride=stride)
        variables = jax.eval_shape(model.init, jax.random.key(0), audio, frames)
        assert jax.eval_shape(model.apply, variables, audio, frames)["attention_map"].shape == (2, side, side)
    c = load_config("av_net:tiny")
    assert c.model.map_stride == 8 and load_config("av_net:paper").model.map_stride == 16
    c.av_net.update(attention_steps=3, rounds=2, round_steps=2, lr_decay_step=5, lr_decay=0.1)
    c.train.steps = 7
    c.optimizer.update(name="adam", lr=1e-3, schedule="constant")
    tx, params = optimizer(c), {"w": jnp.zeros(())}
    opt_state, sizes = tx.init(params), []
    for _ in range(9):  # a constant gradient: Adam's step is the lr
        updates, opt_state = tx.update({"w": jnp.ones(())}, opt_state, params)
        sizes.append(-float(updates["w"]))
    # steps 0-2: one update each, steps 3 and 4: two each -> 7 updates before step 5, then x0.1
    np.testing.assert_allclose(sizes, [1e-3] * 7 + [1e-4] * 2, rtol=1e-4)


def test_report_findings_and_table():
    from jaxlab.methods.av_net.report import findings, format_report

    good = {"pointing": 0.6, "pointing_chance": 0.2, "map_inside": 0.7, "map_outside": 0.3, "map_contrast": 0.4,
            "sounding_over_distractor": 0.8, "match_accuracy": 0.85, "class_agreement": 0.9}
    bad = {**good, "pointing": 0.1, "map_contrast": -0.01}
    holds = [f.holds for f in findings([{"trained": good}, {"trained": good}], 4)]
    assert holds == [True, True, True, True, True]
    holds = [f.holds for f in findings([{"trained": good}, {"trained": bad}], 4)]
    assert holds == [False, False, True, True, True]  # a finding must hold on every seed
    rows = [{"seed": 0, "trained": good, "untrained": bad}]
    text = format_report({"rows": rows, "findings": findings(rows, 4), "seeds": [0]})
    assert "| pointing | 0.600 | 0.100 |" in text and "NO" not in text
