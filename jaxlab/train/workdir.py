"""What a run keeps in its workdir besides checkpoints and metrics: a lock, so that two runs cannot write
into one workdir at once, and the resolved config, so that a resume or an eval can say what changed.

    with WorkdirLock(workdir):                 # a second run into the same workdir stops at once
        changes = compare_config(workdir, config, allow_changes=args.allow_config_change)
        save_config(workdir, config)
        ...

Only process 0 of a multi-process run takes the lock and writes the config (all of them compare).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

from jaxlab.config import ConfigError
from jaxlab.errors import UserError

LOCK_NAME = ".lock"
CONFIG_NAME = "config.json"
# changing these under an existing run changes what its checkpoints or data stream mean: refused
REFUSED_PREFIXES = ("model", "data", "method", "seed")
ALLOWED_ANYWAY = ("data.eval_batch_size",)
OVERRIDE_FLAG = "--allow-config-change"


class WorkdirBusyError(UserError):
    """Another live run holds the workdir's lock; the message names it (pid, host, since when)."""

    exit_code = 1


class ConfigChangedError(ConfigError):
    """The config differs from the workdir's config.json in keys that change the model or data."""


def _process_index() -> int:
    import jax

    return jax.process_index()


def _pid_alive(pid: int) -> bool:
    """Whether `pid` runs on this host (a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WorkdirLock:
    """An exclusive lock on <workdir>/.lock, holding {"pid", "host", "started", "command"} as JSON.

    Taken with fcntl.flock (the kernel drops it when its process dies, so a killed run never blocks the
    next one); a lock file left by a dead process is reported in one line and taken over. A second run
    into a busy workdir raises WorkdirBusyError at once. Only process 0 takes it; on other processes this
    is a no-op. Released (and the file removed) on exit.
    """

    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> Self:
        if _process_index() == 0:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = self._flock(fd)
                if not locked:
                    raise WorkdirBusyError(self._busy_message(_read_holder(fd)))
                try:  # the holder before us may have removed the file after we opened it: retry
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        previous = _read_holder(fd)
        if previous:
            print(f"[jaxlab] taking over the stale lock {self.path} of {_describe(previous)}: "
                  f"{_why_stale(previous)}", file=sys.stderr, flush=True)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def _flock(self, fd: int) -> bool:
        """True when the lock was taken, False when another process holds it. Where the filesystem has
        no flock, falls back to the pid in the file: held if that pid runs here or the file names
        another host."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                return False
            holder = _read_holder(fd)
            if not holder:
                return True
            if holder.get("host") != socket.gethostname():
                return False
            return not _pid_alive(int(holder.get("pid", -1)))

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held, so no one locks the removed file
        finally:
            os.close(self._fd)
            self._fd = None

    def _busy_message(self, holder: dict) -> str:
        if not holder:
            who = "another process (its lock file is empty; it is starting or being released)"
        else:
            who = _describe(holder)
            command = holder.get("command")
            if command:
                who += f" ({command})"
            if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1))):
                who += (f"; pid {holder['pid']} is gone but a process it started still holds the lock "
                        "(e.g. a data worker): end that process")
        pid = holder.get("pid") if holder else None
        stop = f", stop it (kill {pid})" if pid and holder.get("host") == socket.gethostname() else ""
        return (f"workdir {self.workdir} is in use by {who}. Wait for that run to finish{stop}, "
                f"or train into another --workdir.")


def _read_holder(fd: int) -> dict:
    """The JSON record in the lock file ({} when empty or unreadable)."""
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        record = json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {holder.get('started', '?')}"


def _why_stale(holder: dict) -> str:
    if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1))):
        return "that process is gone"
    return "that run no longer holds it"


# ----------------------------------------------------------------------------------------- config


def _plain(config: Any) -> Any:
    """The config as JSON would store it (tuples as lists, other objects as their repr)."""
    data = config.to_dict() if hasattr(config, "to_dict") else config
    return json.loads(json.dumps(data, default=repr))


def save_config(workdir: str | Path, config: Any) -> Path | None:
    """Writes the resolved config to <workdir>/config.json atomically (a temporary file, then
    os.replace). Process 0 only; returns the path (None on other processes)."""
    if _process_index() != 0:
        return None
    path = Path(workdir) / CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{CONFIG_NAME}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(_plain(config), f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_saved_config(workdir: str | Path) -> dict | None:
    """<workdir>/config.json as a dict, or None when the workdir has none (a run from before it existed,
    or a new one). An unreadable file is reported in one line and treated as absent."""
    path = Path(workdir) / CONFIG_NAME
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        print(f"[jaxlab] cannot read {path} ({type(err).__name__}: {err}); the config is not compared",
              file=sys.stderr, flush=True)
        return None
    return saved if isinstance(saved, dict) else None


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": leaf}; a non-empty mapping is descended into, anything else (lists, {}) is a leaf."""
    if isinstance(tree, Mapping) and tree:
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


_ABSENT = object()


def config_changes(old: Mapping, new: Any) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every leaf that differs, sorted by key; a key present on
    one side only has the marker `_ABSENT` on the other."""
    before, after = _flatten(_plain(old)), _flatten(_plain(new))
    return [(k, before.get(k, _ABSENT), after.get(k, _ABSENT)) for k in sorted(set(before) | set(after))
            if before.get(k, _ABSENT) != after.get(k, _ABSENT)]


def _unset(value: Any) -> bool:
    """A value that means "off" (how a newly added option defaults): absent, None, "", empty, 0, False."""
    return value is _ABSENT or value is None or value is False or value in ("", [], {}) or (
        isinstance(value, (int, float)) and value == 0)


def is_refused(key: str, old: Any = None, new: Any = None) -> bool:
    """Whether a change of `key` under an existing run is refused: model.*, data.* (but
    data.eval_batch_size), method, seed; not a key only one side has with an "off" value (an option
    added to or dropped from jaxlab's defaults since the run was saved)."""
    if key in ALLOWED_ANYWAY:
        return False
    if (old is _ABSENT and _unset(new)) or (new is _ABSENT and _unset(old)):
        return False
    return any(key == p or key.startswith(p + ".") for p in REFUSED_PREFIXES)


def _shown(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)


def _has_checkpoints(workdir: str | Path) -> bool:
    """Whether <workdir>/checkpoints or <workdir>/best holds a step folder."""
    return any(p.name.isdigit() for sub in ("checkpoints", "best") if (Path(workdir) / sub).is_dir()
               for p in (Path(workdir) / sub).iterdir())


def compare_config(workdir: str | Path, config: Any, allow_changes: bool = False) -> list[str]:
    """Compares `config` with <workdir>/config.json and returns each change as "key: old -> new".

    Changes to model.*, data.* (but data.eval_batch_size), method or seed raise ConfigChangedError
    naming them and the flag that overrides (`allow_changes`); others (optimizer.*, train.*, mesh.*,
    report.*, ...) are returned for the caller to log. No config.json: no comparison, []. A workdir with
    no checkpoint yet (a run that failed before its first) refuses nothing: there is nothing to mismatch.
    """
    saved = load_saved_config(workdir)
    if saved is None:
        return []
    changes = config_changes(saved, config)
    shown = [f"{key}: {_shown(old)} -> {_shown(new)}" for key, old, new in changes]
    refused = [line for (key, old, new), line in zip(changes, shown) if is_refused(key, old, new)]
    if refused and not allow_changes and _has_checkpoints(workdir):
        raise ConfigChangedError(
            f"the config differs from the one {workdir} was run with ({Path(workdir) / CONFIG_NAME}) in "
            f"keys that change the model or data: {'; '.join(refused)}. Use that config, another --workdir, "
            f"or {OVERRIDE_FLAG} to go on anyway."
        )
    return shown
