"""Supervised fine-tuning loss: next-token prediction on tokens whose loss mask is 1.

The loss mask marks model-written tokens (assistant text); the prompt and tool results
carry 0, so the model learns to call tools, not to imitate their output.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from autotraj_jax.training import packing
from autotraj_jax.training.losses import chunked_sft_loss, sft_loss


def positions_from_valid(valid_BL: jax.Array) -> jax.Array:
  return jnp.maximum(jnp.cumsum(valid_BL, axis=-1) - 1, 0).astype(jnp.int32)


def make_sft_loss(graphdef: nnx.GraphDef):
  """loss_fn(params, batch, rng) for `make_train_step`; batch has tokens, loss_mask, valid and,
  when packed, segment_ids (`training/packing.py`: the same per-token losses either way).

  With the model config's `logits_chunk` > 0 the [B, L, V] logits are never built whole
  (`chunked_sft_loss`); the loss is the same up to float reassociation.
  """

  def loss_fn(params: Any, batch: dict[str, jax.Array], rng: jax.Array):
    del rng
    model = nnx.merge(graphdef, params)
    tokens = batch["tokens"]
    args = packing.model_inputs(batch)
    mask = batch["loss_mask"][:, 1:] * packing.target_mask(packing.segments(batch))
    chunk = getattr(model.cfg, "logits_chunk", 0)
    if chunk:
      hidden, _ = model.model(*args)
      s, c = chunked_sft_loss(hidden, tokens[:, 1:], mask, model.logits, chunk)
    else:
      logits, _ = model(*args)
      s, c = sft_loss(logits, tokens[:, 1:], mask)
    return s, c, {}

  return loss_fn
