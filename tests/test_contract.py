"""The method contract: several parts and optimizers, alternating updates, frozen parts, stages that
change the state's layout, init_from, per-parameter learning-rate rules, and SIGKILL resume of each."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlab.config import ConfigError, Config
from jaxlab.train import checkpoint as ckpt
from jaxlab.train.loop import build_run, restore_for_eval, step_key, train
from jaxlab.train.optim import default_optimizer_config, make_optimizer
from jaxlab.train.state import Part
from tests.helpers import xla_flags
from tests.toy_methods import gan, toy_config, two_stage

ROOT = Path(__file__).resolve().parent.parent


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _same(a, b):
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def test_alternating_updates_leave_the_other_and_the_frozen_part_unchanged():
    config = toy_config()
    config.mesh.data = 1
    method = gan(config)
    run = build_run(config, method)
    step = jax.jit(method.train_step)
    s0 = run.state
    batch = run.batches(0).batch(0)
    s1, m1 = step(s0, batch, step_key(0, 0))  # step 0: discriminator
    assert _same(s1.parts["generator"], s0.parts["generator"]) and _same(s1.parts["critic"], s0.parts["critic"])
    assert not _same(s1.parts["discriminator"].params, s0.parts["discriminator"].params)
    s2, m2 = step(s1, batch, step_key(0, 1))  # step 1: generator
    assert _same(s2.parts["discriminator"], s1.parts["discriminator"]) and _same(s2.parts["critic"], s0.parts["critic"])
    assert not _same(s2.parts["generator"].params, s1.parts["generator"].params)
    assert int(s2.step) == 2 and set(m1) == set(m2) and "critic" in m2
    # each part has its own optimizer and learning rate: optimizer.generator.lr=5e-3 over the default 1e-2
    assert int(s2.parts["generator"].opt_state[0].count) == 1 == int(s2.parts["discriminator"].opt_state[0].count)
    first_g_step = s2.parts["generator"].params["kernel"] - s1.parts["generator"].params["kernel"]
    assert float(jnp.abs(first_g_step).max()) == pytest.approx(5e-3, rel=1e-3)  # Adam's first step = lr


def test_stage_two_starts_from_stage_one_exactly(tmp_path):
    config = toy_config(20)
    method = two_stage(config)
    summary = train(config, tmp_path, method)
    assert summary["eval_accuracy"] > 0.6
    run = build_run(config, method)
    checkpointer = ckpt.Checkpointer(tmp_path, keep=10, asynchronous=False)
    end_of_pretrain = checkpointer.restore(run.abstract_state(0), 10)
    final = checkpointer.restore(run.abstract_state(1), 20)
    assert "snapshot" not in end_of_pretrain.parts and "snapshot" in final.parts
    assert _same(final.parts["snapshot"].params, end_of_pretrain.parts["encoder"].params)
    assert final.parts["snapshot"].is_frozen
    # the decoder does not train in stage 2, the head does not train in stage 1
    assert _same(final.parts["decoder"], end_of_pretrain.parts["decoder"])
    assert _same(end_of_pretrain.parts["head"].params, run.state.parts["head"].params)


def test_resume_inside_each_stage_equals_a_straight_run(tmp_path):
    """A run that lost every checkpoint after step k (inside stage 1, at the boundary, inside stage 2)
    resumes from step k and ends bit-identical to the straight run."""
    config = toy_config(20, checkpoint_every=1, keep_checkpoints=25)
    method = two_stage(config)
    straight = tmp_path / "straight"
    train(config, straight, method)
    abstract = build_run(config, method).abstract_state(1)
    want = ckpt.Checkpointer(straight, asynchronous=False).restore(abstract, 20)
    for stop in (7, 10, 14):
        resumed = tmp_path / f"from{stop}"
        shutil.copytree(straight, resumed)
        for step_dir in (resumed / "checkpoints").iterdir():
            if step_dir.name.isdigit() and int(step_dir.name) > stop:
                shutil.rmtree(step_dir)
        assert ckpt.Checkpointer(resumed, asynchronous=False).latest_step() == stop
        train(config, resumed, method)
        assert _same(ckpt.Checkpointer(resumed, asynchronous=False).restore(abstract, 20), want), stop


def test_init_from_checkpoint_and_npz(tmp_path):
    config = toy_config(10)
    method = two_stage(config)
    train(config, tmp_path / "pre", method)
    _, pre = restore_for_eval(config, tmp_path / "pre", method)
    fresh = build_run(config, method)

    c = toy_config(10)
    c.train.update(init_from=str(tmp_path / "pre"), init_parts=("encoder",))
    from jaxlab.train.loop import initial_state

    state = initial_state(build_run(c, method))
    assert _same(state.parts["encoder"].params, pre.parts["encoder"].params)
    assert _same(state.parts["head"], fresh.state.parts["head"])  # other parts untouched
    assert int(state.parts["encoder"].opt_state[0].count) == 0  # optimizer state fresh

    kernel = np.asarray(pre.parts["encoder"].params["kernel"])
    bias = np.asarray(pre.parts["encoder"].params["bias"])
    np.savez(tmp_path / "w.npz", **{"enc.weight": kernel, "enc.bias": bias})
    c.train.update(init_from=str(tmp_path / "w.npz"), init_rename=((r"^enc\.weight$", "encoder/params/kernel"),
                                                                    (r"^enc\.bias$", "encoder/params/bias")))
    state = initial_state(build_run(c, method))
    np.testing.assert_array_equal(state.parts["encoder"].params["kernel"], kernel)

    np.savez(tmp_path / "partial.npz", **{"encoder/params/kernel": kernel})
    c.train.update(init_from=str(tmp_path / "partial.npz"), init_rename=())
    with pytest.raises(ConfigError, match=r"1 arrays missing: encoder/params/bias"):
        initial_state(build_run(c, method))
    np.savez(tmp_path / "bad.npz", **{"encoder/params/kernel": kernel[:1], "encoder/params/bias": bias})
    c.train.init_from = str(tmp_path / "bad.npz")
    with pytest.raises(ConfigError, match=r"encoder/params/kernel: \(1, 8\) in the source, \(2, 8\) here"):
        initial_state(build_run(c, method))


def test_lr_rules_and_layer_decay_scale_each_parameters_update():
    params = {"embed": {"kernel": jnp.ones(2)}, "blocks_0": {"kernel": jnp.ones(2)},
              "blocks_1": {"kernel": jnp.ones(2)}, "head": {"kernel": jnp.ones(2)}}
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    cfg = default_optimizer_config()
    cfg.update(name="sgd", lr=1.0, layer_decay=0.5)
    updates, _ = make_optimizer(cfg, 10).update(grads, make_optimizer(cfg, 10).init(params), params)
    got = {k: float(-v["kernel"][0]) for k, v in updates.items()}
    assert got == {"embed": 0.125, "blocks_0": 0.25, "blocks_1": 0.5, "head": 1.0}  # 2 blocks: L = 2
    cfg.update(layer_decay=0.0, lr_rules=(("^head/", 10.0), ("embed", 0.0)))
    tx = make_optimizer(cfg, 10)
    updates, _ = tx.update(grads, tx.init(params), params)
    got = {k: float(-v["kernel"][0]) for k, v in updates.items()}
    assert got == {"embed": 0.0, "blocks_0": 1.0, "blocks_1": 1.0, "head": 10.0}


def test_part_optimizer_section_rejects_unknown_keys():
    from jaxlab.train.optim import part_optimizer

    cfg = default_optimizer_config()
    cfg.generator = Config(lrr=1.0)
    with pytest.raises(ConfigError, match=r"optimizer.generator.lrr is not an optimizer key"):
        part_optimizer(cfg, "generator", 10)


def _kill_and_resume(tmp_path, kind, steps):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))
    cmd = [sys.executable, "-m", "tests.toy_methods", kind]
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    proc = subprocess.Popen([*cmd, str(killed), str(steps)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.isdigit() and int(p.name) > steps // 2
                                              for p in (killed / "checkpoints").glob("*")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    kept = ckpt.Checkpointer(killed, asynchronous=False).latest_step()
    assert kept is not None and kept < steps
    for workdir in (killed, straight):
        subprocess.run([*cmd, str(workdir), str(steps)], env=env, cwd=ROOT, check=True, capture_output=True)
    config = toy_config(steps, checkpoint_every=20)
    config.mesh.data = 1
    method = {"gan": gan, "two_stage": two_stage}[kind](config)
    abstract = build_run(config, method).abstract_state(len(method.stages) - 1 if method.stages else 0)
    a, b = (ckpt.Checkpointer(d, asynchronous=False).restore(abstract) for d in (killed, straight))
    assert int(a.step) == int(b.step) == steps
    assert _same(a, b)


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", ["gan", "two_stage"])
def test_sigkill_then_resume_is_bit_identical(tmp_path, kind):
    _kill_and_resume(tmp_path, kind, 200)  # killed past the middle: inside stage 2 of two_stage


def test_zero_step_stage_is_entered_when_a_run_resumes_at_its_boundary(tmp_path):
    """A stage of 0 steps exists for its enter (strip exits, snapshot a teacher). A run resumed from the
    checkpoint at that stage's boundary still runs its enter, so the next stage sees the same layout
    and ends bit-identical to the straight run."""
    import dataclasses

    from jaxlab.train.method import Stage

    config = toy_config(20, checkpoint_every=1, keep_checkpoints=25)
    base = two_stage(config)
    pretrain, finetune = base.stages
    method = dataclasses.replace(base, stages=(
        pretrain, Stage("snapshot", 0, enter=finetune.enter), dataclasses.replace(finetune, enter=None)))
    straight = tmp_path / "straight"
    train(config, straight, method)
    abstract = build_run(config, method).abstract_state(2)
    want = ckpt.Checkpointer(straight, asynchronous=False).restore(abstract, 20)
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for step_dir in (resumed / "checkpoints").iterdir():
        if step_dir.name.isdigit() and int(step_dir.name) > 10:  # keep up to the zero-step stage's boundary
            shutil.rmtree(step_dir)
    train(config, resumed, method)
    assert _same(ckpt.Checkpointer(resumed, asynchronous=False).restore(abstract, 20), want)


def test_restore_for_eval_of_a_step_number(tmp_path):
    """which=<int> restores that step's checkpoint in its own stage's layout (step 5: before the
    snapshot part exists); a step not kept is named."""
    config = toy_config(20, keep_checkpoints=25)
    method = two_stage(config)
    train(config, tmp_path, method)
    _, latest = restore_for_eval(config, tmp_path, method)
    _, same = restore_for_eval(config, tmp_path, method, 20)
    jax.tree_util.tree_map(np.testing.assert_array_equal, latest.params, same.params)
    _, early = restore_for_eval(config, tmp_path, method, 5)
    assert int(early.step) == 5 and "snapshot" not in early.parts and "snapshot" in latest.parts
    with pytest.raises(ckpt.NoCheckpointError, match="no checkpoint of step 7 "):
        restore_for_eval(config, tmp_path, method, 7)
