from autotraj_jax.engine import SamplingParams
from autotraj_jax.tir import prompts
from autotraj_jax.tir.format import extract_answer
from autotraj_jax.tir.rollout import RolloutConfig
from autotraj_jax.tir.trajectory import Segment, Trajectory
from autotraj_jax.tir.prompts import chat_ids as _chat_ids, repair_messages
from data_gen.repair import RepairConfig, repair
from autotraj_jax.scoring import LOW, PRESETS, WRONG, score_group

from scripted_backend import ScriptedBackend
from test_rollout import EchoTool

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
  low = original(tok, HEDGED, "ran:print(6*7)", "<think>maybe 42</think>\n<answer>The final answer is \\boxed{42}</answer>", "q1#0")
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
