"""Runs that survive faults and bad input (issue 11): damaged checkpoints, a busy workdir, a changed
config, a torn metrics line, bad numbers, and user errors that end in one line."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab import cli
from jaxlab.config import ConfigError, base_config, check_numbers, load_config
from jaxlab.train.checkpoint import Checkpointer, CheckpointError, NoCheckpointError, abstract_like
from jaxlab.train.metrics import MetricWriter, read_metrics
from jaxlab.train.workdir import (
    ConfigChangedError,
    WorkdirBusyError,
    WorkdirLock,
    compare_config,
    save_config,
)

ACCURACY = {1: 0.5, 2: 0.9, 3: 0.1}  # best (max) is step 2, latest is step 3


def state_at(step: int) -> dict:
    """A small state whose every value says which step it was saved at."""
    return {"params": {"w": jnp.full((4, 3), float(step)), "b": jnp.arange(3.0) * step},
            "step": jnp.asarray(step, jnp.int32)}


ABSTRACT = abstract_like(state_at(0))


def saved_steps(workdir: Path, steps=(1, 2, 3), best: bool = True) -> Path:
    ckpt = Checkpointer(workdir, keep=3, best_metric="accuracy" if best else None, asynchronous=False)
    for s in steps:
        ckpt.save(s, state_at(s), {"accuracy": ACCURACY[s]})
    ckpt.close()
    return workdir


def array_files(step_dir: Path) -> list[Path]:
    files = [p for p in (step_dir / "default").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, f"no array data files under {step_dir}"
    return files


def truncate_arrays(step_dir: Path) -> None:
    for f in array_files(step_dir):
        os.truncate(f, f.stat().st_size // 2)


def garble_metadata(step_dir: Path) -> None:
    (step_dir / "default" / "_METADATA").write_text('{"tree_metadata": {garbled')


def remove_item(step_dir: Path) -> None:
    import shutil

    shutil.rmtree(step_dir / "default")


# ------------------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("damage, reason", [
    (truncate_arrays, "ValueError"),
    (garble_metadata, "JSONDecodeError"),
    (remove_item, "not found in the checkpoint"),
])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, capsys, damage, reason):
    saved_steps(tmp_path)
    damage(tmp_path / "checkpoints" / "3")
    ckpt = Checkpointer(tmp_path, keep=3, asynchronous=False)
    assert ckpt.latest_step() == 3  # listing does not read the damaged step
    step, state = ckpt.restore_latest_valid(ABSTRACT)
    assert step == 2
    np.testing.assert_array_equal(state["params"]["w"], np.full((4, 3), 2.0))
    err = capsys.readouterr().err
    skip_lines = [line for line in err.splitlines() if "skipping checkpoint step" in line]
    assert len(skip_lines) == 1 and "step 3" in skip_lines[0] and reason in skip_lines[0]
    assert len(skip_lines[0]) < 400  # the exception's type and first line, not orbax's traceback
    assert "Traceback" not in err and "Event loop is closed" not in err
    # set aside, so the resumed run writes step 3 again (orbax skips saving a step it still lists)
    assert ckpt.all_steps() == [1, 2]
    assert (tmp_path / "checkpoints-skipped" / "checkpoints-3").is_dir()
    ckpt.save(3, state_at(33))
    ckpt.close()
    again = Checkpointer(tmp_path, asynchronous=False)
    assert again.restore_latest_valid(ABSTRACT)[0] == 3
    assert float(again.restore(ABSTRACT)["params"]["w"][0, 0]) == 33.0


def test_two_damaged_steps_fall_back_twice(tmp_path, capsys):
    saved_steps(tmp_path)
    truncate_arrays(tmp_path / "checkpoints" / "3")
    garble_metadata(tmp_path / "checkpoints" / "2")
    step, state = Checkpointer(tmp_path, asynchronous=False).restore_latest_valid(ABSTRACT)
    assert step == 1 and int(state["step"]) == 1
    err = capsys.readouterr().err
    assert "skipping checkpoint step 3" in err and "skipping checkpoint step 2" in err


def test_an_empty_step_folder_is_not_trusted(tmp_path):
    saved_steps(tmp_path)
    (tmp_path / "checkpoints" / "4").mkdir()
    ckpt = Checkpointer(tmp_path, asynchronous=False)
    assert ckpt.latest_step() == 4
    assert ckpt.restore_latest_valid(ABSTRACT)[0] == 3


def test_a_changed_tree_is_named_and_nothing_is_moved(tmp_path, capsys):
    saved_steps(tmp_path)
    other = abstract_like({"params": {"w": jnp.zeros((5, 3)), "b2": jnp.zeros(3)}, "step": jnp.int32(0)})
    ckpt = Checkpointer(tmp_path, asynchronous=False)
    with pytest.raises(CheckpointError) as info:
        ckpt.restore_latest_valid(other)
    message = str(info.value)
    assert "steps 3, 2, 1" in message and "params.b2" in message and "params.b" in message
    assert "params.w saved (4, 3) vs (5, 3)" in message
    assert ckpt.all_steps() == [1, 2, 3] and not (tmp_path / "checkpoints-skipped").exists()
    assert "Exception ignored" not in capsys.readouterr().err


def test_abstract_state_may_depend_on_the_step(tmp_path):
    saved_steps(tmp_path, steps=(1, 2))
    seen = []

    def abstract(step):
        seen.append(step)
        return ABSTRACT

    assert Checkpointer(tmp_path, asynchronous=False).restore_latest_valid(abstract)[0] == 2
    assert seen == [2]


def test_no_checkpoint_is_said_so(tmp_path):
    ckpt = Checkpointer(tmp_path, asynchronous=False)
    assert ckpt.restore_latest_valid(ABSTRACT) == (None, None)
    assert ckpt.latest_step() is None
    assert ckpt.describe_latest().startswith("No checkpoint was written")
    assert "None" not in ckpt.describe_latest()
    with pytest.raises(NoCheckpointError, match="no latest checkpoint"):
        ckpt.restore(ABSTRACT)


def test_best_restores_the_best_step_not_the_latest(tmp_path):
    saved_steps(tmp_path)
    ckpt = Checkpointer(tmp_path, best_metric="accuracy", asynchronous=False)
    assert ckpt.latest_step() == 3 and ckpt.best_step() == 2
    best = ckpt.restore(ABSTRACT, which="best")
    latest = ckpt.restore(ABSTRACT, which="latest")
    assert int(best["step"]) == 2 and float(best["params"]["w"][0, 0]) == 2.0
    assert int(latest["step"]) == 3 and float(latest["params"]["w"][0, 0]) == 3.0
    lowest = Checkpointer(tmp_path / "min", best_metric="accuracy", best_mode="min", asynchronous=False)
    for s in (1, 2, 3):
        lowest.save(s, state_at(s), {"accuracy": ACCURACY[s]})
    lowest.wait()
    assert int(lowest.restore(ABSTRACT, which="best")["step"]) == 3  # accuracy 0.1 is the minimum
    with pytest.raises(NoCheckpointError, match="train.best_metric"):
        Checkpointer(tmp_path, asynchronous=False).restore(ABSTRACT, which="best")


def test_explicit_restore_of_a_damaged_step_is_one_clear_error(tmp_path):
    saved_steps(tmp_path)
    truncate_arrays(tmp_path / "checkpoints" / "3")
    expected = r"latest checkpoint step 3 .* cannot be restored: ValueError"
    with pytest.raises(CheckpointError, match=expected) as info:
        Checkpointer(tmp_path, asynchronous=False).restore(ABSTRACT)
    assert len(str(info.value).splitlines()) == 1


def test_garbled_best_metrics_do_not_stop_the_run(tmp_path, capsys):
    saved_steps(tmp_path)
    (tmp_path / "best" / "2" / "metrics" / "metrics").write_text("{torn")
    with pytest.raises(CheckpointError, match="unreadable metrics"):
        Checkpointer(tmp_path, best_metric="accuracy", read_only=True)
    ckpt = Checkpointer(tmp_path, best_metric="accuracy", asynchronous=False)
    assert ckpt.best_step() is None and ckpt.latest_step() == 3
    assert "best checkpoint step 2 has unreadable metrics" in capsys.readouterr().err


def test_read_only_checkpointer_creates_nothing(tmp_path):
    workdir = tmp_path / "absent"
    ckpt = Checkpointer(workdir, best_metric="accuracy", read_only=True)
    assert ckpt.latest_step() is None and ckpt.best_step() is None
    assert not workdir.exists()


# ---------------------------------------------------------------------------------------- workdir lock

HOLD = """
import sys, time
from jaxlab.train.workdir import WorkdirLock
lock = WorkdirLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_busy_workdir_stops_a_second_run_naming_the_first(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirBusyError) as info, WorkdirLock(tmp_path):
            pass
        message = str(info.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message
        assert f"kill {holder.pid}" in message and "--workdir" in message
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    with WorkdirLock(tmp_path):
        record = json.loads((tmp_path / ".lock").read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    err = capsys.readouterr().err
    assert f"taking over the stale lock {tmp_path / '.lock'} of pid {holder.pid}" in err
    assert "that process is gone" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / ".lock").exists()  # released on exit


def test_a_stale_lock_file_of_a_dead_pid_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps(
        {"pid": dead.pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00"}))
    with WorkdirLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert f"of pid {dead.pid} on host {socket.gethostname()} since 2026-01-01" in capsys.readouterr().err


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    with WorkdirLock(tmp_path), pytest.raises(WorkdirBusyError, match=f"pid {os.getpid()}"):
        WorkdirLock(tmp_path).acquire()
    with WorkdirLock(tmp_path):  # free again once released
        pass


# -------------------------------------------------------------------------------------- saved config


def test_config_saved_atomically_and_compared(tmp_path):
    config = load_config("ecg_cnn:tiny")
    assert compare_config(tmp_path, config) == []  # no config.json yet (or an old run): no comparison
    save_config(tmp_path, config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # no temporary left behind
    assert json.loads((tmp_path / "config.json").read_text())["model"]["n_convs"] == 2
    assert compare_config(tmp_path, load_config("ecg_cnn:tiny")) == []

    changed = load_config("ecg_cnn:tiny", ["model.n_convs=3", "optimizer.lr=3e-4"])
    # no checkpoint yet (the first run failed early): nothing to mismatch, the change is only listed
    assert compare_config(tmp_path, changed) == ["model.n_convs: 2 -> 3", "optimizer.lr: 0.001 -> 0.0003"]
    (tmp_path / "checkpoints" / "500").mkdir(parents=True)
    with pytest.raises(ConfigChangedError) as info:
        compare_config(tmp_path, changed)
    message = str(info.value)
    assert "model.n_convs: 2 -> 3" in message and "--allow-config-change" in message
    assert "optimizer.lr" not in message  # allowed changes are not reasons to refuse
    assert compare_config(tmp_path, changed, allow_changes=True) == [
        "model.n_convs: 2 -> 3", "optimizer.lr: 0.001 -> 0.0003"]

    allowed = load_config("ecg_cnn:tiny", ["optimizer.lr=3e-4", "train.steps=10", "data.eval_batch_size=64"])
    assert compare_config(tmp_path, allowed) == [
        "data.eval_batch_size: 512 -> 64", "optimizer.lr: 0.001 -> 0.0003", "train.steps: 3000 -> 10"]
    for override in ("data.batch_size=64", "seed=1", "data.options.keys=signal:x,label:y"):
        with pytest.raises(ConfigChangedError, match=override.split("=")[0]):
            compare_config(tmp_path, load_config("ecg_cnn:tiny", [override]))


def test_a_default_added_since_the_run_is_not_a_refused_change(tmp_path):
    config = load_config("ecg_cnn:tiny")
    old = config.to_dict()
    del old["model"]["dp_epsilon"]  # a model option jaxlab added later, off by default
    (tmp_path / "config.json").write_text(json.dumps(old))
    (tmp_path / "checkpoints" / "10").mkdir(parents=True)
    assert compare_config(tmp_path, config) == ["model.dp_epsilon: (absent) -> 0.0"]
    config.model.dp_epsilon = 1.0  # turned on: a real model change
    with pytest.raises(ConfigChangedError, match="model.dp_epsilon"):
        compare_config(tmp_path, config)


# ------------------------------------------------------------------------------------------- metrics


def test_torn_last_metrics_line_is_dropped_on_read_and_resume(tmp_path, capsys):
    lines = [{"step": s, "split": "train", "loss": 1.0 / s} for s in (10, 20, 30)]
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 40, "split": "tra'
    (tmp_path / "metrics.jsonl").write_text(text)
    assert [r["step"] for r in read_metrics(tmp_path)] == [10, 20, 30]
    err = capsys.readouterr().err
    assert "torn last line" in err and len(err.strip().splitlines()) == 1
    writer = MetricWriter(tmp_path, resume_step=20, tensorboard=False)
    writer.write(30, "train", {"loss": 0.5})
    writer.close()
    assert read_metrics(tmp_path) == [lines[0], lines[1], {"step": 30, "split": "train", "loss": 0.5}]


# ------------------------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("key, value", [
    ("data.batch_size", 0), ("data.batch_size", -4), ("data.eval_batch_size", -1), ("train.steps", -5),
    ("train.steps", 0), ("train.keep_checkpoints", 0), ("train.log_every", 0), ("train.eval_every", 0),
    ("train.checkpoint_every", -1), ("train.accum_steps", 0), ("optimizer.lr", -1e-3),
    ("optimizer.lr", float("nan")), ("optimizer.weight_decay", -0.1), ("optimizer.b2", 1.0),
    ("optimizer.warmup_steps", -10), ("mesh.data", 0), ("data.options.scale", 0.0),
])
def test_each_bad_number_is_one_config_error_naming_its_key(key, value):
    config = load_config("ecg_cnn:tiny")
    section, _, leaf = key.rpartition(".")
    node = config
    for part in section.split("."):
        node = node[part]
    node[leaf] = value
    with pytest.raises(ConfigError) as info:
        check_numbers(config)
    assert str(info.value).startswith(key) and len(str(info.value).splitlines()) == 1


def test_good_numbers_pass_and_accum_must_divide_the_batch():
    check_numbers(base_config())
    check_numbers(load_config("ecg_cnn:tiny", ["mesh.data=2", "optimizer.lr=0.0"]))
    with pytest.raises(ConfigError, match="not divisible by train.accum_steps=3"):
        check_numbers(load_config("ecg_cnn:tiny", ["train.accum_steps=3"]))
    with pytest.raises(ConfigError, match="train.best_mode='maximum'"):
        check_numbers(load_config("ecg_cnn:tiny", ["train.best_mode=maximum"]))


# --------------------------------------------------------------------------------------- the CLI


def test_user_errors_end_in_one_line_and_a_nonzero_code(tmp_path, capsys):
    assert cli.main(["info", "--config", "ecg_cnn:nosuchvariant"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxlab: config error: ecg_cnn.py:nosuchvariant: unknown variant 'nosuchvariant'")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err

    assert cli.main(["--debug", "info", "--config", "ecg_cnn:nosuchvariant"]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert cli.main(["info", "--config", "ecg_cnn:nosuchvariant", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_eval_of_a_missing_workdir_says_so_and_creates_nothing(tmp_path, capsys):
    workdir = tmp_path / "no_run"
    assert cli.main(["eval", "--config", "ecg_cnn:tiny", "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and str(workdir) in err and len(err.strip().splitlines()) == 1
    assert not workdir.exists()
    workdir.mkdir()
    assert cli.main(["eval", "--config", "ecg_cnn:tiny", "--workdir", str(workdir)]) == 2
    assert "holds no checkpoints" in capsys.readouterr().err
    assert os.listdir(workdir) == []


class NonFiniteError(FloatingPointError):
    """Stands in for the trainer's NonFiniteError, which main() knows by name."""


@pytest.mark.parametrize("error, code", [
    (WorkdirBusyError("workdir w is in use by pid 1"), 1),
    (CheckpointError("none of the 3 kept checkpoints restores"), 1),
    (NonFiniteError("non-finite loss at step 7"), 1),
])
def test_run_failures_exit_1_with_the_message(monkeypatch, capsys, error, code):
    def fail(args, overrides):
        raise error

    monkeypatch.setitem(cli.COMMANDS, "list", fail)
    assert cli.main(["list"]) == code
    err = capsys.readouterr().err
    assert err == f"jaxlab: {error}\n"


def test_bugs_still_raise_with_their_traceback(monkeypatch):
    def bug(args, overrides):
        raise ZeroDivisionError("a bug")

    monkeypatch.setitem(cli.COMMANDS, "list", bug)
    with pytest.raises(ZeroDivisionError):
        cli.main(["list"])


def test_allow_config_change_flag_is_parsed():
    args = cli._parser().parse_args(["train", "--allow-config-change"])
    assert args.allow_config_change is True
    assert cli._parser().parse_args(["eval"]).allow_config_change is False

