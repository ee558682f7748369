"""PLwF (jaxlab.methods.plwf): credit-assignment projection, batched snapshot distillation, frozen
snapshots, EWC's Fisher, task splits, accuracy-matrix bookkeeping, and one short trainer run (via the
report) where fine-tuning forgets and PLwF forgets less."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlab.config import load_config
from jaxlab.methods.plwf import credit as CA
from jaxlab.methods.plwf import data as D
from jaxlab.methods.plwf import losses as L
from jaxlab.methods.plwf import metrics as M
from jaxlab.methods.plwf.task import NETWORK, SNAPSHOTS, build_method
from jaxlab.models.multihead import MLPBackbone, ResNetBackbone, add_head, head_logits, init_head, stack_heads


def tree(rng, scale=1.0):
    """A small params-like tree: two 'layers' (kernel + bias) and a top-level leaf."""
    k = jax.random.split(jax.random.PRNGKey(rng), 5)
    return {"a": {"kernel": scale * jax.random.normal(k[0], (3, 4)), "bias": jax.random.normal(k[1], (4,))},
            "b": {"kernel": jax.random.normal(k[2], (4, 2)), "bias": jax.random.normal(k[3], (2,))},
            "c": jax.random.normal(k[4], (5,))}


def flat(t) -> np.ndarray:
    return np.concatenate([np.asarray(x).ravel() for x in jax.tree_util.tree_leaves(t)])


def dot(a, b) -> float:
    return float(flat(a) @ flat(b))


# --- credit assignment ---------------------------------------------------------------------------------

def conflicting_pair(seed=0):
    g_n, g_o = tree(seed), tree(seed + 100)
    if dot(g_n, g_o) >= 0:  # make them conflict: flip g_o
        g_o = jax.tree_util.tree_map(jnp.negative, g_o)
    return g_n, g_o


def test_global_projection_removes_exactly_the_conflicting_component():
    g_n, g_o = conflicting_pair()
    assert dot(g_n, g_o) < 0
    new, old = CA.conflict_free(g_n, g_o, "global")
    n, o = flat(g_n), flat(g_o)
    expected = n - (n @ o) / (o @ o) * o  # numpy reference
    np.testing.assert_allclose(flat(new), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(flat(old), o)
    assert dot(new, g_o) >= -1e-5 * np.linalg.norm(n) * np.linalg.norm(o)
    # the removed part is parallel to g_o: the component orthogonal to g_o is untouched
    ortho = lambda v: v - (v @ o) / (o @ o) * o  # noqa: E731
    np.testing.assert_allclose(ortho(flat(new)), ortho(n), rtol=1e-5, atol=1e-6)


def test_non_conflicting_pair_is_untouched_and_summed():
    g_n, g_o = conflicting_pair()
    g_o = jax.tree_util.tree_map(jnp.negative, g_o)  # now <g_n, g_o> > 0
    assert dot(g_n, g_o) > 0
    tx = CA.credit_assignment("global")
    out, _ = tx.update(CA.pair_grads(g_n, g_o), tx.init(g_n))
    np.testing.assert_array_equal(flat(out), flat(g_n) + flat(g_o))


def test_per_layer_projection_matches_a_numpy_loop_over_layers():
    g_n, g_o = tree(1), tree(2)
    g_o["a"] = jax.tree_util.tree_map(lambda x: -x, g_n["a"])  # layer a conflicts ...
    g_o["b"] = g_n["b"]  # ... layer b agrees
    new, _ = CA.conflict_free(g_n, g_o, "per_layer")
    for layer in ("a", "b", "c"):
        n, o = flat(g_n[layer]), flat(g_o[layer])
        expected = n - min(n @ o, 0.0) / (o @ o) * o
        np.testing.assert_allclose(flat(new[layer]), expected, rtol=1e-5, atol=1e-6)
        assert flat(new[layer]) @ o >= -1e-5
    np.testing.assert_array_equal(flat(new["b"]), flat(g_n["b"]))
    assert CA.layer_of(jax.tree_util.tree_flatten_with_path(g_n)[0][0][0]) == "a"


def test_sum_mode_both_mode_zero_distillation_and_chain_with_optax():
    g_n, g_o = conflicting_pair(3)
    out, _ = CA.credit_assignment("sum").update(CA.pair_grads(g_n, g_o), None)
    np.testing.assert_array_equal(flat(out), flat(g_n) + flat(g_o))
    new, old = CA.conflict_free(g_n, g_o, "global", "both")
    n, o = flat(g_n), flat(g_o)
    np.testing.assert_allclose(flat(old), o - (n @ o) / (n @ n) * n, rtol=1e-5, atol=1e-6)
    assert dot(new, g_o) >= -1e-4 and dot(old, g_n) >= -1e-4
    zero = jax.tree_util.tree_map(jnp.zeros_like, g_o)  # the first task: no distillation gradient
    new, _ = CA.conflict_free(g_n, zero, "global")
    np.testing.assert_array_equal(flat(new), flat(g_n))
    tx = optax.chain(CA.credit_assignment("global"), optax.sgd(0.5))
    updates, _ = tx.update(CA.pair_grads(g_n, g_o), tx.init(g_n))
    projected = n - (n @ o) / (o @ o) * o
    np.testing.assert_allclose(flat(updates), -0.5 * (projected + o), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="per_layer"):
        CA.credit_assignment("layerwise")


# --- distillation -------------------------------------------------------------------------------------

def stacked_snapshots(backbone, x, k, classes=3, seed=0):
    """K random networks' params (backbone + heads 0..k-1) and collections, stacked as the runner stores them."""
    nets, colls = [], []
    init = jax.jit(lambda key: backbone.init(key, x, train=False))  # one compile for the K inits
    for i in range(k):
        variables = init(jax.random.PRNGKey(seed + i))
        params = dict(variables)
        nets.append(params.pop("params"))
        colls.append(params)
    feat = backbone.apply({"params": nets[0], **colls[0]}, x).shape[-1]
    heads = [init_head(jax.random.PRNGKey(50 + i), feat, classes) for i in range(k)]
    latest_heads = stack_heads([init_head(jax.random.PRNGKey(90 + i), feat, classes) for i in range(k)])
    snaps = {"backbone": stack_heads(nets), "head": stack_heads(heads), "latest_heads": latest_heads}
    return snaps, stack_heads(colls) if colls[0] else {}


@pytest.mark.parametrize("kind", ["mlp", "resnet"])
def test_batched_snapshot_forward_equals_a_loop_over_snapshots(kind):
    if kind == "mlp":
        backbone, x = MLPBackbone((7, 5)), jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 1))
    else:  # BatchNorm statistics travel stacked with the snapshots
        backbone, x = ResNetBackbone(blocks_per_stage=1), jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 3))
    k = 3 if kind == "mlp" else 2
    snaps, colls = stacked_snapshots(backbone, x, k=k)
    if colls:  # non-trivial running statistics, different per snapshot
        colls = jax.tree_util.tree_map(lambda a: a + 0.1 * jnp.arange(k).reshape((k,) + (1,) * (a.ndim - 1)),
                                       colls)
    own, latest = jax.jit(lambda s, c, x: L.snapshot_logits(backbone, s, c, x))(snaps, colls, x)
    own_ref, latest_ref = jax.jit(lambda s, c, x: L.snapshot_logits_loop(backbone, s, c, x))(snaps, colls, x)
    assert own.shape == latest.shape == (k, x.shape[0], 3)
    np.testing.assert_allclose(own, own_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(latest, latest_ref, rtol=1e-5, atol=1e-5)


def test_distillation_against_numpy_kl_and_plwf_term():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(4, 2, 3)), rng.normal(size=(4, 2, 3))

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(t / 2.0), softmax(s / 2.0)
    ref = (p * (np.log(p) - np.log(q))).sum(-1).sum(-1).mean()
    np.testing.assert_allclose(L.distillation(jnp.asarray(s), jnp.asarray(t), 2.0), ref, rtol=1e-5)
    assert abs(float(L.distillation(jnp.asarray(t), jnp.asarray(t), 2.0))) < 1e-6
    student = jnp.asarray(rng.normal(size=(4, 3, 3)))  # 3 heads, 2 of them old
    own, latest = jnp.asarray(rng.normal(size=(2, 4, 3))), jnp.asarray(rng.normal(size=(2, 4, 3)))
    dense = L.plwf_distillation(student, own, latest, temperature=2.0, dense=True, latest_too=False)
    lwf = L.plwf_distillation(student, own, latest, temperature=2.0, dense=False, latest_too=False)
    both = L.plwf_distillation(student, own, latest, temperature=2.0, dense=True, latest_too=True)
    per_head = lambda teacher: sum(float(L.distillation(student[:, k:k + 1], teacher[k][:, None], 2.0))  # noqa: E731
                                   for k in range(2))
    np.testing.assert_allclose(dense, per_head(own), rtol=1e-5)
    np.testing.assert_allclose(lwf, per_head(latest), rtol=1e-5)
    np.testing.assert_allclose(both, per_head(own) + per_head(latest), rtol=1e-5)


# --- EWC ----------------------------------------------------------------------------------------------

def test_expected_fisher_of_a_linear_softmax_against_numpy():
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(3, 4)).astype(np.float32)

    def log_probs(params, ex):
        return jax.nn.log_softmax(ex["x"] @ params["w"]), ex["y"]

    batch = {"x": jnp.asarray(x), "y": jnp.asarray(rng.integers(0, 4, 5))}
    ref_exp, ref_emp = np.zeros_like(w), np.zeros_like(w)
    for b in range(5):
        z = x[b] @ w
        p = np.exp(z - z.max())
        p /= p.sum()
        for y in range(4):  # d log p_y / dW = x (e_y - p)^T
            g = np.outer(x[b], np.eye(4)[y] - p)
            ref_exp += p[y] * g ** 2
        ref_emp += np.outer(x[b], np.eye(4)[int(batch["y"][b])] - p) ** 2
    np.testing.assert_allclose(L.per_example_fisher(log_probs, {"w": jnp.asarray(w)}, batch, "expected")["w"],
                               ref_exp, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(L.per_example_fisher(log_probs, {"w": jnp.asarray(w)}, batch, "empirical")["w"],
                               ref_emp, rtol=1e-4, atol=1e-6)


def test_ewc_quadratic_has_the_gradient_of_the_sum_of_per_task_penalties():
    rng = np.random.default_rng(1)
    f1, f2 = rng.uniform(0, 2, 6), rng.uniform(0, 2, 6)
    f2[0] = f1[0] = 0.0  # a parameter no task cares about
    a1, a2, theta = rng.normal(size=6), rng.normal(size=6), rng.normal(size=6)
    grad = jax.grad(L.ewc_penalty)(jnp.asarray(theta), jnp.asarray(f1 + f2), jnp.asarray(f1 * a1 + f2 * a2))
    np.testing.assert_allclose(grad, f1 * (theta - a1) + f2 * (theta - a2), rtol=1e-5, atol=1e-6)


def test_fold_fisher_adds_the_mean_fisher_and_its_anchor_and_zeros_for_the_new_head():
    from jaxlab.methods.plwf.task import fold_fisher

    rng = np.random.default_rng(2)
    params = {"backbone": {"w": rng.normal(size=3)}, "heads": {"kernel": rng.normal(size=(1, 2, 2)),
                                                              "bias": rng.normal(size=(1, 2))}}
    acc = jax.tree_util.tree_map(lambda p: np.abs(rng.normal(size=p.shape)), params)
    extra = {"fisher_acc": acc, "fisher_count": np.float32(4.0)}
    new_head = {"kernel": np.ones((2, 2)), "bias": np.ones(2)}
    ewc, sums = fold_fisher(None, extra, params, new_head)
    np.testing.assert_allclose(ewc.params["fisher"]["backbone"]["w"], acc["backbone"]["w"] / 4, rtol=1e-6)
    np.testing.assert_allclose(ewc.params["fisher_anchor"]["heads"]["kernel"][0],
                               acc["heads"]["kernel"][0] / 4 * params["heads"]["kernel"][0], rtol=1e-6)
    assert ewc.is_frozen and ewc.params["fisher"]["heads"]["kernel"].shape == (2, 2, 2)
    assert not np.any(ewc.params["fisher"]["heads"]["kernel"][1]) and float(sums["fisher_count"]) == 0.0
    # a second task's Fisher adds to the first's
    ewc2, _ = fold_fisher(ewc, {"fisher_acc": sums["fisher_acc"], "fisher_count": np.float32(0.0)},
                          jax.tree_util.tree_map(np.asarray, ewc.params["fisher"]), new_head)
    np.testing.assert_allclose(ewc2.params["fisher"]["backbone"]["w"], acc["backbone"]["w"] / 4, rtol=1e-6)


# --- data and bookkeeping -------------------------------------------------------------------------------

def test_split_digits_five_tasks_of_two_classes():
    c = load_config("plwf:tiny")
    data = D.load_task_data(c)
    assert data.split.order.tolist() == list(range(10))
    for t, src in enumerate(data.train):
        rows = src.get(np.arange(len(src)))
        assert set(rows["task"].tolist()) == {t} and set(rows["label"].tolist()) == {0, 1}
        np.testing.assert_array_equal(rows["class"], 2 * t + rows["label"])
    assert sum(len(s) for s in data.train) == len(data.seen[-1]) == 1797 - len(data.test)
    assert len(data.test) == 359  # scikit-learn's 1,797 digits, test_fraction 0.2
    order = D.class_order(10, seed=3)
    assert sorted(order.tolist()) == list(range(10)) and order.tolist() != list(range(10))


def test_cifar100_under_tfds_mock_data_and_tiny_imagenet_from_files(tmp_path):
    import tensorflow_datasets as tfds

    c = load_config("plwf:cifar100_20", ["data.data_dir=/nonexistent", "model.blocks_per_stage=1",
                                         "data.batch_size=8", "mesh.data=1"])
    with tfds.testing.mock_data(num_examples=400, policy=tfds.testing.MockPolicy.USE_CODE):
        c.cl.update(num_classes=100, num_tasks=20)
        data = D.load_task_data(c)
        method = build_method(c)
        batch = method.transform(method.stages[1].train_source.get(np.arange(8)))
    assert data.split.num_tasks == 20 and data.split.classes_per_task == 5
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    assert set(batch["task"].tolist()) == {1}
    # a PLwF step of task 1 on a ResNet (BatchNorm statistics in the network and the snapshot), augmented
    state = jax.jit(method.init_state)(jax.random.PRNGKey(0), batch)
    state = jax.jit(method.stages[1].enter)(state, jax.random.PRNGKey(1))
    snap_stats = jax.tree_util.tree_map(np.asarray, state.parts[SNAPSHOTS].collections)
    state, metrics = jax.jit(method.stages[1].train_step)(state, batch, jax.random.PRNGKey(2))
    assert bool(metrics["finite"]) and float(metrics["distill"]) >= 0
    jax.tree_util.tree_map(np.testing.assert_array_equal, snap_stats, state.parts[SNAPSHOTS].collections)
    # TinyImageNet-like user files: 64x64x3 uint8, 8 classes -> 4 tasks of 2
    rng = np.random.default_rng(0)
    for split, n in (("train", 48), ("test", 16)):
        np.savez(tmp_path / f"tin_{split}.npz", image=rng.integers(0, 255, (n, 64, 64, 3), dtype=np.uint8),
                 label=np.arange(n) % 8)
    c = load_config("plwf:tinyimagenet", [f"data.source=file:{tmp_path}/tin.npz", "cl.num_tasks=4",
                                          "cl.classes_per_task=2"])
    data = D.load_task_data(c)
    assert [len(s) for s in data.train] == [12, 12, 12, 12] and len(data.test) == 16
    with pytest.raises(ValueError, match="exceeds the dataset's 8 classes"):
        D.load_task_data(load_config("plwf:tinyimagenet", [f"data.source=file:{tmp_path}/tin.npz"]))


def test_augmentation_is_a_padded_crop_and_maybe_a_flip_of_each_image():
    images = np.arange(3 * 4 * 5 * 2, dtype=np.float32).reshape(3, 4, 5, 2)
    out = np.asarray(D.augment_images(jax.random.PRNGKey(0), jnp.asarray(images), pad=1))
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
    for b in range(3):  # numpy: every crop offset, flipped or not
        candidates = [c for i in range(3) for j in range(3)
                      for c in (padded[b, i:i + 4, j:j + 5], padded[b, i:i + 4, j:j + 5][:, ::-1])]
        assert any(np.array_equal(out[b], c) for c in candidates)
    many = np.asarray(D.augment_images(jax.random.PRNGKey(1), jnp.asarray(np.repeat(images[:1], 64, 0)), pad=1))
    assert len({m.tobytes() for m in many}) > 4  # not one fixed transform


def test_accuracy_matrix_and_metrics_on_a_hand_made_example():
    evals = [{"acc_task/0": 0.9},
             {"acc_task/0": 0.8, "acc_task/1": 0.95},
             {"acc_task/0": 0.6, "acc_task/1": 0.7, "acc_task/2": 1.0, "accuracy": 0.77}]
    r = M.accuracy_matrix(evals, "task")
    assert np.isnan(r[0, 1]) and np.isnan(r[1, 2]) and r[2, 1] == 0.7
    # by hand: A = (0.6 + 0.7 + 1.0) / 3; F = ((0.9 - 0.6) + (0.95 - 0.7)) / 2; BWT = ((0.6-0.9) + (0.7-0.95)) / 2
    assert M.average_accuracy(r) == pytest.approx(2.3 / 3)
    assert M.forgetting(r) == pytest.approx(0.275)
    assert M.backward_transfer(r) == pytest.approx(-0.275)
    r2 = M.accuracy_matrix([{"acc_class/0": 0.5}, {"acc_class/0": 0.9, "acc_class/1": 0.4}], "class")
    # task 0 improved after task 1: negative forgetting (Chaudhry et al. do not clip), positive BWT
    assert M.forgetting(r2) == pytest.approx(-0.4) and M.backward_transfer(r2) == pytest.approx(0.4)
    # forgetting takes the best earlier accuracy, not the first one
    r3 = M.accuracy_matrix([{"acc_task/0": 0.5}, {"acc_task/0": 0.9, "acc_task/1": 1.0},
                            {"acc_task/0": 0.7, "acc_task/1": 1.0, "acc_task/2": 1.0}], "task")
    assert M.forgetting(r3) == pytest.approx(0.1) and M.backward_transfer(r3) == pytest.approx(0.1)
    with pytest.raises(KeyError, match="acc_task/1"):
        M.accuracy_matrix([{"acc_task/0": 1.0}, {"acc_task/0": 1.0}], "task")


def test_heads_grow_and_stacked_heads_apply_as_separate_linears():
    feats = jax.random.normal(jax.random.PRNGKey(0), (4, 6))
    heads = stack_heads([init_head(jax.random.PRNGKey(1), 6, 2)])
    h2 = init_head(jax.random.PRNGKey(2), 6, 2)
    heads = add_head(heads, h2)
    logits = head_logits(heads, feats)
    assert logits.shape == (4, 2, 2)
    np.testing.assert_allclose(logits[:, 1], np.asarray(feats) @ np.asarray(h2["kernel"]) + np.asarray(h2["bias"]),
                               rtol=1e-5, atol=1e-6)


# --- the runner ------------------------------------------------------------------------------------------

def small_config(*overrides):
    return load_config("plwf:tiny", ["cl.num_tasks=3", "cl.steps_per_task=5", "mesh.data=1", *overrides])


def test_snapshots_are_frozen_and_never_updated():
    c = small_config("cl.method=plwf")
    method = build_method(c)
    batch = method.transform(method.stages[1].train_source.get(np.arange(32)))
    state = jax.jit(method.init_state)(jax.random.PRNGKey(0), batch)
    after_task0 = state.parts[NETWORK].params
    for t in (1, 2):
        state = jax.jit(method.stages[t].enter)(state, jax.random.PRNGKey(t))
        snaps = state.parts[SNAPSHOTS]
        assert snaps.is_frozen and snaps.params["head"]["bias"].shape[0] == t
        assert state.parts[NETWORK].params["heads"]["bias"].shape[0] == t + 1
        before = jax.tree_util.tree_map(np.asarray, snaps.params)
        step = jax.jit(method.stages[t].train_step)
        net_before = flat(state.parts[NETWORK].params)
        for i in range(3):
            state, metrics = step(state, batch, jax.random.PRNGKey(i))
            assert bool(metrics["finite"])
        jax.tree_util.tree_map(np.testing.assert_array_equal, before, state.parts[SNAPSHOTS].params)
        assert not np.allclose(flat(state.parts[NETWORK].params), net_before)  # the network did train
    # snapshot 0 is the network as task 0 left it (its backbone and head 0)
    snap0 = jax.tree_util.tree_map(lambda a: a[0], state.parts[SNAPSHOTS].params["backbone"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, snap0, after_task0["backbone"])


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="cl.method='lwff'"):
        build_method(small_config("cl.method=lwff"))
    with pytest.raises(ValueError, match="train.accum_steps=2"):
        build_method(small_config("train.accum_steps=2"))


def test_tiny_report_fine_tuning_forgets_and_plwf_forgets_less(tmp_path):
    from jaxlab.methods.plwf.report import report

    c = small_config("cl.steps_per_task=60", "optimizer.lr=5e-3", "report.methods=('finetune', 'plwf')",
                     "report.protocols=('task',)", "report.seeds=(0,)", "data.eval_batch_size=360")
    result = report(c, tmp_path)
    rows = result["results"]["task"]
    ft, pl = rows["finetune"]["by_seed"][0], rows["plwf"]["by_seed"][0]
    assert ft["forgetting"] > 0.02, ft["matrix"]
    assert pl["forgetting"] < ft["forgetting"], (pl["matrix"], ft["matrix"])
    assert (tmp_path / "report.png").stat().st_size > 0
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["findings"][0]["finding"] == "task-incremental: PLwF forgets less than fine-tuning"
    assert "| PLwF |" in (tmp_path / "report.md").read_text()
