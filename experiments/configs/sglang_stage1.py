"""Stage 1 against an SGLang server and a real HF model, with the authors' generation settings.

    python -m sglang.launch_server --model-path HF_DIR --port 30000        # GPU (or sgl_jax on TPU)
    python experiments/main.py --config experiments/configs/sglang_stage1.py \\
        --config.workdir=/tmp/stage1 --config.sglang.urls=http://127.0.0.1:30000 \\
        --config.model.tokenizer_dir=HF_DIR \\
        --config.data.train_file=../shared/data/benchmarks/gsm8k-train.jsonl \\
        --config.data.test_file=../shared/data/benchmarks/gsm8k-test.jsonl

Settings as in the reference code: 2 candidates per question at temperature 0.3 / top-p 0.9, at
most 3 tool calls, 1024 new tokens per turn; the repairer is the same server unless
`--config.repairer.sglang_urls` points at others. Python only by default: add `search` to
`tools.names` with `tools.search_url` (a FlashRAG-style server) or `tools.corpus` (a JSONL
corpus for the local BM25 index). Expected runtime: set by the server (about an hour for GSM8K
train with a 7B model on one GPU); expected result: the SFT set and preference pairs in the workdir.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import base_config  # noqa: E402


def get_config():
  c = base_config()
  c.stages = ("generate", "score", "repair", "datasets", "eval")
  c.backend = "sglang"
  c.sglang.update(urls=("http://127.0.0.1:30000",), max_concurrency=64)
  c.policy.name = "sglang-policy"
  c.repairer.name = "sglang-repairer"
  c.tools.update(names=("code",), search_top_k=3)
  rollout = dict(max_tool_calls=3, max_tokens_per_turn=1024, max_response_tokens=4096,
                 max_tool_output_chars=1000)
  c.generate.update(num_queries=0, samples_per_query=2, chunk_queries=256, temperature=0.3, top_p=0.9,
                    **rollout)
  c.scoring.preset = "autotraj"
  c.repair.update(attempts=2, chunk=256, temperature=0.0, **rollout)
  c.eval.update(max_questions=0, temperature=0.0, **rollout)
  return c
