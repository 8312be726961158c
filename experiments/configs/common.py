"""Shared defaults of the stage-1 configs; each config file edits what it needs."""

import os

import ml_collections

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_POLICY = os.path.join(ROOT, "assets", "demo_policy")
STAGE1 = ("world", "tokenizer", "warmstart", "generate", "score", "repair", "datasets")
STAGE2 = ("eval:base", "sft:high_only", "eval:sft_high_only", "sft:autotraj", "eval:sft_autotraj", "rm",
          "rl:outcome_format", "eval:rl_outcome_format", "rl:autotraj", "eval:rl_autotraj", "results")


def rollout(**kw) -> dict:
  # The demo policy's correct trajectories stay under ~260 tokens and its turns under ~60; a
  # turn cut at 96 tokens just continues next round, so one runaway row no longer holds a batch
  # of 64 for 256 decode steps.
  base = dict(temperature=1.0, top_p=1.0, max_tool_calls=3, max_tokens_per_turn=96,
              max_response_tokens=384, max_tool_output_chars=600)
  base.update(kw)
  return base


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.workdir = ""
  c.seed = 0
  c.compilation_cache_dir = "~/.cache/autotraj/xla"  # '' disables the persistent XLA cache
  c.stages = STAGE1 + ("eval",)
  c.backend = "jax"                      # 'jax' (in-process engine) or 'sglang'
  c.sglang = dict(url="", max_concurrency=32)
  c.data = dict(train_file="", validation_file="", test_file="")  # default: the generated world
  c.world = dict(seed=0, train=6000, validation=100, test=200, families=("arith", "lookup", "combo"),
                 difficulty=(1,), num_entities=1200)
  c.tokenizer = dict(vocab_size=4096, num_tasks=1500)
  c.model = dict(preset="demo", tokenizer_dir="")
  # asset: a shipped warm-started policy to import ('' trains one here; see data_gen/demo_stages.py)
  c.warmstart = dict(asset=DEMO_POLICY, num_tasks=5000, steps=1500, batch_size=16, micro_batch_size=0,
                     buckets=(256, 384, 512, 1024), learning_rate=3e-3, warmup_steps=50, log_every=10,
                     checkpoint_every=100, repair_fraction=0.2,
                     flaws=dict(hedge=0.12, repeat_call=0.08, failed_call=0.08, verbose=0.08,
                                broken_tags=0.04, guess=0.25))
  c.policy = dict(name="demo-policy", checkpoint="", sglang_url="")
  c.repairer = dict(name="demo-policy", checkpoint="", sglang_url="")  # the demo policy repairs too
  c.engine = dict(batch_buckets=(1, 4, 16, 64), prompt_buckets=(128, 256, 384, 512, 768, 1024, 2048),
                  new_token_buckets=(96, 256, 512), chunk_steps=32)
  c.tools = dict(names=("code", "search"), code_timeout_s=5.0, code_workers=2, search_top_k=1,
                 search_url="", corpus="")
  c.generate = dict(split="train", num_queries=300, samples_per_query=4, chunk_queries=64,
                    **rollout(temperature=0.8, top_p=0.95))
  c.scoring = dict(preset="autotraj", overrides={})
  c.repair = dict(attempts=2, show_gold=False, accept_threshold=0.86, accept_threshold_wrong=0.8,
                  retry_temperature=0.7, chunk=64, max_originals=0, **rollout(temperature=0.0))
  c.eval = dict(name="base", split="test", max_questions=200, maj_k=1, **rollout(temperature=0.0))
  # Stage 2. `sft:NAME` / `rl:NAME` apply `sft_variants[NAME]` / `rl_variants[NAME]` on top.
  c.sft = dict(init="policy", data="autotraj", mask_tool_results=True, steps=60, batch_size=16, micro_batch_size=0,
               buckets=(256, 384, 512, 1024), learning_rate=3e-4, warmup_steps=5, log_every=5,
               checkpoint_every=30, eval_fraction=0.1, eval_every=0, eval_questions=32,
               lora=dict(rank=0, alpha=16.0, targets=("q_proj", "k_proj", "v_proj", "o_proj")))
  c.sft_variants = dict(high_only=dict(data="high_only"), autotraj=dict(data="autotraj"))
  # The Bradley-Terry trajectory reward model on pairs.jsonl (fields: autotraj_jax/training/rm_stage.py).
  c.rm = dict(init="sft_autotraj", steps=60, batch_size=8, micro_batch_size=0, learning_rate=5e-4,
              warmup_steps=6, buckets=(256, 512, 1024), margin_low=0.0, margin_wrong=0.0, center_coef=0.01,
              eval_fraction=0.1, eval_every=20, max_score_samples=200, log_every=10, checkpoint_every=30,
              lora=dict(rank=0, alpha=16.0, targets=("q_proj", "k_proj", "v_proj", "o_proj")))
  c.rl = dict(algo="grpo", init="sft_autotraj", rm="rm", split="train", max_questions=0, steps=20,
              prompts_per_step=8, samples_per_prompt=4, minibatches=2, micro_batch_size=0,
              buckets=(256, 384, 512), learning_rate=1e-4, warmup_steps=0, grad_clip=1.0,
              critic_learning_rate=5e-5, critic_warmup=2, checkpoint_every=5,
              clip_low=0.2, clip_high=0.28, agg="token-mean", scale_adv_by_std=True, filter_uniform_groups=False,
              kl_coef=0.0, kl_kind="k3", kl_in_reward=False, entropy_coef=0.0,
              gamma=1.0, lam=0.95, value_clip=0.2, whiten_advantages=True,
              rewards=dict(combination="weighted", weights={"outcome": 1.0, "format": 0.5}, rm_norm="batch",
                           rm_clip=3.0, outcome_metric="equiv", format_penalty=-1.0, max_rm_failures=5),
              **rollout(temperature=1.0))
  c.rl_variants = dict(
      outcome_format=dict(),
      autotraj=dict(rewards=dict(combination="weighted", weights={"outcome": 1.0, "format": 0.5, "rm": 0.2},
                                 rm_norm="batch", rm_clip=3.0, outcome_metric="equiv", format_penalty=-1.0,
                                 max_rm_failures=5)),
      ppo=dict(algo="ppo"))
  # The `results` stage: one table row per (label, eval name), RL training curves per variant.
  c.results = dict(rows=(("base policy", "base"), ("SFT high-quality only", "sft_high_only"),
                         ("AutoTraj SFT (high + repaired)", "sft_autotraj"),
                         ("RL outcome + format", "rl_outcome_format"),
                         ("AutoTraj RL (outcome + format + RM)", "rl_autotraj")),
                   curves=("outcome_format", "autotraj"))
  return c
