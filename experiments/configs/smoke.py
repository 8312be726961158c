"""Stage 1 at toy size: the demo's code path in a few minutes, run by the test suite.

    python experiments/main.py --config experiments/configs/smoke.py --config.workdir=/tmp/smoke

Expected runtime on a 2-core CPU: about 2-3 minutes. Expected result: every stage runs and
writes its files; the warm start is far too short to learn much, so accuracy is near 0.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import base_config  # noqa: E402


def get_config():
  c = base_config()
  c.world.update(train=200, validation=20, test=16, num_entities=200)
  c.tokenizer.update(vocab_size=512, num_tasks=100)
  c.model.preset = "demo"
  c.warmstart.update(num_tasks=64, steps=4, batch_size=8, buckets=(512,), checkpoint_every=2, log_every=1,
                     warmup_steps=1)
  c.generate.update(num_queries=8, samples_per_query=2, chunk_queries=4, max_tokens_per_turn=32,
                    max_response_tokens=64)
  c.repair.update(attempts=1, chunk=8, max_tokens_per_turn=32, max_response_tokens=64)
  c.eval.update(max_questions=8, max_tokens_per_turn=32, max_response_tokens=64)
  c.rm.update(steps=3, batch_size=8, warmup_steps=1, buckets=(256, 512), eval_every=0, log_every=1,
              checkpoint_every=2, max_score_samples=16)
  c.engine.update(batch_buckets=(8, 16), prompt_buckets=(256, 512, 1024), new_token_buckets=(32,))
  return c
