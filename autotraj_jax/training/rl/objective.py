"""The jitted pieces over a model: per-token log-probs, critic values, and the policy and value
losses (`loss_fn(params, batch, rng) -> (sum, count, aux_sums)` for `make_train_step`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from autotraj_jax.training import packing
from autotraj_jax.training.losses import token_logprobs
from autotraj_jax.training.rl import losses
from autotraj_jax.training.rl.batch import shifted_mask
from autotraj_jax.training.rl.config import RLConfig


def forward(model, batch):
  """The model on tokens[:, :-1]: outputs at j predict token j + 1 (packed rows too)."""
  return model(*packing.model_inputs(batch))


def make_logprob_fn(graphdef: nnx.GraphDef):
  """(params, batch) -> log p(token j + 1) [B, T] in fp32."""

  def fn(params, batch):
    logits, _ = forward(nnx.merge(graphdef, params), batch)
    return token_logprobs(logits, batch["tokens"][:, 1:])

  return fn


def make_value_fn(graphdef: nnx.GraphDef):
  """(critic params, batch) -> V at each position [B, T] (the state before token j + 1)."""

  def fn(params, batch):
    return forward(nnx.merge(graphdef, params), batch)

  return fn


def make_policy_loss(graphdef: nnx.GraphDef, cfg: RLConfig):
  """loss_fn(params, batch, rng) -> (sum, count, aux) of the clipped surrogate (+ KL, - entropy).

  batch: tokens, valid, loss_mask [B, L]; adv [B, T]; old_logp, ref_logp [B, T]; segment_ids
  [B, L] when packed (`pack_update_batch`). The KL and entropy terms are aggregated like the
  policy loss, so sum / count stays exact under gradient accumulation.
  """

  def loss_fn(params, batch, rng):
    del rng
    logits, _ = forward(nnx.merge(graphdef, params), batch)
    mask = shifted_mask(batch)
    logp = token_logprobs(logits, batch["tokens"][:, 1:])
    max_len = mask.shape[-1]
    seq = packing.segments(batch)[:, 1:]
    s, c, aux = losses.policy_loss(logp, batch["old_logp"], batch["adv"], mask, clip_low=cfg.clip_low,
                                   clip_high=cfg.clip_high, agg=cfg.agg, max_len=max_len, seq_BL=seq)
    kl = losses.kl_penalty(logp, batch["ref_logp"], cfg.kl_kind)
    aux["kl_sum"] = jax.lax.stop_gradient(jnp.sum(jnp.where(mask > 0, kl, 0.0)))
    if cfg.kl_coef and not cfg.kl_in_reward:
      s = s + cfg.kl_coef * losses.aggregate_tokens(kl, mask, cfg.agg, max_len, seq)[0]
    ent = losses.entropy_from_logits(logits)
    aux["entropy_sum"] = jax.lax.stop_gradient(jnp.sum(ent * mask))
    if cfg.entropy_coef:
      s = s - cfg.entropy_coef * losses.aggregate_tokens(ent, mask, cfg.agg, max_len, seq)[0]
    return s, c, aux

  return loss_fn


def make_value_loss(graphdef: nnx.GraphDef, cfg: RLConfig):
  """loss_fn for the critic: clipped squared error to the GAE returns on model tokens."""

  def loss_fn(params, batch, rng):
    del rng
    values = forward(nnx.merge(graphdef, params), batch)
    mask = shifted_mask(batch)
    s, c = losses.value_loss(values, batch["old_values"], batch["returns"], mask, clip=cfg.value_clip)
    return s, c, {"value_sum": jax.lax.stop_gradient(jnp.sum(values * mask))}

  return loss_fn
