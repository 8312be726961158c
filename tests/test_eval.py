import json

import pytest
from scripted_backend import ScriptedBackend
from test_rollout import ContextLimit, EchoTool

from autotraj_jax.engine import SamplingParams
from autotraj_jax.eval import EvalConfig, evaluate, write_report
from autotraj_jax.questions import load_questions
from autotraj_jax.tir import prompts
from autotraj_jax.tir.rollout import RolloutConfig


def test_eval_metrics_on_scripted_answers(demo_tokenizer, tmp_path):
  rows = [{"id": "a", "question": "1+1?", "answer": "2", "domain": "math"},
          {"id": "b", "question": "capital?", "answer": "Paris", "domain": "knowledge"},
          {"id": "c", "question": "3*3?", "answer": "9", "domain": "math"}]
  rows = [{**r, "dataset": "toy", "split": "test"} for r in rows]
  path = tmp_path / "bench.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  queries = load_questions(str(path))
  scripts = {
      "1+1?": ["<code>print(1+1)</code>", "<think>ok</think><answer>\\boxed{2}</answer>"],
      "capital?": ["<think>x</think><answer>\\boxed{paris}</answer>"],
      "3*3?": ["<code>print(3*3)</code>", "<answer>no box</answer>"],
  }
  backend = ScriptedBackend(demo_tokenizer, {tuple(prompts.prompt_ids(demo_tokenizer, q)): t
                                             for q, t in scripts.items()})
  cfg = EvalConfig(rollout=RolloutConfig(sampling=SamplingParams(temperature=1.0)), maj_k=3)
  metrics, trajs = evaluate(backend, demo_tokenizer, {"code": EchoTool()}, queries, cfg)
  assert metrics["pass@1"] == 2 / 3 and metrics["maj@3"] == 2 / 3
  assert metrics["tool_calls_per_question"] == 2 / 3
  assert metrics["answered_rate"] == 2 / 3
  assert metrics["format_error_rate"] >= 1 / 3
  assert metrics["prompt_too_long"] == 0
  write_report(str(tmp_path / "out"), "demo", metrics, trajs)
  assert json.loads((tmp_path / "out" / "demo.json").read_text())["pass@1"] == 2 / 3
  assert "| run | questions | pass@1" in (tmp_path / "out" / "demo.md").read_text()


def test_prompt_too_long_is_a_counted_failure_not_an_abort(demo_tokenizer, tmp_path):
  long_q = "Compute " + "one plus " * 80 + "one?"
  rows = [{"id": "a", "question": "1+1?", "answer": "2", "dataset": "t", "split": "test", "domain": "math"},
          {"id": "b", "question": long_q, "answer": ["81", "eighty-one"], "dataset": "t", "split": "test",
           "domain": "math"}]
  path = tmp_path / "bench.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  queries = load_questions(path)
  scripts = {"1+1?": ["<answer>\\boxed{2}</answer>"], long_q: ["<answer>\\boxed{81}</answer>"]}
  inner = ScriptedBackend(demo_tokenizer, {tuple(prompts.prompt_ids(demo_tokenizer, q)): t for q, t in scripts.items()})
  backend = ContextLimit(inner, len(prompts.prompt_ids(demo_tokenizer, "1+1?")) + 8)
  cfg = EvalConfig(rollout=RolloutConfig(sampling=SamplingParams(temperature=1.0)), maj_k=2)
  metrics, trajs = evaluate(backend, demo_tokenizer, {}, queries, cfg)
  assert metrics["prompt_too_long"] == 1 and metrics["questions"] == 2
  assert metrics["pass@1"] == 0.5 and metrics["maj@2"] == 0.5
  assert [t.finish_reason for t in trajs] == ["answer", "prompt_too_long"] and trajs[1].scores == {"correct": 0.0}


def test_report_prints_counts_as_integers(tmp_path):
  from autotraj_jax.eval import write_report
  write_report(str(tmp_path), "base", {"questions": 200, "pass@1": 0.255, "prompt_too_long": 0})
  md = (tmp_path / "base.md").read_text()
  assert "| base | 200 | 0.255 | 0 |" in md and "200.000" not in md


def _traj(i, text, calls=(), answer=None, gold="1"):
  """A hand-made greedy trajectory: `calls` are (input, ok) code calls; `text` the whole response."""
  from autotraj_jax.tir.trajectory import Segment, ToolCall, Trajectory
  return Trajectory(id=f"eval/q{i}#0", question_id=f"q{i}", question="?", prompt_ids=[1],
                    segments=[Segment("model", [2, 3], text)], gold=gold, answer=answer, finish_reason="answer",
                    tool_calls=[ToolCall("code", inp, "out" if ok else "Error: timed out", ok, 0.1,
                                         None if ok else "timeout") for inp, ok in calls])


GOOD = "<code>print(1)</code><result>1</result><answer>\\boxed{1}</answer>"


def test_behaviour_rates_on_hand_made_trajectories():
  from autotraj_jax.eval import has_failed_tool_call, has_repeated_tool_call, trajectory_stats
  trajs = [
      _traj(0, GOOD, [("print(1)", True)], "1"),                                   # clean
      _traj(1, GOOD, [("print(1)", True), ("  print(1)\n", True)], "1"),          # repeated (whitespace only)
      _traj(2, "<code>x</code><result>e</result><answer>1</answer>", [("x", False)]),  # failed, no \boxed{}
      _traj(3, GOOD, [("y = 2", True), ("y = 2", False)], "1"),                    # repeated and failed
      _traj(4, "<think>hm</think>"),                                               # no answer block
      _traj(5, GOOD, [("print(1)", True), ("print(2)", True)], "1"),              # two different calls
  ]
  assert [has_repeated_tool_call(t) for t in trajs] == [False, True, False, True, False, False]
  assert [has_failed_tool_call(t) for t in trajs] == [False, False, True, True, False, False]
  stats = trajectory_stats(trajs)
  assert stats["repeated_tool_call_rate"] == 2 / 6 and stats["failed_tool_call_rate"] == 2 / 6
  assert stats["format_error_rate"] == 2 / 6
  assert stats["tool_error_rate"] == 2 / 8  # per call, unlike the per-trajectory rates
  assert trajectory_stats([])["repeated_tool_call_rate"] == 0.0


def test_by_level_orders_levels_and_skips_unlevelled_questions():
  from autotraj_jax.eval import accuracy_ci95, by_level, level_metrics
  assert list(by_level(["10", "2", "1", "", "2", "hard"], [1, 0, 1, 1, 1, 0]).items()) == [
      ("1", 1.0), ("2", 0.5), ("10", 1.0), ("hard", 0.0)]
  assert level_metrics(["", ""], [1.0, 0.0]) == {}
  assert level_metrics(["1", "2", "1", ""], [1.0, 0.0, 0.0, 1.0]) == {
      "accuracy_by_level": {"1": 0.5, "2": 0.0}, "questions_by_level": {"1": 2, "2": 1}}
  low, high = accuracy_ci95(0.5, 20)
  assert 0.0 < low < 0.5 < high < 1.0 and accuracy_ci95(0.0, 0) is None
  with pytest.raises(ValueError, match="pair up"):
    by_level(["1"], [1.0, 0.0])


def test_eval_keeps_levels_and_reports_accuracy_per_level(demo_tokenizer, tmp_path):
  from autotraj_jax.pipeline.evaluate import quality_metrics
  from autotraj_jax.pipeline.results import per_question
  from autotraj_jax.scoring import get_scoring_config
  from autotraj_jax.tir.trajectory import read_trajectories
  rows = [{"id": "a", "question": "1+1?", "answer": "2", "difficulty": 1},
          {"id": "b", "question": "2+2?", "answer": "4", "difficulty": 2},
          {"id": "c", "question": "3+3?", "answer": "6", "difficulty": 1},
          {"id": "d", "question": "4+4?", "answer": "8", "level": "Level 2"},
          {"id": "e", "question": "5+5?", "answer": "10"}]
  path = tmp_path / "bench.jsonl"
  path.write_text("".join(json.dumps({**r, "dataset": "toy", "split": "test", "domain": "math"}) + "\n" for r in rows))
  queries = load_questions(path)
  answers = {"1+1?": "2", "2+2?": "5", "3+3?": "6", "4+4?": "8", "5+5?": "11"}
  backend = ScriptedBackend(demo_tokenizer, {tuple(prompts.prompt_ids(demo_tokenizer, q)): [
      f"<code>print({q[:-1]})</code>", f"<answer>\\boxed{{{a}}}</answer>"] for q, a in answers.items()})
  metrics, trajs = evaluate(backend, demo_tokenizer, {"code": EchoTool()}, queries, EvalConfig())
  assert metrics["pass@1"] == 3 / 5
  assert metrics["accuracy_by_level"] == {"1": 1.0, "2": 0.5}  # e has no level
  assert metrics["questions_by_level"] == {"1": 2, "2": 2}
  assert [t.provenance.get("level") for t in trajs] == ["1", "2", "1", "2", None]
  metrics.update(quality_metrics(trajs, get_scoring_config("autotraj")))  # rescoring keeps the level
  write_report(str(tmp_path / "out"), "demo", metrics, trajs)
  saved = json.loads((tmp_path / "out" / "demo.json").read_text())
  assert saved["accuracy_by_level"] == {"1": 1.0, "2": 0.5} and saved["repeated_tool_call_rate"] == 0.0
  md = (tmp_path / "out" / "demo.md").read_text()
  assert "accuracy@level1 | accuracy@level2 | questions@level1 | questions@level2" in md
  assert "| 1.000 | 0.500 | 2 | 2 |" in md
  back = read_trajectories(tmp_path / "out" / "demo.trajectories.jsonl")
  assert [t.provenance.get("level", "") for t in back] == ["1", "2", "1", "2", ""]
  per_q = per_question(str(tmp_path / "out"), "demo")
  assert {q: (v["level"], v["accuracy"]) for q, v in per_q.items()} == {
      "a": ("1", 1.0), "b": ("2", 0.0), "c": ("1", 1.0), "d": ("2", 1.0), "e": ("", 0.0)}


def test_eval_files_table_shows_interval_and_levels():
  from autotraj_jax.pipeline.evaluate import file_table
  rows = [{"name": "world", "questions": 4, "pass@1": 0.5, "pass@1_ci95": [0.15, 0.85], "format_error_rate": 0.25,
           "repeated_tool_call_rate": 0.25, "failed_tool_call_rate": 0.0,
           "accuracy_by_level": {"10": 0.0, "2": 1.0}, "questions_by_level": {"10": 2, "2": 2}},
          {"name": "gsm8k", "questions": 2, "pass@1": 1.0, "pass@1_ci95": None}]
  table = file_table(rows)
  assert list(table[0]) == ["file", "questions", "pass@1", "pass@1 95% CI", "format_error_rate",
                            "repeated_tool_call_rate", "failed_tool_call_rate", "accuracy@level2", "accuracy@level10"]
  assert table[0]["pass@1 95% CI"] == "[15.0%, 85.0%]" and table[0]["accuracy@level2"] == "100.0%"
  assert table[0]["repeated_tool_call_rate"] == "25.0%"
  assert table[1]["accuracy@level2"] == "-" and table[1]["pass@1 95% CI"] == "-" and table[1]["questions"] == "2"
