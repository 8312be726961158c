"""Benchmark harness: greedy pass@1 and maj@k with real tool calls, plus tool-use statistics.

Reads any question file (`questions.load_questions`: the synthetic test split or the benchmark
files), runs the tool loop through an `LLMBackend`, and writes one table per run as JSON and
markdown next to the trajectories. A question whose prompt the backend cannot take counts as
wrong and is counted under `prompt_too_long`; it never stops the run.

Questions with a difficulty level (`Query.level`) also give `accuracy_by_level` and
`questions_by_level`; each greedy trajectory keeps its question's level in
`provenance["level"]`, so per-level numbers can be recomputed from the saved trajectories.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Mapping, Sequence

from autotraj_jax import scoring
from autotraj_jax.engine.backend import PROMPT_TOO_LONG
from autotraj_jax.questions import Query
from autotraj_jax.stats import wilson_interval
from autotraj_jax.tir.answers import is_equivalent, normalize_math, normalize_qa
from autotraj_jax.tir.format import validate
from autotraj_jax.tir.records import write_json, write_jsonl, write_text
from autotraj_jax.tir.rollout import RolloutConfig, run_rollouts
from autotraj_jax.tir.tools import Tool
from autotraj_jax.tir.trajectory import Trajectory


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  rollout: RolloutConfig = RolloutConfig()   # its sampling is forced greedy for pass@1
  maj_k: int = 1                             # > 1: also sample k answers and take the majority
  maj_temperature: float = 0.7
  max_questions: int | None = None
  seed: int = 0


def _vote_key(answer: str | None, domain: str) -> str | None:
  if answer is None or not answer.strip():
    return None
  return normalize_math(answer) if domain == "math" else normalize_qa(answer)


# Per-level metrics of an eval's JSON ({level: value}) and the prefix of their flat names
# (`accuracy@level2`) in tables, results rows and comparisons.
BY_LEVEL: dict[str, str] = {"accuracy_by_level": "accuracy", "questions_by_level": "questions"}


def level_metric(metric: str, level: str) -> str:
  """The flat name of one level's metric: ('accuracy', '2') -> 'accuracy@level2'."""
  return f"{metric}@level{level}"


def level_order(level: str) -> tuple[int, int, str]:
  """Sort key of level names: numeric ones by value ('2' before '10'), then the rest by name."""
  return (0, int(level), "") if level.isascii() and level.isdigit() else (1, 0, level)


def level_of(traj: Trajectory) -> str:
  """The question level an evaluation recorded on the trajectory ('' when none)."""
  level = traj.provenance.get("level", "")
  return level if isinstance(level, str) else str(level)


def by_level(levels: Sequence[str], values: Sequence[float]) -> dict[str, float]:
  """Mean of `values` per non-empty level, in `level_order`; questions without a level are left out."""
  if len(levels) != len(values):
    raise ValueError(f"levels and values must pair up; got {len(levels)} and {len(values)}")
  groups: dict[str, list[float]] = {}
  for level, v in zip(levels, values):
    if level:
      groups.setdefault(level, []).append(float(v))
  return {lv: sum(groups[lv]) / len(groups[lv]) for lv in sorted(groups, key=level_order)}


def accuracy_ci95(fraction: float, n: int, alpha: float = 0.05) -> list[float] | None:
  """The Wilson interval of an accuracy over n questions (None for n < 1), as [low, high]."""
  if n < 1:
    return None
  return list(wilson_interval(min(n, max(0, round(fraction * n))), n, alpha))


def interval_text(ci: Sequence[float] | None) -> str:
  """[low, high] as percentages, '-' when there is none."""
  return "-" if not ci else f"[{100 * ci[0]:.1f}%, {100 * ci[1]:.1f}%]"


def has_repeated_tool_call(traj: Trajectory) -> bool:
  """An identical tool call made twice, as the `tool_use` scorer judges it (whitespace-insensitive)."""
  return bool(scoring.repeated_tool_calls(traj))


def has_failed_tool_call(traj: Trajectory) -> bool:
  """A call whose result is an error (exception, timeout, call limit): the `ok=False` that the
  `tool_use` scorer penalises and `tool_error_rate` counts per call."""
  return any(not c.ok for c in traj.tool_calls)


def trajectory_stats(trajs: Sequence[Trajectory]) -> dict[str, float]:
  """Behaviour statistics: `format_error_rate`, `repeated_tool_call_rate` and `failed_tool_call_rate`
  are fractions of trajectories, `tool_error_rate` a fraction of calls."""
  n = max(len(trajs), 1)
  calls = [c for t in trajs for c in t.tool_calls]
  return {
      "format_error_rate": sum(bool(validate(t.text)) for t in trajs) / n,
      "answered_rate": sum(t.answer is not None for t in trajs) / n,
      "tool_calls_per_question": len(calls) / n,
      "tool_error_rate": sum(not c.ok for c in calls) / max(len(calls), 1),
      "repeated_tool_call_rate": sum(has_repeated_tool_call(t) for t in trajs) / n,
      "failed_tool_call_rate": sum(has_failed_tool_call(t) for t in trajs) / n,
      "mean_response_tokens": sum(len(t.response_ids) for t in trajs) / n,
      "mean_model_tokens": sum(t.num_model_tokens for t in trajs) / n,
      "prompt_too_long": sum(t.finish_reason == PROMPT_TOO_LONG for t in trajs),
  }


def level_metrics(levels: Sequence[str], correct: Sequence[float]) -> dict[str, dict[str, float]]:
  """`accuracy_by_level` and `questions_by_level` of per-question outcomes; {} when no question has a level."""
  if not any(levels):
    return {}
  counts = collections.Counter(lv for lv in levels if lv)
  return {"accuracy_by_level": by_level(levels, correct),
          "questions_by_level": {lv: counts[lv] for lv in sorted(counts, key=level_order)}}


def evaluate(backend, tokenizer, tools: Mapping[str, Tool], queries: Sequence[Query], cfg: EvalConfig,
             *, progress: bool | str = False) -> tuple[dict[str, Any], list[Trajectory]]:
  """(metrics, greedy trajectories): pass@1, behaviour rates, per-level accuracy when the questions
  have levels, and maj@k when `cfg.maj_k > 1`."""
  greedy = dataclasses.replace(cfg.rollout, sampling=dataclasses.replace(cfg.rollout.sampling, temperature=0.0))
  trajs = run_rollouts(backend, tokenizer, queries, tools, greedy, id_prefix="eval/", progress=progress)
  correct = [t.finish_reason != PROMPT_TOO_LONG and is_equivalent(t.gold, t.answer, t.domain) for t in trajs]
  for q, t, ok in zip(queries, trajs, correct):
    t.scores = {"correct": float(ok)}
    if q.level:
      t.provenance["level"] = q.level
  metrics: dict[str, Any] = {"questions": len(queries), "pass@1": sum(correct) / max(len(correct), 1),
                             **trajectory_stats(trajs), **level_metrics([q.level for q in queries], correct)}
  if cfg.maj_k > 1:
    sampled = dataclasses.replace(cfg.rollout, sampling=dataclasses.replace(
        cfg.rollout.sampling, temperature=cfg.maj_temperature, seed=cfg.seed))
    samples = run_rollouts(backend, tokenizer, queries, tools, sampled, samples_per_query=cfg.maj_k,
                           id_prefix="eval-maj/", progress=progress)
    wins = 0
    for i, q in enumerate(queries):
      group = samples[i * cfg.maj_k:(i + 1) * cfg.maj_k]
      votes = collections.Counter(k for t in group if (k := _vote_key(t.answer, q.domain)) is not None)
      if votes:
        top_key = votes.most_common(1)[0][0]
        answer = next(t.answer for t in group if _vote_key(t.answer, q.domain) == top_key)
        wins += is_equivalent(q.gold, answer, q.domain)
    metrics[f"maj@{cfg.maj_k}"] = wins / max(len(queries), 1)
  return metrics, trajs


def write_report(out_dir: str, name: str, metrics: Mapping[str, Any], trajs: Sequence[Trajectory] = ()) -> None:
  """`<name>.json`, `<name>.md` (a one-row table) and the greedy trajectories as JSONL; each file is
  replaced atomically, so a killed run never leaves half a report."""
  os.makedirs(out_dir, exist_ok=True)
  write_json(os.path.join(out_dir, f"{name}.json"), dict(metrics))
  write_text(os.path.join(out_dir, f"{name}.md"), markdown_table([{"run": name, **flat_metrics(metrics)}]))
  if trajs:
    write_jsonl(os.path.join(out_dir, f"{name}.trajectories.jsonl"), trajs)


def flat_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
  """The metrics with each per-level dict spread into `accuracy@levelL`-style keys, for tables."""
  out: dict[str, Any] = {}
  for k, v in metrics.items():
    if k in BY_LEVEL and isinstance(v, Mapping):
      out.update({level_metric(BY_LEVEL[k], lv): x for lv, x in v.items()})
    else:
      out[k] = v
  return out


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
  cols = list(dict.fromkeys(k for r in rows for k in r))
  fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
  return "\n".join(lines) + "\n"
