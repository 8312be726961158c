"""Shared pieces of the configs: the typed base config (every field, documented) and the stage lists."""

from autotraj_jax.pipeline.config import DEMO_POLICY, base_config  # noqa: F401  (re-exported for configs)

STAGE1 = ("world", "tokenizer", "warmstart", "generate", "score", "repair", "datasets")
STAGE2 = ("eval:base", "sft:high_only", "eval:sft_high_only", "sft:autotraj", "eval:sft_autotraj", "rm",
          "rl:outcome_format", "eval:rl_outcome_format", "rl:autotraj", "eval:rl_autotraj", "results")
