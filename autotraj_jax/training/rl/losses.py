"""Pure pieces of the RL objective: token aggregation modes, the clipped policy loss, KL
estimators, entropy and the critic's clipped value loss.

Every loss returns `(sum, count, ...)` like `training/losses.py`: summing over micro-batches and
dividing once by the summed count gives the exact full-batch value, whatever the split.
Positions whose mask is 0 (prompt, tool results, padding) are zeroed *before* any exponential,
so garbage there can neither leak into the loss nor turn a gradient into NaN.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from autotraj_jax.registry import Registry
from autotraj_jax.training.packing import segment_sums

# exp() of a log-ratio beyond this overflows or dominates the batch; clamp for stability.
MAX_LOG_RATIO = 20.0

# ---------------------------------------------------------------------------------------------
# Aggregation: (masked fp32 values [B, L], float mask [B, L], max_len, sequence ids [B, L]) ->
# (sum, count). A sequence is a (row, id) pair: one per row unpacked, several in a packed row.

AggregateFn = Callable[[jax.Array, jax.Array, int, jax.Array], tuple[jax.Array, jax.Array]]
AGGREGATIONS: Registry[AggregateFn] = Registry("aggregation")
register_aggregation = AGGREGATIONS.register


@register_aggregation("token-mean")
def _token_mean(v: jax.Array, m: jax.Array, max_len: int, seq: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Every model token weighs the same: long answers weigh more."""
  return jnp.sum(v), jnp.sum(m)


@register_aggregation("seq-mean-token-mean")
def _seq_mean_token_mean(v: jax.Array, m: jax.Array, max_len: int, seq: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Every sequence weighs the same: the mean of its tokens, averaged over sequences."""
  tokens = segment_sums(m, seq)
  return jnp.sum(segment_sums(v, seq) / jnp.maximum(tokens, 1.0)), jnp.sum((tokens > 0).astype(jnp.float32))


@register_aggregation("seq-mean-token-sum-norm")
def _seq_mean_token_sum_norm(v: jax.Array, m: jax.Array, max_len: int, seq: jax.Array
                             ) -> tuple[jax.Array, jax.Array]:
  """Dr. GRPO: token sums over a constant `max_len`, averaged over sequences (no length bias)."""
  return jnp.sum(v) / float(max_len), jnp.sum((segment_sums(m, seq) > 0).astype(jnp.float32))


def sequence_ids(mask_BL: jax.Array, seq_BL: jax.Array | None) -> jax.Array:
  """The sequence id of every position: `seq_BL` when packed, else 1 (one sequence per row)."""
  return jnp.ones(jnp.shape(mask_BL), jnp.int32) if seq_BL is None else jnp.asarray(seq_BL, jnp.int32)


def aggregate_tokens(values_BL: jax.Array, mask_BL: jax.Array, agg: str = "token-mean",
                     max_len: int | None = None, seq_BL: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(sum, count) of per-token values under the registered mode `agg`, so that sum / count,
  accumulated over micro-batches, is the exact aggregate.

  `max_len` (default L) is the constant of length-normalised modes; pass it when micro-batches
  are padded to different lengths, or the split changes the result. `seq_BL` gives each
  position's sequence within its row in packed batches (default: one sequence per row). Values
  at mask-0 positions are ignored, even if they are inf or NaN.
  """
  fn = AGGREGATIONS.lookup(agg)
  norm = int(jnp.shape(mask_BL)[-1] if max_len is None else max_len)
  if norm <= 0:
    raise ValueError(f"max_len must be positive, got {max_len}")
  mask = jnp.asarray(mask_BL).astype(bool)
  v = jnp.where(mask, jnp.asarray(values_BL, jnp.float32), 0.0)
  return fn(v, mask.astype(jnp.float32), norm, sequence_ids(mask, seq_BL))


# ---------------------------------------------------------------------------------------------
# Policy loss.

def policy_loss(logp_BL: jax.Array, old_logp_BL: jax.Array, adv: jax.Array, mask_BL: jax.Array, *,
                clip_low: float = 0.2, clip_high: float = 0.2, agg: str = "token-mean",
                max_len: int | None = None, seq_BL: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
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
  loss_sum, count = aggregate_tokens(loss_BL, mask, agg, max_len, seq_BL)

  m = mask.astype(jnp.float32)
  sg_ratio = jax.lax.stop_gradient(ratio)
  sg_log_ratio = jax.lax.stop_gradient(log_ratio)
  aux = {
    "tokens": jnp.sum(m),
    "seqs": jnp.sum((segment_sums(m, sequence_ids(m, seq_BL)) > 0).astype(jnp.float32)),
    "clipfrac_sum": jnp.sum(is_clipped * m),
    "clipfrac_high_sum": jnp.sum((is_clipped & (a > 0)) * m),
    "clipfrac_low_sum": jnp.sum((is_clipped & (a < 0)) * m),
    "approx_kl_k1_sum": jnp.sum(-sg_log_ratio * m),
    "approx_kl_k3_sum": jnp.sum((jnp.expm1(sg_log_ratio) - sg_log_ratio) * m),
    "ratio_sum": jnp.sum(sg_ratio * m),
  }
  return loss_sum, count, aux


# ---------------------------------------------------------------------------------------------
# KL estimators: d = logp - ref_logp (fp32, per token) -> estimate of KL(policy || reference).

KLFn = Callable[[jax.Array], jax.Array]
KL_ESTIMATORS: Registry[KLFn] = Registry("KL estimator")
register_kl = KL_ESTIMATORS.register


@register_kl("k1")
def _k1(d: jax.Array) -> jax.Array:
  """logp - ref: unbiased, can be negative; the usual in-reward penalty."""
  return d


@register_kl("k2")
def _k2(d: jax.Array) -> jax.Array:
  """(logp - ref)^2 / 2: biased, >= 0, its gradient is that of the true KL's first order."""
  return 0.5 * d**2


@register_kl("k3")
def _k3(d: jax.Array) -> jax.Array:
  """exp(ref - logp) - (ref - logp) - 1: unbiased, >= 0, low variance; the usual in-loss penalty.
  The log difference is clamped so one outlier token cannot overflow."""
  x = jnp.clip(-d, -MAX_LOG_RATIO, MAX_LOG_RATIO)
  return jnp.maximum(jnp.expm1(x) - x, 0.0)  # expm1: no cancellation for small x


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, kind: str = "k1") -> jax.Array:
  """Per-token estimate of KL(policy || reference) from tokens sampled by the policy, by the
  registered estimator `kind`. Aggregate with `aggregate_tokens` and the policy loss's mask."""
  fn = KL_ESTIMATORS.lookup(kind)
  return fn(jnp.asarray(logp).astype(jnp.float32) - jnp.asarray(ref_logp).astype(jnp.float32))


def entropy_from_logits(logits_BLV: jax.Array) -> jax.Array:
  """Entropy of softmax(logits) per position, in fp32; -inf logits (banned tokens) are fine."""
  logp = jax.nn.log_softmax(jnp.asarray(logits_BLV).astype(jnp.float32), axis=-1)
  p = jnp.exp(logp)
  safe_logp = jnp.where(p > 0, logp, 0.0)
  return -jnp.sum(p * safe_logp, axis=-1)


# ---------------------------------------------------------------------------------------------
# Critic.

def value_loss(values_BL: jax.Array, old_values_BL: jax.Array, returns_BL: jax.Array,
               mask_BL: jax.Array, clip: float | None = 0.2) -> tuple[jax.Array, jax.Array]:
  """(sum, count) of 0.5 * max((V - R)^2, (V_clipped - R)^2) over mask-1 tokens.

  V_clipped = V_old + clip(V - V_old, -clip, clip) keeps one update from moving the critic far
  from the values the advantages were computed with; `clip=None` is the plain squared error.
  """
  mask = jnp.asarray(mask_BL).astype(bool)
  v = jnp.where(mask, jnp.asarray(values_BL).astype(jnp.float32), 0.0)
  old = jnp.where(mask, jnp.asarray(old_values_BL).astype(jnp.float32), 0.0)
  ret = jnp.where(mask, jnp.asarray(returns_BL).astype(jnp.float32), 0.0)
  err = (v - ret) ** 2
  if clip is not None:
    v_clipped = old + jnp.clip(v - old, -clip, clip)
    err = jnp.maximum(err, (v_clipped - ret) ** 2)
  m = mask.astype(jnp.float32)
  return jnp.sum(0.5 * err * m), jnp.sum(m)
