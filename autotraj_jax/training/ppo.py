"""Critic pieces for PPO on tool-use trajectories: GAE that skips tool results, and the clipped
value loss.

Tool results are inserted by the environment, not chosen by the policy, so they are not time
steps of the MDP: the recursion links each model token to the next *model* token, as if the
tool tokens between them were not there. Prompt and padding (also mask 0) are skipped the same
way, and the position after the last model token is terminal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gae(rewards_BL: jax.Array, values_BL: jax.Array, mask_BL: jax.Array, *, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[jax.Array, jax.Array]:
  """(advantages_BL, returns_BL) by generalised advantage estimation over mask-1 positions only.

  At a model token t with next model token t': delta = r_t + gamma * V_t' - V_t and
  A_t = delta + gamma * lam * A_t' (V and A are 0 past the last model token); returns = A + V.
  Rewards and values at mask-0 positions are ignored (place the reward on a model token,
  usually the last); those positions get advantage 0 and return 0. A reverse `lax.scan` over L.
  """
  mask = jnp.asarray(mask_BL).astype(bool)
  r = jnp.where(mask, jnp.asarray(rewards_BL, jnp.float32), 0.0)
  v = jnp.where(mask, jnp.asarray(values_BL, jnp.float32), 0.0)
  B = mask.shape[0]

  def step(carry, xs):
    next_value_B, next_adv_B = carry
    r_B, v_B, m_B = xs
    delta_B = r_B + gamma * next_value_B - v_B
    adv_B = delta_B + gamma * lam * next_adv_B
    carry = (jnp.where(m_B, v_B, next_value_B), jnp.where(m_B, adv_B, next_adv_B))
    return carry, jnp.where(m_B, adv_B, 0.0)

  zeros_B = jnp.zeros((B,), jnp.float32)
  _, adv_LB = jax.lax.scan(step, (zeros_B, zeros_B), (r.T, v.T, mask.T), reverse=True)
  adv_BL = adv_LB.T
  return adv_BL, jnp.where(mask, adv_BL + v, 0.0)


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


def masked_whiten(x_BL: jax.Array, mask_BL: jax.Array, *, shift_mean: bool = True,
                  eps: float = 1e-8) -> jax.Array:
  """x scaled to unit variance over mask-1 positions and, with `shift_mean`, centred; 0 elsewhere.

  PPO usually whitens GAE advantages over the batch's model tokens before the policy loss;
  `shift_mean=False` keeps their mean (e.g. for rewards, whose sign matters).
  """
  mask = jnp.asarray(mask_BL).astype(bool)
  m = mask.astype(jnp.float32)
  x = jnp.where(mask, jnp.asarray(x_BL, jnp.float32), 0.0)
  n = jnp.maximum(jnp.sum(m), 1.0)
  mean = jnp.sum(x) / n
  var = jnp.sum(((x - mean) * m) ** 2) / n
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return jnp.where(mask, out, 0.0)
