"""Seeded procedural generators (`synthetic:<name>`), each documented in its module."""

from jaxlab.data.synthetic import ecg  # noqa: F401  (registers synthetic:ecg_beats)
from jaxlab.data.synthetic import actions  # noqa: F401  (registers synthetic:actions)
