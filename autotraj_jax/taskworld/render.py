"""Reference trajectories: the clean, short TIR text a correct solver of a task would write.

Layout: a plan in `<think>`, then per step the tool call and its `<result>` (inserted exactly as
the rollout loop inserts it), a one-line `<think>` saying what was found and what comes next,
and finally `<answer>The final answer is \\boxed{...}</answer>`. Search results default to the
expected passage formatted as the search tool prints it; code results come from running the
code. Real tool outputs can be passed in instead, e.g. top-k passages from a BM25 index.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from autotraj_jax.taskworld.entities import ATTRIBUTES, kind_of
from autotraj_jax.taskworld.lookup import needs
from autotraj_jax.taskworld.task import CodeStep, SearchStep, Task
from autotraj_jax.taskworld.verify import CodeError, run_python, run_python_batch
from autotraj_jax.tir.prompts import result_block
from autotraj_jax.tir.search import Passage, format_passages


def _corpus(corpus: Any) -> Mapping[str, str] | None:
  return corpus.corpus if hasattr(corpus, "corpus") else corpus


def fact_sentences(step: SearchStep) -> str:
  """'Zorvak Works was founded in 1982.' for each fact of a search step."""
  kind = kind_of(step.passage_id)
  out = []
  for attr, value in step.facts:
    sentence = ATTRIBUTES[(kind, attr)].sentence.format(s=step.subject, v=value)
    if attr == "profession" and value[:1] in "aeiou":
      sentence = sentence.replace(f" a {value}", f" an {value}")
    out.append(sentence)
  return " ".join(out)


def search_output(step: SearchStep, corpus: Mapping[str, str]) -> str:
  """The search tool's text when the expected passage is the only hit."""
  return format_passages([Passage(step.passage_id, corpus[step.passage_id])])


def reference_tool_outputs(tasks: Sequence[Task], corpus: Any) -> list[dict[int, str]]:
  """Tool outputs (step -> text) of many tasks' reference solutions; code runs in one batch."""
  corpus = _corpus(corpus)
  code = [(t, i, s.source) for t, task in enumerate(tasks)
          for i, s in enumerate(task.solution.steps) if isinstance(s, CodeStep)]
  results = run_python_batch([src for _, _, src in code])
  outputs: list[dict[int, str]] = [{} for _ in tasks]
  for (t, i, _), (out, err) in zip(code, results):
    if err is not None:
      raise CodeError(f"task {tasks[t].id} step {i}: {err}")
    outputs[t][i] = out.strip()
  for t, task in enumerate(tasks):
    for i, s in enumerate(task.solution.steps):
      if isinstance(s, SearchStep):
        outputs[t][i] = search_output(s, corpus)
  return outputs


def render_reference_trajectory(task: Task, tool_outputs: Mapping[int, str] | None = None, *,
                                corpus: Any = None,
                                run_code: Callable[[str], str] | None = None) -> str:
  """The reference trajectory text of `task` (the assistant's part, after the prompt).

  `tool_outputs` maps step index -> the `<result>` text to insert. A missing search output is
  the expected passage from `corpus` (a TaskWorld or id -> contents); a missing code output is
  `run_code(source)` (default: run it in a child interpreter).
  """
  outputs = dict(tool_outputs or {})
  corpus = _corpus(corpus)
  run_code = run_code or run_python
  steps = task.solution.steps
  parts = [f"<think>{task.solution.plan}</think>\n"]
  for i, step in enumerate(steps):
    if isinstance(step, SearchStep):
      if i not in outputs:
        if corpus is None:
          raise ValueError(f"step {i} is a search: pass its output or a corpus")
        outputs[i] = search_output(step, corpus)
      parts.append(f"<search>{step.query}</search>")
      found = fact_sentences(step)
    else:
      if i not in outputs:
        outputs[i] = run_code(step.source).strip()
      parts.append(f"<code>\n{step.source}\n</code>")
      found = f"The result is {outputs[i].strip()}."
    parts.append(result_block(outputs[i]))
    if i + 1 < len(steps):
      nxt = steps[i + 1]
      then = f"Now I look up {needs(nxt)}." if isinstance(nxt, SearchStep) else \
          f"Now I compute {nxt.note} with Python."
      parts.append(f"<think>{found} {then}</think>\n")
    else:
      parts.append(f"<think>{found}</think>\n")
  parts.append(f"<answer>The final answer is \\boxed{{{task.answer}}}</answer>")
  return "".join(parts)
