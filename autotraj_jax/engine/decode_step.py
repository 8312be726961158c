"""The engine's prefill and decode step, built from the model's public pieces.

Numerically the model's cached forward (`model(tokens, positions, mask, cache, index)`), with the
work a sampler does not need left out: prefill attends over the filled slots only and runs the
last layer's attention output and MLP for the last position only (the logits read nothing else);
a decode step computes RoPE tables once for all layers, fuses the q/k/v and gate/up matmuls and
updates and reads the cache in place.

The engine's KV cache (and its prefix-cache pool) is slot-minor, [B, K, H, S], where the model's
`LayerCache` is [B, K, S, H]: see `_attend_one`; the decode loop carries it as [B*K, H, S]
(`merge_heads`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from autotraj_jax.models.decoder import LayerCache

_NEG = float(np.finfo(np.float32).min)


class RopeTable(NamedTuple):
  """sin and cos of the rotary angles of positions 0..n-1, [n, H/2] fp32 (the model's RoPE math)."""
  sin: jax.Array
  cos: jax.Array


def rope_table(n: int, head_dim: int, theta: float) -> RopeTable:
  """Computed once into memory: XLA:CPU otherwise fuses the sin and cos into every q and k
  rotation of every layer, one pair per element (a reduction is never duplicated into its
  consumers, so the table goes through an exact one: the max of two copies of itself)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = jnp.arange(n, dtype=jnp.float32)[:, None] * inv_freq
  return RopeTable(*(jnp.max(jnp.stack([t, t]), axis=0) for t in (jnp.sin(angles), jnp.cos(angles))))


def _rope_at(table: RopeTable, pos_BL):
  """(sin, cos) [B, L, 1, H/2] of each position, read from the table."""
  return tuple(jnp.take(t, pos_BL, axis=0)[:, :, None, :] for t in table)


def _rope(x_BLNH, sin, cos):
  x = x_BLNH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BLNH.dtype)


def _attend_one(q_BNH, k_RHS, v_RHS, valid_BS):
  """GQA attention of one query per row over the decode loop's cache ([B*K, H, S], see
  `merge_heads`). Both products read a head's [H, S] block in place as the right operand of a
  vector-matrix product, ~15% faster on CPU than over [S, H] rows (the products are
  single-threaded and memory-bound)."""
  B, N, H = q_BNH.shape
  K = k_RHS.shape[0] // B
  q = q_BNH.reshape(B * K, N // K, H)
  s = jnp.einsum("rgh,rhs->rgs", q, k_RHS, preferred_element_type=jnp.float32) * H ** -0.5
  s = jnp.where(jnp.repeat(valid_BS, K, axis=0)[:, None, :], s, _NEG)
  p = jax.nn.softmax(s, axis=-1).astype(v_RHS.dtype)
  return jnp.einsum("rhs,rgs->rgh", v_RHS, p).reshape(B, N, H)


def merge_heads(cache: list[LayerCache]) -> list[LayerCache]:
  """The slot-minor cache [B, K, H, S] as the decode loop carries it, [B*K, H, S]: with the
  4-D carry, XLA:CPU copied every layer's K and V each step at batch 1 (the dot reads the
  in-place update through a bitcast that drops the size-1 batch dim; ~1.6x slower there)."""
  return [LayerCache(*(a.reshape(-1, *a.shape[2:]) for a in c)) for c in cache]


def split_heads(cache: list[LayerCache], batch: int) -> list[LayerCache]:
  """`merge_heads` undone."""
  return [LayerCache(*(a.reshape(batch, -1, *a.shape[1:]) for a in c)) for c in cache]


def _attend(q_BLNH, k_BKPH, v_BKPH, mask_BLP):
  """GQA attention of L queries over P slots (the model's `cached_attention` math)."""
  B, L, N, H = q_BLNH.shape
  K = k_BKPH.shape[1]
  q = q_BLNH.reshape(B, L, K, N // K, H)
  s = jnp.einsum("blkgh,bkph->bkglp", q, k_BKPH, preferred_element_type=jnp.float32) * H ** -0.5
  s = jnp.where(mask_BLP[:, None, None], s, _NEG)
  p = jax.nn.softmax(s, axis=-1).astype(v_BKPH.dtype)
  return jnp.einsum("bkglp,bkph->blkgh", p, v_BKPH).reshape(B, L, N, H)


class FusedWeights(NamedTuple):
  """A layer's q/k/v kernels as one [D, (N + 2K) H] matrix (and bias) and gate/up as one
  [D, 2F] matrix: one matmul each instead of three and two, built once per jitted call."""
  qkv: jax.Array
  qkv_bias: jax.Array | None
  gate_up: jax.Array


def lm_head(model) -> jax.Array:
  """The [D, V] output matrix, stored as such: with tied embeddings the decode loop otherwise
  multiplies by the transposed [V, D] table every step (~25% slower at batch 16 on CPU)."""
  dt = model.cfg.jnp_dtype
  if model.lm_head is None:
    return jnp.transpose(model.model.embed_tokens[...].astype(dt))
  return model.lm_head[...].astype(dt)


def decode_weights(model) -> tuple[list[FusedWeights] | None, jax.Array | None]:
  """(fused layer weights, [D, V] head) for `step_forward`, built once per decode call outside
  the loop; on CPU only, where they save per-op overhead and a transposed read per step. They
  are copies of the weights (for a 0.5B model, ~1.5 GB in fp32): accelerators, whose compilers
  fuse and lay out these matmuls themselves, read the model's own weights (None, None)."""
  if jax.default_backend() != "cpu":
    return None, None
  return fuse_weights(model), lm_head(model)


def logits(head_DV, hidden_BD):
  """The model's `logits` for one position per row: fp32 [B, V]."""
  return jnp.matmul(hidden_BD.astype(head_DV.dtype), head_DV, preferred_element_type=jnp.float32)


def fuse_weights(model) -> list[FusedWeights]:
  dt = model.cfg.jnp_dtype
  out = []
  for block in model.model.layers:
    att, mlp = block.self_attn, block.mlp
    D = att.q_proj.kernel.shape[0]
    projs = (att.q_proj, att.k_proj, att.v_proj)
    qkv = jnp.concatenate([p.kernel[...].astype(dt).reshape(D, -1) for p in projs], axis=1)
    bias = None if att.q_proj.bias is None else jnp.concatenate([p.bias[...].astype(dt).reshape(-1) for p in projs])
    gate_up = jnp.concatenate([mlp.gate_proj.kernel[...].astype(dt), mlp.up_proj.kernel[...].astype(dt)], axis=1)
    out.append(FusedWeights(qkv, bias, gate_up))
  return out


def _qkv(block, w: FusedWeights | None, h_BLD):
  """q [B, L, N, H], k and v [B, L, K, H] from one matmul (`w` None: the model's three)."""
  att = block.self_attn
  cfg = att.cfg
  if w is None:
    return att.q_proj(h_BLD, cfg.jnp_dtype), att.k_proj(h_BLD, cfg.jnp_dtype), att.v_proj(h_BLD, cfg.jnp_dtype)
  B, L, D = h_BLD.shape
  N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  y = h_BLD.reshape(B * L, D) @ w.qkv
  if w.qkv_bias is not None:
    y = y + w.qkv_bias
  y = y.reshape(B, L, N + 2 * K, H)
  return y[:, :, :N], y[:, :, N:N + K], y[:, :, N + K:]


def _mlp(block, w: FusedWeights | None, x_BLD, dt):
  """The model's MLP (silu(gate) * up, then down) with gate and up in one matmul (`w` None: the
  model's own)."""
  if w is None:
    return block.mlp(x_BLD)
  B, L, D = x_BLD.shape
  gu = x_BLD.reshape(B * L, D).astype(dt) @ w.gate_up
  g, u = jnp.split(gu, 2, axis=-1)
  return block.mlp.down_proj((jax.nn.silu(g) * u).reshape(B, L, -1), dt)


def prefill_forward(model, tokens_BL, pos_BL, mask_BLP, prefix: list[LayerCache] | None, cache_len: int):
  """The model's cached forward of L new tokens per row on top of `prefix` (A cached slots per
  row; None: A = 0), for a sampler: mask_BLP covers the P = A + L filled slots, so attention
  skips the empty slots the decode will fill, and the last layer computes attention and MLP
  for the last position only. `prefix` is [B, K, A, H]. Returns ([B, V] fp32 logits of the
  last position, slot-minor cache [B, K, H, cache_len] with slots [0, P) filled)."""
  cfg, dt, tr = model.cfg, model.cfg.jnp_dtype, model.model
  x = jnp.take(tr.embed_tokens[...], tokens_BL, axis=0).astype(dt)  # [B, L, D]
  sin, cos = _rope_at(rope_table(mask_BLP.shape[-1], cfg.head_dim, cfg.rope_theta), pos_BL)  # positions < P
  n = len(tr.layers)
  cache = []
  for i, block in enumerate(tr.layers):
    att = block.self_attn
    h = block.input_layernorm(x)
    q, k, v = att.q_proj(h, dt), att.k_proj(h, dt), att.v_proj(h, dt)
    k, v = _rope(k, sin, cos).swapaxes(1, 2), v.swapaxes(1, 2)  # [B, K, L, H]
    if prefix is not None:
      k = jnp.concatenate([prefix[i].k, k.astype(prefix[i].k.dtype)], axis=2)
      v = jnp.concatenate([prefix[i].v, v.astype(prefix[i].v.dtype)], axis=2)
    if i == n - 1:  # only the last position's hidden state reaches the logits
      x, q, sin, cos, mask_BLP = x[:, -1:], q[:, -1:], sin[:, -1:], cos[:, -1:], mask_BLP[:, -1:]
    q = _rope(q, sin, cos)
    x = x + att.o_proj(_attend(q, k.astype(dt), v.astype(dt), mask_BLP), dt)
    x = x + block.mlp(block.post_attention_layernorm(x))
    tail = ((0, 0), (0, 0), (0, 0), (0, cache_len - k.shape[2]))
    cache.append(LayerCache(jnp.pad(k.swapaxes(2, 3), tail), jnp.pad(v.swapaxes(2, 3), tail)))
  return model.logits(tr.norm(x))[:, 0], cache


def step_forward(model, weights: list[FusedWeights] | None, head_DV: jax.Array | None, rope: RopeTable, tok_B, pos_B,
                 cache, slot, valid_BS):
  """`model(tok[:, None], pos[:, None], valid[:, None], cache, slot)` for one token per row, on
  the slot-minor cache with merged heads ([B*K, H, S]: `merge_heads` of `prefill_forward`'s):
  the same layers and numerics, with RoPE read from `rope` (a table of >= S positions, built
  outside the decode loop), the weights of `decode_weights` (fused q/k/v and gate/up matmuls,
  a [D, V] head) and the cache updated and read in place. Returns ([B, V] fp32 logits, cache)."""
  dt, tr = model.cfg.jnp_dtype, model.model
  x = jnp.take(tr.embed_tokens[...], tok_B, axis=0).astype(dt)[:, None]  # [B, 1, D]
  sin, cos = _rope_at(rope, pos_B[:, None])
  new_cache = []
  for i, (block, layer) in enumerate(zip(tr.layers, cache)):
    w = None if weights is None else weights[i]
    q, k, v = _qkv(block, w, block.input_layernorm(x).astype(dt))
    q, k = _rope(q, sin, cos), _rope(k, sin, cos)
    k, v = (a[:, 0].reshape(-1, a.shape[-1], 1) for a in (k, v))  # [B*K, H, 1]
    kc = jax.lax.dynamic_update_slice(layer.k, k.astype(layer.k.dtype), (0, 0, slot))
    vc = jax.lax.dynamic_update_slice(layer.v, v.astype(layer.v.dtype), (0, 0, slot))
    out = _attend_one(q[:, 0], kc.astype(dt), vc.astype(dt), valid_BS)
    x = x + block.self_attn.o_proj(out[:, None], dt)
    x = x + _mlp(block, w, block.post_attention_layernorm(x), dt)
    new_cache.append(LayerCache(kc, vc))
  hidden = tr.norm(x)
  return (model.logits(hidden)[:, 0] if head_DV is None else logits(head_DV, hidden[:, 0])), new_cache
