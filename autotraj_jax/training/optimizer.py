"""AdamW with linear warmup + cosine decay and global-norm clipping."""

from __future__ import annotations

import dataclasses

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float = 1e-5
  warmup_steps: int = 0
  total_steps: int = 1000
  end_lr_ratio: float = 0.0
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  grad_clip: float = 1.0

  def __post_init__(self):
    if self.learning_rate < 0:
      raise ValueError(f"learning_rate must be >= 0, got {self.learning_rate}")
    if self.total_steps <= 0 or self.warmup_steps < 0 or self.warmup_steps > self.total_steps:
      raise ValueError(f"need 0 <= warmup_steps ({self.warmup_steps}) <= total_steps ({self.total_steps})")


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
  """Linear warmup to the peak, then cosine decay to `end_lr_ratio` x peak (constant when 1)."""
  decay = max(cfg.total_steps - cfg.warmup_steps, 1)
  cosine = optax.cosine_decay_schedule(cfg.learning_rate, decay, alpha=cfg.end_lr_ratio) \
      if cfg.end_lr_ratio != 1.0 else optax.constant_schedule(cfg.learning_rate)
  if not cfg.warmup_steps:  # no zero-length warmup piece (optax warns about it)
    return cosine
  warmup = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
  return optax.join_schedules([warmup, cosine], [cfg.warmup_steps])


def _decay_mask(params):
  # No weight decay on norms, biases and other vectors.
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
  tx = optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                   weight_decay=cfg.weight_decay, mask=_decay_mask)
  if cfg.grad_clip and cfg.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
  return tx
