"""The whole AutoTraj pipeline on CPU with no server and no download (the embedded default).

    python experiments/main.py --config experiments/configs/demo.py --config.workdir=/tmp/demo

Stage 1: builds the synthetic task world (difficulty levels 1 and 2), imports the shipped
warm-started ~4.5M-parameter policy (assets/demo_policy) and the repairer fine-tuned from it
(assets/demo_repairer; `--config.model.hf_dir='' --config.repairer.hf_dir=''` trains a policy
instead and lets it repair), samples 4 candidates for each of 250 training questions with real tool
calls, scores and repairs them, and writes the SFT set, the preference pairs and the stats report
(report/); then repairs the same originals again with the repairer seeing only the question (the
authors' code; sft_question.jsonl, report_question/).
Stage 2: evaluates the base policy, SFT on high-quality only, AutoTraj SFT (high-quality + repaired),
the same SFT with the question-only repairs, trains the Bradley-Terry RM on the pairs, runs GRPO
with outcome + format rewards and with outcome + format + RM from the AutoTraj SFT policy, evaluates
each on 400 held-out test questions and writes results.json, results.md and plots/. Measured runtime
on a quiet 2-core CPU (AMD EPYC) from an empty compile cache: 14 minutes (generation 1.5, repair 1.3,
question-only repair 0.7, each evaluation 0.6-0.8, each SFT 0.5-0.6, the RM 1.3, each GRPO variant
1.5-1.7); an older 2-core machine took 20. The SFT and GRPO settings were chosen on validation
questions (demo_tune.py).
Expected result: the table of `results.rows` in results.md (figures of runs are in the README).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DEMO_REPAIRER, STAGE1, STAGE2, base_config  # noqa: E402


def get_config():
  c = base_config()
  c.stages = STAGE1 + STAGE2
  c.repairer.update(hf_dir=DEMO_REPAIRER, name="demo-repairer")
  # Sized for about 20 minutes on 2 CPU cores: 250 stage-1 questions, the ~60 low-quality originals
  # and then wrong ones round-robin over questions up to 200 (all ~940: ~10 min more), 40 RM steps,
  # 16 RL steps.
  c.generate.num_queries = c.rl.max_questions = 250  # RL draws from the stage-1 questions
  c.repair.max_originals = 200
  c.rm.steps = 40
  c.rl.steps = 16
  # Chosen on the validation split (demo_tune.py): SFT 20 steps at 1e-4; GRPO groups of 8 samples at 5e-5.
  c.sft.update(steps=20, learning_rate=1e-4)
  c.rl.update(prompts_per_step=4, samples_per_prompt=8, learning_rate=5e-5)
  return c
