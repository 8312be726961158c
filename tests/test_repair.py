import dataclasses

import pytest
from scripted_backend import ScriptedBackend
from test_rollout import EchoTool

from autotraj_jax.engine import SamplingParams
from autotraj_jax.scoring import LOW, PRESETS, WRONG, score_group
from autotraj_jax.tir import prompts
from autotraj_jax.tir.format import extract_answer
from autotraj_jax.tir.prompts import chat_ids as _chat_ids
from autotraj_jax.tir.prompts import repair_messages
from autotraj_jax.tir.rollout import RolloutConfig
from autotraj_jax.tir.trajectory import RepairRecord, Segment, ToolCall, Trajectory
from data_gen.repair import RepairConfig, judge, repair

HEDGED = "<think>maybe it is 6*7, probably</think>\n<code>print(6*7)</code>"
CLEAN = ["<think>multiply</think>\n<code>print(6*7)</code>",
         "<think>done</think>\n<answer>The final answer is \\boxed{42}</answer>"]


def original(tok, text, result, final, tid):
  segs = [Segment("model", [], text), Segment("tool", [], prompts.result_block(result)),
          Segment("model", [], final)]
  t = Trajectory(id=tid, question_id="q1", question="What is 6*7?", prompt_ids=prompts.prompt_ids(tok, "What is 6*7?"),
                 segments=segs, gold="42")
  t.answer = extract_answer(t.text)
  return t


def test_repair_sees_trajectory_and_diagnosis_and_is_verified(demo_tokenizer):
  tok = demo_tokenizer
  cfg = PRESETS["autotraj"]
  low = original(tok, HEDGED, "ran:print(6*7)",
                 "<think>maybe 42</think>\n<answer>The final answer is \\boxed{42}</answer>", "q1#0")
  wrong = original(tok, "<think>guess</think>\n<code>print(6*8)</code>", "48",
                   "<think>ok</think>\n<answer>The final answer is \\boxed{48}</answer>", "q1#1")
  score_group([low, wrong], cfg)
  s_low, s_wrong = low, wrong
  assert (low.quality, wrong.quality) == (LOW, WRONG)
  msgs = repair_messages(s_low, show_gold=False)
  assert low.text.strip() in msgs[1]["content"] and "hedging in reasoning" in msgs[1]["content"]
  assert "42." not in msgs[1]["content"].split("Reviewer notes")[1]
  assert "The correct final answer is 48" not in repair_messages(s_wrong, show_gold=True)[1]["content"]
  assert "The correct final answer is 42" in repair_messages(s_wrong, show_gold=True)[1]["content"]
  assert repair_messages(s_wrong, False)[0]["content"] != msgs[0]["content"]  # two prompts

  scripts = {tuple(_chat_ids(tok, repair_messages(s_low, False))): CLEAN,
             tuple(_chat_ids(tok, repair_messages(s_wrong, False))):
                 ["<think>again</think>\n<answer>The final answer is \\boxed{48}</answer>"]}
  backend = ScriptedBackend(tok, scripts)
  rcfg = RepairConfig(attempts=2, rollout=RolloutConfig(sampling=SamplingParams(temperature=0.0)))
  out_low, out_wrong = repair(backend, tok, {"code": EchoTool()}, [s_low, s_wrong], cfg, rcfg)
  assert out_low.accepted and len(out_low.attempts) == 1
  rep = out_low.repaired
  assert rep.prompt_ids == low.prompt_ids  # the policy prompt, not the repair prompt
  assert rep.provenance["parent_id"] == "q1#0" and rep.provenance["failure_type"] == LOW
  assert rep.answer == "42" and [s.kind for s in rep.segments] == ["model", "tool", "model"]
  assert not out_wrong.accepted and len(out_wrong.attempts) == 2
  assert "wrong answer" in out_wrong.attempts[-1][1]


def test_repair_queue_takes_low_quality_originals_first_within_the_budget():
  from autotraj_jax.scoring import HIGH
  from data_gen.repair import repair_queue
  qualities = [WRONG, HIGH, WRONG, LOW, WRONG, LOW, HIGH]
  scored = [Trajectory(id=f"t{i}", question_id=f"q{i}", question="?", prompt_ids=[1], quality=q)
            for i, q in enumerate(qualities)]
  assert [t.id for t in repair_queue(scored)] == ["t3", "t5", "t0", "t2", "t4"]
  assert [t.id for t in repair_queue(scored, 3)] == ["t3", "t5", "t0"]


# ---- acceptance of repairs -----------------------------------------------------------------------

def solved(tid, a, b, calls=True, think="multiply"):
  """An answer to 6*7 from computing a*b with Python (or, without calls, from no tool at all)."""
  code, value = f"print({a}*{b})", str(a * b)
  final = f"<think>so {value}</think>\n<answer>The final answer is \\boxed{{{value}}}</answer>"
  segs = [Segment("model", [], f"<think>{think}</think>\n<code>{code}</code>"),
          Segment("tool", [], prompts.result_block(value)), Segment("model", [], final)]
  if not calls:
    segs = [Segment("model", [], f"<think>{think}</think>\n<answer>The final answer is \\boxed{{{value}}}</answer>")]
  t = Trajectory(id=tid, question_id="q1", question="What is 6*7?", prompt_ids=[1], segments=segs, gold="42",
                 tool_calls=[ToolCall("code", code, value, True, 0.0)] if calls else [])
  t.answer = extract_answer(t.text)
  return t


def test_a_wrong_original_scoring_1_is_repaired_by_any_correct_high_quality_trajectory():
  cfg = PRESETS["autotraj"]
  [wrong] = score_group([solved("q1#0", 6, 8)], cfg)   # a clean computation of the wrong product
  assert wrong.category == WRONG and wrong.total == pytest.approx(1.0)
  rep = solved("q1#0/repair0", 6, 7)
  assert judge(wrong.traj, rep, cfg, RepairConfig()) == []
  # Correct by a guess, without a tool call: tool_use is 0, under its floor.
  guess = solved("q1#0/repair1", 6, 7, calls=False)
  reasons = judge(wrong.traj, guess, cfg, RepairConfig())
  assert any(r.startswith("tool_use 0.000 below its floor") and "without a successful tool call" in r
             for r in reasons)
  assert "wrong answer" in judge(wrong.traj, solved("q1#0/repair2", 6, 8), cfg, RepairConfig())


def test_a_low_quality_original_must_still_be_beaten():
  cfg = dataclasses.replace(PRESETS["autotraj"], floors={})
  [low] = score_group([solved("q1#0", 6, 7, think="maybe multiply")], cfg)
  assert low.category == LOW and low.total == pytest.approx(0.8)
  same = solved("q1#0/repair0", 6, 7, think="maybe multiply")
  loose = RepairConfig(accept_threshold=0.5)
  assert judge(low.traj, same, cfg, loose) == ["score 0.800 does not beat the original's 0.800"]
  assert judge(low.traj, solved("q1#0/repair1", 6, 7), cfg, loose) == []


# ---- the repair queue and the datasets -----------------------------------------------------------

def test_repair_queue_spreads_wrong_originals_over_questions_without_a_good_candidate_first():
  from autotraj_jax.scoring import HIGH
  from data_gen.repair import repair_queue
  rows = [("a0", "qa", WRONG), ("a1", "qa", WRONG), ("b0", "qb", WRONG), ("a2", "qa", HIGH),
          ("b1", "qb", WRONG), ("c0", "qc", LOW), ("c1", "qc", WRONG), ("b2", "qb", WRONG), ("d0", "qd", WRONG)]
  scored = [Trajectory(id=i, question_id=q, question="?", prompt_ids=[1], quality=c) for i, q, c in rows]
  # Low quality first; then round 1 (qb, qc, qd have no high-quality candidate, qa has), round 2, round 3.
  assert [t.id for t in repair_queue(scored)] == ["c0", "b0", "c1", "d0", "a0", "b1", "a1", "b2"]
  assert [t.id for t in repair_queue(scored, 5)] == ["c0", "b0", "c1", "d0", "a0"]


def test_a_repair_identical_to_a_high_quality_candidate_keeps_its_pair_and_is_counted():
  from autotraj_jax.scoring import HIGH
  from data_gen import build

  def traj(tid, ids, quality):
    return Trajectory(id=tid, question_id="q1", question="?", prompt_ids=[1],
                      segments=[Segment("model", ids, "x")], gold="42", quality=quality)

  high, w1, w2 = traj("q1#0", [5, 6], HIGH), traj("q1#1", [7], WRONG), traj("q1#2", [8], WRONG)
  repairs = [RepairRecord("q1#1", True, traj("q1#1/repair0", [5, 6], ""), []),
             RepairRecord("q1#2", True, traj("q1#2/repair0", [9], ""), []),
             RepairRecord("q1#2", False, None, [])]
  sft, pairs = build.build_sft_and_pairs([high, w1, w2], repairs)
  assert [t.id for t in sft] == ["q1#0", "q1#2/repair0"]
  assert [p.id for p in pairs] == ["q1#1>q1#1/repair0", "q1#2>q1#2/repair0"]
  summary = build.stats([high, w1, w2], repairs, sft, pairs)
  assert summary["repairs_duplicating_high"] == 1 and summary["repairs_accepted"] == 2
