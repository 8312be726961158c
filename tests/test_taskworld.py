"""The synthetic task world: reproducible disjoint splits, verified answers, reference trajectories."""

import dataclasses
import json
import re

import pytest

from autotraj_jax.taskworld import (
  FAMILIES,
  LEVELS,
  CodeStep,
  SearchStep,
  Task,
  TaskWorld,
  arith_draft,
  check_task,
  extract_fact,
  make_splits,
  read_corpus,
  read_split,
  reference_tool_outputs,
  render_reference_trajectory,
  verify_task,
  verify_tasks,
  write_world,
)
from autotraj_jax.taskworld.entities import kind_of
from autotraj_jax.taskworld.task import QA_FIELDS

SMALL = {"train": 300, "validation": 60, "test": 60}


@pytest.fixture(scope="module")
def world():
  return TaskWorld(seed=0)


@pytest.fixture(scope="module")
def splits(world):
  return make_splits(0, {"train": 1500, "validation": 300, "test": 300}, world=world)


def _files(paths):
  return {name: p.read_bytes() for name, p in paths.items()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
  a = _files(write_world(tmp_path / "a", 3, SMALL, num_entities=600))
  b = _files(write_world(tmp_path / "b", 3, SMALL, num_entities=600))
  c = _files(write_world(tmp_path / "c", 4, SMALL, num_entities=600))
  assert set(a) == {"corpus", "train", "validation", "test", "world"}
  assert a == b
  for name in ("corpus", "train", "validation", "test"):
    assert a[name] != c[name], name


def test_split_does_not_depend_on_other_split_sizes():
  one = make_splits(5, {"train": 200, "test": 50}, num_entities=600)
  two = make_splits(5, {"train": 200, "test": 80}, num_entities=600)
  assert one["train"] == two["train"]


def test_write_world_reads_back(tmp_path):
  paths = write_world(tmp_path, 0)  # default: 4000 / 500 / 500 tasks, 1500 passages
  corpus = read_corpus(paths["corpus"])
  assert len(corpus) == 1500
  test = read_split(paths["test"])
  assert len(test) == 500 and len(read_split(paths["train"])) == 4000
  with open(paths["test"], encoding="utf-8") as f:
    record = json.loads(f.readline())
  assert list(record)[:len(QA_FIELDS)] == list(QA_FIELDS)
  assert all(isinstance(record[k], str) for k in QA_FIELDS)
  assert record["dataset"] == "taskworld" and record["split"] == "test"
  assert record["id"] == test[0].id and test[0] == Task.from_record(test[0].to_record())
  assert all(verify_tasks(test[:50], corpus))


def test_records_fields_and_domains(splits):
  for split, tasks in splits.items():
    assert [t.id for t in tasks] == [f"taskworld-{split}-{i}" for i in range(len(tasks))]
    for t in tasks:
      assert t.split == split and t.answer and t.question
      assert t.domain == ("qa" if t.family == "lookup" else "math")
      if t.domain == "math":
        assert re.fullmatch(r"\d+", t.answer)
      json.dumps(t.to_record())  # serialisable
      assert Task.from_record(json.loads(json.dumps(t.to_record()))) == t
  counts = {(f, d): 0 for f in FAMILIES for d in LEVELS}
  for t in splits["train"]:
    counts[(t.family, t.difficulty)] += 1
  assert min(counts.values()) >= 1500 // 9 - 1  # families and levels come in equal turns


def _entities(task, world):
  """Every entity a task names or retrieves."""
  ids = {s.passage_id for s in task.solution.steps if isinstance(s, SearchStep)}
  names = {world.entity(i).name for i in ids}
  return ids, names


def test_splits_are_disjoint(world, splits):
  questions = {split: [t.question for t in tasks] for split, tasks in splits.items()}
  for split, qs in questions.items():
    assert len(set(qs)) == len(qs), f"duplicate question within {split}"
  ents, arith = {}, {}
  for split, tasks in splits.items():
    ents[split] = set()
    arith[split] = set()
    for t in tasks:
      if t.family == "arith":
        arith[split].add(tuple(re.findall(r"\d+", t.question)))
        continue
      ids, names = _entities(t, world)
      assert {world.entity(i).pool for i in ids} == {split}
      ents[split] |= ids
  names = list(splits)
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      assert not set(questions[a]) & set(questions[b]), (a, b)
      assert not ents[a] & ents[b], (a, b)
      assert not arith[a] & arith[b], (a, b)
  # No test-question entity is even mentioned by a train question.
  train_text = " ".join(questions["train"])
  test_names = {world.entity(i).name for i in ents["test"]}
  assert not [n for n in test_names if n in train_text]


def test_every_task_verifies(world, splits):
  sample = splits["test"] + splits["train"][:300]
  assert len(sample) >= 200
  assert all(verify_tasks(sample, world))
  for t in sample[:3]:
    assert verify_task(t, world)


def test_verification_catches_wrong_answers(world, splits):
  by_family = {f: next(t for t in splits["test"] if t.family == f and t.difficulty == 2)
               for f in FAMILIES}
  for t in by_family.values():
    assert check_task(t, world) == []
    bad = dataclasses.replace(t, answer=t.answer + "1")
    assert not verify_task(bad, world)
  # A corpus whose passage states another value fails the search step.
  t = by_family["lookup"]
  step = t.solution.steps[-1]
  corpus = dict(world.corpus)
  corpus[step.passage_id] = corpus[step.passage_id].replace(t.answer, "Zzz" + t.answer.lower())
  assert not verify_task(t, corpus)
  # Code that does not use the found numbers, or that crashes, fails.
  t = by_family["combo"]
  steps = list(t.solution.steps)
  steps[-1] = CodeStep(f"print({t.answer})", "cheat")
  cheat = dataclasses.replace(t, solution=dataclasses.replace(t.solution, steps=tuple(steps)))
  assert any("does not use" in p for p in check_task(cheat, world))
  steps[-1] = CodeStep("raise SystemExit(3)", "crash")
  crash = dataclasses.replace(t, solution=dataclasses.replace(t.solution, steps=tuple(steps)))
  assert not verify_task(crash, world)


def test_search_steps_point_at_passages_stating_the_fact(world, splits):
  n = 0
  for t in splits["test"] + splits["validation"]:
    for s in t.solution.steps:
      if isinstance(s, SearchStep):
        contents = world.corpus[s.passage_id]
        assert contents.startswith(f'"{s.subject}"\n')
        assert s.subject in s.query
        for attr, value in s.facts:
          assert value in contents
          assert extract_fact(contents, kind_of(s.passage_id), attr) == value
        n += 1
  assert n > 300


def test_bm25_ranks_the_expected_passage_first(world, splits, tmp_path):
  pytest.importorskip("bm25s")
  from autotraj_jax.tir.search import BM25Index
  corpus = tmp_path / "corpus.jsonl"
  corpus.write_text("".join(json.dumps(r) + "\n" for r in world.corpus_records()))
  index = BM25Index(corpus, cache_dir=tmp_path / "cache")
  steps = [s for t in splits["test"] for s in t.solution.steps if isinstance(s, SearchStep)]
  hits = index.batch_search([s.query for s in steps], k=1)
  assert [h[0].id for h in hits] == [s.passage_id for s in steps]


def test_names_are_unique_words(world):
  words = {}
  for e in world.entities:
    for w in e.name.split()[-1:] if e.kind != "company" else e.name.split()[:1]:
      assert w.lower() not in words, (w, e.id, words.get(w.lower()))
      words[w.lower()] = e.id
  assert len({e.name for e in world.entities}) == len(world.entities)
  stemmer = pytest.importorskip("Stemmer").Stemmer("english")
  stems = stemmer.stemWords(list(words))
  assert len(set(stems)) == len(stems)


def _tool_tags(text):
  return re.findall(r"<(code|search)>", text)


def test_reference_trajectories(world, splits):
  tasks = splits["test"][:120]
  outputs = reference_tool_outputs(tasks, world)
  try:
    from autotraj_jax.tir.format import extract_answer, validate
  except ImportError:
    extract_answer = validate = None
  for task, out in zip(tasks, outputs):
    text = render_reference_trajectory(task, out)
    answer = re.search(r"<answer>(.*?)</answer>", text, re.S).group(1)
    assert f"\\boxed{{{task.answer}}}" in answer
    assert text.endswith("</answer>") and text.startswith("<think>")
    tags = _tool_tags(text)
    assert len(tags) == len(task.solution.steps) == text.count("<result>")
    assert set(tags) == {"arith": {"code"}, "lookup": {"search"}, "combo": {"code", "search"}}[task.family]
    assert len(tags) <= 3
    if validate is not None:
      assert validate(text) == [], (task.id, validate(text))
      assert extract_answer(text) == task.answer


def test_render_runs_code_and_reads_corpus(world, splits):
  task = next(t for t in splits["test"] if t.family == "combo")
  default = render_reference_trajectory(task, corpus=world)
  assert default == render_reference_trajectory(task, reference_tool_outputs([task], world)[0])
  calls = []

  def fake(src):
    calls.append(src)
    return task.answer

  assert render_reference_trajectory(task, corpus=world.corpus, run_code=fake) == default
  assert calls == [task.solution.steps[-1].source]
  with pytest.raises(ValueError, match="corpus"):
    render_reference_trajectory(task, run_code=fake)


def test_arith_knobs_change_digits_and_steps():
  import random
  rng = random.Random(0)
  for digits in (3, 6):
    for steps in (1, 2, 5):
      d = arith_draft(rng, steps, digits)
      numbers = re.findall(r"\d+", d.question)
      assert len(numbers[0]) == digits
      assert len(numbers) == steps + 1
      lines = d.solution.steps[0].source.splitlines()
      assert steps <= len(lines) <= steps + 1 and lines[-1].startswith("print(")
  with pytest.raises(ValueError):
    arith_draft(rng, 0, 4)
  with pytest.raises(ValueError):
    arith_draft(rng, 2, 1)


def test_levels_change_digits_steps_and_hops(world):
  by_level = {lvl: make_splits(1, {"test": 60}, difficulty=lvl, world=world)["test"] for lvl in LEVELS}
  for lvl, tasks in by_level.items():
    assert {t.difficulty for t in tasks} == {lvl}
    for t in tasks:
      searches = sum(isinstance(s, SearchStep) for s in t.solution.steps)
      if t.family == "arith":
        assert len(re.findall(r"\d+", t.question)[0]) == LEVELS[lvl].arith_digits
        assert len(re.findall(r"\d+", t.question)) == LEVELS[lvl].arith_steps + 1
      elif t.family == "lookup":
        assert searches == LEVELS[lvl].lookup_hops
      else:
        assert searches == (1 if lvl == 1 else 2)


def test_bad_arguments_and_capacity():
  small = TaskWorld(seed=0, num_entities=60)
  with pytest.raises(ValueError, match="pool"):
    small.tasks("dev", 3)
  with pytest.raises(ValueError, match="difficulty"):
    small.tasks("test", 3, difficulty=7)
  with pytest.raises(ValueError, match="families"):
    small.tasks("test", 3, families=["poetry"])
  with pytest.raises(ValueError, match="num_entities"):
    small.tasks("test", 200, families=["lookup"], difficulty=1)
