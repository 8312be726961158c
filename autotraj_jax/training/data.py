"""Grain input pipeline for token sequences, with length buckets and checkpointable state.

A source is anything with `__len__` and `__getitem__` returning a dict with `tokens` and
`loss_mask` (a list, a `tfds.data_source`, an ArrayRecord source). Batches are padded to the
smallest bucket that fits the longest sequence, so the train step compiles once per bucket.
The iterator's position is saved in checkpoints, which is what makes resume exact.
"""

from __future__ import annotations

import bisect
from typing import Any, Callable, Sequence

import grain
import numpy as np

# (examples, buckets, pad_id) -> batch arrays, batch-major ([B, ...]).
CollateFn = Callable[[Sequence[dict[str, Any]], Sequence[int], int], dict[str, np.ndarray]]


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
  i = bisect.bisect_left(buckets, length)
  return buckets[min(i, len(buckets) - 1)]


def collate(examples: Sequence[dict[str, Any]], buckets: Sequence[int], pad_id: int) -> dict[str, np.ndarray]:
  """Right-pad (and truncate at the largest bucket) to [B, bucket]; `valid` marks real tokens."""
  buckets = sorted(buckets)
  L = pick_bucket(max(len(e["tokens"]) for e in examples), buckets)
  B = len(examples)
  out = {"tokens": np.full((B, L), pad_id, np.int32), "loss_mask": np.zeros((B, L), np.int32),
         "valid": np.zeros((B, L), np.int32)}
  for b, e in enumerate(examples):
    n = min(len(e["tokens"]), L)
    out["tokens"][b, :n] = np.asarray(e["tokens"][:n])
    out["loss_mask"][b, :n] = np.asarray(e["loss_mask"][:n])
    out["valid"][b, :n] = 1
  return out


def example_length(example: dict[str, Any]) -> int:
  """Tokens of an example: one sequence, or the longest of a group (a preference pair)."""
  tokens = example["tokens"]
  if len(tokens) and isinstance(tokens[0], (list, tuple, np.ndarray)):
    return max(len(t) for t in tokens)
  return len(tokens)


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int,
                           window: int = 32) -> list[list[int]]:
  """Index batches of similar lengths: shuffle, sort inside windows of `window` batches, cut.

  Batches then land in small buckets instead of all padding to the longest sequence seen.
  """
  rng = np.random.default_rng(seed)
  perm = rng.permutation(len(lengths))
  span = window * batch_size
  batches = []
  for start in range(0, len(perm), span):
    chunk = sorted(perm[start:start + span].tolist(), key=lambda i: lengths[i])
    batches += [chunk[i:i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
  return batches


def batch_dataset(source: Any, *, batch_size: int, buckets: Sequence[int], seed: int,
                  pad_id: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                  group_by_length: bool = False, shard: tuple[int, int] = (0, 1),
                  collate_fn: CollateFn = collate) -> grain.IterDataset:
  """Shuffled (per epoch), repeated, bucketed batches as a checkpointable IterDataset.

  `shard=(index, count)` keeps every count-th record (or batch, when grouped by length) starting
  at index: each host of a multi-host run reads only its slice of the data. `collate_fn` turns a
  list of examples into arrays (e.g. [B, 2, L] preference pairs instead of [B, L] sequences).
  """
  index, count = shard
  if len(source) < batch_size:
    raise ValueError(f"dataset has {len(source)} examples, fewer than one batch of {batch_size}")
  if group_by_length:
    lengths = [example_length(source[i]) for i in range(len(source))]
    ds = grain.MapDataset.source(length_grouped_batches(lengths, batch_size, seed))[index::count].seed(seed)
    if shuffle:
      ds = ds.shuffle()
    ds = ds.repeat(num_epochs).map(lambda idx: collate_fn([source[i] for i in idx], buckets, pad_id))
    return ds.to_iter_dataset()
  ds = grain.MapDataset.source(source)[index::count].seed(seed)
  if shuffle:
    ds = ds.shuffle()
  ds = ds.repeat(num_epochs)
  ds = ds.batch(batch_size, drop_remainder=True,
                batch_fn=lambda xs: collate_fn(xs, buckets, pad_id))
  return ds.to_iter_dataset()


def split_micro(batch: dict[str, np.ndarray], num_micro: int) -> dict[str, np.ndarray]:
  """[B, ...] -> [num_micro, B / num_micro, ...] for gradient accumulation (any trailing axes)."""
  def one(x):
    if x.shape[0] % num_micro:
      raise ValueError(f"batch of {x.shape[0]} does not split into {num_micro} micro-batches")
    return x.reshape(num_micro, x.shape[0] // num_micro, *x.shape[1:])
  return {k: one(v) for k, v in batch.items()}
