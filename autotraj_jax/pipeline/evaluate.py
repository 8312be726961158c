"""Evaluation stages: greedy pass@1 (and maj@k) with real tool calls, plus quality metrics.

- `eval:NAME` evaluates the model trained as NAME in this workdir on the test split (`eval:base`
  is the starting policy; with an SGLang backend, whatever the server serves) and writes
  `eval/NAME.json`, `.md` and the greedy trajectories.
- `eval_files` evaluates the policy on every file of `config.eval.files` (benchmark JSONL with
  `id, question, answer, domain`; the checker is chosen per line by `domain`) and writes one table,
  `eval/results.json` and `eval/results.md`, with a row per file (`eval_files:NAME`: the model
  trained as NAME, under `eval/NAME/`), pass@1's 95% Wilson interval and accuracy per level.

Behaviour rates are fractions of greedy trajectories: hedging and tool problems as the quality
scorers judge them (below), repeated and failed tool calls and format errors (`eval.trajectory_stats`).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence

from autotraj_jax import scoring
from autotraj_jax.eval import accuracy_ci95, interval_text
from autotraj_jax.pipeline import builders
from autotraj_jax.pipeline.workdir import Workdir
from autotraj_jax.tir import records
from autotraj_jax.tir.trajectory import Trajectory

log = logging.getLogger(__name__)


def quality_metrics(trajs: Sequence[Trajectory], cfg: scoring.ScoringConfig) -> dict[str, float]:
  """HQ@1 (correct AND passing every quality floor of the scoring preset) and behaviour rates.

  Each greedy trajectory is scored alone (its length is not compared with other candidates), so
  HQ@1 sees hedging, failed or repeated tool calls, broken format and repetition, not length.
  Scores land on the trajectories (`scores`, `quality`), which the report keeps per question.
  """
  n = max(len(trajs), 1)
  for t in trajs:
    scoring.score_group([t], cfg)
  correct = [t for t in trajs if t.quality in (scoring.HIGH, scoring.LOW)]
  below = lambda dim: sum(t.scores.get(dim, 1.0) < 1.0 for t in trajs) / n
  return {"hq_at_1": sum(t.quality == scoring.HIGH for t in trajs) / n,
          "hedging_rate": below("confidence"), "tool_problem_rate": below("tool_use"),
          "tool_calls_per_correct": sum(len(t.tool_calls) for t in correct) / max(len(correct), 1),
          "model_tokens_per_correct": sum(t.num_model_tokens for t in correct) / max(len(correct), 1)}


def _open_model(config, wd: Workdir, variant: str):
  """(tokenizer, backend, tools) of eval's model (`variant`: one trained in this workdir, '' or
  'base': the policy), or None when that model was recorded as not trained."""
  model = None if not variant or variant == "base" else variant
  if model and (reason := wd.skipped(model)):
    log.warning("eval %s: skipped, the model was not trained (%s)", model, reason)
    return None
  tokenizer, backend = builders.make_backend(config, wd, "policy", model=model)
  return tokenizer, backend, builders.make_tools(config, wd)


def _evaluate(config, model, queries, out_dir: str, name: str) -> dict[str, Any]:
  """Greedy pass@1 (+ maj@k, accuracy per level) and quality metrics of `queries`, written under
  `out_dir` as `name`."""
  from autotraj_jax.eval import EvalConfig, evaluate, write_report
  tokenizer, backend, tools = model
  node = config.eval
  metrics, trajs = evaluate(backend, tokenizer, tools, queries,
                            EvalConfig(rollout=builders.rollout_config(node, config.seed), maj_k=node.maj_k,
                                       seed=config.seed), progress=f"eval:{name}")
  metrics.update(quality_metrics(trajs, builders.scoring_config(config)))
  write_report(out_dir, name, metrics, trajs)
  log.info("eval %s: %s", name, json.dumps(metrics))
  return metrics


def eval_stage(config, wd: Workdir, variant: str = "") -> None:
  """Greedy pass@1 (and maj@k) with tool use of a model on the test split (eval:NAME: the model NAME)."""
  queries = builders.load_split(config, wd, config.eval.split, config.eval.max_questions)
  model = _open_model(config, wd, variant)
  if model is None:
    return
  try:
    _evaluate(config, model, queries, os.path.join(wd.root, "eval"), variant or config.eval.name)
  finally:
    builders.close_tools(model[2])


FILE_COLUMNS = ("questions", "pass@1", "hq_at_1", "format_error_rate", "repeated_tool_call_rate",
                "failed_tool_call_rate", "tool_calls_per_question", "mean_response_tokens", "prompt_too_long")


def file_name(path: str) -> str:
  """A row name for a question file: its stem ('gsm8k-test')."""
  base = os.path.basename(path)
  return base[:-len(".jsonl")] if base.endswith(".jsonl") else os.path.splitext(base)[0]


def eval_files_stage(config, wd: Workdir, variant: str = "") -> None:
  """One results table over the question files of eval.files (eval_files:NAME: the model NAME)."""
  from autotraj_jax.eval import markdown_table
  from autotraj_jax.questions import load_questions
  from autotraj_jax.tir.answers import QA_DOMAINS
  node = config.eval
  if not node.files:
    raise FileNotFoundError("eval_files: no question files; pass --config.eval.files=a.jsonl,b.jsonl")
  names = [file_name(f) for f in node.files]
  if len(set(names)) != len(names):
    raise ValueError(f"eval.files: two files share a name: {names}")
  questions = {f: load_questions(f, node.max_questions or None) for f in node.files}  # all checked first
  if "search" not in config.tools.names and any(q.domain in QA_DOMAINS for qs in questions.values() for q in qs):
    log.warning("eval_files: knowledge questions but no search tool; add 'search' to tools.names with "
                "tools.search_url (a retrieval server) or tools.corpus (a JSONL corpus)")
  model = _open_model(config, wd, variant)
  if model is None:
    return
  out_dir = os.path.join(wd.root, "eval", variant)  # variant '' -> eval/
  os.makedirs(out_dir, exist_ok=True)
  try:
    rows = [{"name": name, "file": os.path.abspath(path), **_evaluate(config, model, questions[path], out_dir, name)}
            for path, name in zip(node.files, names)]
  finally:
    builders.close_tools(model[2])
  for r in rows:
    r["pass@1_ci95"] = accuracy_ci95(r["pass@1"], int(r["questions"]))
  records.write_json(os.path.join(out_dir, "results.json"), {"rows": rows})
  records.write_text(os.path.join(out_dir, "results.md"),
                     f"# Evaluation\n\nGreedy pass@1 with tool calls ({', '.join(config.tools.names) or 'no tools'}) "
                     "and its 95% Wilson interval; one row per question file.\n\n" + markdown_table(file_table(rows)))


def file_table(rows: Sequence[dict]) -> list[dict[str, str]]:
  """Markdown rows of eval_files: FILE_COLUMNS, pass@1's interval, accuracy per level and maj@k where present."""
  from autotraj_jax.eval import flat_metrics, level_metric, level_order
  flat = [flat_metrics(r) for r in rows]
  levels = sorted({lv for r in rows for lv in (r.get("accuracy_by_level") or {})}, key=level_order)
  cols = [c for c in FILE_COLUMNS if any(c in r for r in flat)]
  cols += [level_metric("accuracy", lv) for lv in levels] + sorted({k for r in flat for k in r if k.startswith("maj@")})
  table = []
  for r, values in zip(rows, flat):
    cells = {"file": r["name"]}
    for c in cols:
      cells[c] = _cell(c, values.get(c))
      if c == "pass@1":
        cells["pass@1 95% CI"] = interval_text(r.get("pass@1_ci95"))
    table.append(cells)
  return table


def _cell(key: str, value) -> str:
  if value is None:
    return "-"
  if key in ("questions", "prompt_too_long"):
    return str(int(value))
  if key.endswith("rate") or key in ("pass@1", "hq_at_1") or key.startswith(("maj@", "accuracy@")):
    return f"{100 * value:.1f}%"
  return f"{value:.2f}"
