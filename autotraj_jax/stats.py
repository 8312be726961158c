"""Confidence intervals for evaluation results: percentile bootstrap (paired and single) and Wilson.

Comparisons of two models on the same questions are paired: resampling questions (not the two
models' results independently) keeps the per-question correlation, which makes the interval on
the difference far tighter than two separate intervals suggest. Pure numpy; the resample indices
are drawn once as an [n_resamples, n] array.
"""

from __future__ import annotations

import statistics
from typing import Sequence

import numpy as np

ArrayLike = Sequence[float] | np.ndarray


def _check_alpha(alpha: float) -> None:
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def _as_1d(x: ArrayLike, name: str) -> np.ndarray:
  arr = np.asarray(x, dtype=np.float64)
  if arr.ndim != 1 or arr.size == 0:
    raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {arr.shape}")
  return arr


def _bootstrap_means(x: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
  """Means of `n_resamples` resamples of x with replacement, all at once."""
  if n_resamples <= 0:
    raise ValueError(f"n_resamples must be positive, got {n_resamples}")
  idx = np.random.default_rng(seed).integers(0, x.size, size=(n_resamples, x.size))
  return x[idx].mean(axis=1)


def _percentiles(means: np.ndarray, alpha: float) -> tuple[float, float]:
  low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
  return float(low), float(high)


def bootstrap_mean_ci(x: ArrayLike, *, n_resamples: int = 10000, seed: int = 0, alpha: float = 0.05
                      ) -> tuple[float, tuple[float, float]]:
  """(mean of x, (low, high)): the percentile bootstrap interval at level 1 - alpha."""
  _check_alpha(alpha)
  arr = _as_1d(x, "x")
  return float(arr.mean()), _percentiles(_bootstrap_means(arr, n_resamples, seed), alpha)


def paired_bootstrap(a: ArrayLike, b: ArrayLike, *, n_resamples: int = 10000, seed: int = 0,
                     alpha: float = 0.05) -> tuple[float, tuple[float, float]]:
  """(mean(b) - mean(a), (low, high)) for per-question metrics of two systems on the same
  questions in the same order; questions are resampled together, so the pairing is kept."""
  _check_alpha(alpha)
  a_arr, b_arr = _as_1d(a, "a"), _as_1d(b, "b")
  if a_arr.shape != b_arr.shape:
    raise ValueError(f"a and b must pair up question by question; got {a_arr.size} and {b_arr.size} values")
  d = b_arr - a_arr
  return float(d.mean()), _percentiles(_bootstrap_means(d, n_resamples, seed), alpha)


def wilson_interval(successes: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
  """Wilson score interval for a binomial proportion: unlike p +- z*se it stays inside [0, 1]
  and does not collapse to a point at 0 or n successes."""
  _check_alpha(alpha)
  if n <= 0:
    raise ValueError(f"n must be positive, got {n}")
  if not 0 <= successes <= n:
    raise ValueError(f"successes must be in [0, {n}], got {successes}")
  z = statistics.NormalDist().inv_cdf(1 - alpha / 2)
  p = successes / n
  denom = 1 + z * z / n
  center = (p + z * z / (2 * n)) / denom
  half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return float(max(0.0, center - half)), float(min(1.0, center + half))


__all__ = ["bootstrap_mean_ci", "paired_bootstrap", "wilson_interval"]
