"""The demo's results table: every evaluated variant side by side, with training curves.

The `results` stage only reads what earlier stages wrote, so it can run (and rerun) at the end
of any pipeline, also one where some variants were never trained:

- `eval/<name>.json` for each `(label, eval_name)` of `config.results.rows`; a missing file gives
  a row marked `"missing": true` and a warning, not a crash.
- `rl_<variant>/logs` for each variant of `config.results.curves`, every `sft_*/logs`, and
  `rm/eval.json` (+ `rm/scores.png`) when they exist.

It writes `results.json` (the rows and the adjacent-row comparisons), `results.md` (the table, the
reward model's pair accuracy, the plots and the stage wall times) and PNG plots in `plots/`. A row
holds the eval's metrics under canonical names, `accuracy_ci95` (the 95% Wilson interval) and, for
questions with difficulty levels, `accuracy_by_level`, `questions_by_level`,
`accuracy_by_level_ci95` and one flat `accuracy@level<L>` per level (what the tables and
`experiments/grid.py` read). A plot whose logs are absent is
skipped and the reason is written to `results.md`. Like every stage it is marked done; delete
`.done/results` to rebuild the table after adding evaluations. `experiments/grid.py` aggregates the
`results.json` of several runs (seeds, overrides).
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

from autotraj_jax.eval import accuracy_ci95, interval_text, level_metric, level_of, level_order
from autotraj_jax.pipeline import plots
from autotraj_jax.pipeline.workdir import Workdir
from autotraj_jax.tir.records import write_json, write_text

log = logging.getLogger(__name__)

# Row keys of results.json that rename an eval metric, so the table reads the same for every run.
RENAMED = {"pass@1": "accuracy", "mean_response_tokens": "mean_length"}
NON_METRIC_KEYS = ("label", "name", "missing", "error")
PAIRED_METRICS = ("accuracy", "hq_at_1")  # per-question 0/1 outcomes compared between adjacent rows
LEVEL_PREFIX = level_metric("accuracy", "")  # 'accuracy@level': the flat per-level accuracy keys


def _pct(v: float) -> str:
  return f"{100 * v:.1f}%"


def _num(digits: int) -> Callable[[float], str]:
  return lambda v: f"{v:.{digits}f}"


# (row key, column header, formatter) of the main table; grid.py shows the first MAIN.
COLUMNS: tuple[tuple[str, str, Callable[[float], str]], ...] = (
    ("accuracy", "accuracy", _pct),
    ("hq_at_1", "HQ@1", _pct),
    ("format_error_rate", "format errors", _pct),
    ("tool_calls_per_question", "tool calls / q", _num(2)),
    ("mean_length", "mean length (tokens)", _num(1)),
    ("answered_rate", "answered", _pct),
    ("tool_error_rate", "tool errors", _pct),
    ("hedging_rate", "hedging", _pct),
    ("tool_problem_rate", "tool problems", _pct),
    ("repeated_tool_call_rate", "repeated tool calls", _pct),
    ("failed_tool_call_rate", "failed tool calls", _pct),
    ("model_tokens_per_correct", "tokens / correct", _num(1)),
    ("questions", "questions", lambda v: str(int(v))),
)


MAIN = 5  # the leading COLUMNS that grid.md shows too
# Fractions of trajectories with a behaviour; grid.md shows them after the main columns.
BEHAVIOUR_RATES = ("hedging_rate", "tool_problem_rate", "repeated_tool_call_rate", "failed_tool_call_rate")


def formatter(key: str) -> Callable[[float], str]:
  """The table format of one metric; unknown rates (maj@k, ...) are shown as percentages."""
  for k, _, fmt in COLUMNS:
    if k == key:
      return fmt
  return _pct if key.startswith(("maj@", LEVEL_PREFIX)) or key.endswith("_rate") else _num(3)


def level_columns(keys: Iterable[str]) -> list[str]:
  """The `accuracy@level<L>` keys among `keys`, once each, in level order."""
  found = {k for k in keys if k.startswith(LEVEL_PREFIX)}
  return sorted(found, key=lambda k: level_order(k[len(LEVEL_PREFIX):]))


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_rows(eval_dir: str, rows: Sequence[Sequence[str]]) -> list[dict[str, Any]]:
  """One results row per `(label, eval_name)`: the eval's numeric metrics, canonical names first."""
  out = []
  for label, name in rows:
    path = os.path.join(eval_dir, f"{name}.json")
    row: dict[str, Any] = {"label": label, "name": name}
    try:
      with open(path) as f:
        metrics = json.load(f)
    except FileNotFoundError:
      log.warning("results: %s has no evaluation (%s is missing)", label, path)
      out.append({**row, "missing": True})
      continue
    except (OSError, ValueError) as e:
      log.warning("results: cannot read %s: %s", path, e)
      out.append({**row, "missing": True, "error": str(e)})
      continue
    row["missing"] = False
    numeric = {RENAMED.get(k, k): float(v) for k, v in metrics.items() if _is_number(v)}
    row.update({k: numeric.pop(k) for k, _, _ in COLUMNS if k in numeric})
    row.update(numeric)
    if "accuracy" in row and (ci := accuracy_ci95(row["accuracy"], int(row.get("questions", 0)))) is not None:
      row["accuracy_ci95"] = ci
    row.update(level_fields(metrics))
    out.append(row)
  return out


def _level_dict(value: Any) -> dict[str, float]:
  """{level: number} of an eval's per-level metric, in level order; anything else gives {}."""
  if not isinstance(value, Mapping):
    return {}
  return {str(k): float(v) for k, v in sorted(value.items(), key=lambda kv: level_order(str(kv[0])))
          if _is_number(v)}


def level_fields(metrics: Mapping[str, Any]) -> dict[str, Any]:
  """Per-level accuracy of an eval's JSON: the dicts, each level's Wilson interval when its
  question count is known, and one flat `accuracy@level<L>` key per level."""
  acc = _level_dict(metrics.get("accuracy_by_level"))
  if not acc:
    return {}
  counts = {lv: int(n) for lv, n in _level_dict(metrics.get("questions_by_level")).items()}
  out: dict[str, Any] = {"accuracy_by_level": acc}
  if counts:
    out["questions_by_level"] = counts
    out["accuracy_by_level_ci95"] = {lv: ci for lv, v in acc.items()
                                     if (ci := accuracy_ci95(v, counts.get(lv, 0))) is not None}
  out.update({level_metric("accuracy", lv): v for lv, v in acc.items()})
  return out


def per_question(eval_dir: str, name: str) -> dict[str, dict[str, Any]]:
  """question id -> {accuracy, hq_at_1, level} of eval `name`'s greedy trajectories (empty if
  absent; level '' when the eval recorded none)."""
  from autotraj_jax.tir.trajectory import iter_trajectories
  path = os.path.join(eval_dir, f"{name}.trajectories.jsonl")
  if not os.path.exists(path):
    return {}
  out = {}
  for t in iter_trajectories(path):
    correct = t.scores.get("correctness", t.scores.get("correct", 0.0))
    out[t.question_id] = {"accuracy": float(correct), "hq_at_1": float(t.quality == "high"), "level": level_of(t)}
  return out


def comparisons(rows: Sequence[Mapping[str, Any]], eval_dir: str, metrics: Sequence[str] = PAIRED_METRICS,
                seed: int = 0, per_level: bool = True) -> list[dict[str, Any]]:
  """For each adjacent pair of evaluated rows (a, b) and metric: mean(b) - mean(a) over the
  questions both answered, with a paired-bootstrap 95% interval.

  With `per_level`, accuracy is also compared on each difficulty level both evals recorded for
  the same questions (metric `accuracy@level<L>`, over that level's common questions only).
  """
  from autotraj_jax.stats import paired_bootstrap
  present = [r for r in rows if not r.get("missing")]
  out = []

  def compare(a, b, qa, qb, questions, key, metric):
    diff, (low, high) = paired_bootstrap([qa[q][key] for q in questions], [qb[q][key] for q in questions], seed=seed)
    out.append({"a": a["name"], "b": b["name"], "metric": metric, "diff": float(diff),
                "ci95": [float(low), float(high)], "n": len(questions)})

  for a, b in zip(present, present[1:]):
    qa, qb = per_question(eval_dir, a["name"]), per_question(eval_dir, b["name"])
    common = sorted(set(qa) & set(qb))
    if not common:
      continue
    for m in metrics:
      compare(a, b, qa, qb, common, m, m)
    if per_level:
      for level, questions in shared_levels(qa, qb, common).items():
        compare(a, b, qa, qb, questions, "accuracy", level_metric("accuracy", level))
  return out


def shared_levels(qa: Mapping[str, Mapping[str, Any]], qb: Mapping[str, Mapping[str, Any]],
                  common: Sequence[str]) -> dict[str, list[str]]:
  """level -> the common questions both evals put at that level, in level order."""
  out: dict[str, list[str]] = {}
  for q in common:
    if qa[q]["level"] and qa[q]["level"] == qb[q]["level"]:
      out.setdefault(qa[q]["level"], []).append(q)
  return {lv: out[lv] for lv in sorted(out, key=level_order)}


HEADERS = {"accuracy_ci95": "accuracy 95% CI"}


def table_rows(rows: Sequence[Mapping[str, Any]],
               cell: Callable[[Mapping[str, Any], str], str]) -> list[dict[str, str]]:
  """Rows for `markdown_table`: the main columns, then the accuracy interval, accuracy per level
  and maj@k when some row has them, then the rest."""
  extra = [k for k in ("accuracy_ci95",) if any(k in r for r in rows)]
  extra += level_columns(k for r in rows for k in r) + sorted({k for r in rows for k in r if k.startswith("maj@")})
  cols = [(k, h) for k, h, _ in COLUMNS[:MAIN]] + [(k, HEADERS.get(k, k)) for k in extra] + \
      [(k, h) for k, h, _ in COLUMNS[MAIN:]]
  return [{"variant": r["label"], **{h: cell(r, k) for k, h in cols}} for r in rows]


def comparison_lines(comps: Sequence[Mapping[str, Any]], label: Mapping[str, str]) -> list[str]:
  """A markdown table of adjacent-row differences with their 95% intervals."""
  if not comps:
    return []
  lines = ["## Differences between adjacent rows", "",
           "Paired bootstrap over the questions both rows answered (10,000 resamples); an interval that "
           "excludes 0 is a difference the test set resolves.", "",
           "| from | to | metric | difference | 95% interval | questions |", "|---|---|---|---|---|---|"]
  for c in comps:
    lo, hi = c["ci95"]
    lines.append(f"| {label.get(c['a'], c['a'])} | {label.get(c['b'], c['b'])} | {c['metric']} | "
                 f"{100 * c['diff']:+.1f} pts | [{100 * lo:+.1f}, {100 * hi:+.1f}] | {c.get('n', '-')} |")
  return lines + [""]


def render_markdown(rows: Sequence[Mapping[str, Any]], rm: Mapping[str, Any] | None,
                    plot_notes: Mapping[str, str], stage_info: Mapping[str, Mapping[str, Any]],
                    comps: Sequence[Mapping[str, Any]] = ()) -> str:
  from autotraj_jax.eval import markdown_table

  def cell(r: Mapping[str, Any], k: str) -> str:
    if r.get("missing"):
      return "missing" if k == "accuracy" else "-"
    if k == "accuracy_ci95":
      return interval_text(r.get(k))
    return formatter(k)(r[k]) if _is_number(r.get(k)) else "-"

  lines = ["# Results", "", "Greedy pass@1 on the held-out test questions (`eval/<name>.json`) with its 95% Wilson "
           "interval; `accuracy@level<L>`: accuracy on the questions of difficulty level L. Behaviour rates are "
           "fractions of trajectories (repeated / failed tool calls, format errors, hedging); tool errors is a "
           "fraction of calls.", "", markdown_table(table_rows(rows, cell))]
  missing = [f"`{r['name']}`" + (f" ({r['error']})" if r.get("error") else "") for r in rows if r.get("missing")]
  if missing:
    lines += [f"Not evaluated in this run: {'; '.join(missing)}.", ""]
  lines += comparison_lines(comps, {r["name"]: r["label"] for r in rows})
  if rm is not None:
    lines += ["## Reward model", ""]
    acc, margin = rm.get("pair_accuracy"), rm.get("pair_margin")
    if not rm.get("trained", True):
      lines.append(f"Not trained: {rm.get('reason', 'no reason given')}.")
    lines.append(f"Pair accuracy (preferred trajectory scored higher): "
                 f"{_pct(acc) if _is_number(acc) else '-'} on {rm.get('pairs', '?')} held-out pairs"
                 + (f", mean margin {margin:.3f}" if _is_number(margin) else "") + ".")
    by_failure = rm.get("pair_accuracy_by_failure") or {}
    if by_failure:
      lines.append("By failure type of the rejected trajectory: "
                   + ", ".join(f"{t or 'none'} {_pct(v)}" for t, v in by_failure.items() if _is_number(v)) + ".")
    scores = rm.get("scores") or {}
    if scores:
      lines += ["", "| quality | mean score | std | n |", "|---|---|---|---|"]
      for q, st in scores.items():
        mean, std = (f"{st[k]:.3f}" if _is_number(st.get(k)) else "-" for k in ("mean", "std"))
        lines.append(f"| {q} | {mean} | {std} | {st.get('n', '-')} |")
    lines.append("")
  lines += ["## Plots", ""]
  for name, note in plot_notes.items():
    lines.append(f"![{name}](plots/{name})" if not note else f"- `{name}`: skipped, {note}.")
  lines.append("")
  if stage_info:
    total = sum(float(i.get("wall_s", 0.0)) for i in stage_info.values())
    lines += ["## Stage wall times", "", "| stage | wall time | finished |", "|---|---|---|"]
    lines += [f"| {s} | {_duration(float(i.get('wall_s', 0.0)))} | {i.get('finished', '')} |"
              for s, i in stage_info.items()]
    lines += [f"| total | {_duration(total)} | |", ""]
  return "\n".join(lines)


def _duration(s: float) -> str:
  return f"{s:.1f}s" if s < 60 else f"{int(s // 60)}m {s % 60:04.1f}s"


def _in_pipeline_order(info: Mapping[str, Any], stages: Sequence[str]) -> dict[str, Any]:
  order = {s: i for i, s in enumerate(stages)}
  return dict(sorted(info.items(), key=lambda kv: order.get(kv[0], len(order))))


def results_stage(config, wd: Workdir) -> None:
  """results.json, results.md and plots/: every evaluated variant side by side, with curves."""
  node = config.get("results") or {}
  rows = load_rows(wd.path("eval"), [tuple(r) for r in node.get("rows", ())])
  for r in rows:
    if r["missing"] and (reason := wd.skipped(r["name"])):
      r["error"] = f"not trained: {reason}"
  comps = comparisons(rows, wd.path("eval"), seed=config.seed)
  write_json(wd.path("results.json"), {"rows": rows, "comparisons": comps})
  plot_notes = plots.make_plots(wd.root, tuple(node.get("curves", ())), os.path.join(wd.root, "plots"))
  rm = None
  rm_path = os.path.join(wd.root, "rm", "eval.json")
  if os.path.exists(rm_path):
    with open(rm_path) as f:
      rm = json.load(f)
  order = _in_pipeline_order(wd.stage_info(), config.get("stages", ()))
  write_text(wd.path("results.md"), render_markdown(rows, rm, plot_notes, order, comps))
  found = [r for r in rows if not r["missing"]]
  log.info("results: %d/%d variants evaluated; %s", len(found), len(rows),
           ", ".join(f"{r['label']}: {r.get('accuracy', float('nan')):.3f}" for r in found))
