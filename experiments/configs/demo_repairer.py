"""Fine-tunes the shipped demo policy into the demo repairer and exports it as `assets/demo_repairer`.

    python experiments/main.py --config experiments/configs/demo_repairer.py --config.workdir=/tmp/demo_repairer

The paper's repairer is a strong LLM next to the policy. Here it is the demo policy's own weights
(and tokenizer, so its repairs are the policy's SFT data token for token), fine-tuned on the demo's
world, on the training tasks the policy warm-started on (disjoint from the demo's stage-1 and test
questions): 85% repair demonstrations (question + a flawed or wrong trajectory + the scorers'
diagnosis -> the clean reference, every flaw kind including miscopied results and guesses) and 15%
clean reference trajectories, which keep it a working tool user. Expected runtime on a 2-core CPU:
about 25 minutes (400 steps), plus its eval as a policy on the test questions (eval/repairer.md).
Set `warmstart.init_from=''` and `model.preset='demo-repairer'` to train a larger one from scratch
(~2 hours on a 2-core CPU, and a weaker repairer at 900 steps).
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
  c.tokenizer.copy_from = DEMO_POLICY
  c.warmstart.name = "repairer"
  c.warmstart.init_from = DEMO_POLICY
  c.warmstart.steps = 400
  c.warmstart.learning_rate = 5e-4
  c.warmstart.warmup_steps = 20
  c.warmstart.repair_fraction = 0.85
  for flaw in c.warmstart.flaws:
    c.warmstart.flaws[flaw] = 0.0  # the rest are clean references
  return c
