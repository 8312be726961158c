"""Benchmark harness: greedy pass@1 and maj@k with real tool calls, plus tool-use statistics.

Reads any question file (`questions.load_questions`: the synthetic test split or the benchmark
files), runs the tool loop through an `LLMBackend`, and writes one table per run as JSON and
markdown next to the trajectories. A question whose prompt the backend cannot take counts as
wrong and is counted under `prompt_too_long`; it never stops the run.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Mapping, Sequence

from autotraj_jax.engine.backend import PROMPT_TOO_LONG
from autotraj_jax.questions import Query
from autotraj_jax.tir.answers import is_equivalent, normalize_math, normalize_qa
from autotraj_jax.tir.format import validate
from autotraj_jax.tir.records import write_json, write_jsonl
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


def trajectory_stats(trajs: Sequence[Trajectory]) -> dict[str, float]:
  n = max(len(trajs), 1)
  calls = [c for t in trajs for c in t.tool_calls]
  return {
      "format_error_rate": sum(bool(validate(t.text)) for t in trajs) / n,
      "answered_rate": sum(t.answer is not None for t in trajs) / n,
      "tool_calls_per_question": len(calls) / n,
      "tool_error_rate": sum(not c.ok for c in calls) / max(len(calls), 1),
      "mean_response_tokens": sum(len(t.response_ids) for t in trajs) / n,
      "mean_model_tokens": sum(t.num_model_tokens for t in trajs) / n,
      "prompt_too_long": sum(t.finish_reason == PROMPT_TOO_LONG for t in trajs),
  }


def evaluate(backend, tokenizer, tools: Mapping[str, Tool], queries: Sequence[Query], cfg: EvalConfig,
             *, progress: bool | str = False) -> tuple[dict[str, float], list[Trajectory]]:
  greedy = dataclasses.replace(cfg.rollout, sampling=dataclasses.replace(cfg.rollout.sampling, temperature=0.0))
  trajs = run_rollouts(backend, tokenizer, queries, tools, greedy, id_prefix="eval/", progress=progress)
  correct = [t.finish_reason != PROMPT_TOO_LONG and is_equivalent(t.gold, t.answer, t.domain) for t in trajs]
  for t, ok in zip(trajs, correct):
    t.scores = {"correct": float(ok)}
  metrics = {"questions": len(queries), "pass@1": sum(correct) / max(len(correct), 1),
             **trajectory_stats(trajs)}
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
  """`<name>.json`, `<name>.md` (a one-row table) and the greedy trajectories as JSONL; the JSON
  files are replaced atomically, so a killed run never leaves half a report."""
  os.makedirs(out_dir, exist_ok=True)
  write_json(os.path.join(out_dir, f"{name}.json"), dict(metrics))
  with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
    f.write(markdown_table([{"run": name, **metrics}]))
  if trajs:
    write_jsonl(os.path.join(out_dir, f"{name}.trajectories.jsonl"), trajs)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
  cols = list(dict.fromkeys(k for r in rows for k in r))
  fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
  return "\n".join(lines) + "\n"
