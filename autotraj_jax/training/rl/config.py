"""The RL objective's settings, validated against the registries they name."""

from __future__ import annotations

import dataclasses

from autotraj_jax.training.rl.advantages import ADVANTAGES
from autotraj_jax.training.rl.losses import AGGREGATIONS, KL_ESTIMATORS


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """The objective. Defaults: Dr. GRPO advantages (mean-centred: GRPO's per-group std division
  would blow the format/RM terms of a uniform-outcome group up to unit advantage), DAPO's
  clip-higher, no KL, token-mean aggregation."""

  advantage: str = "dr_grpo"          # a registered estimator: grpo | dr_grpo | rloo | gae (PPO + critic)
  clip_low: float = 0.2
  clip_high: float = 0.28
  agg: str = "token-mean"             # a registered aggregation of the per-token loss, KL and entropy
  filter_uniform_groups: bool = False  # drop groups whose rewards are all equal (DAPO)
  kl_coef: float = 0.0
  kl_kind: str = "k3"                 # a registered KL estimator: k1 | k2 | k3
  kl_in_reward: bool = False          # subtract kl_coef * KL from the reward instead of the loss
  entropy_coef: float = 0.0
  gamma: float = 1.0                  # gae
  lam: float = 0.95                   # gae
  value_clip: float | None = 0.2      # gae: the critic's value clip (None: plain squared error)
  whiten_advantages: bool = True      # gae: whiten advantages over the batch's model tokens

  def __post_init__(self):
    ADVANTAGES.check(self.advantage, "rl.advantage")
    AGGREGATIONS.check(self.agg, "rl.agg")
    KL_ESTIMATORS.check(self.kl_kind, "rl.kl_kind")
    if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
      raise ValueError(f"rl.clip_low must be in [0, 1) and rl.clip_high >= 0, got {self.clip_low}, {self.clip_high}")
    if self.kl_coef < 0:
      raise ValueError(f"rl.kl_coef must be >= 0, got {self.kl_coef}")
    if self.value_clip is not None and self.value_clip <= 0:
      raise ValueError(f"rl.value_clip must be positive or None, got {self.value_clip}")

  @property
  def needs_critic(self) -> bool:
    return ADVANTAGES[self.advantage].needs_critic
