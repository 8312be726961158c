import numpy as np
import pytest

from autotraj_jax.stats import bootstrap_mean_ci, paired_bootstrap, wilson_interval


def test_paired_interval_covers_the_true_difference_at_about_the_nominal_rate():
  rng = np.random.default_rng(0)
  true_diff, hits, trials = 0.1, 0, 300
  for t in range(trials):
    a = rng.normal(0.0, 1.0, 40)                      # per-question difficulty, shared by both
    b = a + true_diff + rng.normal(0.0, 0.5, 40)
    _, (low, high) = paired_bootstrap(a, b, n_resamples=2000, seed=t)
    hits += low <= true_diff <= high
  assert 0.88 <= hits / trials <= 0.99


def test_mean_interval_covers_the_true_mean_at_about_the_nominal_rate():
  rng = np.random.default_rng(1)
  hits, trials = 0, 300
  for t in range(trials):
    x = rng.random(60) < 0.3                          # per-question correctness, accuracy 0.3
    mean, (low, high) = bootstrap_mean_ci(x, n_resamples=2000, seed=t)
    assert low <= mean <= high
    hits += low <= 0.3 <= high
  assert 0.88 <= hits / trials <= 0.99


def test_identical_systems_give_zero_and_a_zero_width_interval():
  a = np.random.default_rng(2).random(50)
  assert paired_bootstrap(a, a.copy()) == (0.0, (0.0, 0.0))


def test_a_clear_difference_excludes_zero_and_pairing_tightens_it():
  rng = np.random.default_rng(3)
  a = (rng.random(200) < 0.4).astype(float)
  b = np.maximum(a, rng.random(200) < 0.25)           # b solves everything a does, and more
  diff, (low, high) = paired_bootstrap(a, b, seed=1)
  assert diff == pytest.approx(b.mean() - a.mean()) and 0.0 < low <= diff <= high
  # Ignoring the pairing (independent errors: widths add in quadrature) would give a wider interval.
  widths = [hi - lo for _, (lo, hi) in (bootstrap_mean_ci(a, seed=1), bootstrap_mean_ci(b, seed=2))]
  assert high - low < 0.8 * np.hypot(*widths)
  assert paired_bootstrap(a, b, seed=1) == (diff, (low, high))  # seeded: reproducible


def test_wilson_matches_known_values():
  assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
  assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
  low, high = wilson_interval(50, 100, alpha=0.1)
  assert low == pytest.approx(1 - high) and high - low < wilson_interval(50, 100)[1] - wilson_interval(50, 100)[0]


def test_bad_inputs_are_clear_errors():
  with pytest.raises(ValueError, match="pair up"):
    paired_bootstrap([1.0, 0.0], [1.0])
  with pytest.raises(ValueError, match="non-empty 1-D"):
    bootstrap_mean_ci([])
  with pytest.raises(ValueError, match="successes"):
    wilson_interval(11, 10)
  with pytest.raises(ValueError, match="alpha"):
    wilson_interval(1, 10, alpha=1.5)
