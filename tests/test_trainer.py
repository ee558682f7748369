import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.methods import base
from jaxlab.train import checkpoint as ckpt
from jaxlab.train.loop import NonFiniteError, build_run, evaluate, step_key, train
from jaxlab.train.metrics import read_metrics
from jaxlab.train.step import make_train_step
from tests.helpers import tiny_ecg_config


def _losses(workdir):
    return np.array([r["loss"] for r in read_metrics(workdir) if r["split"] == "train"])


def test_one_and_eight_devices_give_the_same_loss_curve(tmp_path):
    assert jax.device_count() == 8
    curves = {}
    for n in (1, 8):
        config = tiny_ecg_config(f"mesh.data={n}", "train.log_every=1", steps=30)
        train(config, tmp_path / str(n))
        curves[n] = _losses(tmp_path / str(n))
    assert len(curves[1]) == 30
    np.testing.assert_allclose(curves[1], curves[8], rtol=2e-4, atol=2e-5)


def test_gradient_accumulation_matches_full_batch():
    config = tiny_ecg_config("mesh.data=1")
    run = build_run(config)
    batch = run.train_batches.batch(0)
    rng = jax.random.PRNGKey(0)
    full = jax.jit(make_train_step(run.task.loss_fn, run.tx))(run.state, batch, rng)[0]
    accum = jax.jit(make_train_step(run.task.loss_fn, run.tx, accum_steps=4))(run.state, batch, rng)[0]
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           full.params, accum.params)


def test_bf16_compute_keeps_float32_params_and_learns(tmp_path):
    config = tiny_ecg_config("train.compute_dtype='bfloat16'", steps=40)
    summary = train(config, tmp_path)
    losses = _losses(tmp_path)
    assert losses[-1] < losses[0]
    run = build_run(config)
    state = ckpt.Checkpointer(tmp_path, asynchronous=False).restore(ckpt.abstract_like(run.state))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state.params))
    assert summary["eval_accuracy"] > 0.3


def test_nan_stops_run_names_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real_build = base.build_task

    def poisoned(config):
        task = real_build(config)

        def loss_fn(params, model_state, batch, rng):
            loss, aux = task.loss_fn(params, model_state, batch, rng)
            bad = jnp.all(rng == step_key(config.seed, 27))  # the 28th step (index 27) goes bad
            return jnp.where(bad, jnp.nan, loss), aux

        import dataclasses

        return dataclasses.replace(task, loss_fn=loss_fn)

    monkeypatch.setattr("jaxlab.train.loop.build_task", poisoned)
    config = tiny_ecg_config("train.checkpoint_every=10", "train.log_every=10", steps=60)
    with pytest.raises(NonFiniteError, match=r"at step 28; .*last good checkpoint \(step 20\)"):
        train(config, tmp_path)
    checkpointer = ckpt.Checkpointer(tmp_path, asynchronous=False)
    assert checkpointer.latest_step() == 20
    restored = checkpointer.restore(ckpt.abstract_like(build_run(config).state))
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(restored.params))


def test_eval_from_checkpoint_latest_and_best(tmp_path):
    config = tiny_ecg_config(steps=40)
    summary = train(config, tmp_path)
    latest = evaluate(config, tmp_path, "latest")
    assert latest["step"] == 40
    assert latest["accuracy"] == pytest.approx(summary["eval_accuracy"], abs=1e-6)
    best = evaluate(config, tmp_path, "best")
    assert best["accuracy"] >= latest["accuracy"] - 1e-6
    assert (tmp_path / "curves.png").exists() and (tmp_path / "metrics.jsonl").exists()
