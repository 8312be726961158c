"""LLM-as-Repairer: rewrite low-quality and wrong trajectories, verify, keep or set aside.

The repairer sees the question, the low-quality trajectory and what the scorers found wrong
(and, if configured, the gold answer), then writes a new trajectory through the real tool loop.
A repair is accepted when it is correct, clears the threshold and beats the original's score;
each (repair, original) becomes a preference pair. After `attempts` failures the last repair is
kept as a hard case with the reasons it failed.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from autotraj_jax.tir import prompts
from autotraj_jax.tir.rollout import Query, RolloutConfig, run_rollouts
from autotraj_jax.tir.tools import Tool
from autotraj_jax.tir.trajectory import Trajectory
from data_gen.scoring import HIGH, LOW, WRONG, ScoringConfig, is_correct, score_group

LOW_QUALITY_SYSTEM = (
    "Rewrite a tool-use solution. Below are a question, an earlier solution that gets the right "
    "answer but is poorly written, and a reviewer's notes. Write a new solution from scratch: brief "
    "reasoning in <think> </think> without hedging, <code> or <search> only when needed (at most "
    "three calls), and one final <answer>The final answer is \\boxed{...}</answer>.")

WRONG_ANSWER_SYSTEM = (
    "Rewrite a tool-use solution. Below are a question, an earlier solution that gets a wrong "
    "answer, and a reviewer's notes. Find the mistake (misreading, logic, arithmetic or tool misuse) "
    "and write a new, correct solution from scratch: brief reasoning in <think> </think>, <code> or "
    "<search> when needed (at most three calls), and one final "
    "<answer>The final answer is \\boxed{...}</answer>.")


@dataclasses.dataclass(frozen=True)
class RepairConfig:
  attempts: int = 2
  show_gold: bool = False
  accept_threshold: float = 0.86         # for correct-but-low-quality originals
  accept_threshold_wrong: float = 0.8    # for wrong-answer originals
  require_improvement: bool = True
  rollout: RolloutConfig = RolloutConfig()
  retry_temperature: float = 0.7         # attempts after the first sample at this temperature


def repair_messages(orig: Trajectory, show_gold: bool) -> list[dict[str, str]]:
  """The repairer's chat: which prompt depends on the failure; the user turn holds the question,
  the scored trajectory and its diagnosis (and the gold answer only if asked)."""
  system = WRONG_ANSWER_SYSTEM if orig.quality == WRONG else LOW_QUALITY_SYSTEM
  notes = orig.diagnosis or ["no specific problem found; make it clearer and shorter"]
  user = (f"Question:\n{orig.question}\n\nEarlier solution:\n{orig.text.strip()}\n\n"
          "Reviewer notes:\n" + "\n".join(f"- {n}" for n in notes))
  if show_gold and orig.gold is not None:
    user += f"\n\nThe correct final answer is {orig.gold}."
  user += "\n\nWrite the improved solution."
  return [{"role": "system", "content": system}, {"role": "user", "content": user}]


@dataclasses.dataclass
class RepairOutcome:
  original: Trajectory
  repaired: Trajectory | None          # accepted repair (policy prompt attached)
  attempts: list[tuple[Trajectory, list[str]]]  # every attempt and why it was rejected

  @property
  def accepted(self) -> bool:
    return self.repaired is not None

  def to_dict(self) -> dict:
    return {"original_id": self.original.id, "accepted": self.accepted,
            "repaired": self.repaired.to_dict() if self.repaired else None,
            "attempts": [{"trajectory": t.to_dict(), "reasons": r} for t, r in self.attempts]}


def judge(orig: Trajectory, repaired: Trajectory, scoring: ScoringConfig, cfg: RepairConfig) -> list[str]:
  """Scores a repair next to its original and lists the reasons to reject it (empty: accept)."""
  copy = dataclasses.replace(orig, scores=dict(orig.scores), diagnosis=list(orig.diagnosis))
  rep = score_group([copy, repaired], scoring)[1]
  reasons = []
  if not is_correct(repaired):
    reasons.append("wrong answer" if repaired.answer else "no answer")
  threshold = cfg.accept_threshold_wrong if orig.quality == WRONG else cfg.accept_threshold
  if rep.total < threshold:
    reasons.append(f"score {rep.total:.3f} below {threshold}")
  orig_total = orig.scores.get("total", 0.0)
  if cfg.require_improvement and rep.total <= orig_total:
    reasons.append(f"score {rep.total:.3f} does not beat the original's {orig_total:.3f}")
  reasons += [d for d in rep.diagnosis() if d.startswith("format")]
  return reasons


def repair(backend, tokenizer, tools: Mapping[str, Tool], originals: Sequence[Trajectory],
           scoring: ScoringConfig, cfg: RepairConfig, *, progress: bool = False,
           model_name: str = "") -> list[RepairOutcome]:
  """Repairs every scored low-quality or wrong trajectory in `originals` (others are skipped)."""
  todo = [o for o in originals if o.quality in (LOW, WRONG)]
  outcomes = {o.id: RepairOutcome(o, None, []) for o in todo}
  by_id = {o.id: o for o in todo}
  for attempt in range(cfg.attempts):
    pending = [o for o in todo if not outcomes[o.id].accepted]
    if not pending:
      break
    sampling = cfg.rollout.sampling
    if attempt > 0:
      sampling = dataclasses.replace(sampling, temperature=cfg.retry_temperature,
                                     seed=(sampling.seed or 0) + 1000 * attempt)
    rcfg = dataclasses.replace(cfg.rollout, sampling=sampling)
    queries = [Query(id=o.id, question=o.question, gold=o.gold, domain=o.domain) for o in pending]

    def build(q: Query) -> list[int]:
      return _chat_ids(tokenizer, repair_messages(by_id[q.id], cfg.show_gold))

    trajs = run_rollouts(backend, tokenizer, queries, tools, rcfg, id_prefix="", prompt_builder=build,
                         progress=progress, provenance={"source": "repaired"})
    for o, t in zip(pending, trajs):
      t.id = f"{o.id}/repair{attempt}"
      t.question_id = o.question_id
      t.prompt_ids = prompts.prompt_ids(tokenizer, o.question)
      t.provenance = {"source": "repaired", "parent_id": o.id, "attempt": attempt,
                      "failure_type": o.quality, "model": model_name}
      reasons = judge(o, t, scoring, cfg)
      outcomes[o.id].attempts.append((t, reasons))
      if not reasons:
        outcomes[o.id].repaired = t
  return [outcomes[o.id] for o in todo]


def _chat_ids(tokenizer, messages) -> list[int]:
  ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
  if hasattr(ids, "keys"):
    ids = ids["input_ids"]
  return list(ids)


__all__ = ["RepairConfig", "RepairOutcome", "repair", "repair_messages", "judge", "HIGH", "LOW", "WRONG"]
