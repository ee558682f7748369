"""SwinDRNet pieces on tiny shapes: the Swin block against a numpy port of the PyTorch block, shift mask
and bias gather, patch merging order, parameter counts, UPerNet resizes, loss terms on analytic
surfaces, metrics on hand-made frames, the simulator's corruptions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from jaxlab.kernels.window_attention import relative_position_bias, shift_attention_mask
from jaxlab.models.swin import SwinBlock, merge_patches, swin
from jaxlab.models.upernet import adaptive_avg_pool, resize_bilinear

# ----------------------------------------------------------------------------- numpy port of PyTorch Swin


def np_layer_norm(x, p, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_linear(x, p):
    return x @ p["kernel"] + p.get("bias", 0.0)


def np_window_attention(xq, xkv, qkv_q, qkv_kv, table, heads, window, shift):
    """Swin's (shifted) window attention of normed maps [B, H, W, C], queries projected from xq by qkv_q,
    keys / values from xkv by qkv_kv (the same for self attention), as the PyTorch code: pad after with
    zeros, roll, windows, (q * d^-0.5) k^T + table[index] (- 100 across shift regions), softmax, reverse."""
    b, h, w, c = xq.shape
    d = c // heads
    hp, wp = -(-h // window) * window, -(-w // window) * window
    pad = lambda y: np.pad(y, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
    yq, ykv = pad(xq), pad(xkv)
    if shift:
        yq, ykv = (np.roll(y, (-shift, -shift), axis=(1, 2)) for y in (yq, ykv))
    img = np.zeros((hp, wp), int)
    if shift:
        cnt = 0
        for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
                img[hs, ws] = cnt
                cnt += 1
    out = np.zeros_like(yq)
    for bi in range(b):
        for wy in range(0, hp, window):
            for wx in range(0, wp, window):
                tokens = [(wy + i, wx + j) for i in range(window) for j in range(window)]
                q_all = np_linear(np.stack([yq[bi, r, t] for r, t in tokens]), qkv_q).reshape(-1, 3, heads, d)
                kv_all = np_linear(np.stack([ykv[bi, r, t] for r, t in tokens]), qkv_kv).reshape(-1, 3, heads, d)
                ids = np.array([img[r, t] for r, t in tokens])
                for hh in range(heads):
                    qh, kh, vh = q_all[:, 0, hh] * d**-0.5, kv_all[:, 1, hh], kv_all[:, 2, hh]
                    logits = qh @ kh.T
                    for i, (ri, ci) in enumerate(tokens):
                        for j, (rj, cj) in enumerate(tokens):
                            dy, dx = ri - rj + window - 1, ci - cj + window - 1
                            logits[i, j] += table[dy * (2 * window - 1) + dx, hh]
                            if shift and ids[i] != ids[j]:
                                logits[i, j] -= 100.0
                    probs = np.exp(logits - logits.max(-1, keepdims=True))
                    probs /= probs.sum(-1, keepdims=True)
                    res = probs @ vh
                    for i, (r, t) in enumerate(tokens):
                        out[bi, r, t, hh * d:(hh + 1) * d] = res[i]
    if shift:
        out = np.roll(out, (shift, shift), axis=(1, 2))
    return out[:, :h, :w]


def np_mlp(x, p):
    hidden = np_linear(x, p["fc1"])
    return np_linear(0.5 * hidden * (1 + erf(hidden / np.sqrt(2))), p["fc2"])


def np_block(x, p, heads, window, shift):
    """SwinTransformerBlock.forward of the mmseg-style Swin (PKU-EPIC/DREDS) in numpy."""
    y = np_layer_norm(x, p["norm1"])
    a = p["attn"]
    x = x + np_linear(np_window_attention(y, y, a["qkv"], a["qkv"], a["relative_position_bias_table"], heads,
                                          window, shift), a["proj"])
    return x + np_mlp(np_layer_norm(x, p["norm2"]), p["mlp"])


def np_fusion(rgb, depth, p, window, released):
    """CrossAttention (one SwinCrossAttentionBlock of one head at shift 0, fuse, norm) in numpy: the
    paper's intent, or the released block (attention output discarded, branch 2 adds branch 1)."""
    n1, n2 = np_layer_norm(rgb, p["norm1_branch_1"]), np_layer_norm(depth, p["norm1_branch_2"])
    a = p["attn"]
    if released:
        b1 = rgb + n1
        b2 = depth + b1
    else:
        a1 = np_window_attention(n2, n1, a["qkv_branch_2"], a["qkv_branch_1"], a["relative_position_bias_table_1"],
                                 1, window, 0)
        a2 = np_window_attention(n1, n2, a["qkv_branch_1"], a["qkv_branch_2"], a["relative_position_bias_table_2"],
                                 1, window, 0)
        b1, b2 = rgb + np_linear(a1, a["proj_branch_1"]), depth + np_linear(a2, a["proj_branch_2"])
    b1 = b1 + np_mlp(np_layer_norm(b1, p["norm2_branch_1"]), p["mlp_branch_1"])
    b2 = b2 + np_mlp(np_layer_norm(b2, p["norm2_branch_2"]), p["mlp_branch_2"])
    return np_layer_norm(np_linear(np.concatenate([b1, b2], -1), p["fuse"]), p["norm"])


def random_params(module, x, seed, *more):
    """The module's params (shapes from eval_shape: nothing compiles) filled with N(0, 0.3) values
    (biases and norms too, so they matter)."""
    tree = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x, *more))["params"]
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(treedef, [rng.normal(0, 0.3, l.shape).astype(np.float32)
                                                  for l in leaves])


@pytest.mark.parametrize("shift", [0, 2])
def test_swin_block_matches_numpy_port_of_the_pytorch_block(shift):
    x = np.random.default_rng(0).normal(size=(1, 6, 9, 8)).astype(np.float32)  # pads to 8 x 12
    block = SwinBlock(heads=2, window=4, shift=shift, attention_impl="xla")
    params = random_params(block, jnp.asarray(x), 1)
    got = np.asarray(jax.jit(block.apply)({"params": params}, jnp.asarray(x)))
    want = np_block(x.astype(np.float64), jax.tree_util.tree_map(np.float64, params), 2, 4, shift)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("fusion", ["paper", "released"])
def test_cross_attention_fusion_matches_numpy_port(fusion):
    from jaxlab.methods.swindrnet.model import CrossAttentionFusion

    rng = np.random.default_rng(2)
    rgb, depth = (rng.normal(size=(1, 5, 6, 8)).astype(np.float32) for _ in range(2))  # pads to 8 x 8
    module = CrossAttentionFusion(heads=1, window=4, fusion=fusion, attention_impl="xla")
    params = random_params(module, jnp.asarray(rgb), 3, jnp.asarray(depth))
    got = np.asarray(jax.jit(module.apply)({"params": params}, jnp.asarray(rgb), jnp.asarray(depth)))
    p64 = jax.tree_util.tree_map(np.float64, params)
    np.testing.assert_allclose(got, np_fusion(rgb.astype(np.float64), depth.astype(np.float64), p64, 4,
                                              fusion == "released"), rtol=2e-4, atol=2e-4)
    grads = jax.jit(jax.grad(lambda p: module.apply({"params": p}, jnp.asarray(rgb), jnp.asarray(depth)).sum()))(
        params)
    attn_grad = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree_util.tree_leaves(grads["attn"]))
    assert (attn_grad == 0.0) == (fusion == "released")  # the released block's attention gets no gradient


def test_bias_gather_and_shift_mask_follow_swin():
    w, heads = 3, 2
    table = np.random.default_rng(0).normal(size=((2 * w - 1) ** 2, heads)).astype(np.float32)
    bias = np.asarray(relative_position_bias(jnp.asarray(table), w))
    for i in range(w * w):
        for j in range(w * w):
            (yi, xi), (yj, xj) = divmod(i, w), divmod(j, w)
            np.testing.assert_array_equal(bias[:, i, j], table[(yi - yj + w - 1) * (2 * w - 1) + xi - xj + w - 1])
    mask = shift_attention_mask(6, 6, w, 1)  # 4 windows of 9 tokens
    region = lambda r: 0 if r < 3 else (1 if r < 5 else 2)  # slices [0, -w), [-w, -s), [-s, end)
    for win in range(4):
        wy, wx = divmod(win, 2)
        ids = [3 * region(wy * w + a // w) + region(wx * w + a % w) for a in range(w * w)]
        want = np.array([[0.0 if ids[a] == ids[b] else -100.0 for b in range(w * w)] for a in range(w * w)])
        np.testing.assert_array_equal(mask[win], want)


def test_shift_on_a_single_window_map_is_kept_by_default_and_dropped_by_the_imagenet_variant():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, 4, 4)).astype(np.float32))
    shifted = SwinBlock(heads=1, window=4, shift=2, attention_impl="xla")
    params = {"params": random_params(shifted, x, 2)}
    plain = jax.jit(SwinBlock(heads=1, window=4, shift=0, attention_impl="xla").apply)(params, x)
    imagenet = SwinBlock(heads=1, window=4, shift=2, shift_single_window=False, attention_impl="xla")
    np.testing.assert_allclose(jax.jit(imagenet.apply)(params, x), plain, atol=1e-6)
    assert np.abs(np.asarray(jax.jit(shifted.apply)(params, x) - plain)).max() > 1e-3


def test_patch_merging_concatenates_x0_x1_x2_x3():
    x = np.arange(2 * 3 * 5 * 2, dtype=np.float32).reshape(2, 3, 5, 2)  # odd sizes pad to 4 x 6
    got = np.asarray(merge_patches(jnp.asarray(x)))
    xp = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    want = np.concatenate([xp[:, 0::2, 0::2], xp[:, 1::2, 0::2], xp[:, 0::2, 1::2], xp[:, 1::2, 1::2]], -1)
    np.testing.assert_array_equal(got, want)


def param_count(module, *args):
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args))["params"]
    return sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes))


def swin_counts(embed=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), window=7):
    """(backbone without head, classifier head + final norm) parameters from the architecture."""
    total = 4 * 4 * 3 * embed + embed + 2 * embed  # patch conv + patch norm
    for i, (depth, h) in enumerate(zip(depths, heads)):
        c = embed * 2**i
        block = 2 * c + (3 * c * c + 3 * c) + (2 * window - 1) ** 2 * h + (c * c + c) + 2 * c + (
            4 * c * c + 4 * c) + (4 * c * c + c)
        total += depth * block
        if i < len(depths) - 1:
            total += 2 * 4 * c + 4 * c * 2 * c  # patch merging
    return total


def test_swin_t_classifier_has_the_published_parameter_count():
    count = param_count(swin("tiny", num_classes=1000, shift_single_window=False), jnp.zeros((1, 224, 224, 3)))
    assert count == 28_288_354
    assert count == swin_counts() + 2 * 768 + 768 * 1000 + 1000


def test_swindrnet_parameter_count_equals_the_spec():
    from jaxlab.methods.swindrnet.model import SwinDRNet

    channels = [96, 192, 384, 768]
    backbone = swin_counts() + sum(2 * c for c in channels)  # stage norms norm0..3
    fusion = sum(4 * c + 2 * (3 * c * c + 3 * c) + 2 * 169 + 2 * (c * c + c) + 4 * c + 2 * (8 * c * c + 5 * c)
                 + (2 * c * c + c) + 2 * c for c in channels)
    head_in = [3 * c for c in channels]  # concat(fused, rgb, depth): 288, 576, 1152, 2304

    def uper(classes, ch=512):
        ppm = 4 * (head_in[-1] * ch + 2 * ch)
        bottleneck = (head_in[-1] + 4 * ch) * 9 * ch + 2 * ch
        laterals = sum(c * ch + 2 * ch for c in head_in[:-1])
        fpn = 3 * (ch * 9 * ch + 2 * ch)
        return ppm + bottleneck + laterals + fpn + (4 * ch * 9 * ch + 2 * ch) + ch * classes + classes

    want = 2 * backbone + fusion + uper(1) + uper(2)
    got = param_count(SwinDRNet(), jnp.zeros((1, 224, 224, 3)), jnp.zeros((1, 224, 224)))
    assert got == want == 160_117_727


def test_upernet_resizes_follow_torch():
    # F.interpolate(bilinear, align_corners=False) of [[0, 1], [2, 3]] to 4x4: rows 0, .25, .75, 1 of the
    # way (clamped at the border), no antialiasing when shrinking
    x = jnp.asarray(np.array([[0.0, 1.0], [2.0, 3.0]], np.float32)[None, :, :, None])
    up = np.asarray(resize_bilinear(x, (4, 4)))[0, :, :, 0]
    cols = np.array([0.0, 0.25, 0.75, 1.0])
    np.testing.assert_allclose(up, 2 * cols[:, None] + cols[None, :], atol=1e-6)
    down = np.asarray(resize_bilinear(jnp.arange(16.0).reshape(1, 4, 4, 1), (2, 2)))[0, :, :, 0]
    np.testing.assert_allclose(down, [[2.5, 4.5], [10.5, 12.5]])  # mean of the centre 2x2 taps
    # AdaptiveAvgPool2d(3) on 7: bins [0, 3), [2, 5), [4, 7) (overlapping)
    row = np.arange(7.0)
    pooled = np.asarray(adaptive_avg_pool(jnp.asarray(np.tile(row, (7, 1))[None, :, :, None]), 3))[0, 0, :, 0]
    np.testing.assert_allclose(pooled, [1.0, 3.0, 5.0])


# ------------------------------------------------------------------------------------------ loss terms


def plane_depth(h, w, intr, normal, offset):
    """Depth of the plane normal . p = offset seen through pixels (u, v)."""
    fx, fy, cx, cy = intr
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    rays = np.stack([(u - cx) / fx, (v - cy) / fy, np.ones_like(u)], -1)
    return offset / (rays @ normal)


def test_normals_of_a_plane_are_its_constant_normal():
    from jaxlab.methods.swindrnet.losses import surface_normals

    intr = np.array([30.0, 40.0, 7.5, 5.5])
    normal = np.array([0.2, -0.5, -1.0])
    normal /= np.linalg.norm(normal)
    depth = plane_depth(12, 16, intr, normal, -0.8)
    n = jax.jit(surface_normals)(jnp.asarray(depth[None], jnp.float32), jnp.asarray(intr[None], jnp.float32))
    n = np.asarray(n)[0]
    inner = n[:-1, :-1].reshape(-1, 3)
    cos = np.abs(inner @ normal)
    assert cos.min() > 0.9999
    np.testing.assert_allclose(inner, np.broadcast_to(inner[0], inner.shape), atol=1e-3)


def test_sobel_of_a_ramp_is_constant_inside():
    from jaxlab.methods.swindrnet.losses import sobel

    v, u = np.mgrid[0:6, 0:7].astype(np.float32)
    gx, gy = sobel(jnp.asarray((0.3 * u - 0.2 * v + 1.0)[None]))
    np.testing.assert_allclose(np.asarray(gx)[0, 1:-1, 1:-1], -8 * 0.3, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gy)[0, 1:-1, 1:-1], -8 * -0.2, rtol=1e-5)


def test_loss_weights_regions_and_the_initial_depth():
    from jaxlab.methods.swindrnet.losses import swindrnet_loss

    rng = np.random.default_rng(0)
    gt = rng.uniform(0.5, 1.5, (2, 5, 6)).astype(np.float32)
    pred = gt + rng.normal(0, 0.1, gt.shape).astype(np.float32)
    init = gt + rng.normal(0, 0.2, gt.shape).astype(np.float32)
    obj = rng.uniform(size=gt.shape) < 0.3
    intr = np.tile(np.array([[20.0, 20.0, 2.5, 2.0]], np.float32), (2, 1))
    args = [jnp.asarray(a) for a in (pred, init, gt, intr, obj)]
    loss_fn = jax.jit(swindrnet_loss)
    loss, _ = jax.jit(lambda *a: swindrnet_loss(*a, {"normal": 0.0, "gradient": 0.0}))(*args)
    per_pixel = np.abs(pred - gt) + 0.4 * np.abs(init - gt)
    want = per_pixel[obj].mean() + 0.4 * per_pixel[~obj].mean()
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    exact, _ = loss_fn(jnp.asarray(gt), jnp.asarray(gt), *args[2:])
    assert float(exact) == pytest.approx(0.0, abs=1e-6)
    grads = jax.jit(jax.grad(lambda p: swindrnet_loss(p, *args[1:])[0]))(args[0])
    assert np.isfinite(np.asarray(grads)).all()


# --------------------------------------------------------------------------------------------- metrics


def test_metrics_on_hand_made_frames():
    from jaxlab.methods.swindrnet.metrics import all_region_metrics, finish_means

    gt = np.array([[[1.0, 2.0], [4.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]], np.float32)
    pred = np.array([[[1.04, 2.4], [0.0, 3.0]], [[1.0, 1.2], [1.0, 1.0]]], np.float32)
    material = np.array([[[3, 1], [2, 0]], [[0, 0], [0, 0]]], np.uint8)  # frame 2 has no object
    values = jax.jit(all_region_metrics)(*map(jnp.asarray, (pred, gt, material)))
    values = {k: np.asarray(v) for k, v in values.items()}
    # frame 1, all valid pixels (gt > 0): errors 0.04, 0.4, -4
    np.testing.assert_allclose(values["all/rmse"][0], np.sqrt((0.04**2 + 0.4**2 + 16) / 3), rtol=1e-5)
    np.testing.assert_allclose(values["all/rel"][0], (0.04 + 0.2 + 1.0) / 3, rtol=1e-5)
    np.testing.assert_allclose(values["all/mae"][0], (0.04 + 0.4 + 4) / 3, rtol=1e-5)
    np.testing.assert_allclose(values["all/d105"][0], 1 / 3, rtol=1e-6)  # 1.04 only; the hole never counts
    np.testing.assert_allclose(values["all/d125"][0], 2 / 3, rtol=1e-6)  # 2.4 / 2 = 1.2 < 1.25
    np.testing.assert_allclose(values["ts/mae"][0], (0.04 + 4) / 2, rtol=1e-5)  # transparent + specular
    assert values["object/frames"].tolist() == [1.0, 0.0]
    means = finish_means({k: float(v.mean()) for k, v in values.items()})
    np.testing.assert_allclose(means["object/mae"], (0.04 + 0.4 + 4) / 3, rtol=1e-5)  # frame 2 not counted
    np.testing.assert_allclose(means["all/mae"], ((0.04 + 0.4 + 4) / 3 + 0.2 / 4) / 2, rtol=1e-5)
    assert "all/frames" not in means


# ------------------------------------------------------------------------------------------- simulator


def test_simulator_corrupts_only_specular_and_transparent_objects():
    from jaxlab.data.synthetic.dreds import simulate

    frames = simulate(4, height=32, width=40, seed=3)
    again = simulate(2, height=32, width=40, seed=3)
    np.testing.assert_array_equal(frames["raw_depth"][:2], again["raw_depth"])  # frame i depends on i only
    depth, raw, material = frames["depth"], frames["raw_depth"], frames["material"]
    assert set(np.unique(material)) <= {0, 1, 2, 3}
    ts = (material == 2) | (material == 3)
    assert ts.reshape(4, -1).any(1).all()  # every frame has a specular or transparent object
    fb = 446.31 * 0.055  # the sensor's disparity quantisation, written out independently
    quantised = fb / (np.round(fb / depth * 16) / 16)
    np.testing.assert_allclose(raw[~ts], quantised[~ts], rtol=1e-5)  # diffuse and background: exact read
    assert np.all(np.abs(raw[~ts] - depth[~ts]) < 0.01)
    assert (raw[ts] == 0).mean() > 0.1  # holes, only there
    changed = np.abs(raw[ts] - quantised[ts]) > 1e-4
    assert changed.mean() > 0.5
    transparent = (material == 3) & (raw > 0)
    assert np.mean(raw[transparent] - depth[transparent]) > 0.02  # biased toward what lies behind
    fx, fy, cx, cy = frames["intrinsics"][0]
    assert (fx, fy, cx, cy) == pytest.approx((446.31 * 40 / 640, 446.31 * 32 / 360, 19.5, 15.5))
    assert frames["rgb"].shape == (4, 32, 40, 3) and 0 <= frames["rgb"].min() and frames["rgb"].max() <= 1
