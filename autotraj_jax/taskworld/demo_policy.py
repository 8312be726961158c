"""Warm-start data for the demo policy: a tiny model must behave like a weak instruct model.

No pretrained weights can be downloaded, so the demo policy is trained from scratch on
reference trajectories of the task world with controlled imperfections mixed in: hedging in
the reasoning, identical repeated tool calls, a failing first call, verbose repeated sentences,
broken tags, answering without the tool (and getting it wrong), and miscopying a correct tool
result into the answer. Repair demonstrations (question + flawed trajectory + the scorers'
diagnosis -> the clean trajectory) teach repairing: a share of the policy's data, so that one
small checkpoint can run stage 1, or most of a separate repairer's (`warmstart.name='repairer'`).

Solving a task is mostly copying names and numbers between the question, the tool calls and the
results; the local tokenizer cuts numbers into 1-3 digit tokens that read the same wherever they
stand, so a number is a few tokens to copy rather than one per digit.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Any, Callable, Sequence

from autotraj_jax.scoring import HIGH, PRESETS, score_group
from autotraj_jax.taskworld.render import reference_tool_outputs, render_reference_trajectory
from autotraj_jax.taskworld.task import Task
from autotraj_jax.tir import prompts
from autotraj_jax.tir.format import extract_answer
from autotraj_jax.tir.trajectory import Segment, ToolCall, Trajectory

_RESULT_RE = re.compile(r"\n<result>\n.*?\n</result>\n", re.DOTALL)
_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_CALL_RE = re.compile(r"<(code|search)>(.*?)</\1>\s*$", re.DOTALL)

FLAWS = ("hedge", "repeat_call", "failed_call", "verbose", "broken_tags", "guess", "copy_error")
# The flaws of the shipped policy's repair demonstrations (copy_error came later: kept out of its
# draw so that its config still reproduces it).
POLICY_REPAIR_FLAWS = FLAWS[:6]


@dataclasses.dataclass(frozen=True)
class FlawRates:
  """Probability of each flaw in a policy warm-start example (the rest are clean)."""

  hedge: float = 0.12
  repeat_call: float = 0.08
  failed_call: float = 0.08
  verbose: float = 0.08
  broken_tags: float = 0.04
  guess: float = 0.25
  copy_error: float = 0.0

  def pick(self, rng: random.Random) -> str | None:
    r = rng.random()
    for name in FLAWS:
      r -= getattr(self, name)
      if r < 0:
        return name
    return None


def split_pieces(text: str) -> list[tuple[str, str]]:
  """[('model', text), ('tool', '<result> block'), ...] in order."""
  out, pos = [], 0
  for m in _RESULT_RE.finditer(text):
    if m.start() > pos:
      out.append(("model", text[pos:m.start()]))
    out.append(("tool", m.group(0)))
    pos = m.end()
  if pos < len(text):
    out.append(("model", text[pos:]))
  return out


def _perturb(answer: str, rng: random.Random, others: Sequence[str]) -> str:
  if answer.lstrip("-").isdigit():
    n = int(answer)
    delta = rng.choice([1, -1]) * rng.randint(1, max(2, abs(n) // 7 + 1))
    return str(n + delta)
  candidates = [o for o in others if o != answer]
  return rng.choice(candidates) if candidates else answer + " Jr"


def flawed(text: str, task: Task, flaw: str, rng: random.Random, *, failed_output: str,
           other_answers: Sequence[str]) -> str:
  """`text` (a clean reference trajectory) with one flaw."""
  pieces = split_pieces(text)
  if flaw == "hedge":
    word = rng.choice(["probably", "maybe", "perhaps", "it seems", "likely"])
    thinks = list(_THINK_RE.finditer(text))
    m = rng.choice(thinks)
    body = m.group(1).rstrip(".")
    return text[:m.start(1)] + f"{body}, {word}. Let me recheck, I guess it might be right." + text[m.end(1):]
  if flaw == "verbose":
    m = list(_THINK_RE.finditer(text))[-1]
    sentence = m.group(1).strip()
    return text[:m.start(1)] + " ".join([sentence] * 3) + text[m.end(1):]
  if flaw == "broken_tags":
    i = text.rfind("</think>")
    return text[:i] + text[i + len("</think>"):] if rng.random() < 0.5 else \
        text.replace("<answer>", "So the answer follows.\n<answer>", 1)
  if flaw == "copy_error":  # the tools were right; the last thought and the answer misread the result
    wrong = _perturb(task.answer, rng, other_answers)
    i = text.rfind("</result>")
    i = 0 if i < 0 else i
    return text[:i] + text[i:].replace(task.answer, wrong)
  if flaw == "guess":
    guess = _perturb(task.answer, rng, other_answers)
    plan = pieces[0][1].split("</think>")[0] + "</think>\n"
    return (plan + f"<think>I can estimate this without a tool. It should be {guess}.</think>\n"
            f"<answer>The final answer is \\boxed{{{guess}}}</answer>")
  # Flaws on the first tool call: repeat it verbatim, or precede it with a failing call.
  first_model, rest = pieces[0][1], pieces[1:]
  if not rest or rest[0][0] != "tool":
    return text
  call_start = max(first_model.rfind("<code>"), first_model.rfind("<search>"))
  call = first_model[call_start:]
  if flaw == "repeat_call":
    return first_model + rest[0][1] + "<think>Let me run that again to be sure.</think>\n" + call + \
        "".join(p for _, p in rest)
  if flaw == "failed_call":
    bad = "<code>\nprint(total)\n</code>"
    return (first_model[:call_start] + bad + prompts.result_block(failed_output) +
            "<think>That failed: the variable was not defined. I write the full computation.</think>\n" +
            call + "".join(p for _, p in rest))
  raise ValueError(f"unknown flaw {flaw!r}")


def to_trajectory(tokenizer, task: Task, prompt_ids: list[int], text: str, *, source: str,
                  failed_outputs: Sequence[str] = ()) -> Trajectory:
  """A Trajectory whose segments are `text` tokenised piece by piece (results as mask 0), with the
  tool calls recorded as the rollout loop records them (a result in `failed_outputs` failed)."""
  segs, calls = [], []
  for kind, piece in split_pieces(text):
    ids = list(tokenizer.encode(piece, add_special_tokens=False))
    segs.append(Segment(kind, ids, piece))
    call = _CALL_RE.search(segs[-2].text) if kind == "tool" and len(segs) > 1 else None
    if call:
      output = piece.strip("\n")[len("<result>\n"):-len("\n</result>")]
      calls.append(ToolCall(tool=call.group(1), input=call.group(2).strip("\n"), output=output,
                            ok=output not in failed_outputs, elapsed_s=0.0))
  t = Trajectory(id=f"{source}/{task.id}", question_id=task.id, question=task.question,
                 prompt_ids=list(prompt_ids), segments=segs, tool_calls=calls, gold=task.answer,
                 domain=task.domain, finish_reason="answer", provenance={"source": source})
  t.answer = extract_answer(t.text)
  return t


def warmstart_examples(tokenizer, tasks: Sequence[Task], corpus: Any, *, rates: FlawRates, seed: int,
                       repair_fraction: float, run_code: Callable[[str], str], scoring_preset: str = "autotraj",
                       repair_flaws: Sequence[str] = POLICY_REPAIR_FLAWS) -> tuple[list[dict[str, list[int]]],
                                                                                   dict[str, int]]:
  """Training examples ({tokens, loss_mask}) for the demo policy + repairer, and their counts; a
  repair demonstration's flaw is drawn uniformly from `repair_flaws`."""

  rng = random.Random(seed)
  outputs = reference_tool_outputs(tasks, corpus)
  failed_output = run_code("print(total)")
  answers_by_family: dict[str, list[str]] = {}
  for t in tasks:
    answers_by_family.setdefault(t.family, []).append(t.answer)
  eos = tokenizer.eos_token_id
  examples, counts = [], {"clean": 0, "repair": 0, **{f: 0 for f in FLAWS}}
  for task, outs in zip(tasks, outputs):
    clean = render_reference_trajectory(task, outs, corpus=corpus)
    p_ids = prompts.prompt_ids(tokenizer, task.question)
    if rng.random() < repair_fraction:
      flaw = rng.choice(tuple(repair_flaws))
      bad_text = flawed(clean, task, flaw, rng, failed_output=failed_output,
                        other_answers=answers_by_family[task.family])
      bad = to_trajectory(tokenizer, task, p_ids, bad_text, source="demo-flawed", failed_outputs=(failed_output,))
      score_group([bad], PRESETS[scoring_preset])
      if bad.quality == HIGH:
        continue  # the scorers see nothing to repair
      r_ids = prompts.chat_ids(tokenizer, prompts.repair_messages(bad, show_gold=False))
      good = to_trajectory(tokenizer, task, r_ids, clean, source="demo-repair")
      ex = good.training_example()
      counts["repair"] += 1
    else:
      flaw = rates.pick(rng)
      text = clean if flaw is None else flawed(clean, task, flaw, rng, failed_output=failed_output,
                                               other_answers=answers_by_family[task.family])
      ex = to_trajectory(tokenizer, task, p_ids, text, source="demo-policy").training_example()
      counts[flaw or "clean"] += 1
    ex["tokens"].append(eos)
    ex["loss_mask"].append(1)
    examples.append(ex)
  return examples, counts
