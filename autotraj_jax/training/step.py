"""A generic train step: exact gradient accumulation over micro-batches, then one update.

`loss_fn(params, micro_batch, rng) -> (loss_sum, count, aux_sums)`. Gradients of the sums are
accumulated over the micro-batch axis and divided once by the total count, so the update
equals the one of a single big batch whatever the split.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

LossFn = Callable[[Any, dict[str, jax.Array], jax.Array], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


class TrainState(NamedTuple):
  step: jax.Array  # int32 scalar
  params: Any
  opt_state: Any
  rng: jax.Array  # typed PRNG key


def init_state(params: Any, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
  return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), jax.random.key(seed))


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule | None = None, *, skip_empty: bool = False):
  """Returns `step(state, batch) -> (state, metrics)`; batch leaves are [accum, micro_B, ...].

  `skip_empty`: a micro-batch with no valid token (`batch['valid']` all 0) is not computed, for
  losses whose sums and counts are 0 there. Batches of variable size can then be padded with
  empty micro-batches to one shape: one compile, and compute only for the filled ones.
  """

  def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    rng, step_rng = jax.random.split(state.rng)
    num_micro = jax.tree.leaves(batch)[0].shape[0]

    def grad_of(micro, i):
      def f(p):
        s, c, aux = loss_fn(p, micro, jax.random.fold_in(step_rng, i))
        return s, (c, aux)
      return jax.value_and_grad(f, has_aux=True)(state.params)

    out_shape = jax.eval_shape(grad_of, jax.tree.map(lambda x: x[0], batch), 0)
    (_, (_, aux0)), _ = out_shape
    zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    zero_aux = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), aux0)

    def grads_or_zeros(micro, i):
      if not skip_empty:
        return grad_of(micro, i)
      return jax.lax.cond(jnp.any(micro["valid"] != 0), lambda: grad_of(micro, i),
                          lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), out_shape))

    def body(carry, xs):
      g_acc, s_acc, c_acc, aux_acc = carry
      micro, i = xs
      (s, (c, aux)), g = grads_or_zeros(micro, i)
      g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
      aux_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), aux_acc, aux)
      return (g_acc, s_acc + s, c_acc + c, aux_acc), None

    init = (zero_grads, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zero_aux)
    (g_sum, loss_sum, count, aux), _ = jax.lax.scan(body, init, (batch, jnp.arange(num_micro)))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), g_sum, state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss_sum / denom, "count": count, "grad_norm": optax.tree.norm(grads),
               **aux}
    if schedule is not None:
      metrics["lr"] = schedule(state.step)
    return TrainState(state.step + 1, params, opt_state, rng), metrics

  return step
