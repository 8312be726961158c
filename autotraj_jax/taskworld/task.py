"""The task record and its reference solution, with a JSON form that round-trips exactly.

A solution is a plan of tool calls a correct trajectory would make, plus where the answer comes
from, so a reference trajectory can be rendered and every stored answer re-derived (verified)
from the corpus and from running the plan's own code.

JSON form of a solution (the `solution` field of a split file):

    {"plan": "<first thought>",
     "steps": [{"tool": "search", "query": str, "passage_id": str, "subject": str,
                "facts": {attribute: value, ...}},
               {"tool": "code", "source": str, "note": str}],
     "answer": {"step": i, "attribute": str | null}}

The answer is fact `attribute` of search step `i`, or (attribute null) what code step `i` prints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

FAMILIES: tuple[str, ...] = ("arith", "lookup", "combo")
DATASET = "taskworld"
QA_FIELDS: tuple[str, ...] = ("id", "question", "answer", "dataset", "split", "domain")
RECORD_FIELDS: tuple[str, ...] = QA_FIELDS + ("family", "difficulty", "solution")


@dataclasses.dataclass(frozen=True)
class SearchStep:
  """Search `query`; passage `passage_id` (about `subject`) states `facts`."""

  query: str
  passage_id: str
  subject: str
  facts: tuple[tuple[str, str], ...]

  def fact(self, attribute: str) -> str:
    return dict(self.facts)[attribute]


@dataclasses.dataclass(frozen=True)
class CodeStep:
  """Run `source` (it prints one value); `note` says in words what it computes."""

  source: str
  note: str


Step = SearchStep | CodeStep


@dataclasses.dataclass(frozen=True)
class Solution:
  plan: str
  steps: tuple[Step, ...]
  answer_step: int
  answer_attribute: str | None = None

  def __post_init__(self):
    if not -len(self.steps) <= self.answer_step < len(self.steps):
      raise ValueError(f"answer_step {self.answer_step} outside the {len(self.steps)} steps")
    step = self.steps[self.answer_step]
    if isinstance(step, SearchStep) and self.answer_attribute not in dict(step.facts):
      raise ValueError(f"answer attribute {self.answer_attribute!r} is not a fact of that search step")
    if isinstance(step, CodeStep) and self.answer_attribute is not None:
      raise ValueError("a code step's answer is its output: answer_attribute must be None")

  def to_json(self) -> dict[str, Any]:
    steps = []
    for s in self.steps:
      if isinstance(s, SearchStep):
        steps.append({"tool": "search", "query": s.query, "passage_id": s.passage_id,
                      "subject": s.subject, "facts": dict(s.facts)})
      else:
        steps.append({"tool": "code", "source": s.source, "note": s.note})
    return {"plan": self.plan, "steps": steps,
            "answer": {"step": self.answer_step, "attribute": self.answer_attribute}}

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "Solution":
    steps: list[Step] = []
    for s in d["steps"]:
      if s["tool"] == "search":
        steps.append(SearchStep(s["query"], s["passage_id"], s["subject"], tuple(s["facts"].items())))
      elif s["tool"] == "code":
        steps.append(CodeStep(s["source"], s["note"]))
      else:
        raise ValueError(f"unknown solution step tool {s['tool']!r}")
    return cls(d["plan"], tuple(steps), d["answer"]["step"], d["answer"]["attribute"])


@dataclasses.dataclass(frozen=True)
class Draft:
  """A generated question before it gets an id, split and level.

  `key` names what is asked whatever the wording (same numbers or same entities and relation
  give the same key): splits are made disjoint and deduplicated on it.
  """

  key: str
  question: str
  answer: str
  solution: Solution


@dataclasses.dataclass(frozen=True)
class Task:
  """One generated question with its gold answer (the canonical `\\boxed{}` content)."""

  id: str
  family: str
  question: str
  answer: str
  domain: str
  difficulty: int
  solution: Solution
  split: str = ""

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
    if self.domain not in ("math", "qa"):
      raise ValueError(f"domain must be 'math' or 'qa', got {self.domain!r}")

  def to_record(self) -> dict[str, Any]:
    """The split-file line: the benchmark fields first, then the task-world extras."""
    return {"id": self.id, "question": self.question, "answer": self.answer, "dataset": DATASET,
            "split": self.split, "domain": self.domain, "family": self.family,
            "difficulty": self.difficulty, "solution": self.solution.to_json()}

  @classmethod
  def from_record(cls, r: Mapping[str, Any]) -> "Task":
    return cls(id=r["id"], family=r["family"], question=r["question"], answer=r["answer"],
               domain=r["domain"], difficulty=int(r["difficulty"]),
               solution=Solution.from_json(r["solution"]), split=r.get("split", ""))
