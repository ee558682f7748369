"""MAR / VideoMAE pieces against independent references: masks (exact counts, the released cell running
pattern, fixed test mask), the video ViT, MAE decoder and bridging classifier against plain numpy
forwards from the same parameters, parameter counts derived from the spec, the normalised-pixel target,
mixup / cutmix targets, the optimizer groups and the video sources."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from jaxlab.kernels.masked_attention import visible_indices
from jaxlab.methods.mar import masking
from jaxlab.methods.mar.losses import mix_batch, pixel_targets, smoothed_one_hot
from jaxlab.models.vit_video import (
    BridgingClassifier,
    MAEDecoder,
    MARModelConfig,
    VideoEncoder,
    VideoGeometry,
    init_modules,
    sinusoid_table,
)
from jaxlab.train.state import param_count

# ---------------------------------------------------------------- numpy references


def np_layer_norm(x, p, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_gelu(x):
    return 0.5 * x * (1.0 + scipy.special.erf(x / math.sqrt(2.0)))


def np_attention(x, p, heads):
    b, n, d = x.shape
    w = np.asarray(p["qkv"]["kernel"])
    bias = np.asarray(p["qkv"]["bias"]) if "bias" in p["qkv"] else np.concatenate(
        [p["q_bias"], np.zeros(d), p["v_bias"]])
    qkv = (x @ w + bias).reshape(b, n, 3, heads, d // heads)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    logits = q * (d // heads) ** -0.5 @ k.transpose(0, 1, 3, 2)
    att = np.exp(logits - logits.max(-1, keepdims=True))
    att = att / att.sum(-1, keepdims=True)
    out = (att @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
    return out @ p["proj"]["kernel"] + p["proj"]["bias"]


def np_block(x, p, heads):
    x = x + np_attention(np_layer_norm(x, p["norm1"]), p["attn"], heads)
    h = np_layer_norm(x, p["norm2"])
    h = np_gelu(h @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"])
    return x + h @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]


def np_sinusoid(n, d):
    table = np.zeros((n, d))
    for pos in range(n):
        for j in range(d):
            angle = pos / 10000 ** (2 * (j // 2) / d)
            table[pos, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    return table


def np_patch_tokens(video, g, kernel, bias):
    """Conv3d with kernel = stride as a matmul over (t, h, w)-ordered tubelets."""
    b = video.shape[0]
    tt, hh, ww = g.grid
    out = np.zeros((b, tt * hh * ww, kernel.shape[-1]))
    for i, (t, h, w) in enumerate(itertools.product(range(tt), range(hh), range(ww))):
        cube = video[:, t * g.tubelet_size:(t + 1) * g.tubelet_size, h * g.patch_size:(h + 1) * g.patch_size,
                     w * g.patch_size:(w + 1) * g.patch_size, :]
        out[:, i] = np.einsum("bthwc,thwcd->bd", cube, kernel) + bias
    return out


def to_np(tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), tree)


GEOM = VideoGeometry(num_frames=4, image_size=16, patch_size=4, tubelet_size=2, channels=3)  # grid 2x4x4


def random_params(params, seed=0):
    """Every leaf replaced by a random normal value (zero-init biases would hide bugs)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), jnp.float32), params)


# ---------------------------------------------------------------- masks


def torch_cell_running(grid, ratio, offset_start=0, order=None):
    """Transliteration of the released CellRunningMaskAgent (1 = masked) for one example."""
    t, h, w = grid
    mask_num = int(ratio * t * h * w)
    k = mask_num // (t * (h // 2) * (w // 2))
    mask_list = [1] * k + [0] * (4 - k)
    rows = np.zeros((t, (h // 2) * (w // 2), 4))
    for s in range(t):
        offset = (s + offset_start) % 4
        rows[s] = np.asarray(mask_list[-offset:] + mask_list[:-offset] if offset else mask_list)[None, :]
    if order is not None:
        rows = rows[order]
    # 't (h w) (s1 s2) -> t (h s1) (w s2)'
    return rows.reshape(t, h // 2, w // 2, 2, 2).transpose(0, 1, 3, 2, 4).reshape(-1).astype(bool)


def test_cell_running_test_mask_is_the_released_pattern():
    grid = (8, 14, 14)
    mask = masking.cell_running_test_mask(grid, 0.5)
    np.testing.assert_array_equal(mask, torch_cell_running(grid, 0.5))
    assert (~mask).sum() == masking.num_visible("cell_running", grid, 0.5) == 784
    per_position = mask.reshape(8, 14 * 14).sum(0)  # every spatial position hidden in exactly half the slots
    np.testing.assert_array_equal(per_position, 4)
    first_cell = mask.reshape(8, 14, 14)[:, :2, :2].reshape(8, 4)
    np.testing.assert_array_equal(first_cell[:4], [[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 1]])
    np.testing.assert_array_equal(masking.cell_running_test_mask(grid, 0.75), torch_cell_running(grid, 0.75))
    again = masking.eval_mask("cell_running", 3, grid, 0.5)
    np.testing.assert_array_equal(np.asarray(again), np.broadcast_to(mask, (3, mask.size)))


@pytest.mark.parametrize("shuffle", [False, True])
def test_cell_running_train_masks_follow_the_released_randomisation(shuffle):
    grid = (8, 4, 6)
    masks = np.asarray(masking.cell_running_train_mask(jax.random.PRNGKey(3), 16, grid, 0.5,
                                                       temporal_shuffle=shuffle))
    assert (~masks).sum(1).tolist() == [masking.num_visible("cell_running", grid, 0.5)] * 16
    starts = set()
    for m in masks:
        rows = {tuple(r) for r in m.reshape(8, -1)}
        matches = [i for i in range(4) if (np.array_equal(m, torch_cell_running(grid, 0.5, i)) if not shuffle
               else sorted(map(tuple, m.reshape(8, -1))) == sorted(map(tuple, torch_cell_running(grid, 0.5, i).reshape(8, -1))))]
        assert matches, "a training mask is no rolled / time-permuted cell running pattern"
        assert len(rows) == 4  # four offsets, each in two of the 8 slots
        starts.update(matches)
    assert len(starts) > 1  # the start offset is drawn


def test_cell_running_per_cell_offsets_keep_the_count():
    grid = (4, 4, 4)
    masks = np.asarray(masking.cell_running_train_mask(jax.random.PRNGKey(0), 8, grid, 0.5, spatial_repeat=False))
    assert ((~masks).sum(1) == 32).all()
    cells = masks.reshape(8, 4, 2, 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(8, 4, 4, 4)
    assert (cells.sum(-1) == 2).all()


def test_tube_and_random_masks_have_static_counts():
    grid = (4, 6, 6)
    tube = np.asarray(masking.tube_mask(jax.random.PRNGKey(1), 5, grid, 0.9)).reshape(5, 4, 36)
    assert (tube == tube[:, :1]).all()  # the same positions in every time slot
    assert ((~tube).reshape(5, -1).sum(1) == masking.num_visible("tube", grid, 0.9)).all()
    assert masking.num_visible("tube", (8, 14, 14), 0.9) == 8 * 20  # VideoMAE: 160 of 1,568
    rnd = np.asarray(masking.random_mask(jax.random.PRNGKey(2), 5, grid, 0.75))
    assert ((~rnd).sum(1) == masking.num_visible("random", grid, 0.75)).all()
    np.testing.assert_array_equal(masking.eval_mask("tube", 2, grid, 0.9, seed=4),
                                  masking.eval_mask("tube", 2, grid, 0.9, seed=4))


# ---------------------------------------------------------------- models


def test_sinusoid_table_matches_the_formula():
    np.testing.assert_allclose(sinusoid_table(10, 12), np_sinusoid(10, 12), atol=1e-6)


def test_encoder_on_visible_tokens_matches_a_numpy_vit():
    enc = VideoEncoder(GEOM, dim=16, depth=2, heads=2, implementation="xla")
    video = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (2, 4, 16, 16, 3)))
    mask = masking.cell_running_test_mask(GEOM.grid, 0.5)[None].repeat(2, 0)
    visible, valid = visible_indices(jnp.asarray(mask), 16)
    params = random_params(jax.eval_shape(enc.init, jax.random.PRNGKey(1), video, visible)["params"])
    out = np.asarray(jax.jit(enc.apply)({"params": params}, video, visible, valid))
    p = to_np(params)
    tokens = np_patch_tokens(video.astype(np.float64), GEOM, p["patch_embed"]["kernel"], p["patch_embed"]["bias"])
    tokens = tokens + np_sinusoid(GEOM.num_tokens, 16)[None]
    x = np.stack([tokens[b][~mask[b]] for b in range(2)])  # a sequence of only the visible tokens
    for i in range(2):
        x = np_block(x, p[f"blocks_{i}"], 2)
    np.testing.assert_allclose(out, np_layer_norm(x, p["norm"]), atol=2e-4)
    assert set(p["blocks_0"]["attn"]) == {"qkv", "q_bias", "v_bias", "proj"}
    assert "bias" not in p["blocks_0"]["attn"]["qkv"]  # no k bias (q, v biases only)


def test_decoder_scatters_mask_tokens_like_numpy():
    dec = MAEDecoder(GEOM, dim=8, depth=1, heads=2, implementation="xla")
    mask = masking.random_mask(jax.random.PRNGKey(0), 2, GEOM.grid, 0.75)
    visible, valid = visible_indices(mask, 8)
    encoded = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 12))
    params = random_params(jax.eval_shape(dec.init, jax.random.PRNGKey(2), encoded, visible)["params"])
    out = np.asarray(jax.jit(dec.apply)({"params": params}, encoded, visible, valid))
    p = to_np(params)
    x = np.broadcast_to(p["mask_token"][0], (2, GEOM.num_tokens, 8)).copy()
    for b in range(2):
        x[b, np.asarray(visible[b])] = np.asarray(encoded[b], np.float64) @ p["encoder_to_decoder"]["kernel"]
    x = np_block(x + np_sinusoid(GEOM.num_tokens, 8)[None], p["blocks_0"], 2)
    ref = np_layer_norm(x, p["norm"]) @ p["head"]["kernel"] + p["head"]["bias"]
    assert out.shape == (2, GEOM.num_tokens, GEOM.patch_dim)
    np.testing.assert_allclose(out, ref, atol=2e-4)


def test_bridging_classifier_matches_numpy():
    head = BridgingClassifier(5, dim=8, depth=2, heads=4, dropout=0.1, implementation="xla")
    encoded = jax.random.normal(jax.random.PRNGKey(0), (3, 6, 12))
    params = random_params(jax.eval_shape(head.init, jax.random.PRNGKey(1), encoded)["params"])
    out = np.asarray(jax.jit(head.apply)({"params": params}, encoded))
    p = to_np(params)
    x = np.asarray(encoded, np.float64) @ p["encoder_to_cls_decoder"]["kernel"]
    for i in range(2):
        x = np_block(x, p[f"blocks_{i}"], 4)
    ref = np_layer_norm(x.mean(1), p["norm"]) @ p["head"]["kernel"] + p["head"]["bias"]
    np.testing.assert_allclose(out, ref, atol=2e-4)
    assert "bias" in p["blocks_0"]["attn"]["qkv"] and "bias" not in p["encoder_to_cls_decoder"]


def spec_encoder_count(d, depth, c=3, t=2, patch=16):
    block = 2 * 2 * d + 3 * d * d + 2 * d + d * d + d + d * 4 * d + 4 * d + 4 * d * d + d
    return c * t * patch * patch * d + d + depth * block + 2 * d


def spec_decoder_count(d_enc, d, depth, out=1536):
    block = 2 * 2 * d + 3 * d * d + 2 * d + d * d + d + d * 4 * d + 4 * d + 4 * d * d + d
    return d_enc * d + d + depth * block + 2 * d + d * out + out


def spec_bridging_count(d_enc, classes, d=512, depth=2):
    block = 2 * 2 * d + 3 * d * d + 3 * d + d * d + d + d * 4 * d + 4 * d + 4 * d * d + d
    return d_enc * d + depth * block + 2 * d + d * classes + classes


@pytest.mark.parametrize("size,dims,decoder", [
    ("S", (384, 12), (192, 4)), ("B", (768, 12), (384, 4)), ("L", (1024, 24), (512, 12)), ("H", (1280, 32), (640, 4)),
])
def test_parameter_counts_match_the_spec(size, dims, decoder):
    config = MARModelConfig.of_size(size, num_classes=400)
    shapes = jax.eval_shape(lambda: init_modules(config, jax.random.PRNGKey(0), 784))
    counts = {k: param_count(v) for k, v in shapes.items()}
    assert counts["encoder"] == spec_encoder_count(*dims)
    assert counts["decoder"] == spec_decoder_count(dims[0], *decoder)
    assert counts["classifier"] == spec_bridging_count(dims[0], 400)
    if size == "B":
        assert counts["encoder"] == 86_227_200  # VideoMAE ViT-B/16 without its head (87M with it)


# ---------------------------------------------------------------- losses


def test_normalised_pixel_target_matches_numpy():
    video = np.asarray(jax.random.uniform(jax.random.PRNGKey(0), (2, 4, 16, 16, 3)))
    mean, std = np.array([0.4, 0.5, 0.6]), np.array([0.2, 0.25, 0.3])
    out = np.asarray(pixel_targets(jnp.asarray(video), GEOM, mean, std))
    raw = video * std + mean
    tt, hh, ww = GEOM.grid
    for b, (t, h, w) in itertools.product(range(2), itertools.product(range(tt), range(hh), range(ww))):
        cube = raw[b, 2 * t:2 * t + 2, 4 * h:4 * h + 4, 4 * w:4 * w + 4].reshape(-1, 3)  # (p0 p1 p2) c
        ref = (cube - cube.mean(0)) / (cube.std(0, ddof=1) + 1e-6)
        np.testing.assert_allclose(out[b, (t * hh + h) * ww + w], ref.reshape(-1), atol=1e-4)


def test_mixup_and_cutmix_soft_targets():
    video = jax.random.normal(jax.random.PRNGKey(0), (4, 2, 8, 8, 3))
    labels = jnp.array([0, 1, 2, 3])
    mix = jax.jit(lambda key: mix_batch(key, video, labels, 5, mixup_alpha=0.8, cutmix_alpha=1.0, smoothing=0.1))
    for seed in range(6):
        mixed, targets = mix(jax.random.PRNGKey(seed))
        np.testing.assert_allclose(np.asarray(targets).sum(1), 1.0, atol=1e-5)
        v, m = np.asarray(video), np.asarray(mixed)
        is_orig, is_flip = np.isclose(m, v), np.isclose(m, v[::-1])
        lam = float(targets[0, 0] - 0.1 / 5) / 0.9  # weight of clip 0's own label
        if (is_orig | is_flip).all():  # cutmix: a box pasted from the reversed batch, lam = kept area
            np.testing.assert_allclose(is_orig[0].mean(), lam, atol=1e-5)
        else:  # mixup: a convex combination with the reversed batch
            np.testing.assert_allclose(m, lam * v + (1 - lam) * v[::-1], atol=1e-4)
    _, plain = mix_batch(jax.random.PRNGKey(0), video, labels, 5, mixup_alpha=0.0, cutmix_alpha=0.0, smoothing=0.1)
    np.testing.assert_allclose(plain, smoothed_one_hot(labels, 5, 0.1))
    np.testing.assert_allclose(plain[0], [0.92, 0.02, 0.02, 0.02, 0.02], atol=1e-6)


def test_encoder_pallas_attention_path_matches_xla():
    """The encoder's attention goes through the masked-attention dispatcher: the Pallas kernel body
    (interpret mode on CPU) gives the XLA path's output."""
    video = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 16, 16, 3)), jnp.float32)
    mask = jnp.asarray(masking.cell_running_test_mask(GEOM.grid, 0.5)[None].repeat(2, 0))
    visible, valid = visible_indices(mask, 16)
    xla = VideoEncoder(GEOM, dim=16, depth=1, heads=2, implementation="xla")
    params = random_params(jax.eval_shape(xla.init, jax.random.PRNGKey(0), video, visible)["params"])
    out_xla = jax.jit(xla.apply)({"params": params}, video, visible, valid)
    out_pallas = jax.jit(xla.clone(implementation="pallas").apply)({"params": params}, video, visible, valid)
    np.testing.assert_allclose(np.asarray(out_pallas), np.asarray(out_xla), atol=1e-4)


def test_bench_mar_prints_the_compute_table_beside_the_paper(capsys):
    from jaxlab.cli import main

    assert main(["bench", "mar", "--quick", "--no-write"]) == 0
    out = capsys.readouterr().out
    assert "| ViT-B full | 1568 | 360.7 | 180.3 |" in out  # VideoMAE publishes 180 GMACs per ViT-B view
    assert "| ViT-B MAR 50% | 784 | 172.5 | 86.3 |" in out and "| 53% |" in out and "14.5%" in out
    assert main(["bench", "no_such_bench"]) == 2
