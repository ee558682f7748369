"""Python-file configs with named variants and checked command-line overrides.

A config file defines `get_config(arg: str | None) -> Config`. It is named on the command line as
`configs/x.py:variant` (or the short form `x:variant`, looked up in the repo's configs/ folder) and
overridden with `--config.optimizer.lr=3e-4`. Overrides are checked against the config before anything
compiles: an unknown key names the nearest valid keys, a wrong type names the expected type.
"""

from __future__ import annotations

import ast
import copy
import difflib
import importlib.util
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxlab.errors import UserError

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = "ecg_cnn:tiny"


class ConfigError(UserError, ValueError):
    """A config file, variant or override that cannot be used; the message says why and what would."""

    exit_code = 2


class Config(dict):
    """A nested dict with attribute access. Keys are fixed once built: setting an unknown key fails."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __setitem__(self, key, value):
        if isinstance(value, Mapping) and not isinstance(value, Config):
            value = Config(value)
        super().__setitem__(key, value)

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(_unknown_key_message(key, self.keys(), "")) from None

    def __setattr__(self, key, value):
        self[key] = value

    def update(self, *args, **kwargs):  # dict.update would bypass __setitem__'s nesting
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __deepcopy__(self, memo):
        return Config({k: copy.deepcopy(v, memo) for k, v in self.items()})

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, Config) else v for k, v in self.items()}

    def flat_keys(self, prefix: str = "") -> list[str]:
        keys = []
        for k, v in self.items():
            keys.append(prefix + k)
            if isinstance(v, Config):
                keys += v.flat_keys(prefix + k + ".")
        return keys


def _unknown_key_message(key: str, valid: Iterable[str], where: str, what: str = "config key") -> str:
    valid = sorted(valid)
    near = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""
    return f"unknown {what} {where + key!r}.{hint} Valid keys here: {', '.join(valid)}"


def parse_arg(arg: str | None, variants: Sequence[str] | None = None, **defaults: Any) -> Config:
    """Parses a variant string like 'tiny' or 'variant=B/16,runlocal=True' into a Config.

    A bare word sets the key `variant`. Values are Python literals where they parse, else strings.
    Keys not in `defaults` are rejected so a misspelt variant argument fails loudly, and so is a
    `variant` not in `variants` when the config file lists them.
    """
    out = Config(defaults)
    for part in arg.split(",") if arg else ():
        if "=" in part:
            key, raw = part.split("=", 1)
        else:
            key, raw = "variant", part
        if key not in defaults:
            raise ConfigError(_unknown_key_message(key, defaults, "", what="config argument"))
        out[key] = _literal(raw)
    if variants is not None and out.get("variant") not in variants:
        raise ConfigError(f"unknown variant {out.get('variant')!r}: {', '.join(variants)}")
    return out


def _literal(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def resolve_config_path(spec: str) -> tuple[Path, str | None]:
    """'configs/x.py:tiny' or 'x:tiny' -> (path to x.py, 'tiny')."""
    path_part, _, arg = spec.partition(":")
    path = Path(path_part)
    if path.suffix != ".py":
        path = CONFIGS_DIR / f"{path_part}.py"
    if not path.exists():
        known = sorted(p.stem for p in CONFIGS_DIR.glob("*.py") if not p.stem.startswith("_"))
        raise ConfigError(f"config file {str(path)!r} not found. Configs in {CONFIGS_DIR}: {', '.join(known)}")
    return path, (arg or None)


def load_config(spec: str = DEFAULT_CONFIG, overrides: Iterable[str] = ()) -> Config:
    """Loads `get_config(arg)` from the file named by `spec` and applies `key=value` overrides."""
    path, arg = resolve_config_path(spec)
    module_spec = importlib.util.spec_from_file_location(f"jaxlab_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(arg)")
    try:
        config = module.get_config(arg)
    except (ValueError, KeyError) as err:  # e.g. an unknown variant (parse_arg) or the file's own check
        raise ConfigError(f"{path.name}:{arg or ''}: {err}") from err
    if not isinstance(config, Config):
        config = Config(config)
    apply_overrides(config, overrides)
    return config


def apply_overrides(config: Config, overrides: Iterable[str]) -> Config:
    """Applies 'a.b.c=value' strings in place; checks each key exists and the value's type fits."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        dotted, raw = item.split("=", 1)
        set_by_path(config, dotted, _literal(raw))
    return config


def set_by_path(config: Config, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = config
    for i, key in enumerate(parts):
        where = ".".join(parts[:i]) + ("." if i else "")
        if not isinstance(node, Config):
            raise ConfigError(f"config key {where.rstrip('.')!r} is a {type(node).__name__}, not a section")
        if key not in node:
            raise ConfigError(_unknown_key_message(key, node.keys(), where))
        if i < len(parts) - 1:
            node = node[key]
    node[parts[-1]] = _checked(dotted, node[parts[-1]], value)


def _checked(dotted: str, current: Any, value: Any) -> Any:
    """Returns value if its type fits the current one (int fits float; None fields take anything)."""
    if current is None or value is None:
        return value
    if isinstance(current, bool) or isinstance(value, bool):
        ok = isinstance(current, bool) and isinstance(value, bool)
    elif isinstance(current, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    elif isinstance(current, (list, tuple)):
        ok = isinstance(value, (list, tuple))
        value = type(current)(value) if ok else value
    elif isinstance(current, Config):
        ok = False
    else:
        ok = isinstance(value, type(current))
    if not ok:
        raise ConfigError(
            f"config key {dotted!r} expects {type(current).__name__} (currently {current!r}), "
            f"got {type(value).__name__} {value!r}"
        )
    return value


def base_config() -> Config:
    """The trainer's sections every experiment config starts from (see README, "Configs")."""
    from jaxlab.train.optim import default_optimizer_config

    return Config(
        method="",
        seed=0,
        model=Config(),
        # options go to the source's loader; keys renames features (jaxlab.data.sources.parse_keys)
        data=Config(source="", data_dir=None, seed=0, options=Config(keys=None), batch_size=32,
                    eval_batch_size=256),
        optimizer=default_optimizer_config(),
        train=Config(
            steps=1000,
            accum_steps=1,
            compute_dtype="float32",
            log_every=50,
            eval_every=500,
            checkpoint_every=500,
            keep_checkpoints=3,
            best_metric="",
            best_mode="max",
            async_checkpoints=True,
            on_nonfinite="stop",
            progress=True,
            init_from="",  # a run's workdir / checkpoint or an .npz (jaxlab.train.init_from)
            init_parts=(),  # which parts to take from it (default: all)
            init_rename=(),  # ((regex, replacement), ...) applied to .npz keys
        ),
        mesh=Config(data=-1, model=1),
    )


# ------------------------------------------------------------------------------- numbers checked early

_AT_LEAST_ONE = ("data.batch_size", "data.eval_batch_size", "train.steps", "train.keep_checkpoints",
                 "train.log_every", "train.eval_every", "train.checkpoint_every", "train.accum_steps",
                 "mesh.model")
# optimizer keys wherever they sit under a section named optimizer* (one optimizer or one per part)
_OPTIMIZER_NON_NEGATIVE = ("lr", "end_lr", "weight_decay", "eps", "warmup_steps", "grad_clip_norm",
                           "layer_decay")
_OPTIMIZER_UNIT = ("b1", "b2", "momentum")  # in [0, 1)
_CHOICES = {"train.best_mode": ("max", "min"), "train.on_nonfinite": ("stop", "skip")}
_MISSING = object()


def _get(config: Mapping, dotted: str) -> Any:
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return _MISSING
        node = node[key]
    return node


def _number(dotted: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{dotted} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{dotted} must be a finite number, got {value!r}")
    return value


def _optimizer_sections(config: Mapping, prefix: str = "") -> list[tuple[str, Mapping]]:
    """(dotted path, section) of every mapping named optimizer* (and the mappings inside it that hold
    an lr: per-part optimizers)."""
    found = []
    for key, value in config.items():
        if not isinstance(value, Mapping):
            continue
        path = f"{prefix}{key}"
        if key.startswith("optimizer"):
            found.append((path, value))
            found += [(f"{path}.{k}", v) for k, v in value.items() if isinstance(v, Mapping) and "lr" in v]
        else:
            found += _optimizer_sections(value, path + ".")
    return found


def check_numbers(config: Mapping) -> None:
    """Raises ConfigError, one line naming the key, for a number no run can use, before anything is
    built or compiled: batch sizes, steps, intervals and kept checkpoints below 1, train.accum_steps not
    dividing data.batch_size, mesh.data not -1 or >= 1, negative (or non-finite) learning rates, weight
    decay, eps, warmup or clip norm, b1/b2/momentum outside [0, 1), data.options.scale <= 0 and
    data.options.test_fraction outside (0, 1). Keys a config does not have are not checked."""
    for dotted in _AT_LEAST_ONE:
        value = _get(config, dotted)
        if value is not _MISSING and _number(dotted, value) < 1:
            raise ConfigError(f"{dotted} must be >= 1, got {value}")
        if value is not _MISSING and value != int(value):
            raise ConfigError(f"{dotted} must be a whole number, got {value}")
    batch, accum = _get(config, "data.batch_size"), _get(config, "train.accum_steps")
    if batch is not _MISSING and accum is not _MISSING and batch % accum:
        raise ConfigError(f"data.batch_size={batch} is not divisible by train.accum_steps={accum}")
    mesh_data = _get(config, "mesh.data")
    if mesh_data is not _MISSING and _number("mesh.data", mesh_data) != -1 and mesh_data < 1:
        raise ConfigError(f"mesh.data must be -1 (all devices) or >= 1, got {mesh_data}")
    for path, section in _optimizer_sections(config):
        for key in _OPTIMIZER_NON_NEGATIVE:
            if key in section and _number(f"{path}.{key}", section[key]) < 0:
                raise ConfigError(f"{path}.{key} must be >= 0, got {section[key]}")
        for key in _OPTIMIZER_UNIT:
            if key in section and not 0 <= _number(f"{path}.{key}", section[key]) < 1:
                raise ConfigError(f"{path}.{key} must be in [0, 1), got {section[key]}")
        if section.get("schedule") == "cosine" and section.get("lr") == 0:
            raise ConfigError(f"{path}.lr must be > 0 with {path}.schedule='cosine' (it divides end_lr)")
    scale = _get(config, "data.options.scale")
    if scale is not _MISSING and scale is not None and _number("data.options.scale", scale) <= 0:
        raise ConfigError(f"data.options.scale must be > 0, got {scale}")
    fraction = _get(config, "data.options.test_fraction")
    if fraction is not _MISSING and not 0 < _number("data.options.test_fraction", fraction) < 1:
        raise ConfigError(f"data.options.test_fraction must be in (0, 1), got {fraction}")
    for dotted, choices in _CHOICES.items():
        value = _get(config, dotted)
        if value is not _MISSING and value not in choices:
            raise ConfigError(f"{dotted}={value!r} must be one of {', '.join(map(repr, choices))}")
