"""Shared settings of the Qwen2.5 recipes: the authors' hyperparameters on real benchmarks.

Not a config by itself (no get_config); `qwen2_5_1_5b.py` and `qwen2_5_7b.py` pick the model,
the mesh and the per-device batch.
"""

import os

from common import base_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCHMARKS = os.environ.get("AUTOTRAJ_BENCHMARKS", os.path.join(ROOT, "..", "shared", "data", "benchmarks"))
REQUIRED = "<pass --config.model.hf_dir=HF_DIR>"  # the HF checkpoint of the instruct model
EVAL_FILES = ("gsm8k-test", "math500-test", "aime24-test", "amc23-test")

STAGES = ("tokenizer", "warmstart", "generate", "score", "repair", "datasets",
          "eval_files:base", "sft:autotraj", "eval_files:sft_autotraj", "rm",
          "rl:autotraj", "eval_files:rl_autotraj")


def benchmark(name: str) -> str:
  """A benchmark file of the shared data folder, or '' when it is not there (pass your own)."""
  path = os.path.join(BENCHMARKS, f"{name}.jsonl")
  return path if os.path.isfile(path) else ""


def recipe(*, hf_dir: str, mesh: dict, seq: int = 2048):
  c = base_config()
  c.stages = STAGES
  c.model.update(hf_dir=hf_dir, param_dtype="bfloat16", remat="full", logits_chunk=512)
  c.mesh.update(mesh)
  c.backend = "sglang"  # stage 1 (generate, repair, eval:base) on the SGLang server(s); stage 2 in-process
  c.sglang.update(urls=("http://127.0.0.1:30000",), max_concurrency=64)
  c.policy.name = c.repairer.name = "qwen2.5-instruct"
  c.data.update(train_file=benchmark("gsm8k-train"), validation_file=benchmark("math500-test"))
  c.eval.update(files=tuple(f for f in (benchmark(n) for n in EVAL_FILES) if f), max_questions=0)
  c.tools.update(names=("code",), code_workers=16)
  # Authors' generation settings: 2 candidates at T=0.3 / top-p 0.9, at most 3 tool calls.
  limits = dict(max_tool_calls=3, max_tokens_per_turn=1024, max_response_tokens=seq, max_tool_output_chars=1000)
  c.generate.update(num_queries=0, samples_per_query=2, chunk_queries=256, temperature=0.3, top_p=0.9, **limits)
  c.repair.update(attempts=2, chunk=256, max_originals=0, temperature=0.0, **limits)
  c.eval.update(temperature=0.0, **limits)
  c.engine.update(batch_buckets=(8, 16, 32, 64), prompt_buckets=(256, 512, 1024, 2048, 3072),
                  new_token_buckets=(256, 1024), chunk_steps=64)
  # SFT: lr 7e-6, 3 epochs, effective batch 16, cosine, warmup 0.1, full fine-tuning.
  c.sft.update(init="policy", epochs=3.0, batch_size=16, learning_rate=7e-6, warmup_ratio=0.1,
               buckets=(1024, 2048, 3072), checkpoint_every=200, log_every=10, eval_every=0, eval_questions=0)
  # RM: lr 1e-5, 2 epochs, effective batch 32 pairs in the authors' runs (16 here), LoRA rank 8.
  c.rm.update(init="sft_autotraj", epochs=2.0, batch_size=16, learning_rate=1e-5, warmup_ratio=0.1,
              buckets=(1024, 2048, 3072), eval_every=0, checkpoint_every=200)
  c.rm.lora.update(rank=8, alpha=16.0)
  # GRPO: lr 1e-6 constant, 12 prompts x 4 rollouts, clip 0.2, no KL, 2048 response tokens,
  # at most 3 tool calls; reward = outcome + format + 0.2 x RM (the AutoTraj variant).
  c.rl.update(init="sft_autotraj", max_questions=0, steps=833, prompts_per_step=12, samples_per_prompt=4,
              minibatches=2, learning_rate=1e-6, warmup_steps=0, clip_low=0.2, clip_high=0.2, kl_coef=0.0,
              advantage="grpo", buckets=(1024, 2048, 3072), checkpoint_every=20, temperature=1.0, top_p=1.0,
              **{k: v for k, v in limits.items() if k != "max_tokens_per_turn"}, max_tokens_per_turn=1024)
  c.results.update(rows=(), curves=("autotraj",))
  return c
