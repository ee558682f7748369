"""Token masks for MAR and VideoMAE, all with a static visible count.

A mask is bool [batch, tokens], True where a token is hidden (masked), over the token grid
(T', H', W') in (time, row, column) order, the encoder's token order.

- Cell running masking (MAR, models/base/agents.py CellRunningMaskAgent): the grid is cut into 1x2x2
  cells; each cell's 4 positions (0,0),(0,1),(1,0),(1,1) get the base pattern [1]*k + [0]*(4-k)
  (1 = masked), k = int(ratio * N) // (T' * cells) (2 at 50%), rolled right by an offset that runs with
  time. Test: offset t % 4 at time slot t, the same in every cell (fixed). Training, as released
  (MASK_SPATIAL_REPEAT, MASK_TEMPORAL_SHUFFLE): a random start offset i in {0..3} per example shared by
  all cells (offset (t + i) % 4), then a random permutation of the time slots; `spatial_repeat=False`
  draws i per cell, `temporal_shuffle=False` keeps the time order.
- Tube masking (VideoMAE pre-training): int(ratio * H'W') random spatial positions per example, hidden
  in every time slot.
- Random masking: int(ratio * N) random tokens per example.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("cell_running", "tube", "random", "none")
CELL = 4  # positions in a 1x2x2 cell


def _check_grid(grid: tuple[int, int, int], ratio: float) -> None:
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"token grid must be (T', H', W') of positive sizes, got {grid}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio {ratio} must be in [0, 1)")


def cell_masked_per_cell(grid: tuple[int, int, int], ratio: float) -> int:
    """k, the masked positions per 1x2x2 cell and time slot: int(ratio * N) // (T' * cells)."""
    _check_grid(grid, ratio)
    t, h, w = grid
    if h % 2 or w % 2:
        raise ValueError(f"cell running masking needs an even spatial token grid, got {h}x{w}")
    cells = (h // 2) * (w // 2)
    return int(ratio * t * h * w) // (t * cells)


def num_visible(kind: str, grid: tuple[int, int, int], ratio: float) -> int:
    """The static visible-token count of a mask kind."""
    _check_grid(grid, ratio)
    t, h, w = grid
    if kind == "cell_running":
        return t * h * w - t * (h // 2) * (w // 2) * cell_masked_per_cell(grid, ratio)
    if kind == "tube":
        return t * (h * w - int(ratio * h * w))
    if kind == "random":
        return t * h * w - int(ratio * t * h * w)
    if kind == "none":
        return t * h * w
    raise ValueError(f"unknown mask kind {kind!r}; kinds: {KINDS}")


def _cell_position(grid: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(time slot, cell index, position within the cell) of every token, each int [N]."""
    t, h, w = grid
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    cell = (hh // 2) * (w // 2) + ww // 2
    within = (hh % 2) * 2 + ww % 2
    return tt.reshape(-1), cell.reshape(-1), within.reshape(-1)


def _rolled(k: int, offsets: jax.Array, within: np.ndarray) -> jax.Array:
    """Base pattern [1]*k + [0]*(4-k) rolled right by `offsets`, read at position `within`."""
    return ((within - offsets) % CELL) < k


def cell_running_test_mask(grid: tuple[int, int, int], ratio: float) -> np.ndarray:
    """The fixed test mask, bool [N]: offset t % 4 in time slot t, every cell alike."""
    k = cell_masked_per_cell(grid, ratio)
    tt, _, within = _cell_position(grid)
    return np.asarray(_rolled(k, tt % CELL, within))


def cell_running_train_mask(rng: jax.Array, batch: int, grid: tuple[int, int, int], ratio: float, *,
                            temporal_shuffle: bool = True, spatial_repeat: bool = True) -> jax.Array:
    """Training masks, bool [batch, N] (module docstring)."""
    k = cell_masked_per_cell(grid, ratio)
    t, h, w = grid
    tt, cell, within = _cell_position(grid)
    start_key, shuffle_key = jax.random.split(rng)
    cells = (h // 2) * (w // 2)
    start = jax.random.randint(start_key, (batch, 1 if spatial_repeat else cells), 0, CELL)
    start = start[:, 0:1] if spatial_repeat else start[:, cell]  # [batch, 1] or [batch, N]
    if temporal_shuffle:  # mask row s of the unshuffled pattern lands in time slot t: slot_of[order[t]]
        order = jnp.argsort(jax.random.uniform(shuffle_key, (batch, t)), axis=1)
        source_slot = order[:, tt]
    else:
        source_slot = jnp.broadcast_to(jnp.asarray(tt), (batch, tt.size))
    return _rolled(k, (source_slot + start) % CELL, within[None, :])


def tube_mask(rng: jax.Array, batch: int, grid: tuple[int, int, int], ratio: float) -> jax.Array:
    """VideoMAE tube masks, bool [batch, N]: the same int(ratio * H'W') positions hidden in every slot."""
    _check_grid(grid, ratio)
    t, h, w = grid
    hidden = int(ratio * h * w)
    rank = jnp.argsort(jnp.argsort(jax.random.uniform(rng, (batch, h * w)), axis=1), axis=1)
    spatial = rank < hidden
    return jnp.tile(spatial, (1, t))


def random_mask(rng: jax.Array, batch: int, grid: tuple[int, int, int], ratio: float) -> jax.Array:
    """Uniform random masks, bool [batch, N] with exactly int(ratio * N) hidden tokens."""
    _check_grid(grid, ratio)
    n = int(np.prod(grid))
    rank = jnp.argsort(jnp.argsort(jax.random.uniform(rng, (batch, n)), axis=1), axis=1)
    return rank < int(ratio * n)


def train_mask(kind: str, rng: jax.Array, batch: int, grid: tuple[int, int, int], ratio: float,
               **cell_options) -> jax.Array:
    """A training mask of `kind`, bool [batch, N]."""
    if kind == "cell_running":
        return cell_running_train_mask(rng, batch, grid, ratio, **cell_options)
    if kind == "tube":
        return tube_mask(rng, batch, grid, ratio)
    if kind == "random":
        return random_mask(rng, batch, grid, ratio)
    if kind == "none":
        return jnp.zeros((batch, int(np.prod(grid))), bool)
    raise ValueError(f"unknown mask kind {kind!r}; kinds: {KINDS}")


def eval_mask(kind: str, batch: int, grid: tuple[int, int, int], ratio: float, seed: int = 0) -> jax.Array:
    """The evaluation mask of `kind`, bool [batch, N]: cell running's fixed pattern; for tube and random
    masking a fixed draw from `seed` (deterministic); 'none' hides nothing."""
    if kind == "cell_running":
        return jnp.broadcast_to(jnp.asarray(cell_running_test_mask(grid, ratio)), (batch, int(np.prod(grid))))
    return train_mask(kind, jax.random.PRNGKey(seed), batch, grid, ratio)
