"""LLM-as-Repairer: rewrite low-quality and wrong trajectories, verify, keep or set aside.

The repairer sees the question, the low-quality trajectory and what the scorers found wrong
(and, if configured, the gold answer), then writes a new trajectory through the real tool loop.
With `context="question"` it sees the question alone, as in the authors' code: the ablation that
shows what seeing the trajectory buys.
A repair is accepted when it is correct, clears the threshold and the scoring floors and, for a
correct-but-low-quality original, beats its score; each (repair, original) becomes a preference
pair. After `attempts` failures the last repair is kept as a hard case with the reasons it failed.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Mapping, Sequence

from autotraj_jax.scoring import HIGH, LOW, WRONG, ScoringConfig, is_correct, score_group
from autotraj_jax.tir import prompts
from autotraj_jax.tir.rollout import Query, RolloutConfig, run_rollouts
from autotraj_jax.tir.tools import Tool
from autotraj_jax.tir.trajectory import RepairRecord, Trajectory


@dataclasses.dataclass(frozen=True)
class RepairConfig:
  attempts: int = 2
  show_gold: bool = False
  context: str = "trajectory"            # what the repairer sees: "trajectory" or "question" (only)
  accept_threshold: float = 0.86         # for correct-but-low-quality originals
  accept_threshold_wrong: float = 0.8    # for wrong-answer originals
  require_improvement: bool = True       # a low-quality original's total must be beaten
  rollout: RolloutConfig = RolloutConfig()
  retry_temperature: float = 0.7         # attempts after the first sample at this temperature


def repair_queue(scored: list[Trajectory], max_originals: int = 0) -> list[Trajectory]:
  """The originals to repair, in order; `max_originals` > 0 keeps that many.

  Correct-but-low-quality ones come first (AutoTraj's main case, and the likelier to be repaired,
  so a budget buys the most pairs). Wrong ones follow round-robin over questions: the first wrong
  original of every question, then the second, and so on, so the budget covers many questions
  instead of repairing four originals of one (greedy repairs of one question tend to coincide).
  Within a round, questions with no high-quality candidate come first: there a repair is the only
  way into the SFT set, elsewhere it often reproduces a high-quality candidate.
  """
  with_high = {t.question_id for t in scored if t.quality == HIGH}
  order: dict[str, int] = {}
  for t in scored:
    order.setdefault(t.question_id, len(order))
  rank: collections.Counter[str] = collections.Counter()
  wrong = []
  for pos, t in enumerate(scored):
    if t.quality == WRONG:
      wrong.append(((rank[t.question_id], t.question_id in with_high, order[t.question_id], pos), t))
      rank[t.question_id] += 1
  queue = [t for t in scored if t.quality == LOW] + [t for _, t in sorted(wrong, key=lambda kt: kt[0])]
  return queue[:max_originals] if max_originals > 0 else queue


def judge(orig: Trajectory, repaired: Trajectory, scoring: ScoringConfig, cfg: RepairConfig) -> list[str]:
  """Scores a repair next to its original and lists the reasons to reject it (empty: accept).

  Every repair must be correct, clear its threshold and every floor of the scoring config. Only a
  correct-but-low-quality original must also be beaten on the quality total: a wrong original's
  total leaves correctness out (and its length score is 1 when no candidate is correct), so it
  often scores 1.0; for it, becoming correct at high quality is the improvement.
  """
  copy = dataclasses.replace(orig, scores=dict(orig.scores), diagnosis=list(orig.diagnosis))
  rep = score_group([copy, repaired], scoring)[1]
  reasons = []
  if not is_correct(repaired):
    reasons.append("wrong answer" if repaired.answer else "no answer")
  threshold = cfg.accept_threshold_wrong if orig.quality == WRONG else cfg.accept_threshold
  if rep.total < threshold:
    reasons.append(f"score {rep.total:.3f} below {threshold}")
  orig_total = orig.scores.get("total", 0.0)
  if cfg.require_improvement and orig.quality != WRONG and rep.total <= orig_total:
    reasons.append(f"score {rep.total:.3f} does not beat the original's {orig_total:.3f}")
  floors = dict(scoring.floors)
  if "format" in rep.scores:
    floors.setdefault("format", 1.0)  # a repair is well-formed whatever the floors say
  for name, floor in floors.items():
    s = rep.scores[name]
    if s.value < floor:
      reasons.append(f"{name} {s.value:.3f} below its floor {floor}" + (f": {s.reason}" if s.reason else ""))
  return reasons


def repair(backend, tokenizer, tools: Mapping[str, Tool], originals: Sequence[Trajectory],
           scoring: ScoringConfig, cfg: RepairConfig, *, progress: bool = False,
           model_name: str = "") -> list[RepairRecord]:
  """Repairs every scored low-quality or wrong trajectory in `originals` (others are skipped)."""
  todo = [o for o in originals if o.quality in (LOW, WRONG)]
  outcomes = {o.id: RepairRecord(o.id, False, None, []) for o in todo}
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
      return prompts.chat_ids(tokenizer, prompts.repair_messages(by_id[q.id], cfg.show_gold, cfg.context))

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
        outcomes[o.id].repaired, outcomes[o.id].accepted = t, True
  return [outcomes[o.id] for o in todo]


__all__ = ["RepairConfig", "judge", "repair", "repair_queue"]
