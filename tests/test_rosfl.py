"""RoS-FL pieces: RED-CNN split counts and equivalence to the unsplit network, DWCS by hand, a vmapped
round against a per-client loop, bytes against the spec's formula."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlab.federated import chain
from jaxlab.federated import clients as C
from jaxlab.methods import rosfl
from jaxlab.methods.rosfl import dwcs
from jaxlab.models.red_cnn import RedCNN, part_param_counts


IMPL = "lax"  # under the tests' XLA flags (O0) lax's conv compiles 2-4x faster than im2col (tested equal below)


def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_red_cnn_parameter_counts_match_the_spec():
    """96 channels, 5x5: head 1*96*25 + 96; body 8 x (96*96*25 + 96); tail 96*25 + 1."""
    shapes = jax.eval_shape(lambda: RedCNN().init(jax.random.key(0), jnp.zeros((1, 32, 32, 1))))["params"]
    assert {k: count(v) for k, v in shapes.items()} == {"head": 2496, "body": 1_843_968, "tail": 2401}
    assert part_param_counts() == {"head": 2496, "body": 1_843_968, "tail": 2401}


def assert_split_equals_unsplit(parts, model, params, x, y):
    """chain_grads over the parts vs value_and_grad of the unsplit model (MSE); returns the wire as
    (direction, kind, shape) per message."""
    def both(params):  # one compiled program for the split and the unsplit side
        full = {"head": params[0], "body": params[1], "tail": params[2]}
        unsplit = jax.value_and_grad(lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2))(full)
        return chain.chain_grads(parts, rosfl.mse_loss, params, [{}] * 3, x, y, jax.random.key(3)), unsplit

    result, (loss, grads) = jax.jit(both)(params)
    np.testing.assert_allclose(result.loss, loss, rtol=1e-6)
    for got, name in zip(result.grads, ("head", "body", "tail")):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), got, grads[name])
    return [(m.direction, m.kind, m.array.shape) for m in result.messages]


def test_three_part_split_equals_unsplit_network():
    """Chain forward/backward (one vjp per part) = value_and_grad of the unsplit RedCNN; the wire
    carries exactly: head activation up, body output down, their gradients back; no labels, no outputs."""
    features, shape = 4, (22, 22)
    params = rosfl.init_red_cnn(jax.random.key(0), shape, features)
    x = jax.random.uniform(jax.random.key(1), (2, *shape, 1))
    y = jax.random.uniform(jax.random.key(2), (2, *shape, 1))
    wire = assert_split_equals_unsplit(rosfl.red_cnn_parts(features, IMPL), RedCNN(features, IMPL), params, x, y)
    d = (2, 18, 18, features)
    assert wire == [("up", "activation", d), ("down", "activation", d), ("up", "gradient", d),
                    ("down", "gradient", d)]


def test_dwcs_by_hand():
    """w_t = 1, w_prev = 0, mu = 0.5, plain Adam lr 0.1: grad 0.5, Adam's first step moves temp by
    -lr * g / (|g| + eps) = -0.1 -> temp 0.9. t = 2: alpha 0.5 -> w = 0.95; t = 1: alpha 0 -> w = 1;
    t = 0: no correction; t = 500: alpha 0.99 -> 0.901. Released flag: only the body changes, every
    part's w_prev becomes the result."""
    tx = optax.adam(0.1)
    params = [jnp.array(1.0), jnp.array(1.0), jnp.array(1.0)]
    state = dwcs.DWCSState([jnp.array(0.0)] * 3, [tx.init(p) for p in params])
    for t, expected in ((0, 1.0), (1, 1.0), (2, 0.95), (500, 0.901)):
        new, new_state = dwcs.apply(params, state, jnp.asarray(t), tx, mu=0.5)
        np.testing.assert_allclose(new, [expected] * 3, rtol=1e-6)
        np.testing.assert_allclose(new_state.previous, [0.0] * 3 if t == 0 else [expected] * 3, rtol=1e-6)
    new, new_state = dwcs.apply(params, state, jnp.asarray(2), tx, mu=0.5, parts=("body",))
    np.testing.assert_allclose(new, [1.0, 0.95, 1.0], rtol=1e-6)
    np.testing.assert_allclose(new_state.previous, [1.0, 0.95, 1.0], rtol=1e-6)
    with pytest.raises(ValueError, match="not among the model's parts"):
        dwcs.apply(params, state, jnp.asarray(2), tx, parts=("neck",))


# 22 px: the smallest even size RED-CNN's five valid 5x5 convs allow (2 x 2 at the bottleneck)
ROUND_FEATURES, ROUND_SHAPE = 2, (22, 22)


@pytest.fixture(scope="module")
def round_setup():
    """One compiled RoS-FL round (RED-CNN, 2 clients x 2 steps x batch 2, DWCS on all parts, mu 1e-2) shared
    by the round tests: client data of another step mask reuses the same program."""
    tx, correction_tx = dwcs.torch_adam(1e-3), dwcs.torch_adam(1e-3)
    parts = rosfl.red_cnn_parts(ROUND_FEATURES, IMPL)
    round_fn = jax.jit(rosfl.make_round(parts, rosfl.mse_loss, tx, correction_tx, mu=1e-2))
    init_params = lambda rng: rosfl.init_red_cnn(rng, ROUND_SHAPE, ROUND_FEATURES)  # noqa: E731
    return {"tx": tx, "correction_tx": correction_tx, "parts": parts, "round": round_fn, "init_params": init_params,
            "params": init_params(jax.random.key(0))}


def two_rounds(setup, data):
    """(state after round 0, after round 1, round 0's metrics) of the shared round program from the
    global params of seed 0, rng keys 7 and 8."""
    state = rosfl.init(setup["params"], 2, setup["tx"], setup["correction_tx"])
    state1, metrics = setup["round"](state, data, jax.random.key(7))
    state2, _ = setup["round"](state1, data, jax.random.key(8))  # round 1: DWCS active (alpha 0)
    return state1, state2, metrics


def _client_data(shape, steps, batch):
    """Two clients; client 1 has one real step (the second is masked)."""
    k = len(steps)
    x = jax.random.uniform(jax.random.key(4), (k, max(steps), batch, *shape, 1))
    y = x * 0.5 + 0.1
    mask = jnp.asarray([[i < s for i in range(max(steps))] for s in steps])
    return C.ClientData({"x": x, "y": y}, mask, jnp.asarray([s * batch for s in steps], jnp.int32))


def test_vmapped_round_equals_per_client_loop_and_bytes_equal_the_formula(round_setup):
    """Two vmapped rounds (client 1 has a masked step) = a plain loop over clients and steps of the chain
    step, then the mean and DWCS; the round's measured bytes = the spec's formula, no labels sent."""
    features, shape, batch, steps = ROUND_FEATURES, ROUND_SHAPE, 2, (2, 1)
    tx, correction_tx, parts, params = (round_setup[k] for k in ("tx", "correction_tx", "parts", "params"))
    data = _client_data(shape, steps, batch)
    state1, state2, metrics = two_rounds(round_setup, data)
    rng = jax.random.key(7)

    def loop_round(global_params, opt_states, correction, t, key):
        step = jax.jit(chain.make_chain_step(parts, rosfl.mse_loss, [tx] * 3))
        finals, new_opts = [], []
        for k, n_steps in enumerate(steps):
            st = {"params": list(global_params), "opt_state": opt_states[k], "model_state": [{}] * 3}
            for i in range(n_steps):
                batch_k = {"x": data.batches["x"][k, i], "y": data.batches["y"][k, i]}
                st, _ = step(st, batch_k, jax.random.fold_in(jax.random.fold_in(key, k), i))
            finals.append(st["params"])
            new_opts.append(st["opt_state"])
        mean = [jax.tree.map(lambda *xs: sum(xs) / len(xs), *[f[j] for f in finals]) for j in range(3)]
        new, correction = dwcs.apply(mean, correction, jnp.asarray(t), correction_tx, mu=1e-2)
        return new, new_opts, correction

    opts = [[tx.init(p) for p in params] for _ in steps]
    ref1, opts, corr = loop_round(params, opts, dwcs.init(params, correction_tx), 0, rng)
    ref2, _, _ = loop_round(ref1, opts, corr, 1, jax.random.key(8))
    for got, want in ((state1.params, ref1), (state2.params, ref2)):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, want)

    d_head, d_body = rosfl.cut_sizes(shape, features)
    counts = part_param_counts(features)
    formula = rosfl.round_bytes_formula([s * batch for s in steps], d_head, d_body, counts["head"], counts["tail"])
    measured = sum(float(metrics[f"bytes_{k}"]) for k in chain.BYTE_KINDS) + float(metrics["bytes_weights"])
    assert measured == formula
    assert float(metrics["bytes_labels_up"]) == 0.0


def test_red_cnn_and_unet_im2col_equal_lax():
    """conv_impl="im2col" (patches @ kernel, the tiny config's choice) computes the same RED-CNN and U-Net
    as lax's conv (the other tests use lax)."""
    from jaxlab.models.unet import UNet

    x = jax.random.uniform(jax.random.key(5), (2, 24, 24, 1))
    params = RedCNN(4).init(jax.random.key(6), x)
    np.testing.assert_allclose(RedCNN(4, "im2col").apply(params, x), RedCNN(4).apply(params, x), rtol=1e-4,
                               atol=1e-5)
    params = UNet((2, 4, 8)).init(jax.random.key(6), x)
    np.testing.assert_allclose(UNet((2, 4, 8), conv_impl="im2col").apply(params, x), UNet((2, 4, 8)).apply(params, x),
                               rtol=1e-4, atol=1e-5)


# `rosfl:tiny` shrunk: 24 px, 2 clients of 2 training / 2 test phantoms, 2 channels, lax convs (IMPL)
TINY = ["data.image_size=24", "data.train_per_client=2", "data.test_per_client=2", "data.batch_size=2",
        "data.eval_batch_size=4", "model.features=2", "model.conv_impl=lax", "rosfl.num_clients=2"]


@pytest.fixture(scope="module")
def tiny_clients():
    """The simulated CT clients of TINY (one simulation for the trainer and the segmentation tests)."""
    from jaxlab.config import load_config

    return rosfl.make_clients(load_config("rosfl:tiny", TINY))


def test_trainer_run_on_ct_clients(tmp_path, tiny_clients):
    """Two rounds of TINY through the trainer: clients scan with different HyperFed-derived geometries
    and doses (their degraded inputs differ in PSNR), every per-client metric (PSNR, RMSE, SSIM, restored
    and input) is reported, and a round's bytes equal the spec's formula."""
    import json

    from jaxlab.config import load_config
    from jaxlab.train.loop import train

    config = load_config("rosfl:tiny", TINY + ["train.steps=2", "train.eval_every=2", "train.checkpoint_every=2",
                                               "train.progress=False"])
    clients = tiny_clients
    assert [g.sino_shape for g in clients.geometries] == [(64, 92), (64, 78)]
    assert clients.doses == [1000.0, 1375.0]
    train(config, tmp_path, rosfl.build(config, clients))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["split"] == "eval"]
    last = evals[-1]
    assert all(np.isfinite(last[f"{p}{m}_c{k}"]) for m in ("psnr", "rmse", "ssim") for p in ("", "input_")
               for k in range(2))
    assert all(-1 <= last[f"{p}ssim_c{k}"] <= 1 for p in ("", "input_") for k in range(2))
    assert last["input_psnr_c0"] != last["input_psnr_c1"]
    d_head, d_body = rosfl.cut_sizes((24, 24), 2)
    counts = part_param_counts(2)
    formula = rosfl.round_bytes_formula([2, 2], d_head, d_body, counts["head"], counts["tail"])
    train_row = [r for r in rows if r["split"] == "train"][-1]
    assert train_row["bytes_total"] + train_row["bytes_weights"] == formula


def test_unet_split_equals_unsplit_and_keeps_skips_on_the_client():
    """U-Net three-part chain = unsplit UNet (values and grads); the wire carries only the pooled encoder
    output (up) and the upsampled bottleneck (down), never the skip features or the image."""
    from jaxlab.models.unet import UNet

    features, shape = (4, 8, 8), (16, 16)
    params = rosfl.init_unet(jax.random.key(0), shape, features)
    x = jax.random.uniform(jax.random.key(1), (2, *shape, 1))
    y = jax.random.uniform(jax.random.key(2), (2, *shape, 1))
    wire = assert_split_equals_unsplit(rosfl.unet_parts(features, conv_impl=IMPL), UNet(features, conv_impl=IMPL),
                                       params, x, y)
    assert wire == [("up", "activation", (2, 4, 4, 8)), ("down", "activation", (2, 8, 8, 8)),
                    ("up", "gradient", (2, 8, 8, 8)), ("down", "gradient", (2, 4, 4, 8))]


def test_bce_dice_loss_against_numpy():
    """BCE (mean over pixels) + soft Dice loss (eps 1) against a float64 numpy reference."""
    logits = jax.random.normal(jax.random.key(9), (2, 5, 5, 1)) * 3
    masks = (jax.random.uniform(jax.random.key(10), (2, 5, 5, 1)) > 0.6).astype(jnp.float32)
    lg, m = np.asarray(logits, np.float64), np.asarray(masks, np.float64)
    p = 1 / (1 + np.exp(-lg))
    bce = -np.mean(m * np.log(p) + (1 - m) * np.log(1 - p))
    dice = 1 - (2 * (p * m).sum() + 1) / (p.sum() + m.sum() + 1)
    loss, parts = rosfl.bce_dice_loss(logits, masks)
    np.testing.assert_allclose([loss, parts["bce"], parts["dice_loss"]], [bce + dice, bce, dice], rtol=1e-5)


def test_segmentation_dice_iou_per_client_by_hand():
    """Three 2x2 examples (clients 0, 1, 0): Dice 2I/(P+T) and IoU I/(P+T-I) over each client's pixels,
    and the thresholded input's scores, counted by hand."""
    from jaxlab.methods.rosfl import task

    logits = jnp.asarray([[1, 1, -1, -1], [1, -1, -1, -1], [-1, -1, -1, 1]], jnp.float32).reshape(3, 2, 2, 1)
    masks = jnp.asarray([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1]], jnp.float32).reshape(3, 2, 2, 1)
    x = jnp.asarray([[2, 2, 2, 2], [0, 0, 0, 0], [0, 0, 2, 2]], jnp.float32).reshape(3, 2, 2, 1)
    batch = {"x": x, "y": masks, "client": jnp.asarray([0, 1, 0])}
    values = task.segmentation_values(logits, batch, 2, threshold=1.0)
    means = {k: float(np.mean(v)) for k, v in values.items()}
    out = task.make_segmentation_finish(2)(means)
    # client 0: I = 1 + 1, P = 2 + 1, T = 1 + 2 -> Dice 4/6, IoU 2/4; client 1: I 1, P 1, T 2 -> 2/3, 1/2
    # all: I 3, P 4, T 5 -> 6/9, 3/6; input: client 0 I 1 + 2, P 4 + 2, T 3 -> 6/9, 3/6; client 1: 0
    expected = {"dice_c0": 4 / 6, "iou_c0": 2 / 4, "dice_c1": 2 / 3, "iou_c1": 1 / 2, "dice": 6 / 9, "iou": 3 / 6,
                "input_dice_c0": 6 / 9, "input_iou_c0": 3 / 6, "input_dice_c1": 0.0, "input_iou_c1": 0.0}
    for k, v in expected.items():
        assert out[k] == pytest.approx(v), k


def test_unet_segmentation_method_pieces(tiny_clients):
    """TINY as U-Net segmentation (24 px, 2 clients of 2 phantoms), its pieces without a training
    run: the labels are the thresholded phantoms (0/1 masks, some foreground), the inputs unchanged; the
    built method's U-Net gives logits (no residual: it equals UNet(residual=False) on the global params)
    and its eval reports Dice / IoU per client in [0, 1]; RED-CNN cannot segment."""
    from jaxlab import methods
    from jaxlab.config import load_config
    from jaxlab.methods.rosfl import task
    from jaxlab.models.unet import UNet

    config = load_config("rosfl:tiny", TINY + ["model.name=unet", "rosfl.task=segmentation"])
    clients = tiny_clients
    train_parts, test_parts = task.task_data(config, clients)
    for seg, raw in zip(train_parts + test_parts, clients.train + clients.test):
        np.testing.assert_array_equal(seg["y"], (raw["y"] > 1.1).astype(np.float32))
        np.testing.assert_array_equal(seg["x"], raw["x"])
    assert 0 < np.mean(np.concatenate([p["y"] for p in train_parts])) < 0.5
    method = rosfl.build(config, clients)
    state = method.init_state(jax.random.key(0), None)
    batch = method.eval_source.get(np.arange(4))
    logits = method.apply_fn(state, batch)
    params = method.param_groups(state)
    want = UNet((2, 4, 8), 1, False, "lax").apply({"params": params}, batch["x"])
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-6)
    values = method.eval_step(state, {k: jnp.asarray(v) for k, v in batch.items()}, jax.random.key(1))
    out = method.eval_finish({k: float(np.mean(v)) for k, v in values.items()})
    for k in range(2):
        assert 0 <= out[f"dice_c{k}"] <= 1 and 0 <= out[f"iou_c{k}"] <= out[f"dice_c{k}"]
    with pytest.raises(Exception, match="needs model.name='unet'"):
        methods.build(load_config("rosfl:tiny", ["rosfl.task=segmentation"]))


def test_fedavg_and_splitfed_baselines_equal_rosfl_without_dwcs(round_setup):
    """The report's FedAvg (unsplit RED-CNN on jaxlab.federated's engine), SplitFed V1 (head | body+tail,
    federated.split.splitfed_v1) and RoS-FL, all with persistent client Adam, are the same algorithm on
    equal-size clients (split = unsplit; equal-weight averaging): two rounds agree. DWCS leaves the
    weights as averaged in rounds 0 and 1 (none at t = 0, alpha = 0 at t = 1), so the shared RoS-FL round
    program is RoS-FL without DWCS here."""
    from jaxlab.methods.rosfl import task

    tx, init_params = round_setup["tx"], round_setup["init_params"]
    data = _client_data(ROUND_SHAPE, (2, 2), 2)
    _, split, _ = two_rounds(round_setup, data)
    fed_round, fed_init, fed_params = task.fedavg_round(RedCNN(ROUND_FEATURES, IMPL), rosfl.mse_loss, tx,
                                                        init_params, 2)
    sf_round, sf_init, sf_params = task.splitfed_round(round_setup["parts"], rosfl.mse_loss, tx, init_params, 2)
    fed, sf = fed_init(jax.random.key(0)), sf_init(jax.random.key(0))

    @jax.jit
    def both(fed, sf, rng):
        return fed_round(fed, data, rng)[0], sf_round(sf, data, rng)[0]

    for r in (7, 8):  # the rng keys of `two_rounds` (no randomness in RED-CNN: they only must not matter)
        fed, sf = both(fed, sf, jax.random.key(r))
    for got in (fed_params(fed), sf_params(sf)):
        for name, want in zip(dwcs.PART_NAMES, split.params):
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got[name], want)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), split.params[1],
                                         round_setup["params"][1]))
    assert max(moved) > 1e-4  # training happened


def test_report_tables_seeds_findings_and_bytes():
    """format_report: per-client mean ± std over seeds per metric, the per-client finding (every seed's
    gain over the input > 0), drift rows; setting_bytes: FedAvg 2 K |W| b, SplitFed V1 the head's whole
    output (activation + the kept input image) each way plus the label images, by hand; pooled concatenates."""
    import importlib

    from jaxlab.config import load_config
    from jaxlab.methods.rosfl.task import ClientSet

    R = importlib.import_module("jaxlab.methods.rosfl.report")  # the package exports the function `report`

    def seed(offset):
        s = lambda p: {"psnr": p, "ssim": 0.5, "rmse": 0.1}  # noqa: E731
        per_client = {name: [s(20.0 + i + offset), s(22.0 + i + offset)] for i, name in enumerate(("input",) + R.SETTINGS)}
        per_client["input"][1]["psnr"] = 30.0  # client 2's input beats RoS-FL (22 + 1 + offset) on both seeds
        return {"seed": int(offset), "per_client": per_client, "drift": {"rosfl": {"body": [0.5 + offset, 0.25]}}}

    byte_rows = {s: dict.fromkeys(R.BYTE_COLUMNS, 1.0) for s in R.SETTINGS}
    result = {"seeds": [seed(0.0), seed(1.0)], "bytes": byte_rows}
    result["findings"] = R.check_findings("restoration", result)
    assert [f.holds for f in result["findings"]] == [True, False]
    md = R.format_report({"tasks": {"restoration": result}, "rounds": 2, "seeds": [0, 1]})
    assert "| RoS-FL (DWCS) | 21.50 ± 0.50 | 23.50 ± 0.50 | 22.50 ± 0.50 |" in md
    assert "| RoS-FL (DWCS) | body | 1.000, 0.250 |" in md and "## Restoration (seeds [0, 1])" in md
    assert "| client 1: restored images better than the degraded input (psnr) | RoS-FL - input: 1.00 ± 0.00" in md
    assert "| FedAvg (unsplit) | 1 | 1 | 1 | 1 | 1 | 1 | 1 | 1 | 8 |" in md

    config = R.report_config(load_config("rosfl:tiny", ["data.image_size=24", "report.features=2",
                                                         "report.segmentation.rounds=5"]))
    seg, rest = R.task_config(config, "segmentation", 3), R.task_config(config, "restoration", 3)
    assert (seg.seed, seg.model.name, seg.train.steps) == (3, "unet", 5)
    assert seg.optimizer.lr == config.report.segmentation.lr
    assert (rest.model.name, rest.train.steps) == ("red_cnn", config.report.rounds)
    assert rest.optimizer.lr == config.optimizer.lr
    a = {"x": np.zeros((3, 24, 24, 1), np.float32), "y": np.ones((3, 24, 24, 1), np.float32)}
    clients = ClientSet([a, a], [a, a], [None, None], [1.0, 2.0])
    rows = R.setting_bytes(config, clients, {"activation_up": 7.0})
    counts = part_param_counts(2)
    total = counts["head"] + counts["body"] + counts["tail"]
    assert rows["fedavg"]["weights_up"] == rows["fedavg"]["weights_down"] == 2 * total * 4
    sent = 20 * 20 * 2 + 24 * 24  # head activation (B, 20, 20, 2) and the input image kept for the residual
    assert rows["splitfed"]["activation_up"] == rows["splitfed"]["gradient_down"] == 6 * sent * 4
    assert rows["splitfed"]["labels_up"] == 6 * 24 * 24 * 4 and rows["splitfed"]["weights_up"] == 2 * counts["head"] * 4
    assert rows["rosfl"]["activation_up"] == 7.0 and sum(rows["local"].values()) == 0
    assert rows["centralised"]["data_up"] == 2 * 6 * 24 * 24 * 4
    b = {"x": np.ones((1, 24, 24, 1)), "y": np.zeros((1, 24, 24, 1))}
    (one,) = R.pooled(ClientSet([a, b], [a, b], [None, None], [1.0, 2.0]))
    np.testing.assert_array_equal(one["x"][:, 0, 0, 0], [0, 0, 0, 1])
