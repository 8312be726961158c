"""A generated task world for tool-integrated reasoning: invented entities, a corpus, and tasks
that need `<code>` (arith), `<search>` (lookup) or both (combo), each with a verified answer and
a reference solution, so the whole pipeline runs on CPU with no download."""

from autotraj_jax.taskworld.arith import arith_draft
from autotraj_jax.taskworld.entities import ATTRIBUTES, Entity, extract_fact
from autotraj_jax.taskworld.render import reference_tool_outputs, render_reference_trajectory
from autotraj_jax.taskworld.task import DATASET, FAMILIES, CodeStep, Draft, SearchStep, Solution, Task
from autotraj_jax.taskworld.verify import CodeError, check_task, run_python, run_python_batch, verify_task, verify_tasks
from autotraj_jax.taskworld.world import (
  DEFAULT_NUM_ENTITIES,
  DEFAULT_POOLS,
  DEFAULT_SIZES,
  LEVELS,
  Level,
  TaskWorld,
  make_splits,
  read_corpus,
  read_split,
  write_world,
)

__all__ = [
  "ATTRIBUTES", "CodeError", "CodeStep", "DATASET", "DEFAULT_NUM_ENTITIES", "DEFAULT_POOLS",
  "DEFAULT_SIZES", "Draft", "Entity", "FAMILIES", "LEVELS", "Level", "SearchStep", "Solution",
  "Task", "TaskWorld", "arith_draft", "check_task", "extract_fact", "make_splits", "read_corpus",
  "read_split", "reference_tool_outputs", "render_reference_trajectory", "run_python",
  "run_python_batch", "verify_task", "verify_tasks", "write_world",
]
