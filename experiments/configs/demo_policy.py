"""Warm-starts the demo policy from scratch and exports it as `assets/demo_policy` (what the demo imports).

    python experiments/main.py --config experiments/configs/demo_policy.py --config.workdir=/tmp/demo_policy

Builds the synthetic world and the local tokenizer, trains the ~4.5M-parameter decoder from
scratch on flawed reference trajectories and repair demonstrations of training tasks disjoint from
the demo's stage-1 questions (1500 steps x 16 sequences), evaluates it greedily on held-out test
tasks and writes bf16 safetensors + tokenizer to `--config.export_dir` (default:
assets/demo_policy). Expected runtime on a 2-core CPU: about 35 minutes. Expected result: pass@1
about 0.25 on the 200 test questions (eval/base.md; the shipped policy: 0.255).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DEMO_POLICY, base_config  # noqa: E402


def get_config():
  c = base_config()
  c.stages = ("world", "tokenizer", "warmstart", "eval", "export_policy")
  c.export_dir = DEMO_POLICY
  c.model.hf_dir = ""
  c.eval.max_questions = 200
  return c
