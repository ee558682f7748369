"""`tfds:<name>`: a TFDS dataset the user prepared (ArrayRecord) under data_dir, read without TensorFlow."""

from __future__ import annotations

import numpy as np

from jaxlab.data.sources import DatasetNotFoundError, register_kind

PREPARE_HINT = (
    "Prepare it once on a machine with internet (TensorFlow needed only there):\n"
    "  pip install 'jaxlab[tfds]' && tfds build {name} --data_dir {data_dir} --file_format array_record\n"
    "then copy that folder here and pass --config.data.data_dir={data_dir}. Nothing is downloaded at run time."
)


class TFDSSource:
    """Random access over `tfds.data_source(name, split=..., data_dir=...)`; features as numpy arrays."""

    def __init__(self, name: str, split: str, data_dir: str | None):
        import tensorflow_datasets as tfds

        self.name = name
        try:
            self._ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as err:
            shown_dir = data_dir or "~/tensorflow_datasets"
            try:
                prepared = tfds.builder(name, data_dir=data_dir).is_prepared()
            except Exception:
                prepared = False
            if not prepared:
                raise DatasetNotFoundError(
                    f"TFDS dataset {name!r} (split {split!r}) is not prepared under {shown_dir}. "
                    + PREPARE_HINT.format(name=name, data_dir=shown_dir)
                ) from err
            raise RuntimeError(
                f"TFDS dataset {name!r} exists under {shown_dir} but cannot be read by random access "
                f"({err}). Re-prepare it with --file_format array_record."
            ) from err

    def __len__(self) -> int:
        return len(self._ds)

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        rows = [self._ds[int(i)] for i in np.asarray(indices)]
        return {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}


@register_kind("tfds")
def _load(name: str, *, split: str, seed: int, data_dir: str | None = None, **_) -> TFDSSource:
    return TFDSSource(name, split=split, data_dir=data_dir)
