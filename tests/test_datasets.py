"""JSONL -> TFDS ArrayRecord -> random-access records, with caching and without TensorFlow."""

import json
import pathlib
import sys

import pytest

from autotraj_jax import datasets as ds

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "benchmarks"

RECORDS = [
    {"id": "q-0", "question": "Janet’s ducks lay 16 eggs. Ünïcödé: 中文, emoji 🦆?",
     "answer": "18", "dataset": "toy", "split": "test", "domain": "math"},
    {"id": "q-1", "question": "Compute $\\frac{1}{2} + \\sqrt{x^2}$ where \\(x=3\\).\nTwo lines\ttab.",
     "answer": "\\frac{7}{2}", "dataset": "toy", "split": "test", "domain": "math"},
    {"id": "q-2", "question": "Quote \" and backslash \\ and {braces}", "answer": "",
     "dataset": "toy", "split": "test", "domain": "knowledge"},
]


def _write(path, records, extra_lines=()):
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
    for line in extra_lines:
      f.write(line + "\n")
  return path


@pytest.fixture
def toy(tmp_path):
  return _write(tmp_path / "toy-test.jsonl", RECORDS * 5)


def test_round_trip_and_random_access(toy, tmp_path):
  src = ds.jsonl_data_source(toy, data_dir=tmp_path / "tfds")
  expected = RECORDS * 5
  assert (src.name, src.split) == ("toy", "test")
  assert len(src) == len(expected)
  for i in (7, 0, 14, 3):
    assert src[i] == expected[i]
  assert src[-1] == expected[-1]
  assert src[2:5] == expected[2:5]
  assert src.__getitems__([4, 1]) == [expected[4], expected[1]]
  assert list(src) == expected
  assert all(type(v) is str for r in src for v in r.values())
  with pytest.raises(IndexError):
    src[len(expected)]
  assert "tensorflow" not in sys.modules


def test_prepared_once_and_rebuilt_on_change(toy, tmp_path, monkeypatch):
  builds = []
  original = ds.AutotrajQa.download_and_prepare
  monkeypatch.setattr(ds.AutotrajQa, "download_and_prepare",
                      lambda self, *a, **k: builds.append(1) or original(self, *a, **k))
  data_dir = tmp_path / "tfds"
  first = ds.jsonl_data_source(toy, data_dir=data_dir)
  shards = sorted(data_dir.glob("autotraj_qa/*/1.0.0/*.array_record*"))
  assert len(shards) == 1
  mtime = shards[0].stat().st_mtime_ns
  second = ds.jsonl_data_source(toy, data_dir=data_dir)
  assert len(builds) == 1
  assert shards[0].stat().st_mtime_ns == mtime
  assert second[3] == first[3]
  # Explicit name/split give a separate build of the same file.
  other = ds.jsonl_data_source(toy, data_dir=data_dir, name="mine", split="train")
  assert (other.name, other.split, len(other)) == ("mine", "train", len(first))
  assert len(builds) == 2
  # New content, new hash, new build.
  _write(toy, RECORDS[:2])
  assert len(ds.jsonl_data_source(toy, data_dir=data_dir)) == 2
  assert len(builds) == 3


def test_default_name_and_split(tmp_path):
  src = ds.jsonl_data_source(_write(tmp_path / "my data.jsonl", RECORDS), data_dir=tmp_path / "d")
  assert (src.name, src.split) == ("my_data", "train")


def test_malformed_jsonl_names_the_line(tmp_path):
  bad_json = _write(tmp_path / "a.jsonl", RECORDS[:2], ["{not json"])
  with pytest.raises(ValueError, match=r"a\.jsonl:3: invalid JSON"):
    ds.read_jsonl(bad_json)
  missing = dict(RECORDS[0])
  del missing["answer"]
  no_answer = _write(tmp_path / "b.jsonl", RECORDS[:1], ["", json.dumps(missing)])
  with pytest.raises(ValueError, match=r"b\.jsonl:3: missing field answer"):
    ds.read_jsonl(no_answer, required_fields=ds.QA_FIELDS)
  wrong_type = _write(tmp_path / "c.jsonl", [dict(RECORDS[0], answer=18)])
  with pytest.raises(ValueError, match=r"c\.jsonl:1: field answer must be str, got int"):
    ds.read_jsonl(wrong_type, required_fields={k: str for k in ds.QA_FIELDS})
  not_object = _write(tmp_path / "d.jsonl", [], ["[1, 2]"])
  with pytest.raises(ValueError, match=r"d\.jsonl:1: expected a JSON object"):
    ds.read_jsonl(not_object)
  not_utf8 = tmp_path / "e.jsonl"
  not_utf8.write_bytes(json.dumps(RECORDS[0]).encode() + b'\n{"id": "\xff"}\n')
  with pytest.raises(ValueError, match=r"e\.jsonl:2: not UTF-8 \(byte 0xff at column 9\)"):
    ds.read_jsonl(not_utf8)
  # The builder reports the same message, and leaves nothing half-built behind.
  with pytest.raises(ValueError, match=r"b\.jsonl:3: missing field answer"):
    ds.jsonl_data_source(no_answer, data_dir=tmp_path / "tfds")
  assert not list((tmp_path / "tfds").glob("autotraj_qa/*/1.0.0/dataset_info.json"))


def test_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ds.jsonl_data_source(tmp_path / "nope.jsonl", data_dir=tmp_path)
  _write(tmp_path / "gsm8k-test.jsonl", RECORDS)
  with pytest.raises(FileNotFoundError, match=r"available: \['gsm8k-test'\]"):
    ds.benchmark_source("math", data_dir=tmp_path / "d", benchmarks_dir=tmp_path)


@pytest.mark.skipif(not (BENCHMARKS / "gsm8k-test.jsonl").is_file(), reason="no shared benchmarks")
def test_gsm8k_benchmark(tmp_path):
  path = BENCHMARKS / "gsm8k-test.jsonl"
  with open(path, encoding="utf-8") as f:
    lines = [json.loads(line) for line in f if line.strip()]
  src = ds.benchmark_source("gsm8k", "test", data_dir=tmp_path, benchmarks_dir=BENCHMARKS)
  assert len(src) == len(lines)
  for i in (0, len(lines) // 2, len(lines) - 1):
    assert src[i] == {k: lines[i][k] for k in ds.QA_FIELDS}
  assert "tensorflow" not in sys.modules
  assert not any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules)


def test_read_jsonl_lives_in_the_light_questions_module():
  from autotraj_jax import questions
  assert ds.read_jsonl is questions.read_jsonl and ds.QA_FIELDS == questions.QA_FIELDS
