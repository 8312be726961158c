"""Shared defaults of the stage-1 configs; each config file edits what it needs."""

import ml_collections


def rollout(**kw) -> dict:
  base = dict(temperature=1.0, top_p=1.0, max_tool_calls=3, max_tokens_per_turn=256,
              max_response_tokens=640, max_tool_output_chars=600)
  base.update(kw)
  return base


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.workdir = ""
  c.seed = 0
  c.compilation_cache_dir = "~/.cache/autotraj/xla"  # '' disables the persistent XLA cache
  c.stages = ("world", "tokenizer", "warmstart", "generate", "score", "repair", "datasets", "eval")
  c.backend = "jax"                      # 'jax' (in-process engine) or 'sglang'
  c.sglang = dict(url="", max_concurrency=32)
  c.data = dict(train_file="", validation_file="", test_file="")  # default: the generated world
  c.world = dict(seed=0, train=2400, validation=100, test=200, families=("arith", "lookup", "combo"),
                 difficulty=(1, 2), num_entities=1200)
  c.tokenizer = dict(vocab_size=2048, num_tasks=1500)
  c.model = dict(preset="demo", tokenizer_dir="")
  c.warmstart = dict(num_tasks=2000, steps=200, batch_size=16, micro_batch_size=0, buckets=(256, 384, 512, 1024),
                     learning_rate=2e-3, warmup_steps=30, log_every=10, checkpoint_every=100,
                     repair_fraction=0.2, copy_fraction=0.3, copy_lengths=(16, 64),
                     flaws=dict(hedge=0.12, repeat_call=0.08, failed_call=0.08, verbose=0.08,
                                broken_tags=0.04, guess=0.25))
  c.policy = dict(name="demo-policy", checkpoint="", sglang_url="")
  c.repairer = dict(name="demo-policy", checkpoint="", sglang_url="")  # the demo policy repairs too
  c.engine = dict(batch_buckets=(1, 4, 16, 64), prompt_buckets=(256, 512, 1024, 2048),
                  new_token_buckets=(256, 512), chunk_steps=32)
  c.tools = dict(names=("code", "search"), code_timeout_s=5.0, code_workers=2, search_top_k=1,
                 search_url="", corpus="")
  c.generate = dict(split="train", num_queries=300, samples_per_query=4, chunk_queries=64,
                    **rollout(temperature=0.8, top_p=0.95))
  c.scoring = dict(preset="autotraj", overrides={})
  c.repair = dict(attempts=2, show_gold=False, accept_threshold=0.86, accept_threshold_wrong=0.8,
                  retry_temperature=0.7, chunk=64, max_originals=0, **rollout(temperature=0.0))
  c.eval = dict(name="base", split="test", max_questions=200, maj_k=1, **rollout(temperature=0.0))
  return c
