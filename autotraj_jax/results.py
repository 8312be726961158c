"""The demo's results table: every evaluated variant side by side, with training curves.

The `results` stage only reads what earlier stages wrote, so it can run (and rerun) at the end
of any pipeline, also one where some variants were never trained:

- `eval/<name>.json` for each `(label, eval_name)` of `config.results.rows`; a missing file gives
  a row marked `"missing": true` and a warning, not a crash.
- `rl_<variant>/logs` for each variant of `config.results.curves`, every `sft_*/logs`, and
  `rm/eval.json` (+ `rm/scores.png` or `rm/score_samples.json`) when they exist.

It writes `results.json` (the rows), `results.md` (the table, the reward model's pair accuracy,
the plots and the stage wall times) and PNG plots in `plots/`. A plot whose logs are absent is
skipped and the reason is written to `results.md`. Like every stage it is marked done; delete
`.done/results` to rebuild the table after adding evaluations. `experiments/grid.py` aggregates the
`results.json` of several runs (seeds, overrides).
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import shutil
from typing import Any, Callable, Mapping, Sequence

from autotraj_jax.metrics import read_metrics
from autotraj_jax.stages import Workdir, register_stage

log = logging.getLogger(__name__)

# Row keys of results.json that rename an eval metric, so the table reads the same for every run.
RENAMED = {"pass@1": "accuracy", "mean_response_tokens": "mean_length"}
NON_METRIC_KEYS = ("label", "eval", "missing", "error")


def _pct(v: float) -> str:
  return f"{100 * v:.1f}%"


def _num(digits: int) -> Callable[[float], str]:
  return lambda v: f"{v:.{digits}f}"


# (row key, column header, formatter) of the main table; grid.py shows the first four.
COLUMNS: tuple[tuple[str, str, Callable[[float], str]], ...] = (
    ("accuracy", "accuracy", _pct),
    ("format_error_rate", "format errors", _pct),
    ("tool_calls_per_question", "tool calls / q", _num(2)),
    ("mean_length", "mean length (tokens)", _num(1)),
    ("answered_rate", "answered", _pct),
    ("tool_error_rate", "tool errors", _pct),
    ("questions", "questions", lambda v: str(int(v))),
)


def formatter(key: str) -> Callable[[float], str]:
  """The table format of one metric; unknown rates (maj@k, ...) are shown as percentages."""
  for k, _, fmt in COLUMNS:
    if k == key:
      return fmt
  return _pct if key.startswith("maj@") or key.endswith("_rate") else _num(3)


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_rows(eval_dir: str, rows: Sequence[Sequence[str]]) -> list[dict[str, Any]]:
  """One results row per `(label, eval_name)`: the eval's numeric metrics, canonical names first."""
  out = []
  for label, name in rows:
    path = os.path.join(eval_dir, f"{name}.json")
    row: dict[str, Any] = {"label": label, "eval": name}
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
    out.append(row)
  return out


def _find_logs(run_dir: str) -> list[dict[str, Any]]:
  """Metric records of a training dir; LoRA runs log under `train/`."""
  for sub in ("logs", os.path.join("train", "logs")):
    records = read_metrics(os.path.join(run_dir, sub))
    if records:
      return records
  return []


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
  pts = [(r["step"], r[key]) for r in records if "step" in r and _is_number(r.get(key))]
  return [p[0] for p in pts], [p[1] for p in pts]


def _line(ax, x: Sequence[float], y: Sequence[float], **kw) -> None:
  """A line, with markers when it has too few points to show as one."""
  ax.plot(x, y, marker=kw.pop("marker", "o" if len(x) < 3 else None), **kw)


def make_plots(root: str, curves: Sequence[str], out_dir: str) -> dict[str, str]:
  """Writes the PNGs it has data for; returns `{file name: ''}` for written and the reason for skipped."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(out_dir, exist_ok=True)
  notes: dict[str, str] = {}
  rl = {v: _find_logs(os.path.join(root, f"rl_{v}")) for v in curves}
  rl = {v: recs for v, recs in rl.items() if recs}
  absent = ", ".join(f"rl_{v}/logs" for v in curves) or "no RL variants in results.curves"

  def save(fig, name: str) -> None:
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=80)
    plt.close(fig)
    notes[name] = ""

  # Reward: the total, then one panel per logged component (outcome, format, rm, ...).
  keys = [k for k in ("reward",) if any(_series(r, k)[0] for r in rl.values())]
  keys += sorted({k for recs in rl.values() for r in recs for k in r if k.startswith("reward/")})
  if keys:
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
      for i, (v, recs) in enumerate(rl.items()):  # one colour per variant across the panels
        x, y = _series(recs, key)
        if x:
          _line(ax, x, y, color=f"C{i}", label=v)
      ax.set_title(key)
      ax.set_xlabel("step")
      ax.legend(fontsize=7)
    save(fig, "rl_reward.png")
  else:
    notes["rl_reward.png"] = f"no reward logged ({absent})"

  if any(_series(r, "accuracy")[0] for r in rl.values()):
    fig, ax = plt.subplots(figsize=(5, 3))
    for i, (v, recs) in enumerate(rl.items()):
      x, y = _series(recs, "accuracy")
      if x:
        _line(ax, x, y, color=f"C{i}", label=v)
    ax.set_title("RL training accuracy")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    save(fig, "rl_accuracy.png")
  else:
    notes["rl_accuracy.png"] = f"no accuracy logged ({absent})"

  sft = {os.path.basename(d): _find_logs(d) for d in sorted(glob.glob(os.path.join(root, "sft_*"))) if os.path.isdir(d)}
  sft = {k: v for k, v in sft.items() if v}
  if sft:
    fig, ax = plt.subplots(figsize=(5, 3))
    for i, (name, recs) in enumerate(sft.items()):
      color = f"C{i}"
      x, y = _series(recs, "loss")
      if x:
        _line(ax, x, y, color=color, label=f"{name} train")
      x, y = _series(recs, "eval/loss")
      if x:
        _line(ax, x, y, color=color, linestyle="--", marker="o", label=f"{name} eval")
    ax.set_title("SFT loss")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    save(fig, "sft_loss.png")
  else:
    notes["sft_loss.png"] = "no sft_*/logs found"

  # The RM's score histogram: the RM stage's own plot if it made one, else drawn from its samples.
  png, samples = os.path.join(root, "rm", "scores.png"), os.path.join(root, "rm", "score_samples.json")
  if os.path.exists(png):
    shutil.copyfile(png, os.path.join(out_dir, "rm_scores.png"))
    notes["rm_scores.png"] = ""
  elif os.path.exists(samples):
    with open(samples) as f:
      by_quality = {q: [float(v) for v in vs] for q, vs in json.load(f).items()}
    every = [v for vs in by_quality.values() for v in vs]
    lo, hi = (min(every), max(every)) if every else (0.0, 1.0)
    bins = [lo + (hi - lo + (hi == lo)) * i / 20 for i in range(21)]  # shared, so the bars compare
    fig, ax = plt.subplots(figsize=(5, 3))
    for quality, scores in by_quality.items():
      if scores:
        ax.hist(scores, bins=bins, alpha=0.6, label=f"{quality} (n={len(scores)})")
    ax.set_title("reward-model scores by quality")
    ax.set_xlabel("score")
    ax.legend(fontsize=7)
    save(fig, "rm_scores.png")
  else:
    notes["rm_scores.png"] = "no rm/scores.png or rm/score_samples.json"
  return notes


def table_rows(rows: Sequence[Mapping[str, Any]],
               cell: Callable[[Mapping[str, Any], str], str]) -> list[dict[str, str]]:
  """Rows for `markdown_table`: the main columns, plus maj@k when some row has it."""
  extra = sorted({k for r in rows for k in r if k.startswith("maj@")})
  cols = [(k, h) for k, h, _ in COLUMNS[:4]] + [(k, k) for k in extra] + [(k, h) for k, h, _ in COLUMNS[4:]]
  return [{"variant": r["label"], **{h: cell(r, k) for k, h in cols}} for r in rows]


def render_markdown(rows: Sequence[Mapping[str, Any]], rm: Mapping[str, Any] | None,
                    plot_notes: Mapping[str, str], stage_info: Mapping[str, Mapping[str, Any]]) -> str:
  from autotraj_jax.eval import markdown_table

  def cell(r: Mapping[str, Any], k: str) -> str:
    if r.get("missing"):
      return "missing" if k == "accuracy" else "-"
    return formatter(k)(r[k]) if _is_number(r.get(k)) else "-"

  lines = ["# Results", "", "Greedy pass@1 on the held-out test questions (`eval/<name>.json`).", "",
           markdown_table(table_rows(rows, cell))]
  missing = [f"`{r['eval']}`" + (f" ({r['error']})" if r.get("error") else "") for r in rows if r.get("missing")]
  if missing:
    lines += [f"Not evaluated in this run: {'; '.join(missing)}.", ""]
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
      for q, s in scores.items():
        f = lambda k: f"{s[k]:.3f}" if _is_number(s.get(k)) else "-"
        lines.append(f"| {q} | {f('mean')} | {f('std')} | {s.get('n', '-')} |")
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


@register_stage("results")
def results_stage(config, wd: Workdir) -> None:
  node = config.get("results") or {}
  rows = load_rows(wd.path("eval"), [tuple(r) for r in node.get("rows", ())])
  for r in rows:
    if r["missing"] and (reason := wd.skipped(r["eval"])):
      r["error"] = f"not trained: {reason}"
  with open(wd.path("results.json"), "w") as f:
    json.dump(rows, f, indent=2)
  plot_notes = make_plots(wd.root, tuple(node.get("curves", ())), os.path.join(wd.root, "plots"))
  rm = None
  rm_path = os.path.join(wd.root, "rm", "eval.json")
  if os.path.exists(rm_path):
    with open(rm_path) as f:
      rm = json.load(f)
  with open(wd.path("results.md"), "w") as f:
    f.write(render_markdown(rows, rm, plot_notes, _in_pipeline_order(wd.stage_info(), config.get("stages", ()))))
  found = [r for r in rows if not r["missing"]]
  log.info("results: %d/%d variants evaluated; %s", len(found), len(rows),
           ", ".join(f"{r['label']}: {r.get('accuracy', float('nan')):.3f}" for r in found))
