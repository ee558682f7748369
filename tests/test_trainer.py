import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab import methods
from jaxlab.train import checkpoint as ckpt
from jaxlab.train.loop import NonFiniteError, build_run, evaluate, step_key, train
from jaxlab.train.metrics import read_metrics
from tests.helpers import tiny_ecg_config


def _losses(workdir):
    return np.array([r["loss"] for r in read_metrics(workdir) if r["split"] == "train"])


def test_one_and_eight_devices_give_the_same_loss_curve(tmp_path):
    assert jax.device_count() == 8
    curves = {}
    for n in (1, 8):
        config = tiny_ecg_config(f"mesh.data={n}", "train.log_every=1", steps=30)
        train(config, tmp_path / str(n), methods.build(config))
        curves[n] = _losses(tmp_path / str(n))
    assert len(curves[1]) == 30
    np.testing.assert_allclose(curves[1], curves[8], rtol=2e-4, atol=2e-5)


def test_gradient_accumulation_averages_microbatch_gradients():
    """Plain SGD, so a summed (not averaged) accumulation shows as a 4x larger step everywhere."""
    updates = {}
    for accum in (1, 4):
        config = tiny_ecg_config("mesh.data=1", "optimizer.name='sgd'", "optimizer.lr=0.5",
                                 f"train.accum_steps={accum}")
        run = build_run(config, methods.build(config))
        batch = run.batches(0).batch(0)
        before = jax.tree_util.tree_map(np.asarray, run.state.params)
        after = run.train_step(0)(run.state, batch, jax.random.PRNGKey(0))[0].params
        updates[accum] = jax.tree_util.tree_map(lambda a, b: np.asarray(a) - b, after, before)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                           updates[1], updates[4])


def test_bf16_compute_keeps_float32_params_and_learns(tmp_path):
    config = tiny_ecg_config("train.compute_dtype='bfloat16'", steps=40)
    method = methods.build(config)
    summary = train(config, tmp_path, method)
    losses = _losses(tmp_path)
    assert losses[-1] < losses[0]
    run = build_run(config, method)
    state = ckpt.Checkpointer(tmp_path, asynchronous=False).restore(run.abstract_state(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state.params))
    assert summary["eval_accuracy"] > 0.3


def _poisoned(config, bad_steps):
    """The ECG method whose loss is NaN at the given step indices."""
    method = methods.build(config)

    def step(state, batch, rng):
        bad = jnp.isin(state.step, jnp.asarray(bad_steps))
        batch = dict(batch, signal=jnp.where(bad, jnp.nan, batch["signal"]))
        return method.train_step(state, batch, rng)

    return dataclasses.replace(method, train_step=step)


def test_nan_stops_run_names_step_and_keeps_last_good_checkpoint(tmp_path):
    config = tiny_ecg_config("train.checkpoint_every=10", "train.log_every=10", steps=60)
    method = _poisoned(config, [27])  # the 28th step goes bad
    with pytest.raises(NonFiniteError, match=r"at step 28; .*last good checkpoint \(step 20\)"):
        train(config, tmp_path, method)
    checkpointer = ckpt.Checkpointer(tmp_path, asynchronous=False)
    assert checkpointer.latest_step() == 20
    restored = checkpointer.restore(build_run(config, method).abstract_state(0))
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(restored.params))


def test_on_nonfinite_skip_keeps_the_state_and_counts_skipped_steps(tmp_path):
    config = tiny_ecg_config("train.on_nonfinite='skip'", "train.log_every=10", steps=20)
    method = _poisoned(config, [3, 4, 12])
    train(config, tmp_path, method)
    skipped = [r["nonfinite_steps"] for r in read_metrics(tmp_path) if r["split"] == "train"]
    assert skipped == [2.0, 1.0]
    # a skipped step leaves params and optimizer state as they were: the same as feeding the step nothing
    run = build_run(config, method)
    state = run.state.replace(step=jnp.asarray(3, jnp.int32))
    batch = run.batches(0).batch(3)
    new, metrics = jax.jit(method.train_step)(state, batch, step_key(config.seed, 3))
    assert not bool(metrics["finite"])
    for a, b in zip(jax.tree_util.tree_leaves(new.parts), jax.tree_util.tree_leaves(run.state.parts)):
        np.testing.assert_array_equal(a, b)


def test_skipping_most_steps_fails_the_run(tmp_path):
    config = tiny_ecg_config("train.on_nonfinite='skip'", "train.log_every=10", steps=20)
    with pytest.raises(NonFiniteError, match="15 of the 20 steps"):
        train(config, tmp_path, _poisoned(config, list(range(15))))


def test_eval_from_checkpoint_latest_and_best(tmp_path):
    config = tiny_ecg_config(steps=40)
    method = methods.build(config)
    summary = train(config, tmp_path, method)
    latest = evaluate(config, tmp_path, method, "latest")
    assert latest["step"] == 40
    assert latest["accuracy"] == pytest.approx(summary["eval_accuracy"], abs=1e-6)
    best = evaluate(config, tmp_path, method, "best")
    assert best["accuracy"] >= latest["accuracy"] - 1e-6
    assert (tmp_path / "curves.png").exists() and (tmp_path / "metrics.jsonl").exists()


def test_eval_batch_must_split_over_devices_only_when_the_trainer_batches_the_eval_set():
    """data.eval_batch_size not a multiple of the 8 data devices: refused for a method whose eval set the
    trainer batches, accepted for one that evaluates itself (Method.evaluate)."""
    from jaxlab.config import ConfigError

    config = tiny_ecg_config("data.eval_batch_size=12")
    method = methods.build(config)
    with pytest.raises(ConfigError, match="data.eval_batch_size=12 does not split over the 8"):
        build_run(config, method)
    self_evaluating = dataclasses.replace(method, evaluate=lambda state: {"score": 1.0})
    assert build_run(config, self_evaluating).method.evaluate is not None
