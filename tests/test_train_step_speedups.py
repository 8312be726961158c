"""The train step's restructured pieces against their plain formulas, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autotraj_jax.models import causal_mask, get_preset, init_model, merge
from autotraj_jax.models.decoder import (
  RopeTables,
  apply_rope,
  materialize,
  matmul_nd,
  rope,
  rope_tables,
  shared_rope_tables,
)
from autotraj_jax.training.losses import chunked_token_stats, sft_loss, token_logprobs


def _normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _rope_reference(x_BLNH, positions_BL, theta):
  """RoPE as first written: half-width tables, each half rotated and concatenated."""
  H = x_BLNH.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
  angles = positions_BL.astype(jnp.float32)[..., None] * inv_freq
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x_BLNH, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@pytest.mark.parametrize("n_in,shape_x,shape_k", [(1, (2, 5, 8), (8, 3, 4)), (2, (2, 5, 3, 4), (3, 4, 8)),
                                                  (1, (2, 5, 8), (8, 6))])
def test_matmul_nd_is_tensordot_with_same_gradients(n_in, shape_x, shape_k):
  x, k = _normal(0, shape_x), _normal(1, shape_k)
  np.testing.assert_allclose(matmul_nd(x, k, n_in), jnp.tensordot(x, k, axes=n_in), rtol=1e-5, atol=1e-5)
  cot = _normal(2, jnp.tensordot(x, k, axes=n_in).shape)

  def grads(f):
    return jax.grad(lambda x, k: jnp.sum(f(x, k) * cot), argnums=(0, 1))(x, k)
  for a, b in zip(grads(lambda x, k: matmul_nd(x, k, n_in)), grads(lambda x, k: jnp.tensordot(x, k, axes=n_in))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_rope_tables_match_the_half_split_formula():
  x = _normal(0, (2, 6, 3, 8))
  positions = jnp.array([[0, 1, 2, 3, 4, 5], [7, 3, 0, 0, 100, 4096]])
  ref = _rope_reference(x, positions, 10000.0)
  np.testing.assert_allclose(rope(x, positions, 10000.0), ref, rtol=1e-6, atol=1e-6)
  tables = rope_tables(positions, 8, 10000.0)
  assert isinstance(tables, RopeTables) and tables.cos.shape == (2, 6, 1, 8)
  np.testing.assert_allclose(apply_rope(x, tables), ref, rtol=1e-6, atol=1e-6)
  cot = _normal(3, x.shape)
  g_new = jax.grad(lambda x: jnp.sum(apply_rope(x, tables) * cot))(x)
  g_ref = jax.grad(lambda x: jnp.sum(_rope_reference(x, positions, 10000.0) * cot))(x)
  np.testing.assert_allclose(g_new, g_ref, rtol=1e-6, atol=1e-6)
  # Position 0 is the identity rotation.
  np.testing.assert_array_equal(apply_rope(x, tables)[1, 2], x[1, 2])


def test_shared_tables_are_the_plain_ones_exactly():
  cfg = get_preset("tiny")
  positions = jnp.array([[0, 1, 2, 5], [3, 3, 9, 0]])
  for a, b in zip(shared_rope_tables(cfg, positions), rope_tables(positions, cfg.head_dim, cfg.rope_theta)):
    np.testing.assert_array_equal(a, b)
  x = jnp.array([[-0.0, 1.5, -jnp.inf], [jnp.nan, 3.0, 1e-30]])
  np.testing.assert_array_equal(materialize(x), x)
  assert jax.jit(materialize)(x).shape == x.shape


def test_token_logprobs_match_log_softmax_gather_with_same_gradients():
  logits = 4.0 * _normal(0, (3, 5, 11))
  targets = jax.random.randint(jax.random.key(1), (3, 5), 0, 11)

  def reference(lg):
    return jnp.take_along_axis(jax.nn.log_softmax(lg, axis=-1), targets[..., None], axis=-1)[..., 0]
  np.testing.assert_allclose(token_logprobs(logits, targets), reference(logits), rtol=1e-5, atol=1e-5)
  cot = _normal(2, targets.shape)
  g_new = jax.grad(lambda lg: jnp.sum(token_logprobs(lg, targets) * cot))(logits)
  g_ref = jax.grad(lambda lg: jnp.sum(reference(lg) * cot))(logits)
  np.testing.assert_allclose(g_new, g_ref, rtol=1e-5, atol=1e-6)
  # bf16 logits get a bf16 gradient, equal to the reference's up to bf16 rounding.
  lg16 = logits.astype(jnp.bfloat16)
  g16 = jax.jit(jax.grad(lambda lg: jnp.sum(token_logprobs(lg, targets) * cot)))(lg16)
  assert g16.dtype == jnp.bfloat16
  np.testing.assert_allclose(g16.astype(jnp.float32), jax.grad(lambda lg: jnp.sum(reference(lg) * cot))(
      lg16.astype(jnp.float32)), atol=2e-2)
  # Extreme logits stay finite and exact: a dominant target has log p = 0.
  big = jnp.zeros((1, 1, 4)).at[0, 0, 2].set(1e4)
  np.testing.assert_allclose(token_logprobs(big, jnp.array([[2]])), [[0.0]], atol=1e-6)
  assert np.isfinite(np.asarray(token_logprobs(big, jnp.array([[0]])))).all()


def test_chunked_stats_match_full_logits_with_entropy():
  h, w = _normal(0, (2, 7, 6)), _normal(1, (6, 13))
  targets = jax.random.randint(jax.random.key(2), (2, 7), 0, 13)
  logits = jnp.einsum("bld,dv->blv", h, w)
  lp, ent = chunked_token_stats(h, targets, lambda x: jnp.einsum("bld,dv->blv", x, w), 3, entropy=True)
  np.testing.assert_allclose(lp, token_logprobs(logits, targets), rtol=1e-5, atol=1e-5)
  p = jax.nn.softmax(logits, axis=-1)
  np.testing.assert_allclose(ent, -jnp.sum(p * jax.nn.log_softmax(logits, axis=-1), axis=-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_model_logits_and_gradients_match_einsum_head(tie):
  cfg = get_preset("tiny", tie_embeddings=tie)
  graphdef, params = init_model(cfg, seed=3)
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, cfg.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
  mask = causal_mask(jnp.arange(9)[None] < jnp.array([[9], [6]]))
  targets = jnp.roll(tokens, -1, axis=1)
  loss_mask = jnp.ones((2, 9))

  def head(model, hidden):
    w = model.model.embed_tokens[...] if tie else model.lm_head[...].T
    return jnp.einsum("bld,vd->blv", hidden, w)

  def loss(p, reference):
    model = merge(graphdef, p)
    hidden, _ = model.model(tokens, pos, mask)
    logits = head(model, hidden) if reference else model.logits(hidden)
    return sft_loss(logits, targets, loss_mask)[0]
  np.testing.assert_allclose(loss(params, False), loss(params, True), rtol=1e-5)
  g_new, g_ref = jax.grad(loss)(params, False), jax.grad(loss)(params, True)
  for a, b in zip(jax.tree.leaves(g_new), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
