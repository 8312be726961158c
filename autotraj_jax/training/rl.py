"""GRPO and PPO on tool-use trajectories: rollout batches and the jitted loss functions.

A rollout batch lays each trajectory out as prompt + response tokens ([B, L], right-padded) with
`loss_mask` 1 on model-written tokens only: tool results and the prompt get no gradient, no
advantage and no value target. Arrays named `*_BT` are aligned with next-token prediction:
index j is about token j + 1, predicted from tokens <= j (T = L - 1).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from autotraj_jax.models.decoder import causal_mask
from autotraj_jax.tir.trajectory import Trajectory
from autotraj_jax.training import ppo, rl_losses
from autotraj_jax.training.losses import token_logprobs
from autotraj_jax.training.sft import positions_from_valid

ALGOS = ("grpo", "ppo")


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """The objective. Defaults: GRPO with DAPO's clip-higher, no KL, token-mean aggregation."""

  algo: str = "grpo"
  clip_low: float = 0.2
  clip_high: float = 0.28
  agg: str = "token-mean"
  scale_adv_by_std: bool = True       # False: Dr. GRPO (mean-centred advantages)
  filter_uniform_groups: bool = False  # drop groups whose rewards are all equal (DAPO)
  kl_coef: float = 0.0
  kl_kind: str = "k3"
  kl_in_reward: bool = False          # subtract kl_coef * KL from the reward instead of the loss
  entropy_coef: float = 0.0
  gamma: float = 1.0                  # PPO
  lam: float = 0.95                   # PPO
  value_clip: float | None = 0.2      # PPO
  whiten_advantages: bool = True      # PPO

  def __post_init__(self):
    if self.algo not in ALGOS:
      raise ValueError(f"algo must be one of {ALGOS}, got {self.algo!r}")
    if self.agg not in rl_losses.AGGREGATIONS:
      raise ValueError(f"agg must be one of {rl_losses.AGGREGATIONS}, got {self.agg!r}")
    if self.kl_kind not in ("k1", "k2", "k3"):
      raise ValueError(f"kl_kind must be k1, k2 or k3, got {self.kl_kind!r}")


def rollout_batch(trajs: Sequence[Trajectory], *, length: int, pad_id: int) -> dict[str, np.ndarray]:
  """tokens/valid/loss_mask [B, length] and the sampler's logprobs (`sampler_logp`, with
  `sampler_has` where known), truncated at `length` (a truncated tail gets no gradient)."""
  B = len(trajs)
  out = {"tokens": np.full((B, length), pad_id, np.int32), "valid": np.zeros((B, length), np.int32),
         "loss_mask": np.zeros((B, length), np.int32), "sampler_logp": np.zeros((B, length), np.float32),
         "sampler_has": np.zeros((B, length), np.int32)}
  for b, t in enumerate(trajs):
    ids, mask, lps, has = list(t.prompt_ids), [0] * len(t.prompt_ids), [0.0] * len(t.prompt_ids), \
        [0] * len(t.prompt_ids)
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
  return (batch["loss_mask"][:, 1:] * batch["valid"][:, 1:]).astype(jnp.float32)


def _forward(model, batch):
  tokens, valid = batch["tokens"], batch["valid"]
  return model(tokens[:, :-1], positions_from_valid(valid)[:, :-1], causal_mask(valid[:, :-1]))


def make_logprob_fn(graphdef: nnx.GraphDef):
  """(params, batch) -> log p(token j + 1) [B, T] in fp32."""

  def fn(params, batch):
    logits, _ = _forward(nnx.merge(graphdef, params), batch)
    return token_logprobs(logits, batch["tokens"][:, 1:])

  return fn


def make_value_fn(graphdef: nnx.GraphDef):
  """(critic params, batch) -> V at each position [B, T] (the state before token j + 1)."""

  def fn(params, batch):
    return _forward(nnx.merge(graphdef, params), batch)

  return fn


def make_policy_loss(graphdef: nnx.GraphDef, cfg: RLConfig):
  """loss_fn(params, batch, rng) -> (sum, count, aux) of the clipped surrogate (+ KL, - entropy).

  batch: tokens, valid, loss_mask [B, L]; adv [B, T]; old_logp, ref_logp [B, T]. The KL and
  entropy terms are aggregated like the policy loss, so sum / count stays exact under
  gradient accumulation.
  """

  def loss_fn(params, batch, rng):
    del rng
    logits, _ = _forward(nnx.merge(graphdef, params), batch)
    mask = shifted_mask(batch)
    logp = token_logprobs(logits, batch["tokens"][:, 1:])
    max_len = mask.shape[-1]
    s, c, aux = rl_losses.policy_loss(logp, batch["old_logp"], batch["adv"], mask, clip_low=cfg.clip_low,
                                      clip_high=cfg.clip_high, agg=cfg.agg, max_len=max_len)
    kl = rl_losses.kl_penalty(logp, batch["ref_logp"], cfg.kl_kind)
    aux["kl_sum"] = jax.lax.stop_gradient(jnp.sum(jnp.where(mask > 0, kl, 0.0)))
    if cfg.kl_coef and not cfg.kl_in_reward:
      s = s + cfg.kl_coef * rl_losses.aggregate_tokens(kl, mask, cfg.agg, max_len)[0]
    ent = rl_losses.entropy_from_logits(logits)
    aux["entropy_sum"] = jax.lax.stop_gradient(jnp.sum(ent * mask))
    if cfg.entropy_coef:
      s = s - cfg.entropy_coef * rl_losses.aggregate_tokens(ent, mask, cfg.agg, max_len)[0]
    return s, c, aux

  return loss_fn


def make_value_loss(graphdef: nnx.GraphDef, cfg: RLConfig):
  """loss_fn for the critic: clipped squared error to the GAE returns on model tokens."""

  def loss_fn(params, batch, rng):
    del rng
    values = _forward(nnx.merge(graphdef, params), batch)
    mask = shifted_mask(batch)
    s, c = ppo.value_loss(values, batch["old_values"], batch["returns"], mask, clip=cfg.value_clip)
    return s, c, {"value_sum": jax.lax.stop_gradient(jnp.sum(values * mask))}

  return loss_fn


def grpo_advantages(rewards_Gn: jax.Array, cfg: RLConfig) -> tuple[jax.Array, jax.Array]:
  """(per-sequence advantages [G*n], keep [G*n]); a dropped group's sequences get keep 0."""
  adv = rl_losses.group_advantages(rewards_Gn, scale_by_std=cfg.scale_adv_by_std)
  keep = jnp.ones(rewards_Gn.shape, bool)
  if cfg.filter_uniform_groups:
    keep = jnp.broadcast_to(rl_losses.filter_uniform_groups(rewards_Gn)[:, None], rewards_Gn.shape)
  return adv.reshape(-1), keep.reshape(-1)


def token_rewards(seq_rewards_B: jax.Array, mask_BT: jax.Array) -> jax.Array:
  """[B, T] with each sequence's reward on its last model token (PPO's sparse reward)."""
  T = mask_BT.shape[-1]
  last = T - 1 - jnp.argmax(jnp.flip(mask_BT, axis=-1) > 0, axis=-1)
  has = jnp.any(mask_BT > 0, axis=-1)
  onehot = jax.nn.one_hot(last, T, dtype=jnp.float32) * has[:, None]
  return onehot * seq_rewards_B[:, None]


def ppo_advantages(seq_rewards_B: jax.Array, values_BT: jax.Array, mask_BT: jax.Array, kl_BT: jax.Array,
                   cfg: RLConfig) -> tuple[jax.Array, jax.Array]:
  """(advantages, returns) [B, T] by GAE over model tokens; KL-in-reward is per token here."""
  r = token_rewards(seq_rewards_B, mask_BT)
  if cfg.kl_in_reward and cfg.kl_coef:
    r = r - cfg.kl_coef * jnp.where(mask_BT > 0, kl_BT, 0.0)
  adv, ret = ppo.gae(r, values_BT, mask_BT, gamma=cfg.gamma, lam=cfg.lam)
  if cfg.whiten_advantages:
    adv = ppo.masked_whiten(adv, mask_BT)
  return adv, ret
