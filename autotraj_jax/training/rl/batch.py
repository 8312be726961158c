"""Rollout batches: trajectories laid out for the RL losses.

A rollout batch lays each trajectory out as prompt + response tokens ([B, L], right-padded) with
`loss_mask` 1 on model-written tokens only: tool results and the prompt get no gradient, no
advantage and no value target. Arrays named `*_BT` are aligned with next-token prediction:
index j is about token j + 1, predicted from tokens <= j (T = L - 1).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from autotraj_jax.tir.trajectory import Trajectory
from autotraj_jax.training import packing


def trajectory_length(t: Trajectory) -> int:
  return len(t.prompt_ids) + sum(len(s.token_ids) for s in t.segments)


def pick_bucket(trajs: Sequence[Trajectory], buckets: Sequence[int]) -> int:
  """The smallest bucket that holds the longest trajectory, else the largest (its tail is cut):
  one compile per bucket, not per step."""
  longest = max((trajectory_length(t) for t in trajs), default=0)
  return min((b for b in buckets if b >= longest), default=max(buckets))


def rollout_batch(trajs: Sequence[Trajectory], *, length: int, pad_id: int) -> dict[str, np.ndarray]:
  """tokens/valid/loss_mask [B, length] and the sampler's logprobs (`sampler_logp`, with
  `sampler_has` where known), truncated at `length` (a truncated tail gets no gradient)."""
  B = len(trajs)
  out = {"tokens": np.full((B, length), pad_id, np.int32), "valid": np.zeros((B, length), np.int32),
         "loss_mask": np.zeros((B, length), np.int32), "sampler_logp": np.zeros((B, length), np.float32),
         "sampler_has": np.zeros((B, length), np.int32)}
  for b, t in enumerate(trajs):
    n0 = len(t.prompt_ids)
    ids, mask, lps, has = list(t.prompt_ids), [0] * n0, [0.0] * n0, [0] * n0
    for s in t.segments:
      ids += s.token_ids
      mask += s.loss_mask
      known = s.kind == "model" and s.logprobs is not None and len(s.logprobs) == len(s.token_ids)
      lps += list(s.logprobs) if known else [0.0] * len(s.token_ids)
      has += [int(known)] * len(s.token_ids)
    n = min(len(ids), length)
    out["tokens"][b, :n] = ids[:n]
    out["valid"][b, :n] = 1
    out["loss_mask"][b, :n] = mask[:n]
    out["sampler_logp"][b, :n] = lps[:n]
    out["sampler_has"][b, :n] = has[:n]
  return out


def shifted_mask(batch: dict[str, Any]) -> jax.Array:
  """[B, T] mask of model-written target tokens (inside their own sequence when packed)."""
  return jnp.asarray(batch["loss_mask"])[:, 1:].astype(jnp.float32) * packing.target_mask(packing.segments(batch))


@dataclasses.dataclass(frozen=True)
class RowLayout:
  """Where each trajectory of an unpacked [B, L] batch sits in packed rows of the same length L
  (`training/packing.py`): fewer rows, the same per-token losses and log-probs."""

  rows: tuple[tuple[int, ...], ...]  # trajectory indices per packed row, in order
  lengths: tuple[int, ...]           # real tokens of each trajectory
  length: int                        # L

  @classmethod
  def of(cls, valid_BL: np.ndarray, multiple: int = 1) -> "RowLayout":
    """First-fit-decreasing rows for the trajectories of `valid_BL`, in multiples of `multiple`."""
    lengths = tuple(int(n) for n in np.asarray(valid_BL).sum(axis=1))
    plan = packing.plan_rows(lengths, np.shape(valid_BL)[1], multiple)
    return cls(tuple(tuple(r) for r in plan), lengths, int(np.shape(valid_BL)[1]))

  def pack(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch's [B, L] per-token and [B, T] next-token-aligned arrays as packed rows
    (T-aligned arrays stay T-aligned), with segment_ids and valid."""
    L = self.length
    aligned = {k for k, v in batch.items() if np.shape(v)[1] == L - 1}
    per_token = {k: packing.token_aligned(v) if k in aligned else np.asarray(v)
                 for k, v in batch.items() if k not in ("valid", "segment_ids")}
    items = [{k: v[b, :n] for k, v in per_token.items()} for b, n in enumerate(self.lengths)]
    packed = packing.pack(items, self.rows, L)
    return {k: v[:, 1:] if k in aligned else v for k, v in packed.items()}

  def forward_BT(self, fn: Any, params: Any, batch: dict[str, np.ndarray], chunk: int = 0) -> jax.Array:
    """`fn(params, packed batch)` (next-token-aligned [R, T], e.g. log-probs or values) run on
    these rows and returned per trajectory as [B, T]. With `chunk`, the rows are padded to
    `capacity(chunk)` and `fn` runs on chunks of `chunk` rows, skipping all-padding ones: one
    shape per batch size, however many rows the packing needs."""
    packed = self.pack({k: batch[k] for k in ("tokens", "valid", "loss_mask")})
    if chunk:
      out = chunked(fn, chunk)(params, packing.pad_rows(packed, self.capacity(chunk)))
    else:
      out = fn(params, {k: jnp.asarray(v) for k, v in packed.items()})
    return jnp.asarray(self.unpack_BT(out))

  def capacity(self, step: int) -> int:
    """Rows that hold any packing of these trajectories, in multiples of `step`: one per trajectory."""
    return -(-len(self.lengths) // step) * step

  def unpack_BT(self, x_RT: Any) -> np.ndarray:
    """Packed next-token-aligned values [R, T] -> [B, T] (0 past each trajectory's end)."""
    x = np.asarray(x_RT)
    out = np.zeros((len(self.lengths), self.length - 1), x.dtype)
    for r, members in enumerate(self.rows):
      at = 0
      for b in members:
        n = self.lengths[b]
        out[b, :max(n - 1, 0)] = x[r, at:at + n - 1]
        at += n
    return out


@functools.cache
def chunked(fn: Any, chunk: int) -> Any:
  """jit of `fn(params, batch) -> [R, ...]` over chunks of `chunk` rows in turn; a chunk with no
  valid token is not computed (its output is 0)."""

  def run(params, batch):
    n = batch["valid"].shape[0] // chunk
    split = jax.tree.map(lambda x: x.reshape(n, chunk, *x.shape[1:]), batch)
    like = jax.eval_shape(fn, params, jax.tree.map(lambda x: x[0], split))

    def one(micro):
      return jax.lax.cond(jnp.any(micro["valid"] != 0), lambda: fn(params, micro),
                          lambda: jnp.zeros(like.shape, like.dtype))
    out = jax.lax.map(one, split)
    return out.reshape(n * chunk, *out.shape[2:])
  return jax.jit(run)


def pack_update_batch(batch: dict[str, np.ndarray], *, multiple: int = 1) -> dict[str, np.ndarray]:
  """An unpacked update batch (tokens, valid, loss_mask [B, L] and next-token-aligned [B, T]
  arrays such as adv, old_logp) as packed rows of the same length L: fewer rows, the same
  per-token losses. Rows come in multiples of `multiple`."""
  return RowLayout.of(batch["valid"], multiple).pack(batch)


def logprob_gap(batch: dict[str, Any], logp_BT: jax.Array) -> float:
  """Mean |sampler logprob - trainer logprob| over model tokens whose sampler logprob is known:
  ~0 when sampler and trainer agree (same weights, untempered sampling)."""
  has = jnp.asarray(batch["sampler_has"])[:, 1:] * shifted_mask(batch)
  gap = jnp.abs(jnp.asarray(batch["sampler_logp"])[:, 1:] - logp_BT)
  return float(jnp.sum(jnp.where(has > 0, gap, 0.0)) / jnp.maximum(jnp.sum(has), 1.0))
