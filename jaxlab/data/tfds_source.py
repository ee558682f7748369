"""`tfds:<name>`: a TFDS dataset the user prepared (ArrayRecord) under data_dir, read without TensorFlow."""

from __future__ import annotations

import difflib
from pathlib import Path

import numpy as np

from jaxlab.data.sources import DatasetNotFoundError, DataSourceError, register_kind

PREPARE_HINT = (
    "Prepare it once on a machine with internet (TensorFlow needed only there):\n"
    "  pip install 'jaxlab[tfds]' && tfds build {name} --data_dir {data_dir} --file_format array_record\n"
    "then copy that folder here and pass --config.data.data_dir={data_dir}. Nothing is downloaded at run time."
)


def short_message(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _check_known(tfds, name: str, shown_dir: str) -> None:
    """An unknown dataset name fails with the nearest known names first (not TFDS's list of all ~450)."""
    base = name.split(":")[0].split("/")[0]
    try:
        tfds.builder_cls(base)
    except Exception:  # noqa: BLE001  (tfds raises its own DatasetNotFoundError, with the whole list)
        known_name = False
    else:
        known_name = True
    if known_name:
        return
    try:
        known = tfds.list_builders(with_community_datasets=False)
    except Exception:  # noqa: BLE001
        known = []
    near = difflib.get_close_matches(base, known, n=3)
    hint = f" Did you mean {', '.join(map(repr, near))}?" if near else ""
    if (Path(shown_dir).expanduser() / base).is_dir():
        return  # a dataset prepared from user code: let data_source read it
    raise DatasetNotFoundError(
        f"no TFDS dataset {base!r}.{hint} Names are TFDS's (https://www.tensorflow.org/datasets/catalog); "
        f"a prepared one lives in {shown_dir}/<name>/. " + PREPARE_HINT.format(name=near[0] if near else base,
                                                                             data_dir=shown_dir)
    )


class TFDSSource:
    """Random access over `tfds.data_source(name, split=..., data_dir=...)`; features as numpy arrays."""

    def __init__(self, name: str, split: str, data_dir: str | None):
        import tensorflow_datasets as tfds

        self.name = name
        shown_dir = data_dir or "~/tensorflow_datasets"
        _check_known(tfds, name, shown_dir)
        try:
            self._ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as err:
            try:
                prepared = tfds.builder(name, data_dir=data_dir).is_prepared()
            except Exception:  # noqa: BLE001  (cannot tell: treat as not prepared)
                prepared = False
            if not prepared:
                raise DatasetNotFoundError(
                    f"TFDS dataset {name!r} (split {split!r}) is not prepared under {shown_dir}. "
                    + PREPARE_HINT.format(name=name, data_dir=shown_dir)
                ) from err
            raise DataSourceError(
                f"TFDS dataset {name!r} exists under {shown_dir} but cannot be read by random access "
                f"({short_message(err)}). Re-prepare it with --file_format array_record."
            ) from err

    def __len__(self) -> int:
        return len(self._ds)

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        rows = [self._ds[int(i)] for i in np.asarray(indices)]
        return {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}


@register_kind("tfds")
def _load(name: str, *, split: str, seed: int, data_dir: str | None = None, **_) -> TFDSSource:
    return TFDSSource(name, split=split, data_dir=data_dir)
