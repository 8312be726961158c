"""AutoTraj-JAX entry point: runs the stages a config lists, in one work directory.

    python experiments/main.py --config experiments/configs/demo.py --config.workdir=/tmp/demo

Any config field can be overridden on the command line (`--config.generate.samples_per_query=2`).
Rerunning the same command continues a killed run where it stopped.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an experiments/configs/*.py file.",
                                          lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  config = _CONFIG.value
  import jax
  if config.get("distributed", False):
    jax.distributed.initialize()
  cache = config.get("compilation_cache_dir", "")
  if cache:  # reruns and later stages reuse compiled buckets instead of recompiling them
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  from autotraj_jax import stages
  import data_gen.demo_stages  # noqa: F401  (registers the stages)
  import data_gen.stages  # noqa: F401
  import autotraj_jax.training.sft_stage  # noqa: F401
  import autotraj_jax.training.rl_stage  # noqa: F401
  import autotraj_jax.training.rm_stage  # noqa: F401
  import autotraj_jax.results  # noqa: F401
  wd = stages.run_stages(config)
  for name, info in wd.stage_info().items():
    logging.info("%-12s %8.1fs", name, info["wall_s"])
  print(f"done: {wd.root}")


class _QuietLibraries:
  """Drops INFO chatter of checkpointing libraries; their warnings still show."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or not any(s in record.pathname for s in ("/orbax/", "/jax/_src/", "/grain/"))


if __name__ == "__main__":
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  app.run(main)
