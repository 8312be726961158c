"""Packed batches: several sequences per row, each attending and counting positions on its own.

A packed row holds whole items back to back; `segment_ids` numbers a row's sequences 1, 2, ...
and marks padding 0. Attention never crosses a segment (`segment_mask`), RoPE positions restart
at every segment (`segment_positions`), and a next-token target counts only inside its own
segment (`target_mask`), so the per-token losses, their (sum, count) and the gradients are those
of the unpacked batch. An unpacked right-padded batch is the special case `segment_ids = valid`.

Rows keep the length an unpacked batch would pad to (the bucket of its longest item) and the
number of rows shrinks instead: attention cost per row stays that of one sequence, and padding
goes from "every sequence to the longest" to the slack of first-fit-decreasing bins. The row
count is rounded up to a multiple (micro-batches x data shards, and a step that bounds the
number of compiled shapes).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Item = Mapping[str, np.ndarray]  # equal-length 1-D arrays; an optional `segment_ids` (1, 1, 2, ...) inside it


def plan_rows(lengths: Sequence[int], length: int, multiple: int = 1) -> list[list[int]]:
  """Item indices per row: first-fit decreasing into rows of `length` tokens (longer items are cut
  to `length`), then empty rows up to a multiple of `multiple`. Deterministic: ties keep index
  order, and each row lists its items in index order."""
  if length <= 0 or multiple <= 0:
    raise ValueError(f"plan_rows needs length > 0 and multiple > 0, got {length} and {multiple}")
  order = sorted(range(len(lengths)), key=lambda i: (-min(int(lengths[i]), length), i))
  rows: list[list[int]] = []
  free: list[int] = []
  for i in order:
    n = min(int(lengths[i]), length)
    for r, f in enumerate(free):
      if f >= n:
        rows[r].append(i)
        free[r] -= n
        break
    else:
      rows.append([i])
      free.append(length - n)
  rows += [[] for _ in range(-len(rows) % multiple)]
  return [sorted(r) for r in rows]


def row_multiple(batch_items: int, granularity: int = 1, max_shapes: int = 16) -> int:
  """The row-count step of a packed batch of `batch_items` items: a multiple of `granularity`
  (micro-batches x data shards) coarse enough that at most about `max_shapes` row counts occur,
  so the train step compiles a bounded number of times per length bucket."""
  step = max(1, -(-batch_items // max_shapes))
  return -(-step // granularity) * granularity


def pack(items: Sequence[Item], rows: Sequence[Sequence[int]], length: int, *,
         pad: Mapping[str, Any] | None = None, template: Item | None = None) -> dict[str, np.ndarray]:
  """[len(rows), length] arrays: row r holds `items[i] for i in rows[r]` back to back.

  Each output key is an item key (filled with `pad[key]`, default 0, where no item is),
  plus `segment_ids` (an item's own segment ids, offset past the row's earlier ones; 1 per item
  when it has none) and `valid` (segment_ids > 0). Items are cut to `length`. `template` (an
  empty item) gives the keys and dtypes when there are no items (rows of padding only).
  """
  pad = dict(pad or {})
  like = items[0] if items else template
  if like is None:
    raise ValueError("pack got no items and no template")
  keys = [k for k in like.keys() if k != "segment_ids"]
  R = len(rows)
  out = {k: np.full((R, length), pad.get(k, 0), np.asarray(like[k]).dtype) for k in keys}
  seg = np.zeros((R, length), np.int32)
  for r, members in enumerate(rows):
    at, base = 0, 0
    for i in members:
      item = items[i]
      size = len(item[keys[0]])
      if not size:
        continue
      n = min(size, length - at)
      if n <= 0:
        raise ValueError(f"pack: row {r} overflows its {length} tokens at item {i}")
      for k in keys:
        out[k][r, at:at + n] = np.asarray(item[k])[:n]
      own = np.asarray(item["segment_ids"])[:n] if "segment_ids" in item else np.ones(n, np.int32)
      seg[r, at:at + n] = own + base
      base += int(own.max())
      at += n
  out["segment_ids"] = seg
  out["valid"] = (seg > 0).astype(np.int32)
  return out


def segments(batch: Mapping[str, Any]) -> jax.Array:
  """A batch's segment ids: its own when packed, else `valid` (one sequence per row)."""
  return jnp.asarray(batch["segment_ids"] if "segment_ids" in batch else batch["valid"]).astype(jnp.int32)


def segment_positions(seg_BL: jax.Array) -> jax.Array:
  """Position of each token within its segment (0 at every segment's first token)."""
  L = seg_BL.shape[-1]
  idx = jnp.arange(L, dtype=jnp.int32)
  start = jnp.concatenate([jnp.ones_like(seg_BL[:, :1], bool), seg_BL[:, 1:] != seg_BL[:, :-1]], axis=1)
  first = jax.lax.cummax(jnp.where(start, idx, 0), axis=1)
  return idx - first


def segment_mask(seg_BL: jax.Array) -> jax.Array:
  """[B, L, L] causal mask inside segments: query i attends to key j iff j <= i and both are in
  the same segment (padding attends only to padding, so no query row is empty)."""
  L = seg_BL.shape[-1]
  causal = jnp.tril(jnp.ones((L, L), dtype=bool))
  return causal[None] & (seg_BL[:, :, None] == seg_BL[:, None, :])


def target_mask(seg_BL: jax.Array) -> jax.Array:
  """[B, L - 1] 1 where token j + 1 is a next-token target of token j: both in one segment."""
  return ((seg_BL[:, 1:] == seg_BL[:, :-1]) & (seg_BL[:, 1:] > 0)).astype(jnp.float32)


def model_inputs(batch: Mapping[str, Any], *, shift: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(tokens, positions, mask) for the model; with `shift`, over tokens[:, :-1] so that output j
  predicts token j + 1."""
  tokens, seg = jnp.asarray(batch["tokens"]), segments(batch)
  if shift:
    tokens, seg = tokens[:, :-1], seg[:, :-1]
  return tokens, segment_positions(seg), segment_mask(seg)


def token_aligned(x_BT: np.ndarray) -> np.ndarray:
  """[B, T] next-token-aligned values (index j is about token j + 1) -> [B, T + 1] per token, so
  they pack with the tokens; `[:, 1:]` of the packed array aligns them back."""
  x = np.asarray(x_BT)
  return np.concatenate([np.zeros_like(x[:, :1]), x], axis=1)


def pad_rows(batch: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  """The batch with all-padding rows (zeros: valid 0, no segment) appended up to `rows`."""
  def one(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.shape[0] > rows:
      raise ValueError(f"a batch of {x.shape[0]} rows does not fit in {rows}")
    return np.concatenate([x, np.zeros((rows - x.shape[0], *x.shape[1:]), x.dtype)])
  return {k: one(v) for k, v in batch.items()}


def padding_fraction(batch: Mapping[str, np.ndarray]) -> float:
  """Padding tokens / all tokens of a (packed or unpacked) batch."""
  valid = np.asarray(batch["valid"])
  return 1.0 - float(valid.sum()) / max(valid.size, 1)


def segment_sums(x_BL: jax.Array, seg_BL: jax.Array) -> jax.Array:
  """[B, L + 1] sums of `x` over each row's segments, indexed by segment id (0: padding)."""
  B, L = x_BL.shape
  ids = seg_BL.astype(jnp.int32) + (L + 1) * jnp.arange(B, dtype=jnp.int32)[:, None]
  sums = jax.ops.segment_sum(x_BL.reshape(-1), ids.reshape(-1), num_segments=B * (L + 1))
  return sums.reshape(B, L + 1)
