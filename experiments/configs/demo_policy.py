"""Warm-starts the demo policy from scratch and exports it as `assets/demo_policy` (what the demo imports).

    python experiments/main.py --config experiments/configs/demo_policy.py --config.workdir=/tmp/demo_policy

Builds the synthetic world and the local tokenizer, trains the ~4M-parameter decoder first on
random sequences written twice (to form copying heads), then on flawed reference trajectories
and repair demonstrations of training tasks disjoint from the demo's stage-1 questions,
evaluates it greedily on held-out test tasks and writes bf16 safetensors + tokenizer to
`--config.export_dir` (default: assets/demo_policy). Expected runtime on a 2-core CPU: about
an hour. Expected result: pass@1 between 0.2 and 0.6 on the test split (eval/base.md).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DEMO_POLICY, base_config  # noqa: E402


def get_config():
  c = base_config()
  c.stages = ("world", "tokenizer", "warmstart", "eval", "export_policy")
  c.export_dir = DEMO_POLICY
  c.warmstart.update(asset="", steps=1200, copy_steps=400)
  c.eval.max_questions = 200
  return c
