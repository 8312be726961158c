"""The pipeline: the typed config, the stage runner and work directory, the config -> object
builders, and the library's stages (demo stand-ins, SFT, RM, RL, eval, results).

Stage 1 (generation, scoring, repair, datasets) lives in `data_gen`; `experiments/main.py` joins
`autotraj_jax.pipeline.stages.STAGES` with `data_gen.stages.STAGES` and runs them.
"""

from autotraj_jax.pipeline.config import ConfigError, base_config, describe, validate
from autotraj_jax.pipeline.runner import Stage, StaleStageError, run_stages
from autotraj_jax.pipeline.workdir import Workdir

__all__ = ["ConfigError", "Stage", "StaleStageError", "Workdir", "base_config", "describe", "run_stages",
           "validate"]
