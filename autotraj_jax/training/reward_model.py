"""Bradley-Terry trajectory reward model: the pairwise loss and how pairs are scored.

Chosen and rejected sequences are stacked on a leading pair axis ([2, B, L]) so one forward of
the scalar-head model scores both; the score of a sequence is the head at its last token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from autotraj_jax.models.decoder import gather_last


def pair_scores(values_2BL: jax.Array, last_index_2B: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(r_chosen_B, r_rejected_B): the scalar head at each sequence's last token, in fp32."""
  values = jnp.asarray(values_2BL)
  index = jnp.asarray(last_index_2B)
  if values.ndim != 3 or values.shape[0] != 2 or index.shape != values.shape[:2]:
    raise ValueError(f"expected values [2, B, L] and last_index [2, B], got {values.shape} and {index.shape}")
  chosen = gather_last(values[0], index[0]).astype(jnp.float32)
  rejected = gather_last(values[1], index[1]).astype(jnp.float32)
  return chosen, rejected


def bradley_terry_loss(r_chosen_B: jax.Array, r_rejected_B: jax.Array, *,
                       margin: float | jax.Array = 0.0, center_coef: float = 0.0,
                       valid_B: jax.Array | None = None) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """(sum, count, aux) of -log sigmoid(r_c - r_r - margin) + center_coef * (r_c + r_r)^2.

  `margin` (scalar or per pair) asks the chosen score to win by at least that much, e.g. more
  for a repair of a wrong answer than of a merely long one. The centering term pins the
  otherwise free offset of the scores near 0, so an RM score can be used as a reward without
  normalisation. `valid_B` drops padding pairs. aux sums, to divide by count: `correct` (pairs
  with r_c > r_r, ties wrong), `loss_bt` (the pairwise term alone), `margin` (r_c - r_r),
  `chosen`, `rejected`.
  """
  rc = jnp.asarray(r_chosen_B).astype(jnp.float32)
  rr = jnp.asarray(r_rejected_B).astype(jnp.float32)
  valid = jnp.ones_like(rc, bool) if valid_B is None else jnp.asarray(valid_B).astype(bool)
  rc = jnp.where(valid, rc, 0.0)
  rr = jnp.where(valid, rr, 0.0)
  diff = rc - rr
  bt = -jax.nn.log_sigmoid(diff - jnp.asarray(margin, jnp.float32))
  loss = bt + center_coef * (rc + rr) ** 2
  v = valid.astype(jnp.float32)
  sg = jax.lax.stop_gradient
  aux = {
    "correct": jnp.sum((diff > 0) * v),
    "loss_bt": sg(jnp.sum(bt * v)),
    "margin": sg(jnp.sum(diff * v)),
    "chosen": sg(jnp.sum(rc * v)),
    "rejected": sg(jnp.sum(rr * v)),
  }
  return jnp.sum(loss * v), jnp.sum(v), aux
