"""Pure loss functions. Each returns `(sum, count)` so that gradient accumulation and
masking give exact token means: the step divides the accumulated sum by the total count."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits_BLV: jax.Array, targets_BL: jax.Array) -> jax.Array:
  """log p(target) per position, in fp32."""
  logp = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, targets_BL[..., None].astype(jnp.int32), axis=-1)[..., 0]


def sft_loss(logits_BLV: jax.Array, targets_BL: jax.Array, mask_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Next-token cross-entropy summed over positions whose mask is 1, and that count."""
  mask = mask_BL.astype(jnp.float32)
  nll = -token_logprobs(logits_BLV, targets_BL)
  return jnp.sum(nll * mask), jnp.sum(mask)
