"""DAE-NR (jaxlab.methods.dae_nr): metrics against scipy / scikit-image / plain loops, the readouts'
parameter counts, the models' shapes, the simulated population and the user source, and one short report
(post-hoc and joint runs through the trainer) whose post-hoc run must keep its encoder frozen."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats
from scipy.spatial.distance import pdist, squareform

from jaxlab.config import ConfigError, load_config
from jaxlab.data.sources import DatasetNotFoundError, DataSourceError, get_source, split_indices
from jaxlab.methods.dae_nr import metrics as M
from jaxlab.methods.dae_nr import task as T
from jaxlab.models.autoencoder import (
    ConvDecoder,
    ConvEncoder,
    FactorizedReadout,
    LinearReadout,
    decoder_features,
    depth_to_space,
)
from jaxlab.train.state import param_count

# ------------------------------------------------------------------------------------------------ RSA


def test_rdm_matches_scipy_correlation_distance():
    x = np.random.default_rng(0).normal(size=(25, 40))
    np.testing.assert_allclose(M.rdm(x), squareform(pdist(x, "correlation")), atol=1e-12)
    np.testing.assert_allclose(M.upper(M.rdm(x)), pdist(x, "correlation"), atol=1e-12)  # same pair order


def test_spearman_and_rsa_match_scipy_with_ties():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 6, 300).astype(float), rng.normal(size=300)  # many ties in a
    assert M.spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b)[0], abs=1e-12)
    np.testing.assert_allclose(M.ranks(a), scipy.stats.rankdata(a))
    fa, fb = rng.normal(size=(20, 30)), rng.normal(size=(20, 10))
    expected = scipy.stats.spearmanr(pdist(fa, "correlation"), pdist(fb, "correlation"))[0]
    assert M.rsa(M.rdm(fa), M.rdm(fb)) == pytest.approx(expected, abs=1e-12)


@pytest.fixture(scope="module")
def population():
    return get_source("synthetic:neural_population", "test", seed=3, n_train=8, n_test=60, num_neurons=32,
                        repeats=4).get(np.arange(60))


def test_rsa_self_is_one_and_shuffled_is_near_zero_with_p_values(population):
    response = population["response"]
    population_rdm = M.rdm(response)
    rho, p, null = M.permutation_test(population_rdm, population_rdm, permutations=199, seed=0)
    assert rho == pytest.approx(1.0)
    assert p == pytest.approx(1 / 200)  # no relabelling reaches rho = 1
    assert abs(null.mean()) < 0.05
    shuffled = M.rdm(response[np.random.default_rng(5).permutation(len(response))])
    rho_s, p_s, _ = M.permutation_test(shuffled, population_rdm, permutations=199, seed=0)
    assert abs(rho_s) < 0.1 and p_s > 0.05
    noisy = M.rdm(response + np.random.default_rng(6).normal(0, 0.5 * response.std(), response.shape))
    rho_n, p_n, _ = M.permutation_test(noisy, population_rdm, permutations=199, seed=0)
    assert 0.2 < rho_n < 1.0 and p_n == pytest.approx(1 / 200)


def test_permutation_test_and_bootstrap_match_plain_loops():
    rng = np.random.default_rng(2)
    f = rng.normal(size=(15, 8))
    a, b = M.rdm(f), M.rdm(f + rng.normal(size=f.shape))
    rho, p, null = M.permutation_test(a, b, permutations=50, seed=7)
    perm_rng = np.random.default_rng(7)
    ref_null = []
    for _ in range(50):
        q = perm_rng.permutation(15)
        ref_null.append(scipy.stats.spearmanr(squareform(a[np.ix_(q, q)], checks=False), squareform(b))[0])
    np.testing.assert_allclose(null, ref_null, atol=1e-12)
    assert p == pytest.approx((1 + np.sum(np.asarray(ref_null) >= rho)) / 51)

    lo, hi = M.bootstrap_ci(a, b, samples=40, level=0.9, seed=3)
    boot_rng, rhos = np.random.default_rng(3), []
    for _ in range(40):
        idx = boot_rng.integers(0, 15, 15)
        pairs = [(i, j) for i in range(15) for j in range(i + 1, 15) if idx[i] != idx[j]]
        rhos.append(scipy.stats.spearmanr([a[idx[i], idx[j]] for i, j in pairs],
                                          [b[idx[i], idx[j]] for i, j in pairs])[0])
    np.testing.assert_allclose([lo, hi], np.percentile(rhos, [5, 95]), atol=1e-12)
    assert lo < rho < hi


# ------------------------------------------------------------------------------ reconstruction and neurons


def test_ssim_and_psnr_match_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    rng = np.random.default_rng(4)
    x = rng.random((3, 24, 20, 2)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1).astype(np.float32)
    ours = np.asarray(M.ssim(jnp.asarray(x), jnp.asarray(y)))
    ref = [structural_similarity(x[i], y[i], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=1.0, channel_axis=-1) for i in range(3)]
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    psnr = np.asarray(M.psnr(M.mse(jnp.asarray(x), jnp.asarray(y))))
    np.testing.assert_allclose(psnr, [peak_signal_noise_ratio(x[i], y[i], data_range=1.0) for i in range(3)],
                               rtol=1e-5)
    with pytest.raises(ValueError, match="window"):
        M.ssim(jnp.zeros((1, 8, 8, 1)), jnp.zeros((1, 8, 8, 1)))


def test_correlation_and_noise_corrected_correlation():
    rng = np.random.default_rng(8)
    rates = rng.gamma(2.0, 0.5, (400, 6))
    prediction = rates + rng.normal(0, 0.5, rates.shape)
    r = M.correlation(prediction, rates)
    np.testing.assert_allclose(r, [np.corrcoef(prediction[:, n], rates[:, n])[0, 1] for n in range(6)])
    same = np.repeat(rates[:, None], 3, axis=1)  # noiseless repeats: CC_norm is the plain correlation
    np.testing.assert_allclose(M.normalized_correlation(prediction, same), r, atol=1e-10)
    trials = rng.poisson(rates[:, None, :], (400, 4, 6)).astype(float)  # noisy trials of the true rates
    raw = M.correlation(rates, trials.mean(1))
    normalized = M.normalized_correlation(rates, trials)
    assert raw.mean() < 0.88 and abs(normalized.mean() - 1.0) < 0.06
    with pytest.raises(ValueError, match="2 repeats"):
        M.signal_power(trials[:, :1])


def test_poisson_nll_matches_scipy_up_to_the_model_free_term():
    rng = np.random.default_rng(9)
    rate, counts = rng.gamma(2.0, 1.0, (5, 7)), rng.poisson(2.0, (5, 7)).astype(float)
    ours = np.asarray(T.poisson_nll(jnp.asarray(rate), jnp.asarray(counts), eps=0.0))
    ref = -scipy.stats.poisson.logpmf(counts, rate) - scipy.special.gammaln(counts + 1)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    assert float(T.neural_loss("mse", jnp.asarray(rate), jnp.asarray(counts))) == pytest.approx(
        np.mean((rate - counts) ** 2), rel=1e-5)
    with pytest.raises(ConfigError, match="neural_loss"):
        T.neural_loss("l1", jnp.asarray(rate), jnp.asarray(counts))


# ------------------------------------------------------------------------------------------- models


def test_readout_parameter_counts():
    layer = jnp.zeros((2, 8, 8, 32))

    def params(module):  # shapes only
        return jax.eval_shape(module.init, jax.random.PRNGKey(0), layer)["params"]

    factorized = params(FactorizedReadout(64))
    assert {k: v.shape for k, v in factorized.items()} == {"mask": (64, 8, 8), "features": (64, 32),
                                                            "bias": (64,)}
    assert param_count(factorized) == 6208  # 64 * (8*8 + 32 + 1)
    assert param_count(params(LinearReadout(64))) == 131136  # 64 * (8*8*32 + 1)


def test_factorized_readout_is_mask_times_features():
    rng = np.random.default_rng(10)
    layer = rng.normal(size=(3, 4, 5, 6)).astype(np.float32)
    module = FactorizedReadout(2)
    params = jax.jit(module.init)(jax.random.PRNGKey(1), jnp.asarray(layer))["params"]
    mask, feats, bias = (np.asarray(params[k], np.float64) for k in ("mask", "features", "bias"))
    ref = np.zeros((3, 2))
    for b in range(3):
        for n in range(2):
            ref[b, n] = sum(layer[b, y, x, k] * mask[n, y, x] * feats[n, k]
                            for y in range(4) for x in range(5) for k in range(6)) + bias[n]
    out = jax.jit(module.apply)({"params": params}, jnp.asarray(layer))
    np.testing.assert_allclose(out, np.log1p(np.exp(ref)), rtol=1e-5, atol=1e-6)


def test_autoencoder_shapes_and_mapped_layer():
    x = jnp.zeros((2, 32, 32, 1))
    encoder = ConvEncoder((16, 32, 8))
    layers = jax.eval_shape(lambda x: encoder.apply(encoder.init(jax.random.PRNGKey(0), x), x), x)
    assert [layer.shape for layer in layers] == [(2, 16, 16, 16), (2, 8, 8, 32), (2, 4, 4, 8)]
    decoder = ConvDecoder(decoder_features((16, 32, 8)))
    code = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 4, 8))
    out = jax.jit(lambda c: decoder.apply(decoder.init(jax.random.PRNGKey(1), c), c))(code)
    assert out.shape == (2, 32, 32, 1) and float(out.min()) >= 0 and float(out.max()) <= 1
    config = load_config("dae_nr:tiny")
    config.model.mapped_layer = 0
    model = T.Model(config.model, num_neurons=5)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(2), x)
    assert params["readout"]["mask"].shape == (5, 16, 16)
    config.model.mapped_layer = 3
    with pytest.raises(ConfigError, match="layers 0..2"):
        T.Model(config.model, num_neurons=5)
    with pytest.raises(ConfigError, match="multiples of 8"):
        model.init(jax.random.PRNGKey(2), jnp.zeros((1, 20, 20, 1)))


def test_depth_to_space_matches_a_loop():
    x = np.arange(2 * 3 * 2 * 8, dtype=np.float32).reshape(2, 3, 2, 8)  # block 2, 2 channels out
    ref = np.zeros((2, 6, 4, 2), np.float32)
    for y in range(3):
        for x_ in range(2):
            for i in range(2):
                for j in range(2):
                    ref[:, 2 * y + i, 2 * x_ + j] = x[:, y, x_, (2 * i + j) * 2:(2 * i + j) * 2 + 2]
    np.testing.assert_array_equal(depth_to_space(jnp.asarray(x), 2), ref)


def test_regimes_train_the_right_parts():
    assert T.stage_plan("posthoc", 10, 7) == [("autoencoder", 10, ("encoder", "decoder"), 1.0, 0.0),
                                               ("readout", 7, ("readout",), 0.0, 1.0)]
    assert [s[2] for s in T.stage_plan("joint", 10, 7)] == [("encoder", "decoder", "readout")]
    with pytest.raises(ConfigError, match="dae.regime"):
        T.stage_plan("both", 10, 7)


def test_neural_only_regime_trains_encoder_up_to_the_mapped_layer():
    config = load_config("dae_nr:tiny", ["data.options.n_train=16", "data.options.n_test=8",
                                         "data.options.num_neurons=4", "dae.regime=neural"])
    method = T.build(config)
    batch = T.transform(method.train_source.get(np.arange(8)))
    before = jax.jit(method.init_state)(jax.random.PRNGKey(0), batch)
    after, metrics = jax.jit(method.stages[0].train_step)(before, batch, jax.random.PRNGKey(1))
    assert float(metrics["loss"]) == pytest.approx(float(metrics["neural_loss"]), rel=1e-6)
    assert after.parts["decoder"].is_frozen
    jax.tree_util.tree_map(np.testing.assert_array_equal, before.params["decoder"], after.params["decoder"])
    leaves = jax.tree_util.tree_leaves
    moved = {name: any(bool(np.any(a != b)) for a, b in zip(leaves(before.params["encoder"][name]),
                                                            leaves(after.params["encoder"][name])))
             for name in before.params["encoder"]}
    # layer 1 is mapped; layer 2 feeds the decoder only
    assert moved == {"conv_0": True, "conv_1": True, "conv_2": False}


# --------------------------------------------------------------------------------------------- data


def test_simulated_population_is_seeded_and_poisson():
    kw = dict(n_train=40, n_test=30, num_neurons=16, repeats=6)
    a = get_source("synthetic:neural_population", "test", seed=1, **kw).get(np.arange(30))
    b = get_source("synthetic:neural_population", "test", seed=1, **kw).get(np.arange(30))
    c = get_source("synthetic:neural_population", "test", seed=2, **kw).get(np.arange(30))
    train = get_source("synthetic:neural_population", "train", seed=1, **kw).get(np.arange(40))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["image"], c["image"]) and not np.array_equal(a["image"], train["image"][:30])
    assert a["image"].shape == (30, 32, 32, 1) and a["trials"].shape == (30, 6, 16)
    assert 0 <= a["image"].min() and a["image"].max() <= 1
    np.testing.assert_array_equal(a["trials"], np.round(a["trials"]))  # spike counts
    np.testing.assert_allclose(a["response"], a["trials"].mean(1), rtol=1e-6)
    assert a["rate"].min() >= 0.1 - 1e-6  # baseline
    # Poisson: across all stimulus-neuron pairs the trial variance tracks the rate like the mean does
    big = get_source("synthetic:neural_population", "train", seed=1, n_train=300, num_neurons=16,
                     repeats=40).get(np.arange(300))
    rate, trials = big["rate"].ravel(), big["trials"].transpose(1, 0, 2).reshape(40, -1)
    assert np.polyfit(rate, trials.mean(0), 1)[0] == pytest.approx(1.0, abs=0.05)
    assert np.polyfit(rate, trials.var(0, ddof=1), 1)[0] == pytest.approx(1.0, abs=0.1)


def test_recordings_source_reads_user_files(tmp_path):
    rng = np.random.default_rng(11)
    images = rng.integers(0, 256, (10, 20, 24, 3), dtype=np.uint8)
    trials = rng.normal(size=(10, 3, 5)).astype(np.float32)
    path = tmp_path / "scenes.npz"
    np.savez(path, stimuli=images, dff=trials)
    spec = f"neural:{path}"
    parts = {split: get_source(spec, split, seed=0, keys="image:stimuli,response:dff", image_size=(16, 16),
                               test_fraction=0.3) for split in ("train", "test")}
    assert (len(parts["train"]), len(parts["test"])) == (7, 3)
    test = parts["test"].get(np.arange(3))
    assert test["image"].shape == (3, 16, 16, 1) and test["trials"].shape == (3, 3, 5)
    assert 0 <= test["image"].min() and test["image"].max() <= 1
    np.testing.assert_allclose(test["response"], test["trials"].mean(1), rtol=1e-6)
    everything = np.concatenate([parts[s].get(np.arange(len(parts[s])))["trials"] for s in ("train", "test")])
    def rows(a):
        return sorted(map(tuple, a.reshape(10, -1).round(5)))

    assert rows(everything) == rows(trials)  # every stimulus in exactly one split

    np.savez(tmp_path / "plain.npz", image=images[..., 0], response=trials[:, 0])
    plain = get_source(f"neural:{tmp_path / 'plain.npz'}", "train", seed=0).get(np.arange(8))
    train_rows = split_indices(10, "train", test_fraction=0.2, seed=0)
    np.testing.assert_allclose(plain["image"][..., 0], images[train_rows, ..., 0] / 255.0, rtol=1e-6)
    assert "trials" not in plain
    with pytest.raises(DatasetNotFoundError, match="Allen"):
        get_source(f"neural:{tmp_path / 'missing.npz'}", "train")
    with pytest.raises(DataSourceError, match="stimuli"):
        get_source(spec, "train")  # stored names differ and no keys given
    config = load_config("dae_nr:tiny", [f"data.source={spec}", "data.options.keys=image:stimuli,response:dff",
                                         "data.options.n_train=4"])
    with pytest.raises(ConfigError, match="neural_loss=mse"):
        T.build(config)  # dF/F below 0 with the Poisson loss


# --------------------------------------------------------------------------------- end to end (report)


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    from jaxlab import methods

    report = methods.module("dae_nr")  # found by name, as `jaxlab report` finds it
    config = load_config("dae_nr:tiny", [
        "train.steps=6", "dae.readout_steps=4", "data.batch_size=8", "data.eval_batch_size=16",
        "data.options.n_train=48", "data.options.n_test=16", "data.options.num_neurons=8",
        "data.options.repeats=3", "report.seeds=(0,)", "report.permutations=19", "report.bootstraps=10",
        "mesh.data=1", "train.log_every=2"])
    workdir = tmp_path_factory.mktemp("dae_report")
    return config, workdir, report.report(config, workdir)


def test_check_findings_compares_means_over_seeds():
    from jaxlab.methods.dae_nr.report import check_findings

    def regime(recon, rsa, corr=None):
        rows = [{"recon_mse": m, "rsa": r, **({"corr": corr} if corr is not None else {})}
                for m, r in zip(recon, rsa)]
        mean = {k: float(np.mean([x[k] for x in rows])) for k in rows[0]}
        return {"by_seed": rows, "mean": mean}

    summary = {"autoencoder": regime([1.0, 1.0], [0.10, 0.10]), "posthoc": regime([1.0, 1.0], [0.10, 0.10], 0.4),
               "joint": regime([0.9, 1.2], [0.20, 0.05], 0.6), "neural": regime([5.0, 5.0], [0.2, 0.2], 0.7)}
    found = {f.claim: f for f in check_findings(summary)}
    assert not found["joint training improves reconstruction (lower MSE)"].holds  # mean 1.05 > 1.0
    assert "better in 1 of 2 seeds" in found["joint training improves reconstruction (lower MSE)"].detail
    assert found["joint training increases RSA with the population"].holds  # mean 0.125 > 0.10
    assert not found["joint training improves both measures"].holds
    assert not found["the neural loss alone raises RSA less than joint training"].holds
    assert found["joint predicts neurons better than a post-hoc readout"].holds


def test_report_writes_table_findings_and_rdm_images(tiny_report):
    _, workdir, result = tiny_report
    for name in ("report.md", "report.json", "report.png", "rdms.png"):
        assert (workdir / name).stat().st_size > 0
    saved = json.loads((workdir / "report.json").read_text())
    assert set(saved["summary"]) == {"autoencoder", "posthoc", "joint"}
    ae, post = saved["summary"]["autoencoder"]["mean"], saved["summary"]["posthoc"]["mean"]
    assert "corr" not in ae and "corr" in post and "corr_norm" in post
    assert ae["recon_mse"] == post["recon_mse"] and ae["rsa"] == post["rsa"]  # one shared encoder
    assert ae["rsa"] == ae["rsa_layer1"] and {"rsa_layer0", "rsa_layer2"} <= set(ae)  # layer 1 is mapped
    assert {f["finding"] for f in saved["findings"]} >= {"joint training improves both measures"}
    assert "RSA rho" in (workdir / "report.md").read_text()


def test_joint_loss_is_reconstruction_plus_alpha_times_neural(tiny_report):
    config, workdir, _ = tiny_report
    records = [json.loads(line) for line in (workdir / "joint-seed0" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert len(train) >= 3
    for r in train:  # logged values are means over the logging interval: the combination is linear
        assert r["loss"] == pytest.approx(r["recon_mse"] + config.dae.alpha * r["neural_loss"], rel=1e-5)


def test_posthoc_encoder_stays_frozen(tiny_report):
    from jaxlab.methods.dae_nr.report import regime_config
    from jaxlab.train.loop import restore_for_eval

    config, workdir, _ = tiny_report
    c = regime_config(config, "posthoc", 0)
    method = T.build(c)
    run_dir = workdir / "posthoc-seed0"
    stage1, final = (restore_for_eval(c, run_dir, method, step)[1] for step in (6, 10))
    assert int(final.step) == 10
    assert final.parts["encoder"].is_frozen and final.parts["decoder"].is_frozen
    assert not final.parts["readout"].is_frozen and not stage1.parts["encoder"].is_frozen
    for part in ("encoder", "decoder"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, stage1.params[part], final.params[part])
    changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                                     stage1.params["readout"], final.params["readout"])
    assert all(jax.tree_util.tree_leaves(changed))
    # and in stage 1 the readout was not trained: still its initial value
    batch = T.transform(method.train_source.get(np.arange(8)))
    initial = jax.jit(method.init_state)(jax.random.PRNGKey(c.seed), batch)  # as the trainer's (jitted)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                           initial.params["readout"], stage1.params["readout"])  # one Adam step moves ~1e-3
