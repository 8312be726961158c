import json
import logging

import pytest
from scripted_backend import ScriptedBackend

from autotraj_jax.engine import PROMPT_TOO_LONG, SamplingParams, prompt_too_long
from autotraj_jax.tir import prompts
from autotraj_jax.tir.rollout import Query, RolloutConfig, limit_message, run_rollouts
from autotraj_jax.tir.tools import ToolResult
from autotraj_jax.tir.trajectory import JsonlAppender, RecordError, Trajectory, read_trajectories


class EchoTool:
  """Returns a fixed transformation of its input and counts calls."""

  name = "code"

  def __init__(self):
    self.inputs = []

  def __call__(self, text, *, session=None):
    self.inputs.append((text, session))
    return ToolResult(output=f"ran:{text.strip()}", ok=True, elapsed_s=0.001)


def _setup(tok, scripts_by_question, **cfg_kw):
  scripts = {tuple(prompts.prompt_ids(tok, q)): turns for q, turns in scripts_by_question.items()}
  backend = ScriptedBackend(tok, scripts)
  cfg = RolloutConfig(sampling=SamplingParams(temperature=0.0), **cfg_kw)
  queries = [Query(id=f"q{i}", question=q, gold="42") for i, q in enumerate(scripts_by_question)]
  return backend, cfg, queries


def test_tool_runs_on_closing_tag_and_results_are_masked(demo_tokenizer):
  turns = ["<think>multiply</think>\n<code>print(6*7)</code>\n<result>\nfake\n</result>",
           "<think>done</think>\n<answer>The final answer is \\boxed{42}</answer> trailing"]
  backend, cfg, queries = _setup(demo_tokenizer, {"What is 6*7?": turns})
  tool = EchoTool()
  [traj] = run_rollouts(backend, demo_tokenizer, queries, {"code": tool}, cfg)
  assert [s.kind for s in traj.segments] == ["model", "tool", "model"]
  assert tool.inputs == [("print(6*7)", traj.id)]
  # The model's own fake <result> never enters the trajectory: generation stopped at </code>.
  assert "fake" not in traj.text and traj.segments[0].text.endswith("</code>")
  assert traj.segments[1].text == prompts.result_block("ran:print(6*7)")
  assert traj.finish_reason == "answer" and traj.answer == "42"
  assert traj.segments[2].text.endswith("</answer>")
  # Stored ids are exactly what the backend emitted, in order.
  prompt = tuple(traj.prompt_ids)
  emitted = backend.emitted[prompt]
  assert [s.token_ids for s in traj.segments if s.kind == "model"] == emitted
  ex = traj.training_example()
  assert len(ex["tokens"]) == len(ex["loss_mask"]) == len(traj.prompt_ids) + len(traj.response_ids)
  tool_ids = traj.segments[1].token_ids
  start = len(traj.prompt_ids) + len(traj.segments[0].token_ids)
  assert ex["loss_mask"][start:start + len(tool_ids)] == [0] * len(tool_ids)
  assert sum(ex["loss_mask"]) == traj.num_model_tokens
  assert ex["loss_mask"][:len(traj.prompt_ids)] == [0] * len(traj.prompt_ids)
  assert sum(traj.training_example(mask_tool_results=False)["loss_mask"]) == len(traj.response_ids)


def test_no_tool_without_real_closing_tag(demo_tokenizer):
  turns = ["<think>x</think>\n<code>print(1)</cod and so on without closing"]
  backend, cfg, queries = _setup(demo_tokenizer, {"q?": turns}, max_tokens_per_turn=12,
                                 max_response_tokens=30)
  tool = EchoTool()
  [traj] = run_rollouts(backend, demo_tokenizer, queries, {"code": tool}, cfg)
  assert tool.inputs == [] and all(s.kind == "model" for s in traj.segments)
  assert traj.finish_reason == "budget" and len(traj.response_ids) <= 30


def test_call_limit_and_budget(demo_tokenizer):
  turns = ["<code>print(1)</code>"] * 5 + ["<answer>\\boxed{1}</answer>"]
  backend, cfg, queries = _setup(demo_tokenizer, {"loop?": turns}, max_tool_calls=2)
  tool = EchoTool()
  [traj] = run_rollouts(backend, demo_tokenizer, queries, {"code": tool}, cfg)
  assert len(tool.inputs) == 2
  assert len(traj.tool_calls) == 5
  assert [c.ok for c in traj.tool_calls] == [True, True, False, False, False]
  assert traj.tool_calls[2].output == limit_message(2)
  assert traj.finish_reason == "answer" and traj.answer == "1"
  # A tight budget cuts the trajectory inside a tool result and never exceeds the budget.
  backend, cfg, queries = _setup(demo_tokenizer, {"loop?": turns}, max_tool_calls=10, max_response_tokens=40)
  [traj] = run_rollouts(backend, demo_tokenizer, queries, {"code": EchoTool()}, cfg)
  assert traj.finish_reason == "budget" and len(traj.response_ids) == 40


def test_trajectories_at_different_turns_share_generate_calls(demo_tokenizer):
  scripts = {"a?": ["<code>1</code>", "<code>2</code>", "<answer>\\boxed{42}</answer>"],
             "b?": ["<answer>\\boxed{7}</answer>"],
             "c?": ["<code>3</code>", "<answer>\\boxed{42}</answer>"]}
  backend, cfg, queries = _setup(demo_tokenizer, scripts)
  trajs = run_rollouts(backend, demo_tokenizer, queries, {"code": EchoTool()}, cfg, samples_per_query=2)
  assert [t.id for t in trajs] == ["q0#0", "q0#1", "q1#0", "q1#1", "q2#0", "q2#1"]
  assert backend.calls == [6, 4, 2]
  assert [t.answer for t in trajs] == ["42", "42", "7", "7", "42", "42"]


def test_jsonl_round_trip_and_errors(demo_tokenizer, tmp_path):
  backend, cfg, queries = _setup(demo_tokenizer, {"6*7?": ["<code>print(6*7)</code>", "<answer>\\boxed{42}</answer>"]})
  [traj] = run_rollouts(backend, demo_tokenizer, queries, {"code": EchoTool()}, cfg)
  path = tmp_path / "t.jsonl"
  with JsonlAppender(path) as w:
    w.write(traj)
    w.write(traj)
  with open(path, "a") as f:
    f.write('{"id": "partial", "quest')  # a write cut by a kill
  back = read_trajectories(path)
  assert len(back) == 2 and back[0] == traj
  JsonlAppender(path).close()  # reopening for append drops the partial line
  assert open(path).read().count("\n") == 2 and len(read_trajectories(path)) == 2
  bad = json.loads(traj.to_json())
  del bad["segments"][1]["token_ids"]
  (tmp_path / "bad.jsonl").write_text(traj.to_json() + "\n" + json.dumps(bad) + "\n")
  with pytest.raises(RecordError, match=r"bad.jsonl:2: missing field segments\[1\]\.token_ids"):
    read_trajectories(tmp_path / "bad.jsonl")
  (tmp_path / "bad2.jsonl").write_text("{not json}\n")
  with pytest.raises(RecordError, match="bad2.jsonl:1: invalid JSON"):
    read_trajectories(tmp_path / "bad2.jsonl")
  with pytest.raises(RecordError, match="schema version"):
    Trajectory.from_dict({**json.loads(traj.to_json()), "version": 99})


class ContextLimit:
  """A backend that cannot take contexts longer than `max_len` tokens (as a full prompt bucket)."""

  def __init__(self, inner, max_len):
    self.inner, self.max_len, self.seen = inner, max_len, []

  def generate(self, requests):
    self.seen.append(len(requests))
    assert len(self.seen) < 20, "the tool loop keeps re-sending a prompt the backend refused"
    fits = [r for r in requests if len(r.prompt_ids) <= self.max_len]
    done = iter(self.inner.generate(fits) if fits else [])
    return [next(done) if len(r.prompt_ids) <= self.max_len else prompt_too_long(r) for r in requests]


def test_prompt_too_long_ends_only_that_trajectory(demo_tokenizer, caplog):
  long_q = "Explain " + "in great detail " * 60 + "what 6*7 is?"
  scripts = {"6*7?": ["<code>print(6*7)</code>", "<answer>\\boxed{42}</answer>"],
             long_q: ["<answer>\\boxed{42}</answer>"],
             "grow?": ["<code>" + "x = 1\n" * 30 + "</code>", "<answer>\\boxed{1}</answer>"]}
  inner, cfg, queries = _setup(demo_tokenizer, scripts)
  short = max(len(prompts.prompt_ids(demo_tokenizer, q)) for q in ("6*7?", "grow?"))
  backend = ContextLimit(inner, short + 40)  # the short prompts fit; "grow?" outgrows it on turn 2
  with caplog.at_level(logging.WARNING, logger="autotraj_jax.tir.rollout"):
    ok, long_t, grown = run_rollouts(backend, demo_tokenizer, queries, {"code": EchoTool()}, cfg)
  assert ok.finish_reason == "answer" and ok.answer == "42"
  assert long_t.finish_reason == PROMPT_TOO_LONG and long_t.segments == [] and long_t.answer is None
  assert grown.finish_reason == PROMPT_TOO_LONG and [s.kind for s in grown.segments] == ["model", "tool"]
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "2 trajectories" in warnings[0] and "engine.prompt_buckets" in warnings[0]


def test_several_golds_round_trip(demo_tokenizer, tmp_path):
  backend, cfg, _ = _setup(demo_tokenizer, {"6*7?": ["<answer>\\boxed{42}</answer>"]})
  query = Query(id="q0", question="6*7?", gold=("42", "forty-two"))
  [traj] = run_rollouts(backend, demo_tokenizer, [query], {}, cfg)
  assert traj.gold == ["42", "forty-two"]
  with JsonlAppender(tmp_path / "t.jsonl") as w:
    w.write(traj)
  assert read_trajectories(tmp_path / "t.jsonl") == [traj]
