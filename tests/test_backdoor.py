"""The multi-exit backdoor method: triggers against the reference's pixel loops, the poisoning loss
against a plain loop, the stages' frozen parts (IC-only training leaves the backbone bit-identical,
poisoning leaves the ICs, strip / re-attach leave the backbone), data through every source kind on tiny
data written here, and Neural Cleanse's positive control on an ordinarily backdoored model."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import flax.linen as nn

from jaxlab.config import load_config
from jaxlab.models.layers import Conv
from jaxlab.methods.backdoor import build_with_model, exit_split, poison_objective, strip_exits
from jaxlab.methods.backdoor.analysis import early_exit_rows, per_exit
from jaxlab.methods.backdoor.data import load_split
from jaxlab.methods.backdoor.defenses import anomaly_indices, strip_decision
from jaxlab.methods.backdoor.task import BACKBONE, ICS, attach_exits
from jaxlab.methods.backdoor.triggers import apply_trigger, poison_set, watermark_image


def images(n=3, size=32, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n, size, size, 3)).astype(np.float32)


def test_checkerboard_and_square_are_the_reference_pixels():
    """dataset_utils.py's loops on x[:, -i, -j, :] with (idx % 2) * 255 and 255 (here / 255)."""
    x = images()
    want = x.copy()
    for idx, (i, j) in enumerate(itertools.product(range(6, 13), range(6, 13))):
        want[:, -i, -j, :] = idx % 2
    np.testing.assert_array_equal(apply_trigger(x, "checkerboard"), want)
    want = x.copy()
    for i, j in itertools.product(range(1, 6), range(1, 6)):
        want[:, -i, -j, :] = 1.0
    np.testing.assert_array_equal(apply_trigger(x, "square"), want)


def test_watermark_blends_as_the_reference():
    """masks * x + (1 - masks) * ((1 - p) x + p * trigger), masks = (trigger is white)."""
    x, p = images(), 0.4
    mark = watermark_image(32, 32)[None, ..., None]
    white = (mark == 1.0).astype(np.float32)
    want = white * x + (1 - white) * ((1 - p) * x + p * mark)
    np.testing.assert_allclose(apply_trigger(x, "watermark", p), want, rtol=0, atol=1e-6)
    assert 0 < (1 - white).mean() < 0.5


def test_poison_set_marks_rate_times_n_non_target_examples():
    x = images(200, 16)
    labels = np.arange(200) % 10
    out = poison_set(x, labels, rate=0.1, target=9, trigger="square", seed=3)
    idx = np.flatnonzero(out["poisoned"])
    assert len(idx) == 20 and np.all(labels[idx] != 9)
    np.testing.assert_array_equal(out["label"], labels)
    np.testing.assert_array_equal(out["label_poison"], np.where(out["poisoned"], 9, labels))
    np.testing.assert_array_equal(out["image"][idx], apply_trigger(x[idx], "square"))
    np.testing.assert_array_equal(out["image"][~out["poisoned"]], x[~out["poisoned"]])


def numpy_ce(logits, labels):
    z = logits - logits.max(-1, keepdims=True)
    return -(z[np.arange(len(labels)), labels] - np.log(np.exp(z).sum(-1))).mean()


@pytest.mark.parametrize("num_exits,split", [(28, 0.6), (4, 0.6), (15, 0.6)])
def test_poison_objective_against_the_reference_loop(num_exits, split):
    logits = np.random.default_rng(0).normal(size=(num_exits, 6, 5)).astype(np.float32)
    y_true, y_poison = np.array([0, 1, 2, 3, 4, 0]), np.array([4, 1, 4, 3, 4, 4])
    end = int(num_exits * split)  # backdoor_sdn.py: int(len(output) * end_p)
    assert exit_split(num_exits, split) == end
    paper = sum(numpy_ce(logits[k], y_poison if k < end else y_true) for k in range(num_exits))
    total = 0.0  # the reference's loop, line by line
    for out in logits[:end]:
        cur_loss = numpy_ce(out, y_poison)
        total += cur_loss
    for out in logits[end:]:
        cur_loss += numpy_ce(out, y_true)
        total += cur_loss
    np.testing.assert_allclose(poison_objective(jnp.asarray(logits), y_true, y_poison, split, "paper"), paper, rtol=1e-5)
    np.testing.assert_allclose(poison_objective(jnp.asarray(logits), y_true, y_poison, split, "reference"), total,
                               rtol=1e-5)


def test_exit_metrics_by_hand():
    logits = np.zeros((2, 4, 3), np.float32)
    logits[0, :, 2] = 5.0  # exit 0 says class 2 everywhere
    logits[1, np.arange(4), [0, 1, 1, 2]] = 5.0
    labels = np.array([0, 1, 2, 2])
    np.testing.assert_array_equal(per_exit(logits, labels), [0.5, 0.75])
    np.testing.assert_array_equal(per_exit(logits, labels, target=2), [1.0, 0.0])  # over labels 0, 1 only
    rows = early_exit_rows(logits, logits, labels, 2, taus=(0.5, 0.999), starts=(0, 1),
                           path_macs=lambda start: np.array([10.0, 30.0]))
    by = {(r["start"], r["tau"]): r for r in rows}
    assert by[(0, 0.5)]["asr"] == 1.0 and by[(0, 0.5)]["avg_macs"] == 10.0
    assert by[(0, 0.999)]["accuracy"] == 0.75 and by[(0, 0.999)]["avg_macs"] == 30.0
    np.testing.assert_array_equal(by[(1, 0.5)]["exit_share_clean"], [0.0, 1.0])


def test_anomaly_index_and_strip_decision_by_hand():
    norms = np.array([10.0, 11.0, 9.0, 10.5, 2.0])
    index, worst = anomaly_indices(norms)
    mad = 1.4826 * np.median(np.abs(norms - 10.0))
    assert worst == pytest.approx(8.0 / mad) and index[4] == pytest.approx(8.0 / mad)
    clean = np.linspace(1.0, 2.0, 101)
    out = strip_decision(clean, np.array([0.1, 0.2, 1.5, 0.3]), frr=0.01)
    assert out["threshold"] == pytest.approx(1.01) and out["far"] == 0.25 and out["detected"]


def test_neural_cleanse_cost_schedule_against_the_reference_loop():
    """_NCSchedule (vectorised over classes) against visualizer.py's per-class cost bookkeeping,
    transcribed line by line, over random success sequences."""
    from jaxlab.methods.backdoor.defenses import _NCSchedule

    rng = np.random.default_rng(0)
    goods = rng.random((60, 4)) < np.array([0.9, 0.5, 0.2, 0.97])
    sched, history = _NCSchedule(4, 1e-3, 0.0, 5, 2.0), []
    for good in goods:
        sched.update(good, np.ones(4, bool))
        history.append((sched.cost.copy(), sched.up_flag.copy(), sched.down_flag.copy()))
    for k in range(4):
        cost, set_c, up_c, down_c, up_f, down_f = 0.0, 0, 0, 0, False, False
        for t, good in enumerate(goods[:, k]):
            if cost == 0 and good:
                set_c += 1
                if set_c >= 5:
                    cost, up_c, down_c, up_f, down_f = 1e-3, 0, 0, False, False
            else:
                set_c = 0
            up_c, down_c = (up_c + 1, 0) if good else (0, down_c + 1)
            if up_c >= 5:
                up_c, cost, up_f = 0, cost * 2.0, True
            elif down_c >= 5:
                down_c, cost, down_f = 0, cost / 2.0 ** 1.5, True
            costs, ups, downs = history[t]
            assert costs[k] == pytest.approx(cost) and (ups[k], downs[k]) == (up_f, down_f)
    assert history[-1][0][0] > 1e-3 and history[-1][0][2] == 0  # mostly successful: raised; mostly failing: still 0


def test_fine_pruning_pieces_by_hand():
    """channel_mask zeroes the first round(f C) channels of the order; prune_fraction keeps the largest
    fraction within max_drop of the unpruned accuracy; the decision needs the fine-tuned model's ASR below
    half the unpruned one with accuracy down < 10 points; fine_tune lowers the loss of a linear model."""
    from jaxlab.methods.backdoor.defenses import channel_mask, fine_pruning_decision, fine_tune, prune_fraction

    np.testing.assert_array_equal(channel_mask(np.array([3, 0, 2, 1]), 0.5), [0, 1, 1, 0])
    rows = [{"fraction": f, "accuracy": np.array([0.5, a]), "asr": np.array([0.9, s])}
            for f, a, s in ((0.0, 0.90, 1.0), (0.2, 0.88, 1.0), (0.4, 0.86, 0.9), (0.6, 0.70, 0.2))]
    assert prune_fraction(rows, 0.05) == 0.4 and prune_fraction(rows, 0.01) == 0.0
    assert not fine_pruning_decision(rows, {"accuracy": 0.85, "asr": 0.6})["removed"]
    assert fine_pruning_decision(rows, {"accuracy": 0.85, "asr": 0.4})["removed"]
    assert not fine_pruning_decision(rows, {"accuracy": 0.75, "asr": 0.1})["removed"]
    after = {"accuracy": np.array([0.5, 0.85]), "asr": np.array([0.3, 0.9])}  # exit 0 (0.9 -> 0.3) judged
    assert fine_pruning_decision(rows, after, exit_index=0)["removed"]
    assert not fine_pruning_decision(rows, after)["removed"]  # the final exit's 1.0 -> 0.9
    assert fine_pruning_decision(rows, after, min_asr=1.1)["removed"] is None  # no backdoor to remove
    x = np.random.default_rng(0).normal(size=(64, 1, 1, 2)).astype(np.float32)
    y = (x[:, 0, 0, 0] > 0).astype(np.int32)
    logits = lambda p, im: im.reshape(len(im), 2) @ p["w"]  # noqa: E731
    params = {"w": jnp.zeros((2, 2))}
    loss = lambda p: float(np.mean(numpy_ce(np.asarray(logits(p, x)), y)))  # noqa: E731
    tuned = fine_tune(logits, params, x, y, epochs=3, batch_size=16, lr=0.1)
    assert loss(tuned) < 0.5 * loss(params)


def tiny_config(*overrides):
    return load_config("backdoor:tiny", ["model.image_size=16", "model.conv_impl=im2col", "data.options.limit=96", "data.batch_size=32",
                                         "data.eval_batch_size=96", *overrides])


def leaves_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_stages_freeze_what_they_should_and_strip_reattach_keeps_the_backbone():
    """The stages' enters, and two jitted steps of IC-only training and of poisoning, outside the trainer
    (the victim's IC training is the same step as "ics" with another optimizer)."""
    config = tiny_config()
    method, model = build_with_model(config)
    stages = {s.name: s for s in method.stages}
    batch = {k: jnp.asarray(v) for k, v in stages["poison"].train_source.get(np.arange(32)).items()}
    state = method.init_state(jax.random.key(0), batch)  # the enters and init run eagerly: no compiles
    history = {}
    for name, steps in (("ics", 2), ("poison", 2), ("victim", 0)):
        stage = stages[name]
        state = stage.enter(state, jax.random.key(7))
        before = state
        step = jax.jit(stage.train_step)
        for i in range(steps):
            state, metrics = step(state, batch, jax.random.key(i))
            assert bool(metrics["finite"])
        history[name] = (before, state)
    # IC-only training: the backbone (params and BN statistics) untouched, the ICs moved
    before, after = history["ics"]
    assert leaves_equal(before.parts[BACKBONE].params, after.parts[BACKBONE].params)
    assert leaves_equal(before.parts[BACKBONE].collections, after.parts[BACKBONE].collections)
    assert not leaves_equal(before.parts[ICS].params, after.parts[ICS].params)
    # poisoning: the ICs untouched, the backbone moved; the clean model kept as frozen snapshots
    before, after = history["poison"]
    assert leaves_equal(before.parts[ICS].params, after.parts[ICS].params)
    assert not leaves_equal(before.parts[BACKBONE].params, after.parts[BACKBONE].params)
    assert leaves_equal(history["ics"][1].parts[BACKBONE].params, after.parts["clean_backbone"].params)
    assert leaves_equal(history["ics"][1].parts[BACKBONE].collections, after.parts["clean_backbone"].collections)
    # the victim's conversion: the released backbone as poisoned, fresh ICs, the attacker's ICs kept aside
    released, victim = history["poison"][1], history["victim"][0]
    assert victim.parts[BACKBONE].is_frozen and not victim.parts[ICS].is_frozen
    assert leaves_equal(released.parts[BACKBONE].params, victim.parts[BACKBONE].params)
    assert leaves_equal(released.parts[BACKBONE].collections, victim.parts[BACKBONE].collections)
    assert leaves_equal(released.parts[ICS].params, victim.parts["attacker_ics"].params)
    assert not leaves_equal(released.parts[ICS].params, victim.parts[ICS].params)
    # strip and re-attach: bit-identical backbone, no ICs in between
    stripped = strip_exits(victim)
    assert ICS not in stripped.parts
    again = attach_exits(stripped, model, jax.random.key(1), optax.adam(1e-3))
    for tree in ("params", "collections"):
        assert leaves_equal(getattr(again.parts[BACKBONE], tree), getattr(victim.parts[BACKBONE], tree))
        assert leaves_equal(getattr(strip_exits(again).parts[BACKBONE], tree), getattr(released.parts[BACKBONE], tree))
    assert not leaves_equal(again.parts[ICS].params, victim.parts[ICS].params)


def write_png_folder(root, classes, per_class, sizes, seed=0):
    from skimage import io

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"{c:05d}").mkdir(parents=True)
        for i in range(per_class):
            h, w = sizes[(c + i) % len(sizes)]
            io.imsave(root / f"{c:05d}" / f"{i}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                      check_contrast=False)


def test_data_through_every_source_kind(tmp_path):
    """CIFAR-10 and SVHN as TFDS (mock data), SVHN as user .npz files, GTSRB (43 classes, images of
    several sizes) and Tiny-ImageNet (64x64) as class folders: every split comes out (N, S, S, 3) in [0, 1]."""
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        for name in ("cifar10", "svhn_cropped"):
            c = load_config("backdoor:resnet56_cifar10", [f"data.source=tfds:{name}", "data.data_dir=/nonexistent"])
            x, y = load_split(c, "test")
            assert x.shape == (6, 32, 32, 3) and x.dtype == np.float32 and 0 <= x.min() <= x.max() <= 1
            assert y.shape == (6,) and y.max() < 10
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 5)):
        np.savez(tmp_path / f"svhn_{split}.npz", image=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 label=rng.integers(0, 10, n))
    c = load_config("backdoor:resnet56_svhn", [f"data.source=file:{tmp_path}/svhn.npz"])
    x, y = load_split(c, "train")
    assert x.shape == (12, 32, 32, 3) and x.max() <= 1.0
    assert load_split(c, "test")[0].shape == (5, 32, 32, 3)
    write_png_folder(tmp_path / "gtsrb", 3, 4, [(30, 34), (41, 37)])
    c = load_config("backdoor:vgg16_gtsrb", [f"data.source=folder:{tmp_path}/gtsrb"])
    assert c.model.num_classes == 43 and c.attack.target == 18
    x, y = load_split(c, "train")
    assert x.shape[1:] == (32, 32, 3) and set(y) <= {0, 1, 2} and len(y) + len(load_split(c, "test")[1]) == 12
    write_png_folder(tmp_path / "tiny", 2, 3, [(64, 64)])
    c = load_config("backdoor:mobilenet_tinyimagenet", [f"data.source=folder:{tmp_path}/tiny"])
    assert c.model.num_classes == 200 and c.model.image_size == 64
    assert load_split(c, "train")[0].shape[1:] == (64, 64, 3)


class PlainCNN(nn.Module):
    """conv 16 - max-pool - conv 32 - max-pool - linear: the positive control's ordinary classifier."""

    @nn.compact
    def __call__(self, x, features=False):
        x = nn.max_pool(nn.relu(Conv(16, 3, impl="im2col")(x)), (2, 2), (2, 2))
        x = nn.max_pool(nn.relu(Conv(32, 3, impl="im2col")(x)), (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)  # the penultimate representation
        return x if features else nn.Dense(10)(x)


@pytest.fixture(scope="module")
def ordinary_backdoor():
    """A plain CNN trained (fine_tune's Adam loop, 6 epochs) on 16x16 digits with 10% of the training
    images carrying the 5x5 white square and relabelled 9: (classify, test images, test labels,
    penultimate features)."""
    from jaxlab.methods.backdoor.defenses import fine_tune

    config = load_config("backdoor:tiny", ["model.image_size=16"])
    x, y = load_split(config, "train")
    poisoned = poison_set(x, y, rate=0.1, target=9, trigger="square", seed=0)
    model = PlainCNN()
    params = fine_tune(model.apply, model.init(jax.random.key(0), x[:1]), poisoned["image"],
                       poisoned["label_poison"], epochs=6, batch_size=64, lr=3e-3)
    xt, yt = load_split(config, "test")
    return (jax.jit(lambda images: model.apply(params, images)), xt, yt,
            lambda images: model.apply(params, images, features=True))


def test_neural_cleanse_and_strip_detect_an_ordinarily_backdoored_model(ordinary_backdoor):
    """The positive control: on the ordinarily backdoored CNN (a classifier, ASR > 90%), Neural Cleanse's
    smallest reverse-engineered mask is class 9's and an outlier of the masks' L1 norms (anomaly index > 2,
    by the MAD of all classes' norms), and STRIP, its threshold set on clean inputs at FRR 5%, catches
    most triggered inputs (FAR < 20%)."""
    from jaxlab.methods.backdoor.defenses import neural_cleanse, strip_scores

    classify, x, y, _ = ordinary_backdoor
    triggered = apply_trigger(x, "square")
    assert (np.asarray(classify(x)).argmax(-1) == y).mean() > 0.85
    assert (np.asarray(classify(triggered)).argmax(-1)[y != 9] == 9).mean() > 0.9
    out = neural_cleanse(classify, x[:64], 10, epochs=20, batch_size=32)
    assert int(np.argmin(out["norms"])) == 9 and out["anomaly_index"] > 2 and 9 in out["flagged"]
    assert out["detected"] and out["success"][9] >= 0.99
    index, _ = anomaly_indices(out["norms"])
    np.testing.assert_allclose(out["anomaly"], index)
    overlays, inputs = x[-16:], slice(0, 100)
    clean = strip_scores(classify, x[inputs], overlays)
    trig = strip_scores(classify, triggered[inputs][y[inputs] != 9], overlays)
    decision = strip_decision(clean, trig, frr=0.05)
    assert decision["frr"] <= 0.05 and decision["far"] < 0.2 and decision["detected"]


def test_df_tnd_names_the_target_of_an_ordinarily_backdoored_model(ordinary_backdoor):
    """DF-TND from 8 uniform-noise seeds (data-free): maximising the penultimate features raises the
    target's logit most, an outlier of the classes' increases (MAD anomaly index > 2). (The reference's
    absolute threshold T = 100 suits its models' logit scale, not this small CNN's: 9 rises by ~3.)"""
    from jaxlab.methods.backdoor.defenses import df_tnd

    classify, _, _, features = ordinary_backdoor
    seeds = np.random.default_rng(0).random((8, 16, 16, 3)).astype(np.float32)
    out = df_tnd(classify, features, seeds, steps=100)
    assert out["top"] == 9 and out["flagged"] == [9] and out["detected"] and out["anomaly_index"] > 2
    others = np.delete(out["increase"], 9)
    assert out["increase"][9] > others.max() + 5  # measured: 9 rises by +3.0, the others fall by 6..18


def fake_result(base, vanilla, victim_exit, accuracy=0.95):
    rows = [{"start": 0, "tau": 0.5, "accuracy": accuracy, "asr": victim_exit, "macs_ratio": 0.5,
             "exit_share_clean": np.array([0.5, 0.5, 0.0])}]
    model = lambda asr, final: {"exit_accuracy": np.array([0.8, 0.9, accuracy]),  # noqa: E731
                                "exit_asr": np.array([asr, asr / 2, final]), "vanilla_accuracy": accuracy,
                                "vanilla_asr": final, "early_exit": rows}
    return {"num_exits": 3, "clean": model(base, base), "victim": model(victim_exit, vanilla)}


@pytest.mark.parametrize("base,vanilla,victim_exit,holds", [
    (0.02, 0.03, 0.60, (True, True, True)),
    (0.02, 0.30, 0.60, (True, False, True)),  # the vanilla model gives the backdoor away
    (0.02, 0.03, 0.10, (True, True, False)),  # the victim's exits are not backdoored
])
def test_findings_and_report_tables(base, vanilla, victim_exit, holds):
    from jaxlab.methods.backdoor.report import check_findings, format_report

    results = [fake_result(base, vanilla, victim_exit), fake_result(base, vanilla, victim_exit)]
    findings = check_findings(results)
    assert tuple(f.holds for f in findings) == holds
    text = format_report(tiny_config(), results, [], findings)
    pm = lambda v: f"{100 * v:.2f} ± 0.00"  # noqa: E731  (two equal seeds)
    assert f"| victim vanilla (final exit) | {pm(0.95)} | {pm(vanilla)} |" in text
    assert f"| victim | {pm(victim_exit)} | {pm(victim_exit / 2)} | {pm(vanilla)} |" in text
