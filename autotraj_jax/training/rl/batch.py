"""Rollout batches: trajectories laid out for the RL losses.

A rollout batch lays each trajectory out as prompt + response tokens ([B, L], right-padded) with
`loss_mask` 1 on model-written tokens only: tool results and the prompt get no gradient, no
advantage and no value target. Arrays named `*_BT` are aligned with next-token prediction:
index j is about token j + 1, predicted from tokens <= j (T = L - 1).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from autotraj_jax.tir.trajectory import Trajectory


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
  """[B, T] mask of model-written target tokens."""
  return (jnp.asarray(batch["loss_mask"])[:, 1:] * jnp.asarray(batch["valid"])[:, 1:]).astype(jnp.float32)


def logprob_gap(batch: dict[str, Any], logp_BT: jax.Array) -> float:
  """Mean |sampler logprob - trainer logprob| over model tokens whose sampler logprob is known:
  ~0 when sampler and trainer agree (same weights, untempered sampling)."""
  has = jnp.asarray(batch["sampler_has"])[:, 1:] * shifted_mask(batch)
  gap = jnp.abs(jnp.asarray(batch["sampler_logp"])[:, 1:] - logp_BT)
  return float(jnp.sum(jnp.where(has > 0, gap, 0.0)) / jnp.maximum(jnp.sum(has), 1.0))
