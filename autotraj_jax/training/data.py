"""Grain input pipeline for token sequences, with length buckets and checkpointable state.

A source is anything with `__len__` and `__getitem__` returning a dict with `tokens` and
`loss_mask` (a list, a `tfds.data_source`, an ArrayRecord source). Batches are padded to the
smallest bucket that fits the longest sequence, so the train step compiles once per bucket.
The iterator's position is saved in checkpoints, which is what makes resume exact.

Multi-host: the stream of global batches (which examples, in which order, padded to which bucket)
depends only on the data, the seed and the global batch size, never on the number of hosts. Each
host loads and pads only its `rows` of every global batch, so N hosts together feed exactly the
batches one host would, and a run's losses do not change with the host count.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np

from autotraj_jax.training import packing

# (examples, buckets, pad_id) -> batch arrays, batch-major ([B, ...]), padded to the smallest bucket
# that fits the longest example (so, given one bucket, to that one: how hosts agree on a length).
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


@dataclasses.dataclass(frozen=True)
class Packer:
  """How examples become items of packed rows (`training/packing.py`).

  `item(example, cap)` gives the 1-D arrays of one item (each sequence in it cut to `cap` tokens,
  the largest bucket); an item never splits across rows. Rows are `scale` x a bucket long (a
  preference pair packs both sides, so 2). `template` is an empty item (keys and dtypes), `pad`
  the fill of keys other than tokens.
  """

  item: Callable[[Mapping[str, Any], int], dict[str, np.ndarray]]
  template: Mapping[str, np.ndarray]
  scale: int = 1
  pad: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def length(self, example: Mapping[str, Any], cap: int) -> int:
    return len(self.item(example, cap)["tokens"])


def sequence_item(example: Mapping[str, Any], cap: int) -> dict[str, np.ndarray]:
  """One SFT sequence (tokens, loss_mask) as a packed-row item."""
  n = min(len(example["tokens"]), cap)
  return {"tokens": np.asarray(example["tokens"][:n], np.int32),
          "loss_mask": np.asarray(example["loss_mask"][:n], np.int32)}


SEQUENCES = Packer(sequence_item, {"tokens": np.zeros(0, np.int32), "loss_mask": np.zeros(0, np.int32)})
GLOBAL_ROWS = "global_rows"  # a packed host batch carries the global row count of its step


def example_length(example: dict[str, Any]) -> int:
  """Tokens of an example: one sequence, or the longest of a group (a preference pair)."""
  tokens = example["tokens"]
  if len(tokens) and isinstance(tokens[0], (list, tuple, np.ndarray)):
    return max(len(t) for t in tokens)
  return len(tokens)


def batches_per_epoch(num_examples: int, batch_size: int) -> int:
  """Batches per epoch when grouped by length: every example once, the last batch filled up."""
  return -(-num_examples // batch_size)


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, window: int = 32, *,
                           epoch: int = 0, shuffle: bool = True) -> list[list[int]]:
  """One epoch of index batches of similar lengths.

  The epoch's permutation (seeded by (seed, epoch), so each epoch groups differently) is sorted by
  length inside windows of `window` batches and cut into batches, then the batch order is shuffled.
  Every example is in exactly one batch; the last, partial batch is filled with repeats of examples
  of similar length, never cut short or dropped.
  """
  if not len(lengths):
    raise ValueError("length_grouped_batches got no examples")
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
  span = window * batch_size
  ordered = [i for start in range(0, len(order), span)
             for i in sorted(order[start:start + span].tolist(), key=lambda i: lengths[i])]
  need = batches_per_epoch(len(lengths), batch_size) * batch_size - len(ordered)
  if need:  # fill up with the next-longest examples (those of the last full batch), not with a batch's own
    full = len(ordered) // batch_size * batch_size
    ordered += np.resize(ordered[:full][::-1] or ordered, need).tolist()
  batches = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
  if shuffle:
    batches = [batches[k] for k in rng.permutation(len(batches))]
  return batches


_ENDLESS = 2 ** 62  # batches of a stream that repeats forever


def _grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, shuffle: bool,
                     num_epochs: int | None) -> grain.MapDataset:
  """Batch k of the stream is batch k % E of epoch k // E (E batches per epoch): a MapDataset over
  the batch number, so the iterator state is one index and resume is exact."""
  per_epoch = batches_per_epoch(len(lengths), batch_size)

  @functools.lru_cache(maxsize=4)  # the prefetch threads read around one or two epochs at a time
  def epoch_batches(epoch: int) -> list[list[int]]:
    return length_grouped_batches(lengths, batch_size, seed, epoch=epoch, shuffle=shuffle)

  total = per_epoch * num_epochs if num_epochs is not None else _ENDLESS
  return grain.MapDataset.range(total).map(lambda k: epoch_batches(k // per_epoch)[k % per_epoch])


def _check_rows(rows: Sequence[int] | None, batch_size: int) -> tuple[int, ...] | None:
  """None when the host loads whole batches, else its rows as a tuple (validated)."""
  if rows is None:
    return None
  rows = tuple(int(r) for r in rows)
  if not rows or any(not 0 <= r < batch_size for r in rows) or len(set(rows)) != len(rows):
    raise ValueError(f"rows must be distinct positions in [0, {batch_size}), got {list(rows)[:16]}")
  return None if rows == tuple(range(batch_size)) else rows


def batch_dataset(source: Any, *, batch_size: int, buckets: Sequence[int], seed: int,
                  pad_id: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                  group_by_length: bool = False, rows: Sequence[int] | None = None,
                  collate_fn: CollateFn = collate, packer: Packer | None = None, row_multiple: int = 1,
                  rows_of: Callable[[int], Sequence[int]] | None = None) -> grain.IterDataset:
  """Shuffled (per epoch), repeated, bucketed global batches of `batch_size` as a checkpointable
  IterDataset.

  `rows`: the positions of each global batch this host loads, in the order it wants them (a
  multi-host run gives each host its own; default all). Each host then reads only its examples
  and pads them to the bucket of the whole global batch, found from the example lengths (read once,
  up front). Grouped by length, each epoch is planned afresh (`length_grouped_batches`) and holds
  every example. `collate_fn` turns a list of examples into arrays (e.g. [B, 2, L] preference pairs
  instead of [B, L] sequences).

  With a `packer`, each global batch of examples is packed (`packing.plan_rows`, first-fit
  decreasing) into rows of `packer.scale` x the bucket of its longest item, as many rows as needed
  rounded up to `row_multiple`; `rows_of(R)` gives this host's rows of a global batch of R rows
  (default all), and the host batch carries R under `GLOBAL_ROWS`.
  """
  if len(source) < batch_size:
    raise ValueError(f"dataset has {len(source)} examples, fewer than one batch of {batch_size}")
  rows = _check_rows(rows, batch_size)
  buckets = tuple(sorted(buckets))
  lengths = item_lengths = None
  if group_by_length or rows is not None or packer is not None:
    lengths = [example_length(source[i]) for i in range(len(source))]
  if packer is not None:
    item_lengths = [packer.length(source[i], buckets[-1]) for i in range(len(source))]
  if group_by_length:
    ds = _grouped_batches(lengths, batch_size, seed, shuffle, num_epochs)
  else:
    ds = grain.MapDataset.range(len(source)).seed(seed)
    if shuffle:
      ds = ds.shuffle()
    ds = ds.repeat(num_epochs).batch(batch_size, drop_remainder=True, batch_fn=list)

  def load_packed(idx: Sequence[int]) -> dict[str, np.ndarray]:
    idx = [int(i) for i in idx]
    length = pick_bucket(max(item_lengths[i] for i in idx), tuple(b * packer.scale for b in buckets))
    plan = packing.plan_rows([item_lengths[i] for i in idx], length, row_multiple)
    mine = plan if rows_of is None else [plan[r] for r in rows_of(len(plan))]
    needed = sorted({j for row in mine for j in row})
    local = {j: k for k, j in enumerate(needed)}
    out = packing.pack([packer.item(source[idx[j]], buckets[-1]) for j in needed],
                       [[local[j] for j in row] for row in mine], length,
                       pad={"tokens": pad_id, **packer.pad}, template=packer.template)
    out[GLOBAL_ROWS] = np.int32(len(plan))
    return out

  def load(idx: Sequence[int]) -> dict[str, np.ndarray]:
    idx = [int(i) for i in idx]
    if packer is not None:
      return load_packed(idx)
    if rows is None:
      return collate_fn([source[i] for i in idx], buckets, pad_id)
    length = pick_bucket(max(lengths[i] for i in idx), buckets)
    return collate_fn([source[idx[r]] for r in rows], (length,), pad_id)

  return ds.map(load).to_iter_dataset()


def split_micro(batch: dict[str, np.ndarray], num_micro: int) -> dict[str, np.ndarray]:
  """[B, ...] -> [num_micro, B / num_micro, ...] for gradient accumulation (any trailing axes)."""
  def one(x):
    if x.shape[0] % num_micro:
      raise ValueError(f"batch of {x.shape[0]} does not split into {num_micro} micro-batches")
    return x.reshape(num_micro, x.shape[0] // num_micro, *x.shape[1:])
  return {k: one(v) for k, v in batch.items()}
