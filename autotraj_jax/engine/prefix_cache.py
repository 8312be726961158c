"""The engine's prefix cache on the host: which token sequence each device pool row holds.

A request reuses the pool row sharing its longest token prefix (like a radix cache), so the next
turn of a multi-turn rollout prefills only its new tokens; rows are evicted least recently used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import jax.numpy as jnp
import numpy as np

from autotraj_jax.models.config import ModelConfig

if TYPE_CHECKING:
  from autotraj_jax.engine.jax_engine import EngineConfig


class PrefixIndex:
  """Which token sequence each pool row holds, and when it was last used. A request reuses the
  row sharing its longest prefix (ties: the most recent); whole-row extensions write back in
  place, anything else takes the least recently used row."""

  def __init__(self, rows: int, length: int):
    self.tokens = np.full((rows, length), -1, np.int32)
    self.lengths = np.zeros((rows,), np.int64)
    self.last_used = np.zeros((rows,), np.int64)
    self._clock = 0

  @property
  def rows(self) -> int:
    return self.tokens.shape[0]

  def _lcp(self, ids: np.ndarray) -> np.ndarray:
    n = min(len(ids), self.tokens.shape[1])
    eq = self.tokens[:, :n] == ids[None, :n]
    return np.where(eq.all(axis=1), n, eq.argmin(axis=1))

  def match(self, ids: np.ndarray) -> tuple[int, int]:
    """(row, length of the longest common prefix of `ids` with that row's tokens)."""
    lcp = self._lcp(ids)
    row = int(np.lexsort((self.last_used, lcp))[-1])
    return row, int(lcp[row])

  def touch(self, row: int) -> None:
    self._clock += 1
    self.last_used[row] = self._clock

  def least_recent(self, exclude: set[int]) -> list[int]:
    return [int(r) for r in np.argsort(self.last_used, kind="stable") if int(r) not in exclude]

  def store(self, row: int, ids: Sequence[int]) -> None:
    ids = np.asarray(ids, np.int32)[:self.tokens.shape[1]]
    self.tokens[row] = -1
    self.tokens[row, :len(ids)] = ids
    self.lengths[row] = len(ids)
    self.touch(row)

  def release(self, ids: Sequence[int]) -> int:
    """Free every row whose tokens are a prefix of `ids`; how many were freed."""
    lcp = self._lcp(np.asarray(ids, np.int32))
    rows = np.nonzero((self.lengths > 0) & (lcp >= self.lengths))[0]
    self.tokens[rows] = -1
    self.lengths[rows] = 0
    self.last_used[rows] = 0
    return len(rows)

  def clear(self) -> None:
    self.tokens[:] = -1
    self.lengths[:] = 0
    self.last_used[:] = 0


def pool_rows(cfg: ModelConfig, config: EngineConfig) -> int:
  """Prefix-cache rows: as configured, within the memory budget."""
  row_bytes = (config.prefix_cache_len * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim
               * jnp.dtype(cfg.jnp_dtype).itemsize)
  return min(config.prefix_cache_rows, config.prefix_cache_mb * 2**20 // row_bytes)
