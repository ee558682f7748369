"""JAX's persistent compilation cache, on by default for the `jaxlab` command.

A second `jaxlab train` (or eval, report, a resumed run) of a config already compiled reads its
executables from disk instead of compiling them again. Where the cache lives, first match wins:

    JAX_COMPILATION_CACHE_DIR     JAX's own variable: left as the user set it
    JAXLAB_COMPILE_CACHE=off      no persistent cache (also `jaxlab --no-compile-cache ...`)
    JAXLAB_COMPILE_CACHE=<dir>    that folder
    $XDG_CACHE_HOME/jaxlab/xla    else ~/.cache/jaxlab/xla (per user)

JAX keys each entry by the program, the compile options, the backend and JAX's version, so one folder
serves every config, device kind and JAX install. Every program is cached, however fast it compiled
(JAX's default skips programs that compile in under a second, which are most of a CPU run's start-up).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV = "JAXLAB_COMPILE_CACHE"
OFF_VALUES = ("0", "off", "false", "no", "none")
_events: dict[str, int] = {}  # persistent-cache events counted since the listener was registered
_listening = False


def default_dir() -> Path:
    """The per-user cache folder: $XDG_CACHE_HOME/jaxlab/xla or ~/.cache/jaxlab/xla."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxlab" / "xla"


def configured_dir(disabled: bool = False) -> Path | None:
    """The folder the rules in the module docstring choose, or None for no persistent cache."""
    if disabled:
        return None
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    value = os.environ.get(ENV, "").strip()
    if value.lower() in OFF_VALUES:
        return None
    return Path(value).expanduser() if value else default_dir()


def enable(path: str | Path) -> Path:
    """Points JAX's persistent cache at `path` (created if missing) and caches every program.

    Takes effect for compilations after the call; call it before the first jit of the process (the
    `jaxlab` command does, before it builds anything). Returns the folder."""
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    _listen()
    return path


def disable() -> None:
    """No persistent cache for this process."""
    jax.config.update("jax_enable_compilation_cache", False)


def setup(disabled: bool = False) -> Path | None:
    """What the `jaxlab` command calls first: enables the cache where `configured_dir` says, or disables
    it. A folder that cannot be created only costs the cache, with a one-line note."""
    path = configured_dir(disabled)
    if path is None:
        disable()
        return None
    try:
        return enable(path)
    except OSError as err:
        print(f"[jaxlab] compilation cache off: cannot use {path} ({err.strerror or err})", flush=True)
        disable()
        return None


def _listen() -> None:
    global _listening
    if _listening:
        return
    _listening = True

    def count(event: str, **_kwargs) -> None:
        if event.startswith("/jax/compilation_cache/cache_"):
            name = event.rsplit("/", 1)[-1]
            _events[name] = _events.get(name, 0) + 1

    jax.monitoring.register_event_listener(count)


def counts() -> dict[str, int]:
    """Persistent-cache hits and misses of this process so far: {"cache_hits": n, "cache_misses": m}."""
    return {k: _events.get(k, 0) for k in ("cache_hits", "cache_misses")}
