"""How the demo's SFT and RL settings were chosen: on the validation split, never on test.

    python experiments/main.py --config experiments/configs/demo_tune.py --config.workdir=/tmp/tune

Runs the demo's stage 1 (seed 0, without the question-only repair), then evaluates on the 400
validation questions: the base policy; AutoTraj SFT (high + repaired) at the demo's SFT setting and
at each alternative of SFT_SETTINGS; the RM; and GRPO with outcome + format + RM from the demo's
AutoTraj SFT policy at each of RL_SETTINGS. results.md lists them with paired-bootstrap intervals
between adjacent rows; each RL run's KL per update and clip fraction are in
rl_<name>/logs/metrics.jsonl. About 40 minutes on 2 CPU cores. The rule for demo.py: the
setting with the best validation accuracy, then HQ@1, then the fewest format errors (the README
gives the figures of a run).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import STAGE1  # noqa: E402
from demo import get_config as demo_config  # noqa: E402

# Alternatives to the demo's own sft.* (20 steps at 1e-4), each trained as its own variant.
SFT_SETTINGS = {
    "steps40_lr3e-4": dict(steps=40, learning_rate=3e-4),
    "steps20_lr3e-4": dict(steps=20, learning_rate=3e-4),
    "steps40_lr1e-4": dict(steps=40, learning_rate=1e-4),
    "steps80_lr1e-4": dict(steps=80, learning_rate=1e-4),
}
# rl.* settings on top of the demo's (4 prompts x 8 samples, 2 minibatches, 16 steps); lr5e-5 is the demo's own.
RL_SETTINGS = {
    "lr5e-5": dict(learning_rate=5e-5),
    "lr1e-4": dict(learning_rate=1e-4),
    "lr2e-4": dict(learning_rate=2e-4),
    "lr3e-4": dict(learning_rate=3e-4),
    "lr3e-4_mb4": dict(learning_rate=3e-4, minibatches=4),
    "lr6e-4": dict(learning_rate=6e-4),
}


def _variant(setting: str) -> str:
  return "tune_" + setting.replace("-", "").replace(".", "")


def _add_settings(c, kind: str, settings: dict, label: str) -> tuple[list[str], list[tuple[str, str]]]:
  """One `kind` variant per setting, on top of the demo's `autotraj` one; its stages and result rows."""
  variants = c[f"{kind}_variants"]
  stages, rows = [], []
  for setting, fields in settings.items():
    name = _variant(setting)
    variants[name] = {**variants["autotraj"].to_dict(), **fields}
    stages += [f"{kind}:{name}", f"eval:{kind}_{name}"]
    rows.append((f"{label}, {setting}", f"{kind}_{name}"))
  return stages, rows


def get_config():
  c = demo_config()
  c.world.validation = 400
  c.eval.split = "validation"
  sft_stages, sft_rows = _add_settings(c, "sft", SFT_SETTINGS, "AutoTraj SFT")
  rl_stages, rl_rows = _add_settings(c, "rl", RL_SETTINGS, "AutoTraj RL")  # the demo's AutoTraj RL rewards
  c.stages = (tuple(s for s in STAGE1 if not s.endswith(":question"))
              + ("eval:base", "sft:autotraj", "eval:sft_autotraj", *sft_stages, "rm", *rl_stages, "results"))
  c.results.rows = (("base policy", "base"), ("AutoTraj SFT, demo setting", "sft_autotraj"), *sft_rows, *rl_rows)
  return c
