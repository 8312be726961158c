import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autotraj_jax.training.rl.advantages import gae, masked_whiten
from autotraj_jax.training.rl.losses import value_loss

gae_jit = jax.jit(gae, static_argnames=("gamma", "lam"))


def reference_gae(rewards, values, gamma, lam):
  """Textbook GAE on one plain sequence (every step is a decision), terminal after the end."""
  T = len(rewards)
  adv = np.zeros(T)
  last = 0.0
  for t in reversed(range(T)):
    next_value = values[t + 1] if t + 1 < T else 0.0
    delta = rewards[t] + gamma * next_value - values[t]
    last = delta + gamma * lam * last
    adv[t] = last
  return adv, adv + values


def compressed_reference(rewards, values, mask, gamma, lam):
  """Reference GAE on the model tokens only, scattered back; 0 elsewhere."""
  adv, ret = np.zeros_like(rewards), np.zeros_like(rewards)
  for b in range(rewards.shape[0]):
    idx = np.flatnonzero(mask[b])
    a, r = reference_gae(rewards[b, idx], values[b, idx], gamma, lam)
    adv[b, idx], ret[b, idx] = a, r
  return adv, ret


def tool_use_batch(seed, B=4, L=16):
  """prompt (0) | model (1) | tool result (0) | model (1) | padding (0), random lengths."""
  rng = np.random.default_rng(seed)
  mask = np.zeros((B, L), np.float32)
  rewards = np.zeros((B, L), np.float32)
  for b in range(B):
    pos = 0
    for length, m in ((rng.integers(1, 3), 0), (rng.integers(1, 4), 1), (rng.integers(0, 4), 0),
                      (rng.integers(1, 4), 1), (rng.integers(0, 3), 0), (rng.integers(1, 3), 1)):
      mask[b, pos:pos + length] = m
      pos += length
    last = np.flatnonzero(mask[b])[-1]
    rewards[b, last] = rng.choice([-1.0, 0.0, 1.0, 0.7])
  rewards += (rng.random((B, L)) < 0.2) * mask * rng.normal(size=(B, L)).astype(np.float32) * 0.1
  values = rng.normal(size=(B, L)).astype(np.float32)
  return rewards, values, mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_matches_reference_on_compressed_sequence(gamma, lam):
  rewards, values, mask = tool_use_batch(0)
  adv, ret = gae_jit(rewards, values, mask, gamma=gamma, lam=lam)
  want_adv, want_ret = compressed_reference(rewards, values, mask, gamma, lam)
  np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-6)


def test_all_model_tokens_is_plain_gae():
  rng = np.random.default_rng(1)
  rewards = rng.normal(size=(2, 9)).astype(np.float32)
  values = rng.normal(size=(2, 9)).astype(np.float32)
  adv, ret = gae_jit(rewards, values, np.ones((2, 9)), gamma=0.97, lam=0.9)
  for b in range(2):
    a, r = reference_gae(rewards[b], values[b], 0.97, 0.9)
    np.testing.assert_allclose(adv[b], a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret[b], r, rtol=1e-5, atol=1e-6)


def test_tool_tokens_are_transparent():
  rewards, values, mask = tool_use_batch(2)
  adv, ret = gae_jit(rewards, values, mask, gamma=0.95, lam=0.9)
  rng = np.random.default_rng(3)
  junk_values = np.where(mask, values, rng.normal(size=values.shape) * 100).astype(np.float32)
  junk_rewards = np.where(mask, rewards, rng.normal(size=values.shape) * 100).astype(np.float32)
  adv2, ret2 = gae_jit(junk_rewards, junk_values, mask, gamma=0.95, lam=0.9)
  np.testing.assert_array_equal(adv2, adv)
  np.testing.assert_array_equal(ret2, ret)
  assert np.all(np.asarray(adv)[mask == 0] == 0) and np.all(np.asarray(ret)[mask == 0] == 0)
  # infinities and NaN in the value head at masked positions change nothing either
  nan_values = np.where(mask, values, np.nan).astype(np.float32)
  adv3, ret3 = gae_jit(rewards, nan_values, mask, gamma=0.95, lam=0.9)
  np.testing.assert_array_equal(adv3, adv)
  np.testing.assert_array_equal(ret3, ret)


def test_tool_block_does_not_cut_the_credit_path():
  # model, model, tool, tool, tool, model(reward 1); gamma = lam = 1 and zero values
  mask = np.array([[1, 1, 0, 0, 0, 1]], np.float32)
  rewards = np.array([[0, 0, 5, 5, 5, 1]], np.float32)  # rewards on tool tokens are ignored
  adv, ret = gae_jit(rewards, np.zeros((1, 6)), mask, gamma=1.0, lam=1.0)
  np.testing.assert_allclose(adv, [[1, 1, 0, 0, 0, 1]])
  # with gamma < 1 the tool block costs no discount step: two model steps before the reward
  adv, _ = gae_jit(rewards, np.zeros((1, 6)), mask, gamma=0.5, lam=1.0)
  np.testing.assert_allclose(adv, [[0.25, 0.5, 0, 0, 0, 1]])
  # the bootstrap of the last model token before a tool call is the value after the call
  values = np.array([[0.0, 0.2, 9.0, 9.0, 9.0, 0.7]], np.float32)
  adv, _ = gae_jit(np.zeros((1, 6)), values, mask, gamma=1.0, lam=0.0)
  np.testing.assert_allclose(adv[0, 1], 0.7 - 0.2, rtol=1e-6)


def test_lambda_one_is_monte_carlo_minus_values():
  rewards, values, mask = tool_use_batch(4)
  for gamma in (1.0, 0.9):
    adv, ret = gae_jit(rewards, values, mask, gamma=gamma, lam=1.0)
    for b in range(mask.shape[0]):
      idx = np.flatnonzero(mask[b])
      r = rewards[b, idx].astype(np.float64)
      mc = np.array([sum(gamma**k * r[t + k] for k in range(len(r) - t)) for t in range(len(r))])
      np.testing.assert_allclose(ret[b, idx], mc, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(adv[b, idx], mc - values[b, idx], rtol=1e-5, atol=1e-5)


def test_lambda_zero_is_one_step_td_and_gamma_zero_is_immediate():
  rewards, values, mask = tool_use_batch(5)
  adv, _ = gae_jit(rewards, values, mask, gamma=0.9, lam=0.0)
  adv0, _ = gae_jit(rewards, values, mask, gamma=0.0, lam=0.95)
  for b in range(mask.shape[0]):
    idx = np.flatnonzero(mask[b])
    next_v = np.append(values[b, idx][1:], 0.0)
    np.testing.assert_allclose(adv[b, idx], rewards[b, idx] + 0.9 * next_v - values[b, idx], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(adv0[b, idx], rewards[b, idx] - values[b, idx], rtol=1e-5, atol=1e-6)


def test_empty_row_and_scan_not_python_loop():
  mask = np.zeros((2, 5), np.float32)
  mask[1, 2] = 1
  adv, ret = gae_jit(np.ones((2, 5)), np.ones((2, 5)) * 3, mask, gamma=1.0, lam=0.95)
  np.testing.assert_array_equal(adv[0], 0.0)
  np.testing.assert_allclose(adv[1], [0, 0, -2, 0, 0])
  np.testing.assert_allclose(ret[1], [0, 0, 1, 0, 0])
  jaxpr = str(jax.make_jaxpr(functools.partial(gae, gamma=1.0, lam=0.95))(
    jnp.zeros((2, 64)), jnp.zeros((2, 64)), jnp.ones((2, 64))))
  assert "scan" in jaxpr and jaxpr.count("scan[") == 1


# ---------------------------------------------------------------------------------------------
# Value loss.

def _vl(v, old, ret, clip):
  m = np.ones((1, len(v)))
  f = lambda x: value_loss(x, np.array([old]), np.array([ret]), m, clip=clip)[0]
  loss, g = jax.value_and_grad(f)(jnp.array([v], jnp.float32))
  return float(loss), np.asarray(g[0])


def test_value_clipping_math():
  # inside the clip range both branches agree: 0.5 (v - R)^2, gradient v - R
  loss, g = _vl([0.1], [0.0], [1.0], 0.2)
  assert loss == pytest.approx(0.5 * 0.81) and g[0] == pytest.approx(-0.9)
  # moved past the clip toward the return: the clipped error is larger and flat in v
  loss, g = _vl([1.0], [0.0], [1.0], 0.2)
  assert loss == pytest.approx(0.5 * 0.64) and g[0] == 0.0
  # moved away from the return: the unclipped error is larger, gradient v - R
  loss, g = _vl([-0.5], [0.0], [1.0], 0.2)
  assert loss == pytest.approx(0.5 * 2.25) and g[0] == pytest.approx(-1.5)
  # no clipping: plain squared error
  loss, g = _vl([1.0, -0.5], [0.0, 0.0], [1.0, 1.0], None)
  assert loss == pytest.approx(0.5 * (0 + 2.25))
  np.testing.assert_allclose(g, [0.0, -1.5])


def test_value_loss_masks_and_counts():
  rng = np.random.default_rng(6)
  v, old, ret = (rng.normal(size=(3, 5)).astype(np.float32) for _ in range(3))
  mask = (rng.random((3, 5)) > 0.4).astype(np.float32)
  s, c = value_loss(v, old, ret, mask, clip=0.2)
  vc = old + np.clip(v - old, -0.2, 0.2)
  want = 0.5 * np.maximum((v - ret) ** 2, (vc - ret) ** 2)
  assert float(c) == mask.sum()
  np.testing.assert_allclose(float(s), (want * mask).sum(), rtol=1e-5)
  v_junk = np.where(mask, v, np.inf).astype(np.float32)
  g = jax.grad(lambda x: value_loss(x, old, np.where(mask, ret, np.nan), mask)[0])(jnp.asarray(v_junk))
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[mask == 0] == 0)


def test_masked_whiten():
  rng = np.random.default_rng(8)
  x = rng.normal(size=(3, 6)).astype(np.float32) * 4 + 2
  mask = (rng.random((3, 6)) > 0.3).astype(np.float32)
  w = np.asarray(masked_whiten(np.where(mask, x, 1e6), mask))
  vals = w[mask == 1]
  assert abs(vals.mean()) < 1e-5 and vals.std() == pytest.approx(1.0, rel=1e-4)
  assert np.all(w[mask == 0] == 0)
  kept = np.asarray(masked_whiten(x, mask, shift_mean=False))[mask == 1]
  assert kept.mean() == pytest.approx(x[mask == 1].mean(), rel=1e-4)  # scaled, mean kept
  assert kept.std() == pytest.approx(1.0, rel=1e-4)
