"""Warm-starts the demo repairer from scratch and exports it as `assets/demo_repairer`.

    python experiments/main.py --config experiments/configs/demo_repairer.py --config.workdir=/tmp/demo_repairer

The paper's repairer is a strong LLM next to the policy. This one is a ~10M-parameter decoder
(preset `demo-repairer`, ~2.5x the demo policy) with the demo policy's tokenizer (copied from
assets/demo_policy, so its repairs are the policy's SFT data token for token), trained on tasks
of every difficulty level: 60% repair demonstrations (question + a flawed or wrong trajectory +
the scorers' diagnosis -> the clean reference, every flaw kind including miscopied results and
guesses) and 40% clean reference trajectories. Its greedy pass@1 as a policy on the test
questions is in eval/repairer.md. Expected runtime on a 2-core CPU: about 2 hours (900 steps
of ~8 s; sequences of up to ~900 tokens).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DEMO_POLICY, DEMO_REPAIRER, base_config  # noqa: E402


def get_config():
  c = base_config()
  c.stages = ("world", "tokenizer", "warmstart", "eval:repairer", "export_policy")
  c.export_dir = DEMO_REPAIRER
  c.model.hf_dir = ""
  c.model.preset = "demo-repairer"
  c.tokenizer.copy_from = DEMO_POLICY
  c.world.difficulty = (1, 2, 3)
  c.world.test = 300
  c.warmstart.name = "repairer"
  c.warmstart.steps = 900
  c.warmstart.learning_rate = 2e-3
  c.warmstart.repair_fraction = 0.6
  c.warmstart.repair_flaws = ("hedge", "repeat_call", "failed_call", "verbose", "broken_tags", "guess", "copy_error")
  for flaw in c.warmstart.flaws:
    c.warmstart.flaws[flaw] = 0.0  # the rest are clean references
  c.eval.max_questions = 300
  return c
