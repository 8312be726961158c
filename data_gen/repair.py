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

from autotraj_jax.scoring import LOW, WRONG, ScoringConfig, is_correct, score_group
from autotraj_jax.tir import prompts
from autotraj_jax.tir.rollout import Query, RolloutConfig, run_rollouts
from autotraj_jax.tir.tools import Tool
from autotraj_jax.tir.trajectory import Trajectory


@dataclasses.dataclass(frozen=True)
class RepairConfig:
  attempts: int = 2
  show_gold: bool = False
  accept_threshold: float = 0.86         # for correct-but-low-quality originals
  accept_threshold_wrong: float = 0.8    # for wrong-answer originals
  require_improvement: bool = True
  rollout: RolloutConfig = RolloutConfig()
  retry_temperature: float = 0.7         # attempts after the first sample at this temperature


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


def repair_queue(scored: list[Trajectory], max_originals: int = 0) -> list[Trajectory]:
  """The originals to repair, in order: correct-but-low-quality ones first (AutoTraj's main
  case, and the likelier to be repaired, so a `max_originals` budget buys the most pairs),
  then wrong ones; `max_originals` > 0 keeps that many."""
  queue = [t for t in scored if t.quality == LOW] + [t for t in scored if t.quality == WRONG]
  return queue[:max_originals] if max_originals > 0 else queue


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
      return prompts.chat_ids(tokenizer, prompts.repair_messages(by_id[q.id], cfg.show_gold))

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


__all__ = ["RepairConfig", "RepairOutcome", "judge", "repair", "repair_queue"]
