"""On-device token choice of the JAX engine: greedy, temperature, top-k and top-p per row."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cutoff(x_BV, top_p_B, top_k_B, iters: int = 32):
  """Per-row smallest logit kept by top-k and top-p (nucleus), found by bisection on the logit
  value: a token is kept iff fewer than k tokens, and less than top_p of the mass, lie strictly
  above it. 32 halvings reach float precision; on CPU this is ~7x faster than sorting V."""
  V = x_BV.shape[-1]
  k = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, V), V)[:, None]
  top_p = jnp.where(top_p_B < 1.0, top_p_B, jnp.inf)[:, None]  # 1.0: no cut (not fp-rounded sums)
  probs = jax.nn.softmax(x_BV, axis=-1)

  def kept(t):
    above = x_BV > t
    return (jnp.sum(jnp.where(above, probs, 0.0), -1, keepdims=True) < top_p) & (jnp.sum(above, -1, keepdims=True) < k)

  def halve(_, lo_hi):
    lo, hi = lo_hi
    mid = 0.5 * (lo + hi)
    ok = kept(mid)
    return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

  lo, hi = jnp.min(x_BV, -1, keepdims=True), jnp.max(x_BV, -1, keepdims=True)  # kept(hi) always holds
  lo, hi = jax.lax.fori_loop(0, iters, halve, (lo, hi))
  return jnp.where(kept(lo), lo, hi)


def max_argmax(x_BV):
  """(row max, first index of it). A max and a min over `where(x == max, iota, V)`: two plain
  reductions XLA:CPU vectorises (~10x faster per step than one variadic (value, index) reduce)."""
  V = x_BV.shape[-1]
  m = jnp.max(x_BV, axis=-1)
  iota = jax.lax.broadcasted_iota(jnp.int32, x_BV.shape, 1)
  first = jnp.min(jnp.where(x_BV == m[:, None], iota, V), axis=-1)
  return m, jnp.minimum(first, V - 1)  # a NaN row (no element equals its max) still gets a valid id


def pick_tokens(logits_BV, t, c):
  """Next token of each row and its log-probability at temperature 1. All-greedy batches (eval,
  repair) take the row max: no key derivation, no filter, no gather."""
  m, greedy = max_argmax(logits_BV)
  log_z = jnp.log(jnp.sum(jnp.exp(logits_BV - m[:, None]), axis=-1))

  def filtered(x):
    return jnp.where(x >= cutoff(x, c["top_p"], c["top_k"]), x, -jnp.inf)

  def draw(_):
    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), t))(c["seeds"])
    x = logits_BV / jnp.maximum(c["temperature"], 1e-6)[:, None]
    x = jax.lax.cond(c["any_filter"], filtered, lambda y: y, x)
    tok = jnp.where(c["temperature"] == 0.0, greedy, jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32))
    return tok, jnp.take_along_axis(logits_BV, tok[:, None], axis=-1)[:, 0]

  tok, picked = jax.lax.cond(c["any_sample"], draw, lambda _: (greedy, m), None)
  return tok, (picked - m) - log_z
