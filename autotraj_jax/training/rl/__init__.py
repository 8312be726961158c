"""RL on tool-use trajectories: registered advantage estimators, loss aggregations and KL
estimators, the jitted objective, and the `Learner` that turns grouped trajectories and their
rewards into policy (and critic) updates.

Extend by registration, not by editing the learner: `register_advantage` /
`register_group_advantage`, `register_aggregation`, `register_kl`.
"""

from autotraj_jax.training.rl.advantages import (
                                                 ADVANTAGES,
                                                 AdvantageInputs,
                                                 Advantages,
                                                 estimate_advantages,
                                                 filter_uniform_groups,
                                                 gae,
                                                 group_advantages,
                                                 leave_one_out_advantages,
                                                 masked_whiten,
                                                 register_advantage,
                                                 register_group_advantage,
                                                 token_rewards,
)
from autotraj_jax.training.rl.batch import (
                                                 RowLayout,
                                                 logprob_gap,
                                                 pack_update_batch,
                                                 pick_bucket,
                                                 rollout_batch,
                                                 shifted_mask,
)
from autotraj_jax.training.rl.config import RLConfig
from autotraj_jax.training.rl.learner import Learner, LearnerConfig
from autotraj_jax.training.rl.losses import (
                                                 AGGREGATIONS,
                                                 KL_ESTIMATORS,
                                                 aggregate_tokens,
                                                 entropy_from_logits,
                                                 kl_penalty,
                                                 policy_loss,
                                                 register_aggregation,
                                                 register_kl,
                                                 value_loss,
)
from autotraj_jax.training.rl.objective import make_logprob_fn, make_policy_loss, make_value_fn, make_value_loss

__all__ = [
  "ADVANTAGES", "AGGREGATIONS", "AdvantageInputs", "Advantages", "KL_ESTIMATORS", "Learner", "LearnerConfig",
  "RLConfig", "RowLayout", "aggregate_tokens", "entropy_from_logits", "estimate_advantages",
  "filter_uniform_groups", "gae", "group_advantages", "kl_penalty", "leave_one_out_advantages", "logprob_gap",
  "make_logprob_fn",
  "make_policy_loss", "make_value_fn", "make_value_loss", "masked_whiten", "pack_update_batch", "pick_bucket",
  "policy_loss", "register_advantage", "register_aggregation", "register_group_advantage", "register_kl",
  "rollout_batch", "shifted_mask", "token_rewards", "value_loss",
]
