"""Audio-visual guided video inpainting (jaxlab.methods.av_inpainting, jaxlab.models.sttn): losses, spectral
norm, masks, metrics and the steps' part isolation against independent references, on tiny shapes, with a
stand-in for the AV-Net (the Guide interface)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from jaxlab.methods.av_inpainting import losses as L
from jaxlab.methods.av_inpainting import masks as M
from jaxlab.methods.av_inpainting import metrics as VM
from jaxlab.methods.av_inpainting.task import Guide
from jaxlab.models import sttn
from jaxlab.train.state import param_count, split_variables


# --- losses ------------------------------------------------------------------------------------------------


def test_hole_valid_l1_on_hand_made_masks():
    # one 2x2 frame, 1 channel: hole at the top-left pixel only
    pred = np.array([[1.0, 2.0], [3.0, 4.0]])[None, None, :, :, None]
    target = np.array([[0.0, 2.5], [3.0, 2.0]])[None, None, :, :, None]
    mask = np.array([[1.0, 0.0], [0.0, 0.0]])[None, None, :, :, None]
    hole, valid = L.hole_valid_l1(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask))
    # hole: mean(m |e|) / mean(m) = (1/4) / (1/4) = 1; valid: ((0.5 + 0 + 2) / 4) / (3/4) = 2.5 / 3
    np.testing.assert_allclose(float(hole), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(valid), 2.5 / 3, rtol=1e-6)
    # an RGB mask broadcast over channels gives the same fractions
    pred3, target3 = np.repeat(pred, 3, -1), np.repeat(target, 3, -1)
    hole3, valid3 = L.hole_valid_l1(jnp.asarray(pred3), jnp.asarray(target3), jnp.asarray(mask))
    np.testing.assert_allclose([float(hole3), float(valid3)], [1.0, 2.5 / 3], rtol=1e-6)


def test_hinge_and_av_losses_match_numpy():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3, 4))
    want_d = 0.5 * (np.maximum(0, 1 - real).mean() + np.maximum(0, 1 + fake).mean())
    np.testing.assert_allclose(float(L.hinge_d_loss(jnp.asarray(real), jnp.asarray(fake))), want_d, rtol=1e-6)
    np.testing.assert_allclose(float(L.hinge_g_loss(jnp.asarray(fake))), -fake.mean(), rtol=1e-6)
    a, b = rng.uniform(size=(3, 4, 5)), rng.uniform(size=(3, 4, 5))
    want_att = np.mean([np.sum((a[i] - b[i]) ** 2) / 20 for i in range(3)])
    np.testing.assert_allclose(float(L.av_attention_loss(jnp.asarray(a), jnp.asarray(b))), want_att, rtol=1e-6)
    ya, yv = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    p = np.exp(ya) / np.exp(ya).sum(-1, keepdims=True)
    logq = yv - np.log(np.exp(yv).sum(-1, keepdims=True))
    np.testing.assert_allclose(float(L.av_class_loss(jnp.asarray(ya), jnp.asarray(yv))),
                               np.mean(-(p * logq).sum(-1)), rtol=1e-5)


# --- model pieces ------------------------------------------------------------------------------------------


def test_spectral_norm_largest_singular_value_is_one():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(6, 20))
    u0 = rng.normal(size=6)
    v0 = rng.normal(size=20)
    normed, _, _ = sttn.spectral_normalize(jnp.asarray(w), jnp.asarray(u0 / np.linalg.norm(u0)),
                                           jnp.asarray(v0 / np.linalg.norm(v0)), 60)
    np.testing.assert_allclose(np.linalg.svd(np.asarray(normed), compute_uv=False)[0], 1.0, rtol=1e-4)
    # the module: a 3D conv whose output is the conv with kernel / sigma_max (numpy SVD of (out, k in))
    conv = sttn.SpectralConv(5, (3, 3, 3), (1, 2, 2), (1, 1, 1), power_iterations=60)
    x = jnp.asarray(rng.normal(size=(1, 3, 6, 6, 2)), jnp.float32)
    variables = jax.jit(conv.init)(jax.random.key(0), x)
    y, updated = jax.jit(lambda v, x: conv.apply(v, x, True, mutable=["spectral"]))(variables, x)
    kernel = np.asarray(variables["params"]["kernel"], np.float64)
    sigma = np.linalg.svd(np.moveaxis(kernel, -1, 0).reshape(5, -1), compute_uv=False)[0]
    ref = jax.lax.conv_general_dilated(x, jnp.asarray(kernel / sigma, jnp.float32), (1, 2, 2), [(1, 1)] * 3,
                                       dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-3, atol=1e-5)
    # evaluation reuses the stored vectors: the same output, nothing to update
    y_eval = conv.apply({**variables, **updated}, x, False)
    np.testing.assert_allclose(np.asarray(y_eval), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_upsample_align_corners_matches_scipy_zoom():
    x = np.random.default_rng(2).normal(size=(2, 3, 4, 5, 2))
    got = np.asarray(sttn.upsample2x_align_corners(jnp.asarray(x)))
    want = ndimage.zoom(x, (1, 1, 2, 2, 1), order=1, grid_mode=False, mode="nearest")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_patch_attention_ignores_keys_that_are_mostly_hole():
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 2, 4, 4, 3)), jnp.float32) for _ in range(3))
    hole = np.zeros((1, 2, 4, 4, 1), np.float32)
    hole[0, 1, :2, :2] = 1  # frame 1's top-left 2x2 patch is all hole
    v2 = np.asarray(v).copy()
    v2[0, 1, :2, :2] = 100.0  # changing the values there must not matter when masked
    for apply_mask, same in ((True, True), (False, False)):
        a = sttn.patch_attention(q, k, v, jnp.asarray(hole), 2, 2, apply_mask)
        b = sttn.patch_attention(q, k, jnp.asarray(v2), jnp.asarray(hole), 2, 2, apply_mask)
        assert np.allclose(a, b) == same


def _conv(k, cin, cout, bias=True):
    return k * k * cin * cout + (cout if bias else 0)


def test_parameter_counts_follow_the_definition():
    c0, c1, hid, blocks, audio = 4, 6, 8, 3, 5
    frames, masks = jnp.zeros((1, 2, 16, 16, 3)), jnp.zeros((1, 2, 16, 16, 1))
    block = 3 * _conv(1, hid, hid) + _conv(3, hid, hid) + 2 * _conv(3, hid, hid)
    enc = _conv(3, 3, c0) + _conv(3, c0, c0) + _conv(3, c0, c1) + _conv(3, c1, hid)
    dec = _conv(3, hid, c1) + _conv(3, c1, c0) + _conv(3, c0, c0) + _conv(3, c0, 3)
    for share, bottleneck in ((False, True), (True, False)):
        gen = sttn.STTNGenerator((c0, c1, hid), blocks, (1, 2), share_blocks=share, audio_bottleneck=bottleneck)
        shapes = jax.eval_shape(gen.init, jax.random.key(0), frames, masks,
                                jnp.zeros((1, 2, audio)) if bottleneck else None)
        want = enc + dec + (1 if share else blocks) * block + (_conv(1, hid + audio, hid) if bottleneck else 0)
        assert param_count(shapes["params"]) == want
    disc = sttn.TPatchGAN((4, 5, 6, 6, 6, 7))
    shapes = jax.eval_shape(disc.init, jax.random.key(0), jnp.zeros((1, 3, 32, 32, 3)))
    chans = (3, 4, 5, 6, 6, 6, 7)
    assert param_count(shapes["params"]) == sum(75 * a * b for a, b in zip(chans[:-1], chans[1:]))
    # the paper's sizes: STTN 8 blocks at (64, 128, 256), T-PatchGAN (64, 128, 256, 256, 256, 256)
    paper_block = 3 * _conv(1, 256, 256) + 3 * _conv(3, 256, 256)
    paper_gen = (_conv(3, 3, 64) + _conv(3, 64, 64) + _conv(3, 64, 128) + _conv(3, 128, 256) + 8 * paper_block
                 + _conv(3, 256, 128) + _conv(3, 128, 64) + _conv(3, 64, 64) + _conv(3, 64, 3))
    shapes = jax.eval_shape(sttn.STTNGenerator().init, jax.random.key(0), jnp.zeros((1, 1, 32, 32, 3)),
                            jnp.zeros((1, 1, 32, 32, 1)))
    assert param_count(shapes["params"]) == paper_gen


def test_composite_keeps_valid_pixels_exactly():
    rng = np.random.default_rng(4)
    frames = jnp.asarray(rng.uniform(-1, 1, (2, 3, 8, 8, 3)), jnp.float32)
    pred = jnp.asarray(rng.uniform(-1, 1, (2, 3, 8, 8, 3)), jnp.float32)
    hole = jnp.asarray(rng.uniform(size=(2, 3, 8, 8, 1)) > 0.6, jnp.float32)
    out = np.asarray(sttn.composite(frames, pred, hole))
    valid = np.broadcast_to(np.asarray(hole) == 0, out.shape)
    assert np.array_equal(out[valid], np.asarray(frames)[valid])
    assert np.array_equal(out[~valid], np.asarray(pred)[~valid])


# --- masks and metrics -------------------------------------------------------------------------------------


def test_stroke_masks_are_deterministic_by_seed():
    a, b = M.mask_bank(7, 4, 32), M.mask_bank(7, 4, 32)
    assert np.array_equal(a, b) and a.shape == (4, 32, 32)
    assert np.array_equal(M.mask_bank(7, 2, 32), a[:2])  # mask i does not depend on the bank's size
    assert not np.array_equal(M.mask_bank(8, 4, 32), a)
    cover = a.mean((1, 2))
    assert np.all(cover > 0) and np.all(cover < 0.7) and set(np.unique(a)) <= {0.0, 1.0}
    videos = M.stroke_video_masks(7, 4, 3, 32)
    assert videos.shape == (4, 3, 32, 32, 1) and np.array_equal(videos[:, 2, ..., 0], a)


def test_object_masks_dilate_the_silhouette_by_a_disk():
    sil = np.zeros((1, 7, 7))
    sil[0, 3, 3] = 1
    got = M.object_masks(sil, dilate=1)[0]
    want = np.zeros((7, 7))
    want[3, 2:5] = want[2:5, 3] = 1
    assert np.array_equal(got, want)


def test_warp_error_is_zero_for_a_static_video_and_positive_for_flicker():
    rng = np.random.default_rng(5)
    frame = ndimage.gaussian_filter(rng.uniform(size=(24, 24, 3)), (1.5, 1.5, 0))
    video = np.repeat(frame[None], 3, 0)
    flows, masks = VM.flows_and_occlusion(video)
    assert VM.warp_error(video, flows, masks) == 0.0
    flicker = video.copy()
    flicker[1] += 0.1
    assert VM.warp_error(flicker, flows, masks) == pytest.approx(3 * 0.01, rel=1e-6)


def test_frechet_distance_matches_the_eigen_form():
    rng = np.random.default_rng(6)
    a = rng.normal(size=(40, 3))
    b = rng.normal(size=(50, 3)) @ np.diag([1.0, 2.0, 0.5]) + 1.0
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, vec = np.linalg.eigh(ca)
    ra = vec @ np.diag(np.sqrt(w)) @ vec.T  # Tr sqrt(Ca Cb) = Tr sqrt(Ca^1/2 Cb Ca^1/2)
    inner = np.linalg.eigvalsh(ra @ cb @ ra)
    want = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca) + np.trace(cb) - 2 * np.sqrt(inner).sum()
    assert VM.frechet_distance(a, b) == pytest.approx(want, rel=1e-6)
    assert abs(VM.frechet_distance(a, a)) < 1e-8


# --- the steps, with a stand-in AV-Net ---------------------------------------------------------------------


class StandInAV(nn.Module):
    """A tiny audio-visual net with the AV-Net's outputs: frames (N, H, W, 3) -> (N, H/8, W/8) map."""

    def setup(self):
        self.visual = nn.Conv(4, (8, 8), strides=(8, 8))
        self.audio = nn.Dense(4)
        self.visual_head, self.audio_head = nn.Dense(3), nn.Dense(3)

    def encode_audio(self, spectrograms):
        return self.audio(spectrograms.reshape(spectrograms.shape[0], -1))

    def __call__(self, spectrograms, frames):
        v, a = self.visual(frames), self.encode_audio(spectrograms)
        cos = jnp.einsum("nhwc,nc->nhw", v / jnp.linalg.norm(v, axis=-1, keepdims=True),
                         a / jnp.linalg.norm(a, axis=-1, keepdims=True))
        return {"attention_map": jax.nn.sigmoid(5 * cos), "audio_logits": self.audio_head(a),
                "visual_logits": self.visual_head(v.mean((1, 2)))}


def stand_in_guide() -> Guide:
    net = StandInAV()
    return Guide(
        spectrogram=lambda audio: audio.reshape(audio.shape[:-1] + (2, audio.shape[-1] // 2)),
        outputs=lambda p, c, s, f: net.apply({"params": p, **c}, s, f),
        audio_features=lambda p, c, s: net.apply({"params": p, **c}, s, method=StandInAV.encode_audio),
        init=lambda rng, s, f: split_variables(sttn.release_init(net, rng, s, f)), feature_dim=4)


def tiny_config(steps=2):
    from jaxlab.config import load_config

    c = load_config("av_inpainting:tiny")
    c.model.update(channels=(4, 8, 8), num_blocks=1, patch_divisors=(1, 2), disc_channels=(4, 4, 4, 4, 4, 4))
    c.data.update(batch_size=2, eval_batch_size=2)
    c.data.options.update(num_clips=4, size=32, window_seconds=0.01)
    c.inpaint.update(mask_bank=4, eval_clips=2)
    c.mesh.data = 1
    c.train.update(steps=steps, log_every=1, eval_every=steps, checkpoint_every=steps, progress=False,
                   async_checkpoints=False)
    return c


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_each_update_changes_only_its_part_and_the_av_net_stays_frozen():
    """gan_schedule="alternate": step 0 is the discriminator's update, step 1 the generator's (one compiled
    program, the method's own train_step)."""
    from jaxlab.methods.av_inpainting.task import build, make_transform

    c = tiny_config()
    c.inpaint.gan_schedule = "alternate"
    method = build(c, guide=stand_in_guide())
    batch = make_transform(c)(method.train_source.get(np.arange(2)))
    batch = jax.tree_util.tree_map(jnp.asarray, batch)
    state = jax.jit(method.init_state)(jax.random.key(0), batch)
    assert state.parts["av_net"].is_frozen and set(state.parts) == {"generator", "discriminator", "av_net"}
    step = jax.jit(method.train_step)
    after_d, d_metrics = step(state, batch, jax.random.key(1))
    after_g, g_metrics = step(after_d, batch, jax.random.key(2))
    assert bool(d_metrics["finite"]) and bool(g_metrics["finite"])
    assert float(g_metrics["av_att"]) > 0 and float(g_metrics["av_cls"]) > 0 and float(d_metrics["av_att"]) == 0
    # discriminator update: its params and power-iteration vectors move; generator and AV-Net untouched
    assert _same(after_d.parts["generator"], state.parts["generator"])
    assert not _same(after_d.parts["discriminator"].params, state.parts["discriminator"].params)
    assert not _same(after_d.parts["discriminator"].collections, state.parts["discriminator"].collections)
    # generator update: the discriminator (params, Adam state, u / v) untouched
    assert _same(after_g.parts["discriminator"], after_d.parts["discriminator"])
    assert not _same(after_g.parts["generator"].params, after_d.parts["generator"].params)
    # the AV-Net never changes
    assert _same(after_g.parts["av_net"], state.parts["av_net"])


# --- config and report ----------------------------------------------------------------------------------------


def test_paper_lr_drops_as_the_release_and_report_arms():
    """The paper variant's lr for both parts follows the release's update_lr (core/trainer.py):
    lr * 0.1 ** (min(it, 300k) // 150k); the report's arms and the audio-only control finding."""
    from jaxlab.config import load_config
    from jaxlab.methods.av_inpainting.report import arm_config, check_findings, report_arms
    from jaxlab.train.optim import make_schedule, part_config

    c = load_config("av_inpainting:paper")
    for part in ("generator", "discriminator"):
        schedule = make_schedule(part_config(c.optimizer, part), int(c.train.steps))
        for it in (0, 149_999, 150_000, 299_999, 300_000, 349_999):
            assert float(schedule(it)) == pytest.approx(1e-4 * 0.1 ** (min(it, 300_000) // 150_000), rel=1e-5)
    tiny = load_config("av_inpainting:tiny")
    assert report_arms(tiny) == ("baseline", "audio", "att", "cls", "both")
    assert "audio" not in report_arms(load_config("av_inpainting:tiny,released=True"))
    audio = arm_config(tiny, "audio", "object", 0, "/av")
    assert audio.model.audio_bottleneck and audio.inpaint.av_att == 0 and audio.inpaint.av_cls == 0
    assert not arm_config(tiny, "baseline", "object", 0, "/av").model.audio_bottleneck

    def arm(*psnr):
        return {"by_seed": [{"psnr": p, "ssim": p, "vfid": 1 / p} for p in psnr],
                "mean": {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(psnr)), "vfid": 1 / float(np.mean(psnr))}}

    found = check_findings({"object": {"baseline": arm(18, 18), "audio": arm(20, 20), "both": arm(19, 19.5)}})
    assert [f.holds for f in found] == [True, False]  # beats the baseline, but not the audio-only arm
