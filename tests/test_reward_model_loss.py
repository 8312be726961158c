import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from autotraj_jax.models import abstract_model, get_preset
from autotraj_jax.models.decoder import causal_mask
from autotraj_jax.training.reward_model import bradley_terry_loss, pair_scores
from autotraj_jax.training.sft import positions_from_valid


def softplus(x):
  return float(np.log1p(np.exp(x)))


def test_loss_hand_computed():
  s, c, aux = bradley_terry_loss(jnp.array([2.0, 0.0, -1.0]), jnp.array([1.0, 0.0, 1.0]))
  # -log sigmoid(d) = log(1 + exp(-d)) for d = 1, 0, -2
  want = softplus(-1.0) + np.log(2.0) + softplus(2.0)
  assert float(s) == pytest.approx(want, rel=1e-6)
  assert float(c) == 3
  assert float(aux["correct"]) == 1  # the tie is not a win
  assert float(aux["loss_bt"]) == pytest.approx(want, rel=1e-6)
  assert float(aux["margin"]) == pytest.approx(1.0 + 0.0 - 2.0)
  assert float(aux["chosen"]) == pytest.approx(1.0) and float(aux["rejected"]) == pytest.approx(2.0)


def test_gradient_sign_pushes_chosen_up_and_rejected_down():
  rc, rr = jnp.array([0.5, -2.0]), jnp.array([1.5, -3.0])
  g_c, g_r = jax.grad(lambda a, b: bradley_terry_loss(a, b)[0], argnums=(0, 1))(rc, rr)
  assert np.all(np.asarray(g_c) < 0) and np.all(np.asarray(g_r) > 0)
  d = np.asarray(rc - rr)
  np.testing.assert_allclose(g_c, -1 / (1 + np.exp(d)), rtol=1e-6)  # -sigmoid(-d)
  np.testing.assert_allclose(g_r, -np.asarray(g_c), rtol=1e-6)
  # a pair already won by a lot barely moves
  g_far = jax.grad(lambda a: bradley_terry_loss(a, jnp.array([0.0]))[0])(jnp.array([30.0]))
  assert abs(float(g_far[0])) < 1e-10


def test_margin_scalar_and_per_pair():
  rc, rr = jnp.array([2.0, 1.0]), jnp.array([1.0, 1.0])
  s, _, aux = bradley_terry_loss(rc, rr, margin=0.5)
  assert float(s) == pytest.approx(softplus(-0.5) + softplus(0.5), rel=1e-6)
  s, _, aux = bradley_terry_loss(rc, rr, margin=jnp.array([1.0, -1.0]))
  assert float(s) == pytest.approx(np.log(2.0) + softplus(-1.0), rel=1e-6)
  assert float(aux["correct"]) == 1  # accuracy ignores the margin
  # a larger margin asks for more: the loss of the same scores grows
  assert float(bradley_terry_loss(rc, rr, margin=2.0)[0]) > float(bradley_terry_loss(rc, rr)[0])


def test_centering_term():
  rc, rr = jnp.array([2.0, -1.0]), jnp.array([1.0, -4.0])
  base = float(bradley_terry_loss(rc, rr)[0])
  s, _, aux = bradley_terry_loss(rc, rr, center_coef=0.01)
  assert float(s) == pytest.approx(base + 0.01 * (3.0**2 + 5.0**2), rel=1e-6)
  assert float(aux["loss_bt"]) == pytest.approx(base, rel=1e-6)
  # the term alone is invariant to the score difference and pulls the sum toward 0
  g_c, g_r = jax.grad(lambda a, b: bradley_terry_loss(a, b, center_coef=1.0)[0] -
                      bradley_terry_loss(a, b)[0], argnums=(0, 1))(rc, rr)
  np.testing.assert_allclose(g_c, 2 * np.asarray(rc + rr), rtol=1e-6)
  np.testing.assert_allclose(g_r, g_c, rtol=1e-6)


def test_accuracy_counts_and_valid_pairs():
  rc = jnp.array([1.0, 2.0, 0.0, 5.0, 9.0])
  rr = jnp.array([0.0, 3.0, 0.0, 4.0, -9.0])
  valid = jnp.array([1, 1, 1, 1, 0])  # the last pair is padding
  s, c, aux = bradley_terry_loss(rc, rr, valid_B=valid)
  assert float(c) == 4 and float(aux["correct"]) == 2
  s4, c4, _ = bradley_terry_loss(rc[:4], rr[:4])
  assert float(s) == pytest.approx(float(s4), rel=1e-6) and float(c4) == 4
  g = jax.grad(lambda a: bradley_terry_loss(a, rr, valid_B=valid)[0])(rc.at[4].set(jnp.nan))
  assert np.all(np.isfinite(g)) and float(g[4]) == 0.0


def test_micro_batch_sums_give_the_full_batch_mean():
  rng = np.random.default_rng(0)
  rc, rr = rng.normal(size=8).astype(np.float32), rng.normal(size=8).astype(np.float32)
  margin = rng.random(8).astype(np.float32)
  full = bradley_terry_loss(rc, rr, margin=margin, center_coef=0.1)
  parts = [bradley_terry_loss(rc[i:i + 3], rr[i:i + 3], margin=margin[i:i + 3], center_coef=0.1)
           for i in (0, 3, 6)]
  assert sum(float(p[0]) for p in parts) == pytest.approx(float(full[0]), rel=1e-5)
  assert sum(float(p[1]) for p in parts) == float(full[1])
  assert sum(float(p[2]["correct"]) for p in parts) == float(full[2]["correct"])


def test_pair_scores_reads_each_last_token():
  values = jnp.arange(2 * 3 * 5, dtype=jnp.float32).reshape(2, 3, 5)
  last = jnp.array([[4, 0, 2], [1, 3, 4]])
  rc, rr = pair_scores(values, last)
  np.testing.assert_array_equal(rc, [4, 5, 12])
  np.testing.assert_array_equal(rr, [16, 23, 29])
  assert rc.dtype == jnp.float32
  with pytest.raises(ValueError, match=r"\[2, B, L\]"):
    pair_scores(values[0], last[0])
  with pytest.raises(ValueError, match=r"\[2, B\]"):
    pair_scores(values, last[:, :2])


def test_pair_scores_one_forward_equals_separate_forwards():
  """Chosen and rejected scored in one [2B, L] forward give the scores of two separate ones."""
  cfg = get_preset("tiny", num_layers=1)
  graphdef, abstract = abstract_model(cfg, kind="scalar")
  rng = np.random.default_rng(2)
  # random host params (no init compile): every weight matters, the score head included
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.3, a.dtype), abstract)
  B, L = 2, 7
  tokens_2BL = jnp.asarray(rng.integers(1, cfg.vocab_size, (2, B, L)))
  lengths_2B = np.array([[7, 4], [5, 6]])
  valid_2BL = jnp.asarray(np.arange(L)[None, None] < lengths_2B[..., None])

  @jax.jit
  def forward(tokens_BL, valid_BL):
    model = nnx.merge(graphdef, params)
    return model(tokens_BL, positions_from_valid(valid_BL), causal_mask(valid_BL))

  values_2BL = forward(tokens_2BL.reshape(2 * B, L), valid_2BL.reshape(2 * B, L)).reshape(2, B, L)
  rc, rr = pair_scores(values_2BL, jnp.asarray(lengths_2B - 1))
  scores = np.concatenate([rc, rr])
  assert np.all(np.isfinite(scores)) and np.min(np.abs(scores[:, None] - scores[None] + np.eye(4))) > 1e-3
  for k, got in enumerate((rc, rr)):
    alone = forward(tokens_2BL[k], valid_2BL[k])
    want = alone[np.arange(B), lengths_2B[k] - 1]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  s, c, _ = bradley_terry_loss(rc, rr)
  assert np.isfinite(float(s)) and float(c) == B
