"""The engine's own prefill and decode step (autotraj_jax/engine/decode_step.py) compute what the
model's cached forward computes: the same last-position logits and the same KV, in the engine's
slot-minor cache layout, with and without a cached prefix; and the sampler's max/argmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autotraj_jax.engine.decode_step import (
  fuse_weights,
  lm_head,
  merge_heads,
  prefill_forward,
  rope_table,
  step_forward,
)
from autotraj_jax.engine.sampling import max_argmax
from autotraj_jax.models import get_preset, init_cache, init_model, merge

B, A, L, T = 3, 8, 6, 4  # rows, cached prefix slots, new prompt slots, decode steps
S = A + L + T


@pytest.fixture(scope="module")
def model():
  # GQA (4 query heads on 2 kv heads), q/k/v biases, untied head: every branch of the step.
  cfg = get_preset("tiny", tie_embeddings=False)
  graphdef, params = init_model(cfg, seed=3)
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape, x.dtype), params)
  return merge(graphdef, params)


def _inputs():
  """Rows with different cached lengths and left padding: row b caches cached[b] tokens, right
  aligned to slot A, then its new tokens end at slot A + L."""
  rng = np.random.default_rng(0)
  cached = np.array([A, 3, 0])
  new_valid = np.ones((B, L), bool)
  new_valid[1, :2] = False
  slots = np.arange(S)
  slot_valid = ((slots >= A - cached[:, None]) & (slots < A)) | np.pad(new_valid, ((0, 0), (A, T)))
  slot_valid[:, A + L:] = True  # the decoded tokens
  positions = np.cumsum(slot_valid, axis=1) - 1
  tokens = rng.integers(1, 500, (B, S))
  return jnp.asarray(tokens), jnp.asarray(np.maximum(positions, 0)), jnp.asarray(slot_valid)


def _model_forward(model, tokens, positions, slot_valid, upto: int):
  """The model's cached forward of slots [0, upto) in one call: (logits, cache [B, K, S, H])."""
  mask = slot_valid[:, None, :] & (jnp.arange(S)[None, :] <= jnp.arange(upto)[:, None])[None]
  cache = init_cache(model.cfg, B, S)
  return model(tokens[:, :upto], positions[:, :upto], mask[:, :upto], cache, 0)


def test_prefill_then_steps_match_the_model(model):
  tokens, positions, slot_valid = _inputs()
  ref_logits, ref_cache = _model_forward(model, tokens, positions, slot_valid, A + L)
  prefix = [type(c)(c.k[:, :, :A], c.v[:, :, :A]) for c in ref_cache]  # the model's KV of the prefix
  P = A + L
  mask = slot_valid[:, None, :P] & (jnp.arange(P)[None, :] <= A + jnp.arange(L)[:, None])[None]
  for pre in (None, prefix):
    if pre is None:  # no prefix: the "new" tokens are all P slots
      toks, pos, m = tokens[:, :P], positions[:, :P], slot_valid[:, None, :P] & jnp.tril(jnp.ones((P, P), bool))[None]
    else:
      toks, pos, m = tokens[:, A:P], positions[:, A:P], mask
    logits, cache = prefill_forward(model, toks, pos, m, pre, S)
    np.testing.assert_allclose(logits, ref_logits[:, -1], atol=2e-5, rtol=1e-5)
    for got, want in zip(cache, ref_cache):
      valid = np.asarray(slot_valid[:, None, None, :P])
      for g, w in ((got.k, want.k), (got.v, want.v)):
        assert g.shape == (B, model.cfg.num_kv_heads, model.cfg.head_dim, S)  # slot-minor
        np.testing.assert_allclose(np.where(valid, g[..., :P], 0), np.where(valid, w.swapaxes(2, 3)[..., :P], 0),
                                   atol=2e-5, rtol=1e-5)
  # Decode T tokens one at a time and compare with the model's forward over every slot so far,
  # with the CPU's fused weights and [D, V] head and with the model's own (accelerators).
  rope = rope_table(S, model.cfg.head_dim, model.cfg.rope_theta)
  for weights, head in ((fuse_weights(model), lm_head(model)), (None, None)):
    valid_now, state = slot_valid.at[:, P:].set(False), merge_heads(cache)
    for t in range(T):
      slot = P + t
      valid_now = valid_now.at[:, slot].set(True)
      logits, state = step_forward(model, weights, head, rope, tokens[:, slot], positions[:, slot], state,
                                   jnp.int32(slot), valid_now)
      want, _ = _model_forward(model, tokens, positions, slot_valid, slot + 1)
      np.testing.assert_allclose(logits, want[:, -1], atol=2e-5, rtol=1e-5)


def test_max_argmax_is_the_first_maximum():
  rng = np.random.default_rng(0)
  x = rng.integers(-3, 4, (64, 300)).astype(np.float32)  # many ties
  x[5] = -np.inf
  x[6, 17] = np.inf
  m, i = max_argmax(jnp.asarray(x))
  np.testing.assert_array_equal(i, np.argmax(x, axis=1))
  np.testing.assert_array_equal(m, np.max(x, axis=1))
  _, i_nan = max_argmax(jnp.asarray(np.full((1, 8), np.nan, np.float32)))
  assert 0 <= int(i_nan[0]) < 8
