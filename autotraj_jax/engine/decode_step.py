"""One decode step of the model for the engine, built from the model's public pieces.

Numerically the model's cached forward for one token per row; RoPE tables are computed once per
step for all layers, and attention reads the slot-major cache in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from autotraj_jax.models.decoder import LayerCache

_NEG = float(np.finfo(np.float32).min)


def _rope_tables(pos_B, head_dim: int, theta: float):
  """sin/cos of each row's position, once per step for every layer (the model's `rope` math)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = pos_B.astype(jnp.float32)[:, None, None, None] * inv_freq  # [B, 1, 1, H/2]
  return jnp.sin(angles), jnp.cos(angles)


def _rope(x_BLNH, sin, cos):
  x = x_BLNH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BLNH.dtype)


def _attend_one(q_BNH, k_BKSH, v_BKSH, valid_BS):
  """GQA attention of one query per row over the slot-major cache. The keys are the left
  operand so XLA reads them in place ([S, H] rows); as the right operand (the model's
  `cached_attention`), XLA:CPU transposes the whole cache every layer and step."""
  B, N, H = q_BNH.shape
  K = k_BKSH.shape[1]
  q = q_BNH.reshape(B, K, N // K, H)
  s = jnp.einsum("bksh,bkgh->bkgs", k_BKSH, q, preferred_element_type=jnp.float32) * H ** -0.5
  s = jnp.where(valid_BS[:, None, None, :], s, _NEG)
  p = jax.nn.softmax(s, axis=-1).astype(v_BKSH.dtype)
  return jnp.einsum("bkgs,bksh->bkgh", p, v_BKSH).reshape(B, N, H)


def step_forward(model, tok_B, pos_B, cache, slot, valid_BS):
  """`model(tok[:, None], pos[:, None], valid[:, None], cache, slot)` for one token per row:
  the same layers and numerics, with RoPE tables shared by the layers and the cache read in
  place. Returns ([B, V] fp32 logits, cache)."""
  cfg, dt, tr = model.cfg, model.cfg.jnp_dtype, model.model
  x = jnp.take(tr.embed_tokens[...], tok_B, axis=0).astype(dt)[:, None]  # [B, 1, D]
  sin, cos = _rope_tables(pos_B, cfg.head_dim, cfg.rope_theta)
  new_cache = []
  for block, layer in zip(tr.layers, cache):
    att = block.self_attn
    h = block.input_layernorm(x)
    q = _rope(att.q_proj(h, dt), sin, cos)
    k = _rope(att.k_proj(h, dt), sin, cos)
    v = att.v_proj(h, dt)
    kc = jax.lax.dynamic_update_slice(layer.k, k.swapaxes(1, 2).astype(layer.k.dtype), (0, 0, slot, 0))
    vc = jax.lax.dynamic_update_slice(layer.v, v.swapaxes(1, 2).astype(layer.v.dtype), (0, 0, slot, 0))
    out = _attend_one(q[:, 0], kc.astype(dt), vc.astype(dt), valid_BS)
    x = x + att.o_proj(out[:, None], dt)
    x = x + block.mlp(block.post_attention_layernorm(x))
    new_cache.append(LayerCache(kc, vc))
  return model.logits(tr.norm(x))[:, 0], new_cache
