"""Warm-start data of the demo policy: each controlled flaw is one the scorers catch, and the
example mix follows the configured rates."""

import random

import pytest

from autotraj_jax.scoring import HIGH, LOW, PRESETS, WRONG, score_group
from autotraj_jax.taskworld import TaskWorld, make_splits, reference_tool_outputs, render_reference_trajectory
from autotraj_jax.taskworld.demo_policy import FLAWS, FlawRates, flawed, to_trajectory, warmstart_examples
from autotraj_jax.tir import prompts
from autotraj_jax.tir.format import validate

FAILED = "Traceback (most recent call last):\nNameError: name 'total' is not defined"


@pytest.fixture(scope="module")
def tasks_and_corpus():
  world = TaskWorld(seed=0, num_entities=300)
  tasks = make_splits(0, {"train": 60, "validation": 1, "test": 1}, world=world, difficulty=(1,))["train"]
  return tasks, world.corpus


def _quality(tokenizer, task, text):
  traj = to_trajectory(tokenizer, task, prompts.prompt_ids(tokenizer, task.question), text, source="t",
                       failed_outputs=(FAILED,))
  score_group([traj], PRESETS["autotraj"])
  return traj


@pytest.mark.parametrize("flaw", FLAWS)
def test_each_flaw_is_caught_by_the_scorers(demo_tokenizer, tasks_and_corpus, flaw):
  tasks, corpus = tasks_and_corpus
  answers = [t.answer for t in tasks]
  outs = reference_tool_outputs(tasks, corpus)
  rng = random.Random(0)
  for task, out in zip(tasks[:20], outs):
    clean = render_reference_trajectory(task, out, corpus=corpus)
    if flaw in ("repeat_call", "failed_call") and "<result>" not in clean:
      continue
    assert _quality(demo_tokenizer, task, clean).quality == HIGH
    bad = flawed(clean, task, flaw, rng, failed_output=FAILED, other_answers=answers)
    assert bad != clean
    traj = _quality(demo_tokenizer, task, bad)
    assert traj.quality in (LOW, WRONG), (flaw, bad, traj.scores)
    if flaw in ("guess", "copy_error"):
      assert traj.quality == WRONG
    if flaw == "copy_error":  # the tool calls and their results are the reference's own
      *calls, last = bad.split("</result>")
      assert calls == clean.split("</result>")[:-1] and task.answer not in last
    if flaw == "broken_tags":
      assert validate(bad)


def test_warmstart_mix_follows_the_rates(demo_tokenizer, tasks_and_corpus):
  tasks, corpus = tasks_and_corpus
  rates = FlawRates(hedge=0.0, repeat_call=0.0, failed_call=0.0, verbose=0.0, broken_tags=0.0, guess=0.5)
  exs, counts = warmstart_examples(demo_tokenizer, tasks, corpus, rates=rates, seed=0, repair_fraction=0.0,
                                   run_code=lambda src: FAILED)
  assert len(exs) == len(tasks) == counts["clean"] + counts["guess"]
  assert 0.25 < counts["guess"] / len(tasks) < 0.75
  assert all(counts[f] == 0 for f in FLAWS if f != "guess") and counts["repair"] == 0
  eos = demo_tokenizer.eos_token_id
  for ex in exs:  # the model learns to stop, and never learns tool output
    assert ex["tokens"][-1] == eos and ex["loss_mask"][-1] == 1
  _, counts = warmstart_examples(demo_tokenizer, tasks, corpus, rates=FlawRates(), seed=0, repair_fraction=0.5,
                                 run_code=lambda src: FAILED)
  assert counts["repair"] > 0


def test_repair_demonstrations_draw_only_the_given_flaws(demo_tokenizer, tasks_and_corpus):
  """A repairer's data: every demonstration repairs one of `repair_flaws` into the clean reference."""
  tasks, corpus = tasks_and_corpus
  none = FlawRates(**{f: 0.0 for f in FLAWS})
  exs, counts = warmstart_examples(demo_tokenizer, tasks, corpus, rates=none, seed=0, repair_fraction=1.0,
                                   run_code=lambda src: FAILED, repair_flaws=("copy_error",))
  assert counts["repair"] == len(exs) == len(tasks)  # a miscopied answer is always wrong, so always repaired
  for ex, task in zip(exs[:5], tasks):
    text = demo_tokenizer.decode(ex["tokens"])
    assert prompts.WRONG_ANSWER_SYSTEM in text and text.count(f"\\boxed{{{task.answer}}}") == 1
  _, counts = warmstart_examples(demo_tokenizer, tasks, corpus, rates=none, seed=0, repair_fraction=0.0,
                                 run_code=lambda src: FAILED, repair_flaws=("copy_error",))
  assert counts["clean"] == len(tasks) and counts["repair"] == 0
