"""Question files: the benchmark JSONL schema, validated whole before any work starts.

One JSON object a line: `id, question, answer, dataset, split, domain` (the files under
`shared/data/benchmarks/` and the generated world's splits). `answer` is the gold: a string, or
a non-empty list of acceptable strings. An optional difficulty level, `difficulty` (the task
world's int) or `level` (MATH-style, `"Level 3"` or `3`), becomes `Query.level` so evaluations
can report accuracy per level. Every problem is reported as `file:line: field ...`
before a model is loaded, so a bad line costs seconds, not an evaluation.

Kept light on purpose (no JAX, no TensorFlow Datasets): evaluation and the pipeline import it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any, Iterable

from autotraj_jax.tir.answers import CODE_DOMAINS, MATH_DOMAINS, QA_DOMAINS
from autotraj_jax.tir.records import (
  Check,
  RecordError,
  as_object,
  fail,
  field,
  is_bool,
  is_int,
  is_number,
  is_object,
  is_str,
  iter_records,
  list_of,
)

QA_FIELDS: tuple[str, ...] = ("id", "question", "answer", "dataset", "split", "domain")
# The domains `answers.is_equivalent` can check; any other would fail mid-evaluation.
KNOWN_DOMAINS: frozenset[str] = MATH_DOMAINS | QA_DOMAINS | CODE_DOMAINS

Gold = str | tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Query:
  """One question to roll out. `gold` is one answer or a tuple of acceptable ones; `level` is the
  question's difficulty level as text ('' when the file gives none)."""

  id: str
  question: str
  gold: Gold | None = None
  domain: str = "math"
  level: str = ""

  def __post_init__(self):
    if isinstance(self.gold, list):  # JSON gives lists; a frozen record keeps a tuple
      object.__setattr__(self, "gold", tuple(self.gold))


_TYPE_CHECKS: dict[type, Check] = {str: is_str, int: is_int, float: is_number, bool: is_bool, dict: is_object}


def _type_check(kind: type | None) -> Check:
  if kind is None:
    return lambda v, where, name: v
  if kind in _TYPE_CHECKS:
    return _TYPE_CHECKS[kind]

  def check(value: Any, where: str, name: str) -> Any:
    if not isinstance(value, kind):
      raise fail(where, name, kind.__name__, value)
    return value

  return check


def read_jsonl(path: str | os.PathLike,
               required_fields: Iterable[str] | Mapping[str, type] = ()) -> list[dict]:
  """All records of a hand-made JSONL file; blank lines are skipped, a last line without a
  newline is read.

  `required_fields` names keys every record must have; a mapping also gives each key's type.
  A malformed line (invalid JSON, non-UTF-8, not an object, a missing or wrong-typed field)
  raises RecordError (a ValueError) naming `file:line` and the field.
  """
  types = dict(required_fields) if isinstance(required_fields, Mapping) else \
      {name: None for name in required_fields}
  checks = {name: _type_check(kind) for name, kind in types.items()}

  def parse(record: Any, where: str) -> dict:
    as_object(record, where)
    for name, check in checks.items():
      field(record, name, check, where)
    return record

  return list(iter_records(path, parse, keep_unterminated=True))


def _non_empty_str(value: Any, where: str, name: str) -> str:
  if not is_str(value, where, name).strip():
    raise RecordError(f"{where}: field {name} must be a non-empty string")
  return value


def _answer(value: Any, where: str, name: str) -> Gold:
  if isinstance(value, list):
    return tuple(list_of(_non_empty_str, non_empty=True)(value, where, name))
  if not isinstance(value, str):
    raise fail(where, name, "a string or a non-empty list of strings", value)
  return _non_empty_str(value, where, name)


def _domain(value: Any, where: str, name: str) -> str:
  if is_str(value, where, name) not in KNOWN_DOMAINS:
    raise RecordError(f"{where}: field {name} is {value!r}, not a known domain "
                      f"({', '.join(sorted(KNOWN_DOMAINS))})")
  return value


LEVEL_FIELDS: tuple[str, ...] = ("difficulty", "level")  # the first one a record has is its level
_LEVEL_PREFIX = re.compile(r"^level\s*", re.IGNORECASE)


def _level_text(value: Any, where: str, name: str) -> str:
  """An int level or a string one; MATH's 'Level 3' is '3', so every file names levels alike."""
  if isinstance(value, int) and not isinstance(value, bool):
    return str(value)
  if value is None:
    return ""
  if not isinstance(value, str):
    raise fail(where, name, "an int or a string", value)
  return _LEVEL_PREFIX.sub("", value.strip())


def _level(record: dict, where: str) -> str:
  """The record's level ('' when it has none): `difficulty` (task world) first, else `level`."""
  for name in LEVEL_FIELDS:
    if name in record:
      return field(record, name, _level_text, where)
  return ""


def _query(record: Any, where: str) -> tuple[Query, str]:
  as_object(record, where, "a question object")
  for name in ("dataset", "split"):
    field(record, name, is_str, where)
  q = Query(id=field(record, "id", _non_empty_str, where), question=field(record, "question", _non_empty_str, where),
            gold=field(record, "answer", _answer, where), domain=field(record, "domain", _domain, where),
            level=_level(record, where))
  return q, where


def load_questions(path: str | os.PathLike, limit: int | None = None) -> list[Query]:
  """The questions of a file, every line validated first; `limit` keeps the first ones
  (None or 0: all, the config convention).

  Raises ValueError naming `file:line: field` for invalid JSON, non-UTF-8 bytes, a missing or
  wrong-typed field, an unknown domain or a repeated id (both lines named), and for a file
  with no questions or a negative limit.
  """
  if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
    raise ValueError(f"limit must be a non-negative int or None (0 or None: all questions), got {limit!r}")
  path = os.fspath(path)
  seen: dict[str, str] = {}
  queries = []
  for q, where in iter_records(path, _query, keep_unterminated=True):
    if q.id in seen:
      raise RecordError(f"{where}: field id {q.id!r} repeats the id of {seen[q.id]}")
    seen[q.id] = where
    queries.append(q)
  if not queries:
    raise ValueError(f"{path}: no questions")
  return queries[:limit] if limit else queries


__all__ = ["Gold", "KNOWN_DOMAINS", "LEVEL_FIELDS", "QA_FIELDS", "Query", "load_questions", "read_jsonl"]
