"""Re-derives every stored answer from the corpus and from running the reference code.

The code run here is the task world's own reference code, never model output, so a plain `exec`
in one child process (stdout captured, the whole batch under a timeout) is enough; model code
goes through the sandboxed `code` tool instead.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from autotraj_jax.taskworld.entities import ATTRIBUTES, extract_fact, kind_of, passage_body
from autotraj_jax.taskworld.task import CodeStep, SearchStep, Task

_DRIVER = r"""
import contextlib, io, json, sys
results = []
for source in json.load(sys.stdin):
  buf = io.StringIO()
  try:
    with contextlib.redirect_stdout(buf):
      exec(compile(source, "<reference>", "exec"), {"__name__": "__main__"})
    results.append([buf.getvalue(), None])
  except BaseException as e:
    results.append([buf.getvalue(), f"{type(e).__name__}: {e}"])
json.dump(results, sys.stdout)
"""

_INT_RE = re.compile(r"\d+")


class CodeError(RuntimeError):
  """Reference code that raised or whose process failed."""


def run_python_batch(sources: Sequence[str], timeout_s: float = 10.0) -> list[tuple[str, str | None]]:
  """(stdout, error or None) of each source, all run in one fresh interpreter.

  The timeout covers the whole batch plus a small allowance per source.
  """
  if not sources:
    return []
  proc = subprocess.run([sys.executable, "-I", "-c", _DRIVER], input=json.dumps(list(sources)),
                        capture_output=True, text=True, timeout=timeout_s + 0.01 * len(sources))
  if proc.returncode != 0:
    raise CodeError(f"reference-code runner exited with {proc.returncode}: {proc.stderr[-500:]}")
  return [(out, err) for out, err in json.loads(proc.stdout)]


def run_python(source: str, timeout_s: float = 10.0) -> str:
  """What `source` prints, stripped of surrounding whitespace; CodeError if it raises."""
  out, err = run_python_batch([source], timeout_s)[0]
  if err is not None:
    raise CodeError(err)
  return out.strip()


def _corpus(world: Any) -> Mapping[str, str]:
  return world.corpus if hasattr(world, "corpus") else world


def check_task(task: Task, world: Any, code_outputs: Mapping[int, tuple[str, str | None]] | None = None
               ) -> list[str]:
  """Everything wrong with `task` against the corpus of `world` (a TaskWorld or id -> contents).

  Search steps: the passage exists, is titled with the subject, and each fact read back from its
  text equals the stored one; the subject is named by the question or by an earlier step. Code
  steps: every number of the question and every numeric fact found so far appears in the source,
  and the source runs. The answer step's value must equal `task.answer`. `code_outputs` (step ->
  (stdout, error)) skips running the code again.
  """
  corpus = _corpus(world)
  problems: list[str] = []
  known = {task.question}
  found: list[str] = []  # numeric facts read so far
  values: dict[int, str] = {}
  for i, step in enumerate(task.solution.steps):
    if isinstance(step, SearchStep):
      contents = corpus.get(step.passage_id)
      if contents is None:
        problems.append(f"step {i}: passage {step.passage_id!r} is not in the corpus")
        continue
      if passage_body(contents)[0] != step.subject:
        problems.append(f"step {i}: passage {step.passage_id} is not about {step.subject!r}")
      if step.subject not in step.query:
        problems.append(f"step {i}: query {step.query!r} does not name {step.subject!r}")
      if not any(step.subject in k for k in known):
        problems.append(f"step {i}: {step.subject!r} is named neither by the question nor by an "
                        "earlier passage")
      kind = kind_of(step.passage_id)
      for attr, value in step.facts:
        if (kind, attr) not in ATTRIBUTES:
          problems.append(f"step {i}: {kind} has no attribute {attr!r}")
          continue
        got = extract_fact(contents, kind, attr)
        if got != value:
          problems.append(f"step {i}: passage {step.passage_id} gives {attr}={got!r}, stored {value!r}")
        known.add(value)
        if value.isdigit():
          found.append(value)
      values[i] = dict(step.facts).get(task.solution.answer_attribute or "", "")
    elif isinstance(step, CodeStep):
      numbers = _INT_RE.findall(task.question) + found
      used = set(_INT_RE.findall(step.source))
      missing = [n for n in numbers if n not in used]
      if missing:
        problems.append(f"step {i}: code does not use {missing}")
      if code_outputs is not None and i in code_outputs:
        out, err = code_outputs[i]
      else:
        out, err = run_python_batch([step.source])[0]
      if err is not None:
        problems.append(f"step {i}: code failed: {err}")
      values[i] = out.strip()
  answer = values.get(task.solution.answer_step % len(task.solution.steps))
  if answer != task.answer:
    problems.append(f"the solution gives {answer!r}, stored answer is {task.answer!r}")
  return problems


def verify_tasks(tasks: Sequence[Task], world: Any) -> list[bool]:
  """`verify_task` for many tasks, running all their code in one child process."""
  where = [(t, i) for t, task in enumerate(tasks) for i, s in enumerate(task.solution.steps)
           if isinstance(s, CodeStep)]
  results = run_python_batch([tasks[t].solution.steps[i].source for t, i in where])
  outputs: list[dict[int, tuple[str, str | None]]] = [{} for _ in tasks]
  for (t, i), result in zip(where, results):
    outputs[t][i] = result
  return [not check_task(task, world, out) for task, out in zip(tasks, outputs)]


def verify_task(task: Task, world: Any) -> bool:
  """True when the task's reference solution, executed, gives its stored answer."""
  return verify_tasks([task], world)[0]
