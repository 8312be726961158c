"""Shared pieces of the configs: the typed base config (every field, documented) and the stage lists."""

from autotraj_jax.pipeline.config import DEMO_POLICY, DEMO_REPAIRER, base_config  # noqa: F401  (re-exported)

# `repair:question` / `datasets:question` repeat repair with a repairer that sees only the question (the
# authors' code) into repairs_question.jsonl / sft_question.jsonl; `sft:autotraj_question` trains on that.
STAGE1 = ("world", "tokenizer", "warmstart", "generate", "score", "repair", "datasets", "repair:question",
          "datasets:question")
STAGE2 = ("eval:base", "sft:high_only", "eval:sft_high_only", "sft:autotraj", "eval:sft_autotraj",
          "sft:autotraj_question", "eval:sft_autotraj_question", "rm",
          "rl:outcome_format", "eval:rl_outcome_format", "rl:autotraj", "eval:rl_autotraj", "results")
