"""The whole stage 1 on CPU with no server and no download (the embedded default).

    python experiments/main.py --config experiments/configs/demo.py --config.workdir=/tmp/demo

Builds the synthetic task world and a local tokenizer, warm-starts a ~4M-parameter policy on
flawed reference trajectories, samples 4 candidates for each of 300 training questions with
real tool calls, scores and repairs them, writes the SFT set, the preference pairs and the
stats report, and evaluates the warm-started policy on 200 held-out test questions.
Expected runtime on a 2-core CPU: about 10-15 minutes. Expected result: base pass@1 between
0.2 and 0.6, a real share of correct candidates scored low quality, and a few hundred SFT
examples and preference pairs (figures of a run are in the README).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import base_config  # noqa: E402


def get_config():
  return base_config()
