import dataclasses
import math

import pytest

from autotraj_jax.scoring import HIGH, LOW, PRESETS, WRONG, ScoringConfig, score_group
from autotraj_jax.tir.format import extract_answer
from autotraj_jax.tir.trajectory import Segment, ToolCall, Trajectory

REF = PRESETS["reference"]


def traj(text, gold="42", calls=(), segments=None, tid="t"):
  segs = segments or [Segment("model", [], text)]
  t = Trajectory(id=tid, question_id="q", question="?", prompt_ids=[1], segments=segs, gold=gold,
                 tool_calls=list(calls))
  t.answer = extract_answer(t.text)
  return t


SHORT = "<think>compute it</think> <answer>\\boxed{42}</answer>"              # 3 words
HEDGED = "<think>maybe it is 42 maybe</think> <answer>\\boxed{42}</answer>"    # 6 words, hedges
WRONG_T = "<think>x</think> <answer>\\boxed{41}</answer>"
REPEAT = "<think> a b c a b c a b c </think> <answer>\\boxed{42}</answer>"      # 12 words


def test_reference_hand_computed_keep_best():
  short, hedged = score_group([traj(SHORT), traj(HEDGED)], REF)
  # short: C=1, L=1 (it is the shortest), E=1 (< 6 words) -> 1.0
  assert short.total == pytest.approx(1.0)
  # hedged: C=0, L=exp(-(6-3)^2 / (2 * 1.5^2)) = exp(-2), E=1 (4 distinct trigrams)
  assert hedged.scores["confidence"].value == 0.0
  assert hedged.scores["length"].value == pytest.approx(math.exp(-2))
  assert hedged.total == pytest.approx(0.3 * math.exp(-2) + 0.3)
  assert (short.category, hedged.category) == (HIGH, LOW)


def test_reference_repetition_and_keep_all():
  [r] = score_group([traj(REPEAT)], REF)
  # 10 trigrams; (a b c) x3, (b c a) x2, (c a b) x2 repeated -> R = 7/10, E = 0.3
  assert r.scores["repetition"].value == pytest.approx(0.3)
  assert r.total == pytest.approx(0.4 + 0.3 + 0.3 * 0.3)
  assert r.category == LOW  # 0.79 < 0.86
  a, b = score_group([traj(SHORT), traj(SHORT.replace("it", "that"))], REF)
  assert a.total >= 0.9 and b.total >= 0.9 and a.category == b.category == HIGH


def test_reference_splits_mixed_correctness_items():
  short, hedged, wrong = score_group([traj(SHORT), traj(HEDGED), traj(WRONG_T)], REF)
  # Mixed correctness: each trajectory is its own item, so L = 1 for everyone.
  assert hedged.scores["length"].value == 1.0
  assert hedged.total == pytest.approx(0.6)
  assert (short.category, hedged.category, wrong.category) == (HIGH, LOW, WRONG)
  # An answer that is missing is wrong, never correct.
  [none] = score_group([traj("<think>no answer</think>")], REF)
  assert none.category == WRONG and none.scores["correctness"].value == 0.0


def test_autotraj_preset_excludes_tool_output_and_scores_tool_use():
  cfg = PRESETS["autotraj"]
  segs = [Segment("model", [], "<think>add</think>\n<code>print(40+2)</code>"),
          Segment("tool", [], "\n<result>\n" + "42 " * 200 + "\n</result>\n"),
          Segment("model", [], "<think>so 42</think>\n<answer>The final answer is \\boxed{42}</answer>")]
  good_calls = [ToolCall("code", "print(40+2)", "42", True, 0.01)]
  bad_calls = [ToolCall("code", "print(40+2)", "42", True, 0.01),
               ToolCall("code", "print(40+2)", "42", True, 0.01),   # repeated, after the answer
               ToolCall("code", "1/0", "ZeroDivisionError", False, 0.01)]  # failed, after the answer
  good, bad = score_group([traj(None, calls=good_calls, segments=segs, tid="a"),
                           traj(None, calls=bad_calls, segments=segs, tid="b")], cfg)
  # The 200 repeated words of tool output count neither for length nor for repetition.
  assert good.scores["repetition"].value == 1.0 and good.scores["length"].value == 1.0
  assert good.scores["tool_use"].value == 1.0 and good.scores["format"].value == 1.0
  assert good.total == pytest.approx(1.0) and good.category == HIGH
  reasons = bad.scores["tool_use"].reason
  assert "repeated identical code call" in reasons and "after the answer was known" in reasons
  assert "failed code call" in reasons
  assert bad.scores["tool_use"].value == pytest.approx(0.0)
  assert bad.category == LOW and any(d.startswith("tool_use") for d in bad.diagnosis())
  assert good.traj.scores["total"] == pytest.approx(1.0)
  # The same text scored by the reference preset counts the tool output.
  [ref] = score_group([traj(None, calls=good_calls, segments=segs)], REF)
  assert ref.scores["repetition"].value < 0.1


def test_format_scorer_and_config_validation():
  [s] = score_group([traj("<think>x <answer>\\boxed{42}</answer>")], PRESETS["autotraj"])
  assert s.scores["format"].value < 1.0 and "never closed" in s.scores["format"].reason
  with pytest.raises(ValueError, match="unknown scorers"):
    ScoringConfig(weights={"vibes": 1.0})


def test_floors_make_one_flaw_low_quality_whatever_the_total():
  segs = [Segment("model", [], "<think>add</think>\n<code>print(40+2)</code>"),
          Segment("tool", [], "\n<result>\n42\n</result>\n"),
          Segment("model", [], "<think>so 42</think>\n<answer>The final answer is \\boxed{42}</answer>")]
  one_failed = [ToolCall("code", "print(x)", "NameError", False, 0.01),
                ToolCall("code", "print(40+2)", "42", True, 0.01)]
  [s] = score_group([traj(None, calls=one_failed, segments=segs)], PRESETS["autotraj"])
  assert s.total >= PRESETS["autotraj"].high_threshold  # the weighted total alone would keep it
  assert s.category == LOW and any(d.startswith("tool_use: failed code call") for d in s.diagnosis())
  no_floor = ScoringConfig(weights=PRESETS["autotraj"].weights)
  [s] = score_group([traj(None, calls=one_failed, segments=segs)], no_floor)
  assert s.category == HIGH
  with pytest.raises(ValueError, match="unknown scorers"):
    ScoringConfig(weights={"length": 1.0}, floors={"vibes": 0.5})


def test_an_answer_resting_on_no_successful_tool_call_scores_zero_on_tool_use():
  cfg = PRESETS["autotraj"]
  failed = [ToolCall("code", "print(x)", "NameError", False, 0.01)]
  guess, only_failed, worked = score_group(
      [traj(SHORT, tid="guess"), traj(SHORT, calls=failed, tid="failed"),
       traj(SHORT, calls=[ToolCall("code", "print(6*7)", "42", True, 0.01)], tid="worked")], cfg)
  assert guess.scores["tool_use"].value == 0.0
  assert guess.scores["tool_use"].reason == "answer without a successful tool call"
  # Every other dimension is perfect, yet a guess is no high-quality example, floors or not.
  assert guess.total == pytest.approx(0.8) and guess.category == LOW
  assert score_group([traj(SHORT)], ScoringConfig(weights=cfg.weights))[0].category == LOW
  assert only_failed.scores["tool_use"].value == 0.0 and "failed code call" in only_failed.scores["tool_use"].reason
  assert worked.scores["tool_use"].value == 1.0 and worked.category == HIGH
  # No answer: nothing is claimed (correctness scores it). Data whose tasks need no tool opts out.
  assert score_group([traj("<think>x</think>")], cfg)[0].scores["tool_use"].value == 1.0
  [free] = score_group([traj(SHORT)], dataclasses.replace(cfg, answer_needs_tool=False))
  assert free.scores["tool_use"].value == 1.0 and free.category == HIGH
