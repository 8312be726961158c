"""Warm-starts the demo policy from scratch and exports it as `assets/demo_policy` (what the demo imports).

    python experiments/main.py --config experiments/configs/demo_policy.py --config.workdir=/tmp/demo_policy

Builds the synthetic world (difficulty 1 and 2, 3000 invented entities in 20000 training tasks, so
facts must be read from tool results, not memorised) and the local tokenizer, trains the
~4.5M-parameter decoder from scratch on reference trajectories with the base config's flaw rates
(hedging, repeated, failed and verbose calls common, guessing rare) and 20% repair demonstrations,
on 19000 training tasks disjoint from the demo's stage-1 questions (4000 steps x 16 sequences),
evaluates it greedily on the held-out test tasks and writes bf16 safetensors + tokenizer to
`--config.export_dir` (default: assets/demo_policy). Expected runtime on a 2-core CPU: about 2.3
hours; the same command resumes an interrupted run from its last checkpoint (every 100 steps).
Expected result: pass@1 about 0.11 on the 400 test questions, about 0.18 at level 1 and 0.04 at
level 2 (eval/base.md).
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
  return c
