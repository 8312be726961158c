"""The documented eval command: any benchmark JSONL files, one table, the shipped demo policy."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "..", "shared", "data", "benchmarks")


def run_eval(workdir, files, *extra):
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "main.py"), "--config",
         os.path.join(ROOT, "experiments", "configs", "eval.py"), f"--config.workdir={workdir}",
         f"--config.eval.files={','.join(str(f) for f in files)}",
         f"--config.model.hf_dir={os.path.join(ROOT, 'assets', 'demo_policy')}", *extra]
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)


def write(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def test_eval_command_on_unseen_files_writes_one_table(tmp_path):
  a = write(tmp_path / "toy-test.jsonl", [
      {"id": "a1", "question": "What is 123 times 45?", "answer": "5535", "dataset": "toy", "split": "test",
       "domain": "math", "level": "Level 2"},
      {"id": "a2", "question": "What is 7 + 8?", "answer": ["15", "15.0"], "dataset": "toy", "split": "test",
       "domain": "math", "level": "Level 1"},
      {"id": "a3", "question": "Compute " + " + ".join(["12345"] * 700) + ".", "answer": "8641500",
       "dataset": "toy", "split": "test", "domain": "math"}])  # longer than the largest prompt bucket
  b = write(tmp_path / "other.jsonl", [
      {"id": "b1", "question": "Who wrote Hamlet?", "answer": "William Shakespeare", "dataset": "toy2",
       "split": "test", "domain": "knowledge"}])
  proc = run_eval(tmp_path / "run", [a, b])
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
  rows = {r["name"]: r for r in results["rows"]}
  assert set(rows) == {"toy-test", "other"}
  assert rows["toy-test"]["questions"] == 3 and rows["other"]["questions"] == 1
  assert rows["toy-test"]["prompt_too_long"] == 1
  for r in rows.values():
    assert 0.0 <= r["pass@1"] <= 1.0 and "format_error_rate" in r and "tool_calls_per_question" in r
    low, high = r["pass@1_ci95"]
    assert 0.0 <= low <= r["pass@1"] <= high <= 1.0
    assert 0.0 <= r["repeated_tool_call_rate"] <= 1.0 and 0.0 <= r["failed_tool_call_rate"] <= 1.0
  assert rows["toy-test"]["questions_by_level"] == {"1": 1, "2": 1}  # a3 has no level
  assert set(rows["toy-test"]["accuracy_by_level"]) == {"1", "2"} and "accuracy_by_level" not in rows["other"]
  md = (tmp_path / "run" / "eval" / "results.md").read_text()
  assert "| toy-test |" in md and "| other |" in md
  assert "| pass@1 95% CI |" in md and "| accuracy@level1 | accuracy@level2 |" in md
  assert "knowledge questions but no search tool" in proc.stderr


def test_eval_command_refuses_a_bad_file_before_any_work(tmp_path):
  bad = write(tmp_path / "bad.jsonl", [{"id": "x", "question": "q", "answer": "1", "dataset": "d", "split": "test",
                                        "domain": "astrology"}])
  proc = run_eval(tmp_path / "run", [bad])
  assert proc.returncode == 2
  assert "bad.jsonl:1" in proc.stderr and "domain" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(not os.path.isdir(BENCHMARKS), reason="../shared/data/benchmarks is not beside the checkout")
def test_eval_command_on_real_benchmark_files(tmp_path):
  files = [os.path.join(BENCHMARKS, f) for f in ("aime24-test.jsonl", "gsm8k-test.jsonl")]
  proc = run_eval(tmp_path / "run", files, "--config.eval.max_questions=4")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())["rows"]
  assert [r["name"] for r in rows] == ["aime24-test", "gsm8k-test"] and all(r["questions"] == 4 for r in rows)
