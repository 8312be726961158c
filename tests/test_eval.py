import json

from autotraj_jax.engine import SamplingParams
from autotraj_jax.eval import EvalConfig, evaluate, load_queries, write_report
from autotraj_jax.tir import prompts
from autotraj_jax.tir.rollout import RolloutConfig

from scripted_backend import ScriptedBackend
from test_rollout import EchoTool


def test_eval_metrics_on_scripted_answers(demo_tokenizer, tmp_path):
  rows = [{"id": "a", "question": "1+1?", "answer": "2", "domain": "math"},
          {"id": "b", "question": "capital?", "answer": "Paris", "domain": "knowledge"},
          {"id": "c", "question": "3*3?", "answer": "9", "domain": "math"}]
  path = tmp_path / "bench.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  queries = load_queries(str(path))
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
  write_report(str(tmp_path / "out"), "demo", metrics, trajs)
  assert json.loads((tmp_path / "out" / "demo.json").read_text())["pass@1"] == 2 / 3
  assert "| run | questions | pass@1" in (tmp_path / "out" / "demo.md").read_text()
