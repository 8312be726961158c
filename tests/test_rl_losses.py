import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from autotraj_jax.training.rl import RLConfig
from autotraj_jax.training.rl import losses as rl_losses
from autotraj_jax.training.rl.advantages import (
  ADVANTAGES,
  AdvantageInputs,
  estimate_advantages,
  filter_uniform_groups,
  group_advantages,
  leave_one_out_advantages,
  register_group_advantage,
)
from autotraj_jax.training.rl.losses import (
  aggregate_tokens,
  entropy_from_logits,
  kl_penalty,
  policy_loss,
  register_aggregation,
  register_kl,
)
from autotraj_jax.training.step import init_state, make_train_step

# ---------------------------------------------------------------------------------------------
# Group advantages.

def test_group_advantages_hand_computed():
  rewards = np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
  # group 0: mean 0.5, unbiased std sqrt(1/3); group 1: mean 0.75, unbiased std 0.5
  s0, s1 = np.sqrt(1 / 3), 0.5
  expected = np.array([[0.5 / s0, -0.5 / s0, -0.5 / s0, 0.5 / s0],
                       [0.25 / s1, 0.25 / s1, 0.25 / s1, -0.75 / s1]])
  np.testing.assert_allclose(group_advantages(rewards, eps=0.0), expected, rtol=1e-6)
  np.testing.assert_allclose(group_advantages(rewards), expected, rtol=1e-5)
  # ddof=0: the population std (0.5 and sqrt(3)/4)
  pop = np.array([[0.5, -0.5, -0.5, 0.5], [0.25, 0.25, 0.25, -0.75]]) / np.array([[0.5], [np.sqrt(3) / 4]])
  np.testing.assert_allclose(group_advantages(rewards, eps=0.0, ddof=0), pop, rtol=1e-6)


def test_dr_grpo_is_mean_centred_only():
  rewards = np.array([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 1.0, 1.0]])
  np.testing.assert_allclose(group_advantages(rewards, scale_by_std=False),
                             [[0.5, -0.5, -0.5, 0.5], [1.5, -0.5, -0.5, -0.5]], rtol=1e-6)
  # std scaling makes both groups' advantages the same size; Dr. GRPO keeps the reward scale
  small = np.array([[0.01, 0.0]])
  assert abs(float(group_advantages(small, scale_by_std=False)[0, 0])) == pytest.approx(0.005)
  assert float(group_advantages(small)[0, 0]) > 0.7


def test_uniform_group_gets_zero_advantage():
  adv = group_advantages(np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
  np.testing.assert_array_equal(adv, 0.0)


def test_group_ids_match_grid_and_size_one_group_is_zero():
  grid = np.array([[1.0, 0.0, 0.5], [2.0, 4.0, 0.0]])
  flat = grid.reshape(-1)
  ids = np.array([107, 107, 107, -3, -3, -3])  # arbitrary ids, not 0..G-1
  perm = np.array([4, 0, 5, 2, 1, 3])
  by_ids = jax.jit(group_advantages, static_argnames="scale_by_std")  # works under jit
  for std in (True, False):
    want = np.asarray(group_advantages(grid, scale_by_std=std)).reshape(-1)
    got = by_ids(flat[perm], ids[perm], scale_by_std=std)
    np.testing.assert_allclose(got, want[perm], rtol=1e-6, atol=1e-7)
  # mixed sizes, a singleton included
  r = np.array([5.0, 1.0, 3.0, 7.0, 2.0, 0.0])
  ids = np.array([9, 1, 1, 2, 2, 2])
  adv = np.asarray(by_ids(r, ids, scale_by_std=True))
  assert adv[0] == 0.0  # the singleton group
  np.testing.assert_allclose(adv[1:3], [-1 / np.sqrt(2), 1 / np.sqrt(2)], rtol=1e-5)
  np.testing.assert_allclose(adv[3:], np.array([4, -1, -3]) / np.sqrt(13), rtol=1e-5)  # mean 3, var 26/2
  np.testing.assert_allclose(by_ids(r, ids, scale_by_std=False), [0, -1, 1, 4, -1, -3])
  # a [G, 1] grid: every group is a singleton
  np.testing.assert_array_equal(group_advantages(np.array([[3.0], [-1.0]])), 0.0)


def test_group_advantages_shape_errors():
  with pytest.raises(ValueError, match=r"\[G, n\]"):
    group_advantages(np.zeros(4))
  with pytest.raises(ValueError, match="does not match"):
    group_advantages(np.zeros(4), np.zeros(3, np.int32))


def test_filter_uniform_groups():
  rewards = np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [-1.0, -1.0, -1.0], [0.5, 0.5, 0.50001]])
  np.testing.assert_array_equal(filter_uniform_groups(rewards), [False, True, False, True])
  np.testing.assert_array_equal(filter_uniform_groups(rewards, atol=1e-3), [False, True, False, False])


def test_rloo_advantages_hand_computed():
  rewards = np.array([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 1.0, 1.0]])
  # A_i = r_i - mean of the other three: group 0: 1 - 1/3, 0 - 2/3; group 1: 3 - 1, 1 - 5/3
  want = np.array([[2 / 3, -2 / 3, -2 / 3, 2 / 3], [2.0, -2 / 3, -2 / 3, -2 / 3]])
  np.testing.assert_allclose(leave_one_out_advantages(rewards), want, rtol=1e-6)
  np.testing.assert_array_equal(leave_one_out_advantages(np.array([[5.0], [2.0]])), 0.0)  # no other sample
  # through the registry: rows of one prompt are adjacent, each sequence's advantage on its model tokens
  mask = np.array([[0, 1, 1], [1, 1, 0], [0, 0, 1], [1, 0, 1]] * 2, np.float32)
  out = _estimate("rloo", rewards.reshape(-1), 4, mask)
  np.testing.assert_allclose(out.adv_BT, want.reshape(-1)[:, None] * mask, rtol=1e-6)
  assert out.keep_B.all() and out.returns_BT is None


def _estimate(name, rewards_B, n, mask, kl=None, values=None, **cfg):
  inputs = AdvantageInputs(rewards_B=jnp.asarray(rewards_B, jnp.float32), group_size=n, mask_BT=jnp.asarray(mask),
                           kl_BT=jnp.zeros(mask.shape) if kl is None else jnp.asarray(kl),
                           values_BT=None if values is None else jnp.asarray(values))
  return estimate_advantages(name, inputs, RLConfig(advantage=name, **cfg))


def test_group_estimators_by_name():
  r = np.array([1.0, 0.0, 0.25, 0.25])  # group 1 has equal rewards
  mask = np.ones((4, 2), np.float32)
  grpo = _estimate("grpo", r, 2, mask)
  s = np.sqrt(0.5)  # unbiased std of {1, 0}
  np.testing.assert_allclose(grpo.adv_BT[:, 0], [0.5 / (s + 1e-6), -0.5 / (s + 1e-6), 0.0, 0.0], rtol=1e-5)
  np.testing.assert_allclose(_estimate("dr_grpo", r, 2, mask).adv_BT[:, 0], [0.5, -0.5, 0.0, 0.0])
  kept = _estimate("dr_grpo", r, 2, mask, filter_uniform_groups=True)
  assert kept.keep_B.tolist() == [True, True, False, False]
  # KL in the reward: each sequence's summed KL is subtracted before the baseline
  kl = np.array([[0.0, 0.0], [0.0, 0.0], [0.5, 0.5], [0.0, 0.0]], np.float32)
  out = _estimate("dr_grpo", r, 2, mask, kl=kl, kl_coef=0.1, kl_in_reward=True)
  np.testing.assert_allclose(out.adv_BT[2:, 0], [-0.05, 0.05], rtol=1e-5)
  # a uniform-outcome group whose format term differs a little: GRPO blows it up, Dr. GRPO does not
  small = np.array([1.0, 0.95])
  assert float(_estimate("grpo", small, 2, mask[:2]).adv_BT[0, 0]) > 0.7
  assert float(_estimate("dr_grpo", small, 2, mask[:2]).adv_BT[0, 0]) == pytest.approx(0.025)
  with pytest.raises(ValueError, match="groups of 3"):
    _estimate("rloo", r, 3, mask)


def test_gae_estimator_needs_values_and_returns_targets():
  mask = np.array([[0, 1, 1]], np.float32)
  with pytest.raises(ValueError, match="critic"):
    _estimate("gae", [1.0], 1, mask)
  out = _estimate("gae", [1.0], 1, mask, values=np.array([[9.0, 0.25, 0.5]]), whiten_advantages=False, lam=1.0)
  np.testing.assert_allclose(out.adv_BT, [[0.0, 0.75, 0.5]])  # reward on the last model token
  np.testing.assert_allclose(out.returns_BT, [[0.0, 1.0, 1.0]])
  assert RLConfig(advantage="gae").needs_critic and not RLConfig(advantage="rloo").needs_critic


def test_registered_estimator_aggregation_and_kl():
  try:
    @register_group_advantage("test_max_baseline")
    def max_baseline(rewards_Gn):
      return rewards_Gn - jnp.max(rewards_Gn, axis=1, keepdims=True)

    @register_aggregation("test_sum")
    def total(v, m, max_len, seq):
      return jnp.sum(v), jnp.ones(())

    @register_kl("test_abs")
    def abs_kl(d):
      return jnp.abs(d)

    out = _estimate("test_max_baseline", [1.0, 3.0], 2, np.ones((2, 1), np.float32), agg="test_sum",
                    kl_kind="test_abs")
    np.testing.assert_allclose(out.adv_BT[:, 0], [-2.0, 0.0])
    assert float(aggregate_tokens(np.array([[1.0, 2.0]]), np.ones((1, 2)), "test_sum")[0]) == 3.0
    np.testing.assert_allclose(kl_penalty(np.array([1.0]), np.array([3.0]), "test_abs"), [2.0])
    with pytest.raises(ValueError, match="already registered"):
      register_aggregation("test_sum")(lambda v, m, n, seq: (v, m))
  finally:
    ADVANTAGES.pop("test_max_baseline", None)
    rl_losses.AGGREGATIONS.pop("test_sum", None)
    rl_losses.KL_ESTIMATORS.pop("test_abs", None)


def test_rl_config_names_the_bad_field():
  for field, value in (("advantage", "ppo"), ("agg", "sum"), ("kl_kind", "k4")):
    with pytest.raises(ValueError, match=rf"rl\.{field} must be a registered .*got '{value}'"):
      RLConfig(**{field: value})


# ---------------------------------------------------------------------------------------------
# Clipping.

_STATIC = ("agg", "max_len", "clip_low", "clip_high")
_policy_loss = jax.jit(policy_loss, static_argnames=_STATIC)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _loss_and_grad(logp, old, adv, mask, **kw):
  def f(lp):
    s, _, _ = policy_loss(lp, old, adv, mask, **kw)
    return s
  return jax.value_and_grad(f)(logp)


def test_clipping_gradients():
  ratios = np.array([1.5, 0.5, 1.5, 0.5, 1.1, 0.9, 1.0])
  advs = np.array([1.0, -1.0, -1.0, 1.0, 2.0, -3.0, 0.7])
  old = np.log(np.array([0.3, 0.2, 0.5, 0.4, 0.1, 0.6, 0.25]))[None]
  logp = jnp.asarray(old + np.log(ratios)[None], jnp.float32)
  mask = np.ones((1, 7))
  loss, grad = _loss_and_grad(logp, old, advs[None], mask)
  g = np.asarray(grad[0])
  assert g[0] == 0.0  # ratio > 1 + clip_high with A > 0: flat
  assert g[1] == 0.0  # ratio < 1 - clip_low with A < 0: flat
  # outside the range on the other side, or inside it: d(-A r)/d logp = -A r
  np.testing.assert_allclose(g[2:], -advs[2:] * ratios[2:], rtol=1e-5)
  per_token = [-1.0 * 1.2, 1.0 * 0.8, 1.5, -0.5, -2.2, 2.7, -0.7]
  np.testing.assert_allclose(float(loss), sum(per_token), rtol=1e-5)
  _, count, aux = _policy_loss(logp, old, advs[None], mask)
  assert float(count) == 7
  assert float(aux["clipfrac_sum"]) == 2
  assert float(aux["clipfrac_high_sum"]) == 1 and float(aux["clipfrac_low_sum"]) == 1
  np.testing.assert_allclose(float(aux["ratio_sum"]), ratios.sum(), rtol=1e-5)


def test_separate_low_and_high_clip():
  old = np.zeros((1, 2))
  logp = jnp.log(jnp.array([[1.25, 0.75]]))
  mask = np.ones((1, 2))
  _, g = _loss_and_grad(logp, old, np.array([[1.0, -1.0]]), mask, clip_low=0.2, clip_high=0.2)
  np.testing.assert_array_equal(g, [[0.0, 0.0]])
  # clip-higher: 1.25 is inside [0.8, 1.28], 0.75 still below 0.8
  _, g = _loss_and_grad(logp, old, np.array([[1.0, -1.0]]), mask, clip_low=0.2, clip_high=0.28)
  np.testing.assert_allclose(g, [[-1.25, 0.0]], rtol=1e-6)
  _, g = _loss_and_grad(logp, old, np.array([[1.0, -1.0]]), mask, clip_low=0.3, clip_high=0.2)
  np.testing.assert_allclose(g, [[0.0, 0.75]], rtol=1e-6)


def test_sequence_advantage_broadcasts():
  rng = np.random.default_rng(0)
  logp = jnp.asarray(rng.normal(size=(3, 5)) * 0.1 - 1, jnp.float32)
  old = logp + jnp.asarray(rng.normal(size=(3, 5)) * 0.3, jnp.float32)
  mask = (rng.random((3, 5)) > 0.3).astype(np.float32)
  adv_B = np.array([1.0, -2.0, 0.5])
  a = _policy_loss(logp, old, adv_B, mask)
  b = _policy_loss(logp, old, np.repeat(adv_B[:, None], 5, 1), mask)
  np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
  assert a[1] == b[1]


# ---------------------------------------------------------------------------------------------
# Masking.

def test_masked_positions_get_exactly_zero_gradient_even_with_garbage():
  mask = np.array([[1, 1, 0, 0, 1, 0], [0, 1, 1, 1, 0, 0]], np.float32)  # 0: prompt, tool, pad
  rng = np.random.default_rng(1)
  logp = rng.normal(size=(2, 6)).astype(np.float32) - 2.0
  old = logp + rng.normal(size=(2, 6)).astype(np.float32) * 0.1
  adv = rng.normal(size=(2, 6)).astype(np.float32)
  # values a real batch may hold at masked positions: huge, -inf, NaN
  logp_g = np.where(mask, logp, 300.0).astype(np.float32)
  old_g = np.where(mask, old, -np.inf).astype(np.float32)
  adv_g = np.where(mask, adv, np.nan).astype(np.float32)
  for agg in sorted(rl_losses.AGGREGATIONS):
    clean_loss, clean_grad = _loss_and_grad(jnp.asarray(logp), old, adv, mask, agg=agg)
    loss, grad = _loss_and_grad(jnp.asarray(logp_g), old_g, adv_g, mask, agg=agg)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(float(loss), float(clean_loss), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(grad)[mask == 0], 0.0)
    np.testing.assert_allclose(grad, clean_grad, rtol=1e-6)
    assert np.all(np.asarray(grad)[mask == 1] != 0.0)
    _, _, aux = _policy_loss(logp_g, old_g, adv_g, mask, agg=agg)
    assert all(np.isfinite(float(v)) for v in aux.values())


# ---------------------------------------------------------------------------------------------
# Aggregation.

def test_aggregations_hand_computed():
  values = np.array([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]])
  mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])  # row 2 is padding
  s, c = aggregate_tokens(values, mask, "token-mean")
  assert (float(s), float(c)) == (10.0, 4.0)
  s, c = aggregate_tokens(values, mask, "seq-mean-token-mean")
  assert (float(s), float(c)) == (2.0 + 4.0, 2.0)  # means 2 and 4 over two real sequences
  s, c = aggregate_tokens(values, mask, "seq-mean-token-sum-norm")
  assert (float(s), float(c)) == pytest.approx((6 / 4 + 4 / 4, 2.0))
  s, c = aggregate_tokens(values, mask, "seq-mean-token-sum-norm", max_len=8)
  assert (float(s), float(c)) == pytest.approx((6 / 8 + 4 / 8, 2.0))
  with pytest.raises(ValueError, match="unknown aggregation"):
    aggregate_tokens(values, mask, "mean")


def test_policy_loss_aggregations_hand_computed():
  # ratio 1 everywhere, so the per-token loss is -A
  adv = np.array([[1.0, 2.0, 3.0, 0.0], [-4.0, 0.0, 0.0, 0.0]])
  mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]])
  logp = np.full((2, 4), -1.0)
  want = {"token-mean": (-(1 + 2 + 3 - 4), 4), "seq-mean-token-mean": (-(2.0 - 4.0), 2),
          "seq-mean-token-sum-norm": (-(6 / 4 - 4 / 4), 2)}
  for agg, (s_want, c_want) in want.items():
    s, c, aux = _policy_loss(logp, logp, adv, mask, agg=agg)
    assert float(s) == pytest.approx(s_want) and float(c) == c_want, agg
    assert float(aux["tokens"]) == 4 and float(aux["seqs"]) == 2
    assert float(aux["approx_kl_k1_sum"]) == 0.0 and float(aux["approx_kl_k3_sum"]) == 0.0


def _random_batch(seed, B=6, L=7):
  rng = np.random.default_rng(seed)
  mask = (rng.random((B, L)) > 0.35).astype(np.float32)
  mask[2] = 0.0  # a padding row
  logp = (rng.normal(size=(B, L)) * 0.3 - 1.5).astype(np.float32)
  old = (logp + rng.normal(size=(B, L)) * 0.3).astype(np.float32)
  adv = rng.normal(size=(B,)).astype(np.float32)
  return logp, old, adv, mask


@pytest.mark.parametrize("agg", sorted(rl_losses.AGGREGATIONS))
def test_micro_batch_sums_give_the_full_batch_value(agg):
  logp, old, adv, mask = _random_batch(2)

  @jax.jit
  def vg(lp, old, adv, mask):
    def f(lp):
      s, c, aux = policy_loss(lp, old, adv, mask, agg=agg, max_len=7)
      return s, (c, aux)
    return jax.value_and_grad(f, has_aux=True)(lp)

  def value_and_grad(sl):
    return vg(logp[sl], old[sl], adv[sl], mask[sl])

  (s_full, (c_full, aux_full)), g_full = value_and_grad(slice(None))
  for split in ([3, 3], [1] * 6):
    bounds = np.cumsum([0] + split)
    parts = [value_and_grad(slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]
    s = sum(float(p[0][0]) for p in parts)
    c = sum(float(p[0][1][0]) for p in parts)
    assert c == float(c_full)
    np.testing.assert_allclose(s / c, float(s_full) / float(c_full), rtol=1e-5)
    g = np.concatenate([np.asarray(p[1]) for p in parts]) / c
    np.testing.assert_allclose(g, np.asarray(g_full) / float(c_full), rtol=1e-5, atol=1e-8)
    for k in aux_full:
      np.testing.assert_allclose(sum(float(p[0][1][1][k]) for p in parts), float(aux_full[k]), rtol=1e-5)


def test_train_step_accumulation_is_exact():
  """Through `make_train_step`, with the mode a naive mean of micro-batch means gets wrong."""
  agg = "seq-mean-token-mean"
  B, L, V = 6, 5, 11
  rng = np.random.default_rng(3)
  tokens = rng.integers(0, V, (B, L))
  _, old, adv, mask = _random_batch(4, B, L)
  params = {"w": jnp.asarray(rng.normal(size=(V,)), jnp.float32)}

  def loss_fn(p, micro, rng):
    del rng
    logp = jax.nn.log_sigmoid(p["w"][micro["tokens"]])
    return policy_loss(logp, micro["old"], micro["adv"], micro["mask"], agg=agg, max_len=L)

  data = {"tokens": tokens, "old": old, "adv": adv, "mask": mask}
  step = jax.jit(make_train_step(loss_fn, optax.sgd(1.0)))
  results = []
  for accum in (1, 3):
    batch = jax.tree.map(lambda x, k=accum: jnp.asarray(x).reshape(k, B // k, *x.shape[1:]), data)
    state, metrics = step(init_state(params, optax.sgd(1.0), 0), batch)
    results.append((np.asarray(state.params["w"]), float(metrics["loss"])))
  for w, loss in results[1:]:
    np.testing.assert_allclose(w, results[0][0], rtol=1e-5, atol=1e-7)
    assert loss == pytest.approx(results[0][1], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# KL and entropy.

def test_kl_estimators():
  rng = np.random.default_rng(5)
  logp = rng.normal(size=(4, 9)).astype(np.float32) - 2
  ref = rng.normal(size=(4, 9)).astype(np.float32) - 2
  np.testing.assert_allclose(kl_penalty(logp, ref, "k1"), logp - ref, rtol=1e-6)
  k3 = np.asarray(kl_penalty(logp, ref, "k3"))
  assert np.all(k3 >= 0)
  d = ref.astype(np.float64) - logp.astype(np.float64)
  np.testing.assert_allclose(k3, np.expm1(d) - d, rtol=1e-5, atol=1e-8)
  assert np.all(np.asarray(kl_penalty(logp, ref, "k2")) >= 0)
  for kind in ("k1", "k2", "k3"):
    np.testing.assert_array_equal(kl_penalty(logp, logp, kind), 0.0)
  # both are unbiased: their expectation under the policy is KL(policy || ref) exactly
  p = jax.nn.log_softmax(jnp.array([0.3, -1.0, 2.0, 0.1]))
  q = jax.nn.log_softmax(jnp.array([1.0, 0.0, -0.5, 0.2]))
  kl = float(jnp.sum(jnp.exp(p) * (p - q)))
  for kind in ("k1", "k3"):
    assert float(jnp.sum(jnp.exp(p) * kl_penalty(p, q, kind))) == pytest.approx(kl, rel=1e-5)
  # an extreme token does not overflow, and the gradient is finite
  big = kl_penalty(jnp.array([-200.0]), jnp.array([0.0]), "k3")
  assert np.isfinite(float(big[0]))
  assert np.all(np.isfinite(jax.grad(lambda x: kl_penalty(x, jnp.array([0.0]), "k3")[0])(jnp.array([-200.0]))))
  with pytest.raises(ValueError, match="KL estimator"):
    kl_penalty(logp, ref, "k4")


def test_kl_in_loss_shares_the_policy_aggregation():
  logp, old, adv, mask = _random_batch(6)
  ref = old - 0.1
  s_pg, c_pg, _ = _policy_loss(logp, old, adv, mask, agg="seq-mean-token-mean")
  s_kl, c_kl = aggregate_tokens(kl_penalty(logp, ref, "k3"), mask, "seq-mean-token-mean")
  assert float(c_pg) == float(c_kl) and float(s_kl) > 0


def test_entropy_from_logits():
  V = 7
  logits = jnp.zeros((2, 3, V), jnp.bfloat16)
  ent = entropy_from_logits(logits)
  assert ent.dtype == jnp.float32 and ent.shape == (2, 3)
  np.testing.assert_allclose(ent, np.log(V), rtol=1e-6)
  peaked = jnp.array([[[1000.0, 0.0, 0.0]]])
  assert float(entropy_from_logits(peaked)[0, 0]) == pytest.approx(0.0, abs=1e-6)
  rng = np.random.default_rng(7)
  x = rng.normal(size=(2, 4, V)) * 3
  p = np.exp(x - x.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(entropy_from_logits(jnp.asarray(x, jnp.float32)), -(p * np.log(p)).sum(-1), rtol=1e-5)
  # banned tokens (-inf logits): finite value and gradient, equal to the entropy over the rest
  banned = jnp.array([[[1.0, 2.0, -jnp.inf, 0.5]]])
  val, grad = jax.value_and_grad(lambda l: entropy_from_logits(l).sum())(banned)
  assert float(val) == pytest.approx(float(entropy_from_logits(jnp.array([[[1.0, 2.0, 0.5]]]))[0, 0]), rel=1e-6)
  assert np.all(np.isfinite(grad))
