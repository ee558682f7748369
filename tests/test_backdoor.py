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

from jaxlab.config import load_config
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


def tiny_config(*overrides):
    return load_config("backdoor:tiny", ["model.image_size=16", "data.options.limit=96", "data.batch_size=32",
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
    state = jax.jit(method.init_state)(jax.random.key(0), batch)
    history = {}
    for name, steps in (("ics", 2), ("poison", 2), ("victim", 0)):
        stage = stages[name]
        state = jax.jit(stage.enter)(state, jax.random.key(7))
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
