"""Advantage estimators, registered by name (`rl.advantage`).

Critic-free estimators compare each sampled trajectory with the others of its prompt's group
(P prompts x n samples, rows grouped: g * n .. g * n + n - 1); register one with
`register_group_advantage` as a function [G, n] rewards -> [G, n] advantages. `gae` is PPO's:
generalised advantage estimation with the value-head critic, over model tokens only. Any other
estimator is `register_advantage(name, needs_critic=...)` on a function
`(AdvantageInputs, RLConfig) -> Advantages`.

Tool results are inserted by the environment, not chosen by the policy, so they are not time
steps of the MDP: GAE links each model token to the next *model* token, as if the tool tokens
between them were not there. Prompt and padding (also mask 0) are skipped the same way, and the
position after the last model token is terminal.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

import jax
import jax.numpy as jnp

from autotraj_jax.registry import Registry

if TYPE_CHECKING:
  from autotraj_jax.training.rl.config import RLConfig


@dataclasses.dataclass(frozen=True)
class AdvantageInputs:
  """What an estimator may use; arrays named `*_BT` are aligned with next-token prediction."""

  rewards_B: jax.Array            # the task reward of each trajectory, grouped by prompt
  group_size: int                 # n samples per prompt
  mask_BT: jax.Array              # 1 on model-written target tokens
  kl_BT: jax.Array                # KL(policy || reference) per token under the rollout params
  values_BT: jax.Array | None = None  # the critic's values (estimators with needs_critic)


@dataclasses.dataclass(frozen=True)
class Advantages:
  adv_BT: jax.Array                    # 0 off the mask
  keep_B: jax.Array                    # bool: False drops the trajectory from the policy loss
  returns_BT: jax.Array | None = None  # the critic's targets (estimators with needs_critic)


@dataclasses.dataclass(frozen=True)
class Estimator:
  fn: Callable[[AdvantageInputs, "RLConfig"], Advantages]
  needs_critic: bool = False


ADVANTAGES: Registry[Estimator] = Registry("advantage estimator")


def register_advantage(name: str, *, needs_critic: bool = False):
  """Decorator registering `fn(inputs, cfg) -> Advantages` as estimator `name`."""
  def deco(fn):
    ADVANTAGES.register(name)(Estimator(fn, needs_critic))
    return fn
  return deco


def register_group_advantage(name: str):
  """Decorator registering a critic-free estimator from `fn(rewards [G, n]) -> advantages [G, n]`:
  KL-in-reward, the uniform-group filter and the broadcast over model tokens are shared."""
  def deco(fn: Callable[[jax.Array], jax.Array]):
    def estimate(inputs: AdvantageInputs, cfg: "RLConfig") -> Advantages:
      return group_estimate(fn, inputs, cfg)
    ADVANTAGES.register(name)(Estimator(estimate, needs_critic=False))
    return fn
  return deco


def estimate_advantages(name: str, inputs: AdvantageInputs, cfg: "RLConfig") -> Advantages:
  est = ADVANTAGES.lookup(name)
  if est.needs_critic and inputs.values_BT is None:
    raise ValueError(f"advantage estimator {name!r} needs the critic's values")
  return est.fn(inputs, cfg)


def grid(x_B: jax.Array, group_size: int) -> jax.Array:
  """[B] -> [G, n]; B must be a whole number of groups."""
  x = jnp.asarray(x_B, jnp.float32)
  if group_size <= 0 or x.shape[0] % group_size:
    raise ValueError(f"{x.shape[0]} trajectories do not form groups of {group_size}")
  return x.reshape(-1, group_size)


def group_estimate(fn: Callable[[jax.Array], jax.Array], inputs: AdvantageInputs, cfg: "RLConfig") -> Advantages:
  """A group estimator's advantages on the model tokens. KL-in-reward subtracts each sequence's
  summed KL from its reward; the uniform-group filter looks at the task rewards alone, so a KL
  difference cannot make a group of equal outcomes informative."""
  mask = jnp.asarray(inputs.mask_BT, jnp.float32)
  r = jnp.asarray(inputs.rewards_B, jnp.float32)
  if cfg.kl_in_reward and cfg.kl_coef:
    r = r - cfg.kl_coef * jnp.sum(jnp.where(mask > 0, inputs.kl_BT, 0.0), axis=-1)
  adv_B = fn(grid(r, inputs.group_size)).reshape(-1)
  keep_B = jnp.ones(adv_B.shape, bool)
  if cfg.filter_uniform_groups:
    keep_G = filter_uniform_groups(grid(inputs.rewards_B, inputs.group_size))
    keep_B = jnp.repeat(keep_G, inputs.group_size)
  return Advantages(adv_BT=adv_B[:, None] * mask, keep_B=keep_B)


# ---------------------------------------------------------------------------------------------
# Group baselines.

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
    centred = r - jnp.mean(r, axis=1, keepdims=True)
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


def leave_one_out_advantages(rewards_Gn: jax.Array) -> jax.Array:
  """RLOO: A_i = r_i - mean_{j != i} r_j, i.e. n / (n - 1) * (r_i - mean); 0 for a group of one."""
  r = jnp.asarray(rewards_Gn, jnp.float32)
  if r.ndim != 2:
    raise ValueError(f"rewards must be [G, n], got shape {r.shape}")
  n = r.shape[1]
  if n < 2:
    return jnp.zeros_like(r)
  others = (jnp.sum(r, axis=1, keepdims=True) - r) / (n - 1)
  return r - others


def filter_uniform_groups(rewards_Gn: jax.Array, *, atol: float = 0.0) -> jax.Array:
  """keep_G: False for groups whose rewards are all equal (within `atol`).

  Such groups have zero advantage everywhere, so they only dilute the token count; dropping
  them (DAPO's dynamic sampling) keeps every trained token informative.
  """
  r = jnp.asarray(rewards_Gn, jnp.float32)
  if r.ndim != 2:
    raise ValueError(f"rewards must be [G, n], got shape {r.shape}")
  return (jnp.max(r, axis=1) - jnp.min(r, axis=1)) > atol


@register_group_advantage("grpo")
def grpo(rewards_Gn: jax.Array) -> jax.Array:
  """Group z-score. Beware: a group whose outcomes agree but whose format/RM terms differ
  slightly gets those small differences scaled up to unit advantage."""
  return group_advantages(rewards_Gn, scale_by_std=True)


@register_group_advantage("dr_grpo")
def dr_grpo(rewards_Gn: jax.Array) -> jax.Array:
  """Mean-centred within the group, on the reward's own scale."""
  return group_advantages(rewards_Gn, scale_by_std=False)


@register_group_advantage("rloo")
def rloo(rewards_Gn: jax.Array) -> jax.Array:
  return leave_one_out_advantages(rewards_Gn)


# ---------------------------------------------------------------------------------------------
# GAE with a critic.

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


def token_rewards(seq_rewards_B: jax.Array, mask_BT: jax.Array) -> jax.Array:
  """[B, T] with each sequence's reward on its last model token (PPO's sparse reward)."""
  T = mask_BT.shape[-1]
  last = T - 1 - jnp.argmax(jnp.flip(mask_BT, axis=-1) > 0, axis=-1)
  has = jnp.any(mask_BT > 0, axis=-1)
  onehot = jax.nn.one_hot(last, T, dtype=jnp.float32) * has[:, None]
  return onehot * jnp.asarray(seq_rewards_B, jnp.float32)[:, None]


@register_advantage("gae", needs_critic=True)
def gae_estimate(inputs: AdvantageInputs, cfg: "RLConfig") -> Advantages:
  """PPO: the reward on the last model token (KL-in-reward per token), GAE over model tokens,
  whitened over the batch when `whiten_advantages`."""
  mask = jnp.asarray(inputs.mask_BT, jnp.float32)
  r = token_rewards(inputs.rewards_B, mask)
  if cfg.kl_in_reward and cfg.kl_coef:
    r = r - cfg.kl_coef * jnp.where(mask > 0, inputs.kl_BT, 0.0)
  adv, ret = gae(r, inputs.values_BT, mask, gamma=cfg.gamma, lam=cfg.lam)
  if cfg.whiten_advantages:
    adv = masked_whiten(adv, mask)
  return Advantages(adv_BT=adv, keep_B=jnp.ones(mask.shape[:1], bool), returns_BT=ret)
