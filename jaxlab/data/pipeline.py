"""Batches whose order is a pure function of (seed, step), sharded per process and prefetched to devices.

Global batch `step` holds the examples at positions step*B .. step*B+B-1 of an endless stream that walks
a fresh seeded permutation of the source each epoch. Process p of P takes rows p*B/P .. (p+1)*B/P-1 of
it and builds the global jax.Array from its local rows, so a resumed run reads exactly the batches an
uninterrupted run would have, with no iterator state to save.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from jaxlab.data.sources import Source


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0xDA7A]).permutation(n)


def batch_indices(n: int, global_batch: int, seed: int, step: int, shuffle: bool = True) -> np.ndarray:
    """Indices of global batch `step` into a source of n examples (int64, shape (global_batch,))."""
    positions = step * global_batch + np.arange(global_batch, dtype=np.int64)
    epochs, offsets = np.divmod(positions, n)
    if not shuffle:
        return offsets
    out = np.empty_like(positions)
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        out[sel] = _epoch_permutation(n, seed, int(epoch))[offsets[sel]]
    return out


def process_slice(global_batch: int) -> slice:
    """This process's rows of a global batch; the batch must split evenly over processes."""
    count, index = jax.process_count(), jax.process_index()
    if global_batch % count:
        raise ValueError(f"global batch size {global_batch} does not split over {count} processes")
    per = global_batch // count
    return slice(index * per, (index + 1) * per)


def to_global(local: dict[str, np.ndarray], sharding, global_batch: int) -> dict[str, jax.Array]:
    """Builds global jax.Arrays (leading axis sharded) from this process's rows."""
    def put(x):
        shape = (global_batch, *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return {k: put(v) for k, v in local.items()}


class TrainBatches:
    """Endless training batches for steps start, start+1, ...; prefetched on a background thread."""

    def __init__(
        self,
        source: Source,
        global_batch: int,
        seed: int,
        sharding,
        transform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
        prefetch: int = 2,
    ):
        if len(source) == 0:
            raise ValueError("training source is empty")
        self.source, self.global_batch, self.seed = source, global_batch, seed
        self.sharding, self.transform, self.prefetch = sharding, transform, prefetch
        self.rows = process_slice(global_batch)

    def local_batch(self, step: int) -> dict[str, np.ndarray]:
        idx = batch_indices(len(self.source), self.global_batch, self.seed, step)[self.rows]
        batch = self.source.get(idx)
        return self.transform(batch) if self.transform else batch

    def batch(self, step: int) -> dict[str, jax.Array]:
        return to_global(self.local_batch(step), self.sharding, self.global_batch)

    def iterate(self, start_step: int, end_step: int) -> Iterator[tuple[int, dict[str, jax.Array]]]:
        """Yields (step, device batch) for start_step <= step < end_step, `prefetch` batches ahead."""
        return prefetched(self.batch, start_step, end_step, self.prefetch)


class StepBatches:
    """Batches that are any pure function of the step (a federated round's stacked client data):
    local_batch(step) -> host pytree, placed on the devices with `sharding` (a sharding for every leaf)."""

    def __init__(self, local_batch: Callable[[int], Any], sharding, prefetch: int = 2):
        self.local_batch, self.sharding, self.prefetch = local_batch, sharding, prefetch

    def batch(self, step: int):
        return jax.device_put(self.local_batch(step), self.sharding)

    def iterate(self, start_step: int, end_step: int):
        return prefetched(self.batch, start_step, end_step, self.prefetch)


def prefetched(batch: Callable[[int], Any], start_step: int, end_step: int, depth: int = 2) -> Iterator:
    """Yields (step, batch(step)) for start_step <= step < end_step, computed `depth` ahead on a thread."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def produce():
        try:
            for step in range(start_step, end_step):
                if stop.is_set():
                    return
                q.put((step, batch(step)))
        except BaseException as err:  # surfaced in the consumer
            q.put(err)
        q.put(None)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue, then let it end
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass


def eval_batches(
    source: Source,
    global_batch: int,
    sharding,
    transform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
) -> Iterator[dict[str, jax.Array]]:
    """One pass over the whole source in order; the last batch is padded and carries `mask` (1 = real)."""
    n = len(source)
    rows = process_slice(global_batch)
    for start in range(0, n, global_batch):
        positions = np.arange(start, start + global_batch)[rows]
        mask = (positions < n).astype(np.float32)
        batch = source.get(np.minimum(positions, n - 1))
        batch = transform(batch) if transform else batch
        batch["mask"] = mask
        yield to_global(batch, sharding, global_batch)
