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
from data_gen.scoring import HIGH, LOW, WRONG, Scored, ScoringConfig, is_correct, score_group

LOW_QUALITY_SYSTEM = (
    "You rewrite tool-use solutions. You get a question, an earlier solution that reaches the right "
    "answer but is poorly written, and a reviewer's notes on it. Write a new solution from scratch: "
    "reason briefly inside <think> </think> without hedging words, call <code> or <search> only when "
    "needed (at most three calls), think again after each <result>, and end with exactly one "
    "<answer>The final answer is \\boxed{...}</answer>.")

WRONG_ANSWER_SYSTEM = (
    "You rewrite tool-use solutions. You get a question, an earlier solution that reaches a wrong "
    "answer, and a reviewer's notes on it. Work out where it went wrong (misreading, logic, arithmetic "
    "or tool misuse), then write a new, correct solution from scratch: reason briefly inside "
    "<think> </think>, call <code> or <search> when needed (at most three calls), think again after "
    "each <result>, and end with exactly one <answer>The final answer is \\boxed{...}</answer>.")


@dataclasses.dataclass(frozen=True)
class RepairConfig:
  attempts: int = 2
  show_gold: bool = False
  accept_threshold: float = 0.86         # for correct-but-low-quality originals
  accept_threshold_wrong: float = 0.8    # for wrong-answer originals
  require_improvement: bool = True
  rollout: RolloutConfig = RolloutConfig()
  retry_temperature: float = 0.7         # attempts after the first sample at this temperature


def repair_messages(orig: Scored, show_gold: bool) -> list[dict[str, str]]:
  system = WRONG_ANSWER_SYSTEM if orig.category == WRONG else LOW_QUALITY_SYSTEM
  notes = orig.diagnosis() or ["no specific problem found; make it clearer and shorter"]
  user = (f"Question:\n{orig.traj.question}\n\nEarlier solution:\n{orig.traj.text.strip()}\n\n"
          "Reviewer notes:\n" + "\n".join(f"- {n}" for n in notes))
  if show_gold and orig.traj.gold is not None:
    user += f"\n\nThe correct final answer is {orig.traj.gold}."
  user += "\n\nWrite the improved solution."
  return [{"role": "system", "content": system}, {"role": "user", "content": user}]


@dataclasses.dataclass
class RepairOutcome:
  original: Scored
  repaired: Trajectory | None          # accepted repair (policy prompt attached)
  attempts: list[tuple[Trajectory, list[str]]]  # every attempt and why it was rejected

  @property
  def accepted(self) -> bool:
    return self.repaired is not None


def judge(orig: Scored, repaired: Trajectory, scoring: ScoringConfig, cfg: RepairConfig) -> tuple[Scored, list[str]]:
  """Scores a repair next to its original and lists the reasons to reject it (empty: accept)."""
  rep = score_group([dataclasses.replace(orig.traj, scores=dict(orig.traj.scores)), repaired], scoring)[1]
  reasons = []
  if not is_correct(repaired):
    reasons.append("wrong answer" if repaired.answer else "no answer")
  threshold = cfg.accept_threshold_wrong if orig.category == WRONG else cfg.accept_threshold
  if rep.total < threshold:
    reasons.append(f"score {rep.total:.3f} below {threshold}")
  if cfg.require_improvement and rep.total <= orig.total:
    reasons.append(f"score {rep.total:.3f} does not beat the original's {orig.total:.3f}")
  reasons += [d for d in rep.diagnosis() if d.startswith("format")]
  return rep, reasons


def repair(backend, tokenizer, tools: Mapping[str, Tool], originals: Sequence[Scored],
           scoring: ScoringConfig, cfg: RepairConfig, *, progress: bool = False,
           model_name: str = "") -> list[RepairOutcome]:
  """Repairs every low-quality or wrong trajectory in `originals` (high ones are skipped)."""
  todo = [o for o in originals if o.category in (LOW, WRONG)]
  outcomes = {o.traj.id: RepairOutcome(o, None, []) for o in todo}
  by_id = {o.traj.id: o for o in todo}
  for attempt in range(cfg.attempts):
    pending = [o for o in todo if not outcomes[o.traj.id].accepted]
    if not pending:
      break
    sampling = cfg.rollout.sampling
    if attempt > 0:
      sampling = dataclasses.replace(sampling, temperature=cfg.retry_temperature,
                                     seed=(sampling.seed or 0) + 1000 * attempt)
    rcfg = dataclasses.replace(cfg.rollout, sampling=sampling)
    queries = [Query(id=o.traj.id, question=o.traj.question, gold=o.traj.gold, domain=o.traj.domain)
               for o in pending]

    def build(q: Query) -> list[int]:
      return _chat_ids(tokenizer, repair_messages(by_id[q.id], cfg.show_gold))

    trajs = run_rollouts(backend, tokenizer, queries, tools, rcfg, id_prefix="", prompt_builder=build,
                         progress=progress, provenance={"source": "repaired"})
    for o, t in zip(pending, trajs):
      t.id = f"{o.traj.id}/repair{attempt}"
      t.question_id = o.traj.question_id
      t.prompt_ids = prompts.prompt_ids(tokenizer, o.traj.question)
      t.provenance = {"source": "repaired", "parent_id": o.traj.id, "attempt": attempt,
                      "failure_type": o.category, "diagnosis": o.diagnosis(), "model": model_name}
      _, reasons = judge(o, t, scoring, cfg)
      outcomes[o.traj.id].attempts.append((t, reasons))
      if not reasons:
        outcomes[o.traj.id].repaired = t
  return [outcomes[o.traj.id] for o in todo]


def _chat_ids(tokenizer, messages) -> list[int]:
  ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
  if hasattr(ids, "keys"):
    ids = ids["input_ids"]
  return list(ids)


__all__ = ["RepairConfig", "RepairOutcome", "repair", "repair_messages", "judge", "HIGH", "LOW", "WRONG"]
