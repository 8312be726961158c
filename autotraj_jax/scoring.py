"""Multi-dimensional trajectory scoring and the high / low / wrong partition.

Scorers are registered functions `(traj, group, opts) -> Score(value in [0, 1], reason)`; the
group is every candidate of the same query (the length scorer needs it). A preset names the
scorers, their weights, what text they read and how a query's candidates are partitioned:

- `reference`: the authors' code: 0.4 confidence + 0.3 length + 0.3 repetition on the whole
  text (tool output included); length relative to the shortest candidate of the item, where
  a query whose candidates disagree on correctness is split into one-trajectory items; keep all
  if every score >= 0.9, else keep the best if >= 0.86.
- `autotraj`: adds format validity and tool use, measures length and repetition on model text
  only, length relative to the shortest *correct* candidate; a trajectory is high quality when
  its own total clears the threshold.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Callable, Mapping, Sequence

from autotraj_jax.registry import Registry
from autotraj_jax.tir.answers import is_equivalent
from autotraj_jax.tir.format import parse_segments, validate
from autotraj_jax.tir.trajectory import Trajectory

HEDGES = ("maybe", "unsure", "guess", "seems", "perhaps", "probably", "might", "likely", "recheck")
_HEDGE_RE = re.compile(r"\b(" + "|".join(HEDGES) + r")\b", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Score:
  value: float
  reason: str = ""


@dataclasses.dataclass(frozen=True)
class ScoringConfig:
  weights: Mapping[str, float]
  text: str = "model"                 # 'model': model-written text only; 'all': with tool output
  length_reference: str = "correct"   # shortest among 'correct' candidates or 'all' of the item
  split_mixed_items: bool = False     # the authors' split of mixed-correctness queries
  selection: str = "threshold"        # 'threshold' (per trajectory) or 'reference' (per query)
  high_threshold: float = 0.86
  keep_all_threshold: float = 0.9
  # A correct candidate with any of these dimensions below its floor is low quality whatever its
  # total: one failed or repeated tool call barely moves a five-way weighted mean.
  floors: Mapping[str, float] = dataclasses.field(default_factory=dict)
  # tool_use: an answer must rest on a successful tool call (tool-integrated tasks); off for data
  # where some questions need no tool.
  answer_needs_tool: bool = True

  def __post_init__(self):
    unknown = (set(self.weights) | set(self.floors)) - set(SCORERS)
    if unknown:
      raise ValueError(f"unknown scorers {sorted(unknown)}; registered: {sorted(SCORERS)}")
    if self.text not in ("model", "all") or self.length_reference not in ("correct", "all"):
      raise ValueError(f"bad scoring text/length_reference: {self.text!r}, {self.length_reference!r}")
    if self.selection not in ("threshold", "reference"):
      raise ValueError(f"selection must be 'threshold' or 'reference', got {self.selection!r}")


Scorer = Callable[[Trajectory, Sequence[Trajectory], ScoringConfig], Score]
SCORERS: Registry[Scorer] = Registry("quality scorer")
register_scorer = SCORERS.register


def scored_text(traj: Trajectory, cfg: ScoringConfig) -> str:
  if cfg.text == "all":
    return traj.text
  return "".join(s.text for s in traj.segments if s.kind == "model")


def words(text: str) -> list[str]:
  return text.split()


def is_correct(traj: Trajectory) -> bool:
  return traj.gold is not None and is_equivalent(traj.gold, traj.answer, traj.domain)


@register_scorer("correctness")
def correctness(traj, group, cfg) -> Score:
  if traj.answer is None:
    return Score(0.0, "no answer in \\boxed{} inside <answer>")
  ok = is_correct(traj)
  return Score(1.0 if ok else 0.0, "" if ok else f"answer {traj.answer!r} does not match the gold")


@register_scorer("format")
def format_validity(traj, group, cfg) -> Score:
  problems = validate(traj.text)
  return Score(max(0.0, 1.0 - 0.25 * len(problems)), "; ".join(problems))


@register_scorer("confidence")
def confidence(traj, group, cfg) -> Score:
  """0 when the reasoning hedges (a lexicon of uncertainty words inside <think>), else 1."""
  found = sorted({m.group(1).lower() for s in parse_segments(traj.text) if s.kind == "think"
                  for m in _HEDGE_RE.finditer(s.content)})
  return Score(0.0, "hedging in reasoning: " + ", ".join(found)) if found else Score(1.0)


@register_scorer("length")
def length(traj, group, cfg) -> Score:
  """exp(-(n - n*)^2 / (2 sigma^2)), sigma = n*/2, n* the shortest reference candidate."""
  n = len(words(scored_text(traj, cfg)))
  pool = [t for t in group if cfg.length_reference == "all" or is_correct(t)] or [traj]
  n_star = min(len(words(scored_text(t, cfg))) for t in pool)
  if n_star <= 0:
    return Score(1.0)
  value = math.exp(-((n - n_star) ** 2) / (2 * (0.5 * n_star) ** 2))
  return Score(value, f"{n} words vs shortest {n_star}" if value < 0.99 else "")


@register_scorer("repetition")
def repetition(traj, group, cfg) -> Score:
  """1 - (occurrences of repeated word trigrams / number of trigrams); 1 under 6 words."""
  w = words(scored_text(traj, cfg))
  if len(w) < 6:
    return Score(1.0)
  counts = collections.Counter(zip(w, w[1:], w[2:]))
  repeated = sum(c for c in counts.values() if c > 1)
  value = max(0.0, 1.0 - repeated / (len(w) - 2))
  return Score(value, f"{repeated} repeated trigram occurrences" if repeated else "")


def repeated_tool_calls(traj: Trajectory) -> list[int]:
  """Indices of tool calls identical (tool and whitespace-normalised input) to an earlier call."""
  seen, out = set(), []
  for i, call in enumerate(traj.tool_calls):
    key = (call.tool, " ".join(call.input.split()))
    if key in seen:
      out.append(i)
    seen.add(key)
  return out


@register_scorer("tool_use")
def tool_use(traj, group, cfg) -> Score:
  """0.25 off per failed call, identical repeated call, or call made after a tool result already
  held the final answer; 0 for an answer resting on no successful tool call.

  The last rule is what keeps a guess from looking like good tool use: with no call at all there
  is nothing else to penalise, so a bare answer would score 1. It asks only for some successful call,
  not for an output that contains the answer: on real benchmarks the printed value and the boxed
  answer often differ in form (0.5 vs \\frac{1}{2}, units, names) and the last step may be done in
  reasoning. Data whose tasks do not all need a tool turns it off with `answer_needs_tool=False`.
  """
  problems = []
  repeated = set(repeated_tool_calls(traj))
  answer_known = False
  for i, call in enumerate(traj.tool_calls):
    if answer_known:
      problems.append(f"{call.tool} call after the answer was known")
    if i in repeated:
      problems.append(f"repeated identical {call.tool} call")
    if not call.ok:
      problems.append(f"failed {call.tool} call: {(call.error or call.output)[:60]}")
    if traj.answer and call.ok and _contains_answer(call.output, traj.answer):
      answer_known = True
  if cfg.answer_needs_tool and traj.answer and not any(call.ok for call in traj.tool_calls):
    problems.append("answer without a successful tool call")
    return Score(0.0, "; ".join(problems))
  return Score(max(0.0, 1.0 - 0.25 * len(problems)), "; ".join(problems))


def _contains_answer(output: str, answer: str) -> bool:
  a = answer.strip()
  return bool(a) and re.search(r"(?<![\w.])" + re.escape(a) + r"(?![\w.])", output) is not None


PRESETS: dict[str, ScoringConfig] = {
    "reference": ScoringConfig(weights={"confidence": 0.4, "length": 0.3, "repetition": 0.3}, text="all",
                               length_reference="all", split_mixed_items=True, selection="reference"),
    "autotraj": ScoringConfig(weights={"confidence": 0.2, "length": 0.2, "repetition": 0.2, "format": 0.2,
                                       "tool_use": 0.2}, high_threshold=0.86,
                          floors={"format": 1.0, "tool_use": 1.0, "repetition": 0.88}),
}

# ---- totals and partition ---------------------------------------------------------------------

HIGH, LOW, WRONG = "high", "low", "wrong"


@dataclasses.dataclass
class Scored:
  traj: Trajectory
  scores: dict[str, Score]
  total: float
  category: str = ""

  def diagnosis(self) -> list[str]:
    """What the scorers found wrong, for the repairer and the stats report."""
    return [f"{k}: {s.reason}" for k, s in self.scores.items() if s.reason and s.value < 1.0]


def score_group(group: Sequence[Trajectory], cfg: ScoringConfig) -> list[Scored]:
  """Scores and partitions every candidate of one query; writes scores onto the trajectories."""
  correct = [is_correct(t) for t in group]
  items: list[list[int]] = [list(range(len(group)))]
  if cfg.split_mixed_items and 0 < sum(correct) < len(group):
    items = [[i] for i in range(len(group))]
  out: list[Scored | None] = [None] * len(group)
  for item in items:
    members = [group[i] for i in item]
    for i in item:
      t = group[i]
      scores = {"correctness": correctness(t, members, cfg)}
      for name in {**cfg.weights, **cfg.floors}:
        scores[name] = SCORERS[name](t, members, cfg)
      total = sum(w * scores[name].value for name, w in cfg.weights.items())
      out[i] = Scored(t, scores, total)
  result: list[Scored] = out  # type: ignore[assignment]
  for s, ok in zip(result, correct):
    below = any(s.scores[name].value < floor for name, floor in cfg.floors.items())
    s.category = WRONG if not ok else LOW if below else HIGH
  ok_idx = [i for i, ok in enumerate(correct) if ok and result[i].category == HIGH]
  if cfg.selection == "threshold":
    for i in ok_idx:
      if result[i].total < cfg.high_threshold:
        result[i].category = LOW
  else:
    for item in items:
      good = [i for i in item if correct[i]]
      if not good or min(result[i].total for i in good) >= cfg.keep_all_threshold:
        continue
      best = max(good, key=lambda i: result[i].total)
      for i in good:
        if i != best or result[i].total < cfg.high_threshold:
          result[i].category = LOW
  for s in result:
    s.traj.scores = {**{k: v.value for k, v in s.scores.items()}, "total": s.total}
    s.traj.quality = s.category
    s.traj.diagnosis = s.diagnosis()
  return result


def get_scoring_config(name_or_cfg: str | ScoringConfig, **overrides) -> ScoringConfig:
  cfg = PRESETS[name_or_cfg] if isinstance(name_or_cfg, str) else name_or_cfg
  return dataclasses.replace(cfg, **overrides) if overrides else cfg
