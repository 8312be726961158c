"""The demo's code path (stages 1 and 2) at toy size, run by the test suite.

    python experiments/main.py --config experiments/configs/smoke.py --config.workdir=/tmp/smoke

Expected runtime on a 2-core CPU: about 6 minutes. Expected result: every stage runs (the question-only
repairer and its SFT too), every model trains (4 preference pairs at seed 0, enough for the reward
model) and results.md has a row per `results.rows` entry; the numbers mean nothing at this size.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import STAGE1, STAGE2, base_config  # noqa: E402


def get_config():
  c = base_config()
  c.stages = STAGE1 + STAGE2
  c.world.update(train=200, validation=20, test=16, num_entities=200)
  c.warmstart.update(num_tasks=64, steps=4, batch_size=8, buckets=(512,), checkpoint_every=2,
                     log_every=1, warmup_steps=1)
  # Sized so that a few repairs are accepted at the default seed and every model really trains;
  # the repairer is shown the gold answer to make that likelier at toy size.
  c.generate.update(num_queries=32, samples_per_query=3, chunk_queries=8)
  c.repair.update(attempts=2, chunk=8, show_gold=True)
  c.eval.update(max_questions=8)
  c.engine.update(batch_buckets=(8, 16), prompt_buckets=(256, 512, 1024), new_token_buckets=(96,))
  c.sft.update(steps=4, batch_size=4, warmup_steps=1, buckets=(512,), checkpoint_every=2, log_every=1,
               eval_questions=4)
  c.rm.update(steps=3, batch_size=2, warmup_steps=1, buckets=(512,), eval_every=0, log_every=1,
              checkpoint_every=2, max_score_samples=16)
  c.rl.update(steps=2, prompts_per_step=2, samples_per_prompt=2, minibatches=1, buckets=(512,),
              checkpoint_every=1, max_questions=c.generate.num_queries)
  return c
