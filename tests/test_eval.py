import json

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
