"""Qwen2/Llama decoder in Flax NNX.

Parameter names mirror the HF checkpoints (`layers[i].self_attn.q_proj`, ...) so the
import/export key map is one line per tensor. Kernels keep the head axis explicit
(`[embed, heads, head_dim]`) so tensor parallelism shards heads by name.

Shapes: B batch, L query length, S key length (cache slots), D model width,
N query heads, K kv heads, H head dim, F MLP width, V vocab.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from autotraj_jax.models.config import ModelConfig, remat_name
from autotraj_jax.sharding import BATCH_AXES


class LayerCache(NamedTuple):
  # Heads before slots: a decode step then reads each head's keys as one contiguous [S, H]
  # matrix (with [B, S, K, H], XLA on CPU transposes the whole cache every step).
  k: jax.Array  # [B, K, S, H]
  v: jax.Array  # [B, K, S, H]


Cache = list[LayerCache]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> Cache:
  """Zeroed KV cache with `max_len` slots per sequence."""
  dtype = dtype or cfg.jnp_dtype
  shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
  return [LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers)]


def causal_mask(valid_BL: jax.Array) -> jax.Array:
  """[B, L, L] mask: query i attends to key j iff j <= i and key j is not padding."""
  L = valid_BL.shape[-1]
  causal = jnp.tril(jnp.ones((L, L), dtype=bool))
  return causal[None] & valid_BL[:, None, :].astype(bool)


def shard_batch(x: jax.Array) -> jax.Array:
  """Pin an activation's batch axis to the mesh's data axes when a mesh is set (`jax.set_mesh`).

  Under FSDP the params and the batch both split over `fsdp`; without this hint the SPMD
  partitioner may all-gather the activations (the whole global batch) instead of the weights.
  No mesh in context (tests, the engine, single-device runs): returns `x` untouched.
  """
  mesh = jax.sharding.get_abstract_mesh()
  axes = tuple(a for a in BATCH_AXES if not mesh.empty and a in mesh.axis_names)
  if not axes:
    return x
  parts = 1
  for a in axes:
    parts *= mesh.shape[a]
  if parts == 1 or x.shape[0] % parts:
    return x
  return jax.lax.with_sharding_constraint(x, P(axes, *([None] * (x.ndim - 1))))


def _normal(rngs: nnx.Rngs, shape, dtype, std: float = 0.02):
  return nnx.Param(jax.random.normal(rngs.params(), shape, jnp.float32).astype(dtype) * std)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, param_dtype):
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.weight[...].astype(jnp.float32)).astype(x.dtype)


class RopeTables(NamedTuple):
  """cos and sin of each position's rotary angles, [B, L, 1, H] fp32 (each half-split angle
  repeated for both halves, as HF builds them): computed once per forward and shared by q and
  k of every layer."""
  cos: jax.Array
  sin: jax.Array


def rope_tables(positions_BL: jax.Array, head_dim: int, theta: float) -> RopeTables:
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions_BL.astype(jnp.float32)[..., None, None] * inv_freq  # [B, L, 1, H/2]
  angles = jnp.concatenate([angles, angles], axis=-1)
  return RopeTables(jnp.cos(angles), jnp.sin(angles))


def apply_rope(x_BLNH: jax.Array, tables: RopeTables) -> jax.Array:
  """Rotary embedding, half-split layout (HF `x * cos + rotate_half(x) * sin`), in fp32."""
  x = x_BLNH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = x * tables.cos + jnp.concatenate([-x2, x1], axis=-1) * tables.sin
  return out.astype(x_BLNH.dtype)


def rope(x_BLNH: jax.Array, positions_BL: jax.Array, theta: float) -> jax.Array:
  """`apply_rope` with tables for these positions (one-off use; the model shares its tables)."""
  return apply_rope(x_BLNH, rope_tables(positions_BL, x_BLNH.shape[-1], theta))


class Projection(nnx.Module):
  """Dense layer with an arbitrary kernel shape `in_shape + out_shape`."""

  def __init__(self, in_dims: tuple[int, ...], out_dims: tuple[int, ...], *, bias: bool,
               param_dtype, rngs: nnx.Rngs):
    self.kernel = _normal(rngs, in_dims + out_dims, param_dtype)
    self.bias = nnx.Param(jnp.zeros(out_dims, param_dtype)) if bias else None
    self._n_in = len(in_dims)

  def __call__(self, x, dtype):
    y = matmul_nd(x.astype(dtype), self.kernel[...].astype(dtype), self._n_in)
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y


def matmul_nd(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
  """`tensordot(x, kernel, n_in)` as one [tokens, in] @ [in, out] matmul.

  The reshapes are free (row-major bitcasts); with the leading axes flattened, the backward
  dots are plain matrix products too, where XLA:CPU otherwise transposes activations to feed them.
  """
  in_dims, out_dims = kernel.shape[:n_in], kernel.shape[n_in:]
  lead = x.shape[:x.ndim - n_in]
  fan_in = math.prod(in_dims)
  y = x.reshape(-1, fan_in) @ kernel.reshape(fan_in, -1)
  return y.reshape(*lead, *out_dims)


def shared_rope_tables(cfg: ModelConfig, positions_BL: jax.Array) -> RopeTables:
  """The RoPE tables of one forward, built once for all layers (`materialize`d)."""
  return RopeTables(*(materialize(t) for t in rope_tables(positions_BL, cfg.head_dim, cfg.rope_theta)))


def materialize(x: jax.Array) -> jax.Array:
  """`x`, computed once into memory rather than inside each consumer.

  XLA fuses cheap-looking producers into every consumer; for the RoPE tables that means a sin
  and a cos per element of q and k, in every layer, forward and backward (3x the cost of the
  rope itself on CPU). A reduction is never duplicated into its consumers, so `x` goes through
  an exact one: the max of two copies of itself. (`optimization_barrier` does not stop fusion
  on CPU.)
  """
  return jnp.max(jnp.stack([x, x]), axis=0)


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    D, N, K, H, pd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.jnp_param_dtype
    self.q_proj = Projection((D,), (N, H), bias=cfg.qkv_bias, param_dtype=pd, rngs=rngs)
    self.k_proj = Projection((D,), (K, H), bias=cfg.qkv_bias, param_dtype=pd, rngs=rngs)
    self.v_proj = Projection((D,), (K, H), bias=cfg.qkv_bias, param_dtype=pd, rngs=rngs)
    self.o_proj = Projection((N, H), (D,), bias=False, param_dtype=pd, rngs=rngs)
    self.cfg = cfg

  def __call__(self, x_BLD, positions_BL, mask_BLS, cache: LayerCache | None, cache_index,
               rope_BL: RopeTables | None = None):
    """`rope_BL`: the tables for `positions_BL` when the caller shares them across layers."""
    cfg, dt = self.cfg, self.cfg.jnp_dtype
    if rope_BL is None:
      rope_BL = rope_tables(positions_BL, cfg.head_dim, cfg.rope_theta)
    q = apply_rope(self.q_proj(x_BLD, dt), rope_BL)
    k = apply_rope(self.k_proj(x_BLD, dt), rope_BL)
    v = self.v_proj(x_BLD, dt)
    if cache is None:
      # GQA, fp32 softmax; XLA on CPU/TPU, cuDNN flash attention where available.
      out = jax.nn.dot_product_attention(q, k, v, mask=mask_BLS[:, None], implementation=cfg.attention_impl)
      return self.o_proj(out, dt), None
    start = (0, 0, cache_index, 0)
    k = jax.lax.dynamic_update_slice(cache.k, k.swapaxes(1, 2).astype(cache.k.dtype), start)
    v = jax.lax.dynamic_update_slice(cache.v, v.swapaxes(1, 2).astype(cache.v.dtype), start)
    out = cached_attention(q, k.astype(dt), v.astype(dt), mask_BLS)
    return self.o_proj(out, dt), LayerCache(k, v)


def cached_attention(q_BLNH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array, mask_BLS: jax.Array) -> jax.Array:
  """GQA attention over a slot-major KV cache (query head n reads kv head n // (N / K)), fp32
  softmax, masked by slot; the same function as `jax.nn.dot_product_attention` on [B, S, K, H]."""
  B, L, N, H = q_BLNH.shape
  K = k_BKSH.shape[1]
  q = q_BLNH.reshape(B, L, K, N // K, H)
  s = jnp.einsum("blkgh,bksh->bkgls", q, k_BKSH, preferred_element_type=jnp.float32) * H ** -0.5
  s = jnp.where(mask_BLS[:, None, None], s, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(s, axis=-1).astype(v_BKSH.dtype)
  out = jnp.einsum("bkgls,bksh->blkgh", p, v_BKSH)
  return out.reshape(B, L, N, H)


class MLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    D, F, pd = cfg.hidden_size, cfg.intermediate_size, cfg.jnp_param_dtype
    self.gate_proj = Projection((D,), (F,), bias=False, param_dtype=pd, rngs=rngs)
    self.up_proj = Projection((D,), (F,), bias=False, param_dtype=pd, rngs=rngs)
    self.down_proj = Projection((F,), (D,), bias=False, param_dtype=pd, rngs=rngs)
    self.dtype = cfg.jnp_dtype

  def __call__(self, x):
    h = jax.nn.silu(self.gate_proj(x, self.dtype)) * self.up_proj(x, self.dtype)
    return self.down_proj(h, self.dtype)


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    pd = cfg.jnp_param_dtype
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
    self.self_attn = Attention(cfg, rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, positions, mask, cache, cache_index, rope: RopeTables | None = None):
    h, cache = self.self_attn(self.input_layernorm(x), positions, mask, cache, cache_index, rope)
    x = x + h
    x = x + self.mlp(self.post_attention_layernorm(x))
    return x, cache


def _block_call(block: Block, x, positions, mask, cache, cache_index, rope):
  return block(x, positions, mask, cache, cache_index, rope)


def remat_block_call(remat: bool | str):
  """The block call for a remat policy: 'none' keeps every activation for the backward pass,
  'full' only each block's input (recomputing the block), 'dots' also the matmul outputs
  without batch dims (recomputes only the cheap elementwise ops and attention softmax)."""
  name = remat_name(remat)
  if name == "none":
    return _block_call
  if name == "full":
    return nnx.remat(_block_call)
  return nnx.remat(_block_call, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)


class Transformer(nnx.Module):
  """Embedding, decoder blocks and the final norm: tokens -> hidden states."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed_tokens = nnx.Param(
        jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size)).astype(cfg.jnp_param_dtype) * 0.02)
    self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_param_dtype)

  def __call__(self, tokens_BL, positions_BL, mask_BLS, cache: Cache | None = None,
               cache_index=0) -> tuple[jax.Array, Cache | None]:
    x = shard_batch(jnp.take(self.embed_tokens[...], tokens_BL, axis=0).astype(self.cfg.jnp_dtype))
    call = remat_block_call(self.cfg.remat)
    rope = shared_rope_tables(self.cfg, positions_BL)
    new_cache = [] if cache is not None else None
    for i, block in enumerate(self.layers):
      x, layer_cache = call(block, x, positions_BL, mask_BLS,
                            None if cache is None else cache[i], cache_index, rope)
      x = shard_batch(x)
      if cache is not None:
        new_cache.append(layer_cache)
    return self.norm(x), new_cache


class CausalLM(nnx.Module):
  """Decoder with a language-model head; logits are fp32."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.model = Transformer(cfg, rngs)
    self.lm_head = None if cfg.tie_embeddings else _normal(
        rngs, (cfg.hidden_size, cfg.vocab_size), cfg.jnp_param_dtype)

  def __call__(self, tokens_BL, positions_BL, mask_BLS, cache: Cache | None = None,
               cache_index=0) -> tuple[jax.Array, Cache | None]:
    hidden, cache = self.model(tokens_BL, positions_BL, mask_BLS, cache, cache_index)
    return self.logits(hidden), cache

  def logits(self, hidden_BLD):
    # As [tokens, D] @ [D, V]: with the [B, L] axes flattened, XLA:CPU feeds the backward dots
    # without transposing the [tokens, V] logit gradient (the largest array of the step).
    dt = self.cfg.jnp_dtype
    h = hidden_BLD.astype(dt)
    if self.lm_head is None:
      w = self.model.embed_tokens[...].astype(dt).T
    else:
      w = self.lm_head[...].astype(dt)
    logits = jnp.matmul(h.reshape(-1, h.shape[-1]), w, preferred_element_type=jnp.float32)
    return shard_batch(logits.reshape(*h.shape[:-1], w.shape[-1]))


class ScalarModel(nnx.Module):
  """Decoder with a scalar head (value / reward): one fp32 number per position."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.model = Transformer(cfg, rngs)
    self.score = nnx.Param(jnp.zeros((cfg.hidden_size,), cfg.jnp_param_dtype))

  def __call__(self, tokens_BL, positions_BL, mask_BLS) -> jax.Array:
    hidden, _ = self.model(tokens_BL, positions_BL, mask_BLS)
    return jnp.einsum("bld,d->bl", hidden.astype(jnp.float32), self.score[...].astype(jnp.float32))


def gather_last(values_BL: jax.Array, index_B: jax.Array) -> jax.Array:
  """values[b, index[b]]: the scalar head read at a given position (e.g. the last token)."""
  return jnp.take_along_axis(values_BL, index_B[:, None].astype(jnp.int32), axis=1)[:, 0]
