"""Pure pieces of the critic-free RL objective: group advantages, the clipped policy loss,
KL estimators and entropy.

Every loss returns `(sum, count, aux_sums)` like `losses.py`: summing over micro-batches and
dividing once by the summed count gives the exact full-batch value, whatever the split.
Positions whose mask is 0 (prompt, tool results, padding) are zeroed *before* any exponential,
so garbage there can neither leak into the loss nor turn a gradient into NaN.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
AGGREGATIONS: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KLKind = Literal["k1", "k2", "k3"]

# exp() of a log-ratio beyond this overflows or dominates the batch; clamp for stability.
MAX_LOG_RATIO = 20.0


# ---------------------------------------------------------------------------------------------
# Advantages.

def group_advantages(rewards: jax.Array, group_ids_N: jax.Array | None = None, *,
                     scale_by_std: bool = True, eps: float = 1e-6, ddof: int = 1) -> jax.Array:
  """Per-prompt group baseline: (r - mean_group) / (std_group + eps), or r - mean_group.

  `rewards` is either [G, n] (one row per prompt) or [N] with `group_ids_N` (any integers; equal
  ids share a group). `scale_by_std=False` is Dr. GRPO: mean-centred only, so groups with a small
  reward spread are not up-weighted. `ddof=1` is the unbiased std of the reference (torch.std).
  A group of size 1 gets 0 (no baseline to compare with). Returns fp32 with the rewards' shape.
  """
  r = jnp.asarray(rewards, jnp.float32)
  if group_ids_N is None:
    if r.ndim != 2:
      raise ValueError(f"rewards without group ids must be [G, n], got shape {r.shape}")
    n = r.shape[1]
    mean = jnp.mean(r, axis=1, keepdims=True)
    centred = r - mean
    if not scale_by_std:
      return centred
    if n <= ddof:
      return jnp.zeros_like(r)
    std = jnp.sqrt(jnp.sum(centred**2, axis=1, keepdims=True) / (n - ddof))
    return centred / (std + eps)

  if r.ndim != 1:
    raise ValueError(f"rewards with group ids must be [N], got shape {r.shape}")
  ids = jnp.asarray(group_ids_N)
  if ids.shape != r.shape:
    raise ValueError(f"group_ids shape {ids.shape} does not match rewards shape {r.shape}")
  N = r.shape[0]
  _, seg_N = jnp.unique(ids, return_inverse=True, size=N)
  seg_N = seg_N.reshape(N)
  count_G = jax.ops.segment_sum(jnp.ones_like(r), seg_N, num_segments=N)
  mean_G = jax.ops.segment_sum(r, seg_N, num_segments=N) / jnp.maximum(count_G, 1.0)
  centred = r - mean_G[seg_N]
  if not scale_by_std:
    return centred
  ss_G = jax.ops.segment_sum(centred**2, seg_N, num_segments=N)
  dof_G = count_G - ddof
  std_G = jnp.sqrt(jnp.where(dof_G > 0, ss_G, 0.0) / jnp.maximum(dof_G, 1.0))
  adv = centred / (std_G[seg_N] + eps)
  return jnp.where(dof_G[seg_N] > 0, adv, 0.0)


def filter_uniform_groups(rewards_Gn: jax.Array, *, atol: float = 0.0) -> jax.Array:
  """keep_G: False for groups whose rewards are all equal (within `atol`).

  Such groups have zero advantage everywhere, so they only dilute the token count; dropping
  them (DAPO's dynamic sampling) keeps every trained token informative.
  """
  r = jnp.asarray(rewards_Gn, jnp.float32)
  if r.ndim != 2:
    raise ValueError(f"rewards must be [G, n], got shape {r.shape}")
  return (jnp.max(r, axis=1) - jnp.min(r, axis=1)) > atol


# ---------------------------------------------------------------------------------------------
# Aggregation.

def aggregate_tokens(values_BL: jax.Array, mask_BL: jax.Array, agg: Aggregation = "token-mean",
                     max_len: int | None = None) -> tuple[jax.Array, jax.Array]:
  """(sum, count) of per-token values so that sum / count, accumulated, is the exact aggregate.

  - 'token-mean': sum over mask tokens, count = mask tokens (long answers weigh more).
  - 'seq-mean-token-mean': sum over sequences of their token mean, count = sequences with at
    least one mask token (every sequence weighs the same).
  - 'seq-mean-token-sum-norm': sum over sequences of token sum / max_len, count = sequences
    (Dr. GRPO: a constant normaliser, no length bias). `max_len` defaults to L; pass it when
    micro-batches are padded to different lengths, or the split changes the result.
  Values at mask-0 positions are ignored, even if they are inf or NaN.
  """
  mask = jnp.asarray(mask_BL).astype(bool)
  v = jnp.where(mask, jnp.asarray(values_BL, jnp.float32), 0.0)
  m = mask.astype(jnp.float32)
  if agg == "token-mean":
    return jnp.sum(v), jnp.sum(m)
  tokens_B = jnp.sum(m, axis=-1)
  has_B = (tokens_B > 0).astype(jnp.float32)
  if agg == "seq-mean-token-mean":
    return jnp.sum(jnp.sum(v, axis=-1) / jnp.maximum(tokens_B, 1.0)), jnp.sum(has_B)
  if agg == "seq-mean-token-sum-norm":
    norm = float(mask.shape[-1] if max_len is None else max_len)
    if norm <= 0:
      raise ValueError(f"max_len must be positive, got {max_len}")
    return jnp.sum(v) / norm, jnp.sum(has_B)
  raise ValueError(f"unknown aggregation {agg!r}; expected one of {AGGREGATIONS}")


# ---------------------------------------------------------------------------------------------
# Policy loss.

def policy_loss(logp_BL: jax.Array, old_logp_BL: jax.Array, adv: jax.Array, mask_BL: jax.Array, *,
                clip_low: float = 0.2, clip_high: float = 0.2, agg: Aggregation = "token-mean",
                max_len: int | None = None) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """PPO clipped surrogate, -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A).

  `adv` is per token [B, L] or per sequence [B] (broadcast over the tokens). Separate low/high
  clips allow DAPO's clip-higher. The returned sum and count follow `agg` (see
  `aggregate_tokens`); aux holds token sums to divide by `aux['tokens']`: clipped fractions
  (total, high side, low side), approx KL(old || new) as k1 = old - new and k3 = r - 1 - log r,
  and the ratio; `aux['seqs']` counts sequences with at least one mask token.
  """
  mask = jnp.asarray(mask_BL).astype(bool)
  logp = jnp.asarray(logp_BL).astype(jnp.float32)
  old = jnp.asarray(old_logp_BL).astype(jnp.float32)
  a = jnp.asarray(adv).astype(jnp.float32)
  if a.ndim == 1:
    a = a[:, None]
  a = jnp.where(mask, jnp.broadcast_to(a, mask.shape), 0.0)
  log_ratio = jnp.clip(jnp.where(mask, logp - old, 0.0), -MAX_LOG_RATIO, MAX_LOG_RATIO)
  ratio = jnp.exp(log_ratio)
  unclipped = -a * ratio
  clipped = -a * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  is_clipped = clipped > unclipped  # the pessimistic branch is the flat, clipped one
  loss_BL = jnp.where(is_clipped, clipped, unclipped)
  loss_sum, count = aggregate_tokens(loss_BL, mask, agg, max_len)

  m = mask.astype(jnp.float32)
  sg_ratio = jax.lax.stop_gradient(ratio)
  sg_log_ratio = jax.lax.stop_gradient(log_ratio)
  aux = {
    "tokens": jnp.sum(m),
    "seqs": jnp.sum((jnp.sum(m, axis=-1) > 0).astype(jnp.float32)),
    "clipfrac_sum": jnp.sum(is_clipped * m),
    "clipfrac_high_sum": jnp.sum((is_clipped & (a > 0)) * m),
    "clipfrac_low_sum": jnp.sum((is_clipped & (a < 0)) * m),
    "approx_kl_k1_sum": jnp.sum(-sg_log_ratio * m),
    "approx_kl_k3_sum": jnp.sum((jnp.expm1(sg_log_ratio) - sg_log_ratio) * m),
    "ratio_sum": jnp.sum(sg_ratio * m),
  }
  return loss_sum, count, aux


# ---------------------------------------------------------------------------------------------
# KL and entropy.

def kl_penalty(logp: jax.Array, ref_logp: jax.Array, kind: KLKind = "k1") -> jax.Array:
  """Per-token estimate of KL(policy || reference) from tokens sampled by the policy.

  k1 = logp - ref_logp (unbiased, can be negative; the usual in-reward penalty);
  k2 = (logp - ref_logp)^2 / 2; k3 = exp(ref - logp) - (ref - logp) - 1 (unbiased, >= 0, low
  variance; the usual in-loss penalty). The log difference is clamped for k3 so one outlier token
  cannot overflow. Aggregate with `aggregate_tokens` and the policy loss's mask and mode.
  """
  d = jnp.asarray(logp).astype(jnp.float32) - jnp.asarray(ref_logp).astype(jnp.float32)
  if kind == "k1":
    return d
  if kind == "k2":
    return 0.5 * d**2
  if kind == "k3":
    x = jnp.clip(-d, -MAX_LOG_RATIO, MAX_LOG_RATIO)
    return jnp.maximum(jnp.expm1(x) - x, 0.0)  # expm1: no cancellation for small x
  raise ValueError(f"unknown KL estimator {kind!r}; expected 'k1', 'k2' or 'k3'")


def entropy_from_logits(logits_BLV: jax.Array) -> jax.Array:
  """Entropy of softmax(logits) per position, in fp32; -inf logits (banned tokens) are fine."""
  logp = jax.nn.log_softmax(jnp.asarray(logits_BLV).astype(jnp.float32), axis=-1)
  p = jnp.exp(logp)
  safe_logp = jnp.where(p > 0, logp, 0.0)
  return -jnp.sum(p * safe_logp, axis=-1)
