"""Question files: every problem found before any work starts, named as file:line: field."""

import json
import pathlib
import subprocess
import sys

import pytest

from autotraj_jax.questions import KNOWN_DOMAINS, Query, load_questions
from autotraj_jax.tir.answers import is_equivalent

BENCHMARKS = pathlib.Path("/work/shared/data/benchmarks")


def row(i, **kw):
  return {"id": f"q-{i}", "question": f"What is {i}+{i}?", "answer": str(2 * i), "dataset": "toy",
          "split": "test", "domain": "math", **kw}


def write(path, rows, raw=b""):
  path.write_bytes(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows) + raw)
  return path


def test_loads_queries_with_one_or_several_golds(tmp_path):
  rows = [row(0), row(1, answer=["Frank Lowy", "Sir Frank Lowy"], domain="knowledge"), row(2, domain="qa")]
  qs = load_questions(write(tmp_path / "q.jsonl", rows))
  assert qs[0] == Query(id="q-0", question="What is 0+0?", gold="0", domain="math")
  assert qs[1].gold == ("Frank Lowy", "Sir Frank Lowy") and qs[2].domain == "qa"
  assert is_equivalent(qs[1].gold, "sir frank lowy", qs[1].domain)
  assert [q.id for q in load_questions(tmp_path / "q.jsonl", limit=2)] == ["q-0", "q-1"]
  assert len(load_questions(tmp_path / "q.jsonl", limit=0)) == 3  # 0: all, as in the configs
  assert Query("a", "b", gold=["x", "y"]).gold == ("x", "y")


def test_last_line_without_newline_is_a_question(tmp_path):
  path = write(tmp_path / "q.jsonl", [row(0)], json.dumps(row(1)).encode())
  assert [q.id for q in load_questions(path)] == ["q-0", "q-1"]


def test_level_comes_from_difficulty_or_level(tmp_path):
  rows = [row(0, difficulty=2, family="arith", solution="{}"), row(1, level="Level 3"), row(2, level=4), row(3),
          row(4, difficulty=1, level="Level 5"), row(5, level=" 2 "), row(6, level=None)]
  qs = load_questions(write(tmp_path / "q.jsonl", rows))
  assert [q.level for q in qs] == ["2", "3", "4", "", "1", "2", ""]  # difficulty wins over level
  assert qs[3] == Query(id="q-3", question="What is 3+3?", gold="6", domain="math")  # no level: as before
  assert Query("a", "b", "c", "math").level == ""  # positional callers are unchanged


def test_task_world_split_carries_its_difficulty_levels(tmp_path):
  from autotraj_jax.taskworld.task import RECORD_FIELDS
  from autotraj_jax.taskworld.world import write_world
  path = write_world(tmp_path / "world", 0, {"test": 30})["test"]
  records = [json.loads(line) for line in path.read_text().splitlines()]
  assert "difficulty" in RECORD_FIELDS and all(isinstance(r["difficulty"], int) for r in records)
  qs = load_questions(path)
  assert [q.level for q in qs] == [str(r["difficulty"]) for r in records]
  assert len({q.level for q in qs}) > 1


BAD = [
    ([row(0)], b"{not json\n", r"q\.jsonl:2: invalid JSON"),
    ([row(0)], b'{"id": "caf\xe9"}\n', r"q\.jsonl:2: not UTF-8"),
    ([row(0), [1, 2]], b"", r"q\.jsonl:2: expected a question object, got list"),
    ([{k: v for k, v in row(0).items() if k != "answer"}], b"", r"q\.jsonl:1: missing field answer"),
    ([{k: v for k, v in row(0).items() if k != "split"}], b"", r"q\.jsonl:1: missing field split"),
    ([row(0, answer=18)], b"", r"q\.jsonl:1: field answer must be a string or a non-empty list of strings, got int"),
    ([row(0, answer=[])], b"", r"q\.jsonl:1: field answer must be a non-empty list"),
    ([row(0, answer=["18", 18])], b"", r"q\.jsonl:1: field answer\[1\] must be str, got int"),
    ([row(0, answer="  ")], b"", r"q\.jsonl:1: field answer must be a non-empty string"),
    ([row(0, id=7)], b"", r"q\.jsonl:1: field id must be str, got int"),
    ([row(0, question=None)], b"", r"q\.jsonl:1: field question must be str, got null"),
    ([row(0, dataset=1)], b"", r"q\.jsonl:1: field dataset must be str, got int"),
    ([row(0), row(1, domain="poetry")], b"",
     r"q\.jsonl:2: field domain is 'poetry', not a known domain \(code, knowledge, math, qa\)"),
    ([row(0), row(1), row(0)], b"", r"q\.jsonl:3: field id 'q-0' repeats the id of .*q\.jsonl:1$"),
    ([], b"\n\n", r"q\.jsonl: no questions"),
    ([row(0), row(1, difficulty=1.5)], b"", r"q\.jsonl:2: field difficulty must be an int or a string, got float"),
    ([row(0, level=["3"])], b"", r"q\.jsonl:1: field level must be an int or a string, got list"),
    ([row(0, level=True)], b"", r"q\.jsonl:1: field level must be an int or a string, got bool"),
]


@pytest.mark.parametrize("rows, raw, message", BAD, ids=[m for _, _, m in BAD])
def test_bad_files_are_refused_with_file_line_and_field(tmp_path, rows, raw, message):
  with pytest.raises(ValueError, match=message):
    load_questions(write(tmp_path / "q.jsonl", rows, raw))


def test_a_bad_line_past_the_limit_is_still_found(tmp_path):
  path = write(tmp_path / "q.jsonl", [row(0), row(1, answer=5)])
  with pytest.raises(ValueError, match=r"q\.jsonl:2: field answer"):
    load_questions(path, limit=1)


@pytest.mark.parametrize("limit", [-1, 1.5, True])
def test_bad_limit(tmp_path, limit):
  with pytest.raises(ValueError, match="limit must be a non-negative int"):
    load_questions(write(tmp_path / "q.jsonl", [row(0)]), limit=limit)


def test_known_domains_are_the_checkable_ones():
  assert {"math", "knowledge", "qa", "code"} == KNOWN_DOMAINS
  for domain in KNOWN_DOMAINS:
    is_equivalent("1", "1", domain)  # none raises "unknown answer domain"


@pytest.mark.skipif(not BENCHMARKS.is_dir(), reason="no shared benchmarks")
def test_every_benchmark_file_loads():
  for path in sorted(BENCHMARKS.glob("*.jsonl")):
    with open(path, encoding="utf-8") as f:
      n = sum(1 for line in f if line.strip())
    qs = load_questions(path)
    assert len(qs) == n, path
    assert all(isinstance(q.gold, str) and q.domain in KNOWN_DOMAINS for q in qs), path


def test_light_imports():
  code = ("import sys, autotraj_jax.questions, autotraj_jax.eval, autotraj_jax.tir.rollout; "
          "print(sorted(m for m in ('jax', 'tensorflow_datasets', 'tensorflow') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"
