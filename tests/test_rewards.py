import dataclasses
import logging
import threading
import time

import numpy as np
import pytest

from autotraj_jax import rewards as rw
from autotraj_jax.rewards import RewardConfig, RewardState, compute_rewards
from autotraj_jax.tir.trajectory import Segment, Trajectory

GOOD = "<think>look it up</think><search>capital of France</search><result>Paris.</result>" \
       "<answer>\\boxed{{{}}}</answer>"


def traj(answer_text="Paris", gold="Paris", domain="qa", text=None, tid="t"):
  text = GOOD.format(answer_text) if text is None else text
  return Trajectory(id=tid, question_id="q", question="Capital of France?", prompt_ids=[1, 2],
                    segments=[Segment("model", [3, 4], text)], gold=gold, domain=domain)


def scorer(scores):
  def rm_fn(trajs):
    assert all(isinstance(t, Trajectory) for t in trajs)
    return list(scores[:len(trajs)])
  return rm_fn


# ---------------------------------------------------------------------------------------------
# Components.

def test_outcome_component():
  cfg = RewardConfig(weights={"outcome": 1.0})
  batch = [traj("Paris"), traj("paris."), traj("London"), traj(gold=None),
           traj(text="<think>x</think><answer>Paris</answer>"),  # no box: no answer
           traj("Emperor Zhaozong of Tang", gold="Emperor Taizong of Tang")]
  rewards, comps, _ = compute_rewards(batch, cfg)
  assert comps["outcome"] == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
  assert rewards == comps["outcome"]
  # F1 for QA: partial credit (3 of 4 tokens shared)
  f1 = dataclasses.replace(cfg, outcome_metric="f1")
  assert compute_rewards(batch, f1)[1]["outcome"] == pytest.approx([1.0, 1.0, 0.0, 0.0, 0.0, 0.75])
  # math keeps equivalence under 'f1'; 'f1_all' applies F1 to math too, as the authors' code
  math = [traj("\\frac{1}{2}", gold="0.5", domain="math"), traj("x+1", gold="1+x", domain="math")]
  assert compute_rewards(math, f1)[1]["outcome"] == [1.0, 1.0]
  assert compute_rewards(math, dataclasses.replace(cfg, outcome_metric="f1_all"))[1]["outcome"] == [0.0, 0.0]


def test_outcome_uses_the_records_answer_when_set():
  t = traj("London")
  t.answer = "Paris"
  assert compute_rewards([t], RewardConfig(weights={"outcome": 1.0}))[0] == [1.0]


def test_format_component():
  good = traj()
  one = traj(text="<think>x</think><answer>\\boxed{Paris}</answer> trailing")  # 1 violation
  many = traj(text="junk <search>q</search> more <answer>x")  # 5 violations
  cfg = RewardConfig(weights={"format": 1.0})
  assert compute_rewards([good, one, many], cfg)[1]["format"] == [0.0, -1.0, -1.0]
  per = dataclasses.replace(cfg, format_penalty=-1.0, format_penalty_per_violation=-0.25)
  assert compute_rewards([good, one, many], per)[1]["format"] == [0.0, -0.25, -1.0]
  half = dataclasses.replace(cfg, format_penalty=-0.5)
  assert compute_rewards([good, one], half)[1]["format"] == [0.0, -0.5]


def test_rm_component_none_and_clip():
  batch = [traj(tid=str(i)) for i in range(3)]
  cfg = RewardConfig(weights={"rm": 1.0})
  rewards, comps, info = compute_rewards(batch, cfg, rm_fn=scorer([2.0, -7.0, 0.5]))
  assert comps["rm"] == [2.0, -7.0, 0.5] and rewards == [2.0, -7.0, 0.5]
  assert info["rm_failures"] == 0 and info["rm_raw"] == [2.0, -7.0, 0.5] and info["rm_error"] is None
  clipped = dataclasses.replace(cfg, rm_clip=1.0)
  assert compute_rewards(batch, clipped, rm_fn=scorer([2.0, -7.0, 0.5]))[1]["rm"] == [1.0, -1.0, 0.5]


def test_rm_batch_normalisation():
  batch = [traj(tid=str(i)) for i in range(4)]
  cfg = RewardConfig(weights={"rm": 1.0}, rm_norm="batch")
  raw = [1.0, 3.0, 5.0, 11.0]
  _, comps, info = compute_rewards(batch, cfg, rm_fn=scorer(raw))
  z = np.asarray(comps["rm"])
  np.testing.assert_allclose(z, (np.array(raw) - 5.0) / np.std(raw), rtol=1e-5)
  assert info["rm_raw"] == raw
  # a constant batch gives 0, a batch of one gives 0
  assert compute_rewards(batch, cfg, rm_fn=scorer([2.0] * 4))[1]["rm"] == [0.0] * 4
  assert compute_rewards(batch[:1], cfg, rm_fn=scorer([9.0]))[1]["rm"] == [0.0]


def test_rm_running_normalisation_and_state_roundtrip():
  cfg = RewardConfig(weights={"rm": 1.0}, rm_norm="running")
  state = RewardState()
  b1, b2 = [1.0, 2.0, 6.0], [10.0, -3.0]
  z1 = compute_rewards([traj()] * 3, cfg, rm_fn=scorer(b1), state=state)[1]["rm"]
  np.testing.assert_allclose(z1, (np.array(b1) - np.mean(b1)) / np.std(b1), rtol=1e-5)
  z2 = compute_rewards([traj()] * 2, cfg, rm_fn=scorer(b2), state=state)[1]["rm"]
  both = np.array(b1 + b2)
  assert state.rm_count == 5 and state.batches == 2
  assert state.rm_mean == pytest.approx(both.mean()) and state.rm_std == pytest.approx(both.std())
  np.testing.assert_allclose(z2, (np.array(b2) - both.mean()) / both.std(), rtol=1e-5)
  restored = RewardState.from_dict(state.to_dict())
  assert restored == state
  # the merge is exact: one batch of everything gives the same statistics
  one = RewardState()
  one.update(list(both))
  assert one.rm_mean == pytest.approx(state.rm_mean) and one.rm_m2 == pytest.approx(state.rm_m2)


# ---------------------------------------------------------------------------------------------
# Combinations.

def test_weighted_combination_hand_case():
  batch = [traj("Paris"), traj("London"),
           traj(text="<think>x</think><answer>\\boxed{Paris}</answer> trailing")]
  cfg = RewardConfig(weights={"outcome": 1.0, "format": 0.5, "rm": 0.1})
  rewards, comps, _ = compute_rewards(batch, cfg, rm_fn=scorer([2.0, -3.0, 1.0]))
  assert comps["outcome"] == [1.0, 0.0, 1.0] and comps["format"] == [0.0, 0.0, -1.0]
  assert rewards == pytest.approx([1.0 + 0.2, -0.3, 1.0 - 0.5 + 0.1])  # symmetric: RM can lower it
  # a zero weight skips the component (and the RM call)
  no_rm = RewardConfig(weights={"outcome": 1.0, "format": 0.5, "rm": 0.0})
  rewards, comps, info = compute_rewards(batch, no_rm)
  assert "rm" not in comps and "rm_failures" not in info and rewards == [1.0, 0.0, 0.5]


def test_reference_combination_hand_cases():
  cfg = RewardConfig(combination="reference", outcome_metric="f1_all")
  cases = [
    (traj(text="<think>x</think><answer>Paris</answer>"), 50.0, -1.0),  # no boxed answer
    (traj(text="<search>q</search><answer>\\boxed{Paris}</answer>"), 50.0, -1.0),  # bad format
    (traj("London"), 50.0, 0.0),                       # F1 = 0: RM ignored, even a big one
    (traj("Paris"), 2.0, 1.4),                         # F1 1 + 0.2 * 2
    (traj("Paris"), -5.0, 1.0),                        # one-sided: a negative RM never lowers it
    (traj("Paris"), 100.0, 3.0),                       # capped at 3
    (traj("Emperor Zhaozong of Tang", gold="Emperor Taizong of Tang"), 1.0, 0.95),  # 0.75 + 0.2
    (traj("Emperor Zhaozong of Tang", gold="Emperor Taizong of Tang"), -1.0, 0.75),
  ]
  rewards, comps, info = compute_rewards([c[0] for c in cases], cfg, rm_fn=scorer([c[1] for c in cases]))
  assert rewards == pytest.approx([c[2] for c in cases])
  assert set(comps) == {"outcome", "format", "rm"} and info["rm_failures"] == 0
  # the rule itself
  assert rw.reference_reward(True, True, 0.5, 1.0, cfg) == pytest.approx(0.7)
  assert rw.reference_reward(True, False, 1.0, 1.0, cfg) == -1.0
  # without the RM term the reference reduces to penalty / F1
  no_rm = dataclasses.replace(cfg, reference_rm_coef=0.0)
  assert compute_rewards([c[0] for c in cases], no_rm)[0] == pytest.approx([-1, -1, 0, 1, 1, 1, 0.75, 0.75])


# ---------------------------------------------------------------------------------------------
# A dead or slow reward model.

def test_rm_exception_falls_back_to_zero_and_is_counted(caplog):
  def dead(trajs):
    raise ConnectionError("connection refused on :8000")

  cfg = RewardConfig(weights={"outcome": 1.0, "rm": 0.5})
  state = RewardState()
  with caplog.at_level(logging.WARNING, logger="autotraj_jax.rewards"):
    rewards, comps, info = compute_rewards([traj("Paris"), traj("London")], cfg, rm_fn=dead, state=state)
  assert comps["rm"] == [0.0, 0.0] and rewards == [1.0, 0.0]
  assert info["rm_failures"] == 1 and info["rm_failures_total"] == 1 and state.rm_failures == 1
  assert "ConnectionError" in info["rm_error"] and "connection refused" in info["rm_error"]
  assert any("connection refused" in r.getMessage() and "0 for this batch" in r.getMessage()
             for r in caplog.records)


def test_rm_timeout_falls_back_without_waiting():
  release = threading.Event()

  def hung(trajs):
    release.wait(30)
    return [1.0] * len(trajs)

  cfg = RewardConfig(weights={"rm": 1.0}, rm_timeout_s=0.2)
  t0 = time.monotonic()
  try:
    rewards, comps, info = compute_rewards([traj()], cfg, rm_fn=hung)
  finally:
    release.set()
  assert time.monotonic() - t0 < 5.0
  assert rewards == [0.0] and info["rm_failures"] == 1 and "timed out" in info["rm_error"]


@pytest.mark.parametrize("bad,reason", [([1.0], "returned 1 scores for 2"), ([1.0, float("nan")], "non-finite"),
                                        (None, "malformed"), (["a", "b"], "malformed")])
def test_malformed_rm_output_is_a_failure(bad, reason):
  _, comps, info = compute_rewards([traj(), traj()], RewardConfig(weights={"rm": 1.0}), rm_fn=lambda t: bad)
  assert comps["rm"] == [0.0, 0.0] and info["rm_failures"] == 1 and reason in info["rm_error"]


def test_running_stats_skip_failed_batches():
  cfg = RewardConfig(weights={"rm": 1.0}, rm_norm="running")
  state = RewardState()
  compute_rewards([traj()] * 2, cfg, rm_fn=scorer([1.0, 3.0]), state=state)
  compute_rewards([traj()] * 2, cfg, rm_fn=lambda t: 1 / 0, state=state)
  assert state.rm_count == 2 and state.rm_failures == 1 and state.batches == 2


def test_stop_after_max_failures():
  calls = {"n": 0}

  def flaky(trajs):
    calls["n"] += 1
    if calls["n"] == 2:
      return [0.5] * len(trajs)  # a success in between does not reset the count
    raise TimeoutError("read timed out")

  cfg = RewardConfig(weights={"outcome": 1.0, "rm": 1.0}, max_rm_failures=2)
  state = RewardState()
  for _ in range(3):  # failure 1, success, failure 2: still allowed
    compute_rewards([traj()], cfg, rm_fn=flaky, state=state)
  assert state.rm_failures == 2
  with pytest.raises(RuntimeError, match=r"failed 3 times.*max_rm_failures=2.*read timed out"):
    compute_rewards([traj()], cfg, rm_fn=flaky, state=state)
  # max_rm_failures=0 stops at the first failure; None never stops
  with pytest.raises(RuntimeError, match="max_rm_failures=0"):
    compute_rewards([traj()], dataclasses.replace(cfg, max_rm_failures=0), rm_fn=lambda t: 1 / 0)
  lenient = dataclasses.replace(cfg, max_rm_failures=None)
  for _ in range(5):
    compute_rewards([traj()], lenient, rm_fn=lambda t: 1 / 0, state=state)
  assert state.rm_failures == 8


def test_empty_batch_does_not_call_the_rm():
  rewards, comps, _ = compute_rewards([], RewardConfig(weights={"outcome": 1.0, "rm": 1.0}), rm_fn=lambda t: 1 / 0)
  assert rewards == [] and comps == {"outcome": [], "rm": []}


def test_reference_with_failed_rm_keeps_f1():
  cfg = RewardConfig(combination="reference", outcome_metric="f1")
  rewards, _, info = compute_rewards([traj("Paris"), traj("London")], cfg, rm_fn=lambda t: 1 / 0)
  assert rewards == [1.0, 0.0] and info["rm_failures"] == 1


# ---------------------------------------------------------------------------------------------
# Configuration and registry.

def test_config_validation():
  with pytest.raises(ValueError, match="unknown reward components"):
    RewardConfig(weights={"outcom": 1.0})
  with pytest.raises(ValueError, match="combination"):
    RewardConfig(combination="sum")
  with pytest.raises(ValueError, match="rm_norm"):
    RewardConfig(rm_norm="zscore")
  with pytest.raises(ValueError, match="outcome_metric"):
    RewardConfig(outcome_metric="em")
  with pytest.raises(ValueError, match="<= 0"):
    RewardConfig(format_penalty=1.0)
  with pytest.raises(ValueError, match="max_rm_failures"):
    RewardConfig(max_rm_failures=-1)
  with pytest.raises(ValueError, match="no rm_fn"):
    compute_rewards([traj()], RewardConfig(weights={"rm": 1.0}))
  with pytest.raises(ValueError, match="no rm_fn"):
    compute_rewards([traj()], RewardConfig(combination="reference"))


def test_registered_custom_component():
  @rw.register_reward("test_brevity")
  def brevity(trajs, cfg, ctx):
    return [-0.01 * len(t.text) for t in trajs]

  try:
    cfg = RewardConfig(weights={"outcome": 1.0, "test_brevity": 2.0})
    t = traj()
    rewards, comps, _ = compute_rewards([t], cfg)
    assert rewards == pytest.approx([1.0 - 0.02 * len(t.text)])
    assert set(comps) == {"outcome", "test_brevity"}
    with pytest.raises(ValueError, match="already registered"):
      rw.register_reward("test_brevity")(lambda trajs, cfg, ctx: [])
  finally:
    rw.REWARD_COMPONENTS.pop("test_brevity")


def test_registered_custom_combination():
  @rw.register_combination("test_outcome_only_if_formatted", needs=lambda cfg: ["outcome", "format"])
  def gated(trajs, components, cfg):
    return [o if f == 0.0 else cfg.format_penalty for o, f in zip(components["outcome"], components["format"])]

  try:
    cfg = RewardConfig(combination="test_outcome_only_if_formatted", weights={})
    assert cfg.components == ["outcome", "format"] and not cfg.uses_rm
    bad = traj(text="<think>x</think><answer>\\boxed{Paris}</answer> trailing")
    rewards, comps, _ = compute_rewards([traj("Paris"), traj("London"), bad], cfg)
    assert rewards == [1.0, 0.0, -1.0] and set(comps) == {"outcome", "format"}
    with pytest.raises(ValueError, match="already registered"):
      rw.register_combination("test_outcome_only_if_formatted", needs=lambda cfg: [])(lambda t, c, cfg: [])
  finally:
    rw.COMBINATIONS.pop("test_outcome_only_if_formatted")
  with pytest.raises(ValueError, match=r"rewards\.combination must be a registered combination"):
    RewardConfig(combination="test_outcome_only_if_formatted")


def test_builtin_combinations_name_their_components():
  assert RewardConfig(weights={"outcome": 1.0, "format": 0.5, "rm": 0.0}).components == ["outcome", "format"]
  assert RewardConfig(weights={"outcome": 1.0, "rm": 0.2}).uses_rm
  assert RewardConfig(combination="reference").components == ["outcome", "format", "rm"]
  assert not RewardConfig(combination="reference", reference_rm_coef=0.0).uses_rm
