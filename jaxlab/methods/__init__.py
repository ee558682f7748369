"""One package (or module) per paper, found by name: config.method = "split_ecg" imports
jaxlab.methods.split_ecg and calls its `build(config) -> jaxlab.train.method.Method`. A method with a
paper experiment also defines `report(config, workdir)`. No table to keep: a new package is found."""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from types import ModuleType

from jaxlab.config import ConfigError


def names() -> list[str]:
    """Every method in this package (modules and packages defining build)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def module(name: str) -> ModuleType:
    if name not in names():
        near = difflib.get_close_matches(name, names(), n=3)
        hint = f" Did you mean {', '.join(map(repr, near))}?" if near else ""
        raise ConfigError(f"unknown method {name!r}.{hint} Known methods: {', '.join(names())}")
    return importlib.import_module(f"{__name__}.{name}")


def build(config):
    """config.method's Method (jaxlab.train.method) under config."""
    return module(config.method).build(config)
