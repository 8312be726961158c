"""Stage-1 outputs: the SFT set, the preference pairs and a stats report.

SFT set = high-quality candidates + accepted repairs; preference pairs = (repair, original).
Both are JSONL of Trajectory records (token ids and loss masks included), deduplicated on the
response token ids, with provenance. The report counts categories, plots the score histograms
per dimension, gives the repair acceptance rate per failure type and counts the accepted repairs
that merely reproduce a high-quality candidate.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from typing import Any, Iterable, Sequence

from autotraj_jax.scoring import HIGH, LOW, WRONG
from autotraj_jax.tir.records import write_json, write_text
from autotraj_jax.tir.trajectory import PreferencePair, RepairRecord, Trajectory


def response_key(t: Trajectory) -> str:
  h = hashlib.sha256()
  h.update(json.dumps([t.question_id, t.response_ids]).encode())
  return h.hexdigest()


def dedupe(trajs: Iterable[Trajectory]) -> list[Trajectory]:
  seen, out = set(), []
  for t in trajs:
    k = response_key(t)
    if k not in seen:
      seen.add(k)
      out.append(t)
  return out


def accepted_repairs(scored: Sequence[Trajectory], repairs: Sequence[RepairRecord]
                     ) -> list[tuple[Trajectory, Trajectory]]:
  """(repair, original) for every accepted repair whose original is in `scored`."""
  by_id = {t.id: t for t in scored}
  return [(r.repaired, by_id[r.original_id]) for r in repairs if r.accepted and r.original_id in by_id]


def repairs_duplicating_high(scored: Sequence[Trajectory], repairs: Sequence[RepairRecord]) -> int:
  """Accepted repairs whose response is a high-quality candidate's of the same question: they add
  no SFT example (deduplicated away), only their preference pair."""
  high = {response_key(t) for t in scored if t.quality == HIGH}
  return sum(response_key(rep) in high for rep, _ in accepted_repairs(scored, repairs))


def build_sft_and_pairs(scored: Sequence[Trajectory], repairs: Sequence[RepairRecord]
                        ) -> tuple[list[Trajectory], list[PreferencePair]]:
  """SFT set and preference pairs. A repair identical to a high-quality candidate keeps its pair
  (still a valid (good, bad) pair) but adds no SFT example; `stats` counts such repairs."""
  accepted = accepted_repairs(scored, repairs)
  sft = dedupe([t for t in scored if t.quality == HIGH] + [rep for rep, _ in accepted])
  pairs, seen = [], set()
  for rep, orig in accepted:
    key = (response_key(rep), response_key(orig))
    if key in seen:
      continue
    seen.add(key)
    pairs.append(PreferencePair(id=f"{orig.id}>{rep.id}", question_id=orig.question_id, failure_type=orig.quality,
                                chosen=rep, rejected=orig))
  return sft, pairs


def stats(scored: Sequence[Trajectory], repairs: Sequence[RepairRecord], sft: Sequence[Trajectory],
          pairs: Sequence[PreferencePair]) -> dict[str, Any]:
  cats = collections.Counter(t.quality for t in scored)
  by_type: dict[str, list[bool]] = collections.defaultdict(list)
  by_id = {t.id: t for t in scored}
  for r in repairs:
    orig = by_id.get(r.original_id)
    if orig is not None:
      by_type[orig.quality].append(r.accepted)
  questions = {t.question_id for t in scored}
  return {
      "candidates": len(scored), "questions": len(questions),
      "high": cats.get(HIGH, 0), "low": cats.get(LOW, 0), "wrong": cats.get(WRONG, 0),
      "candidate_accuracy": (cats.get(HIGH, 0) + cats.get(LOW, 0)) / max(len(scored), 1),
      "repairs_attempted": len(repairs),
      "repairs_accepted": sum(r.accepted for r in repairs),
      "repairs_duplicating_high": repairs_duplicating_high(scored, repairs),
      "acceptance_by_failure": {k: sum(v) / len(v) for k, v in by_type.items() if v},
      "attempted_by_failure": {k: len(v) for k, v in by_type.items()},
      "sft_size": len(sft), "pairs": len(pairs),
      "hard_cases": sum(not r.accepted for r in repairs),
  }


DIM_NOTES = {"total": "weighted quality total (correctness is a gate, not part of it)",
             "correctness": "answer correctness (1/0)"}


def plot_score_histograms(scored: Sequence[Trajectory], path: str) -> None:
  """One panel per scored dimension; each class (high / low / wrong) is normalised to its own
  count, so 61 low-quality candidates stay visible next to 900 wrong ones."""
  import math

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  dims = sorted({k for t in scored for k in t.scores}, key=lambda d: (d != "total", d))
  cols = min(3, max(len(dims), 1))
  rows = max(math.ceil(len(dims) / cols), 1)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
  for ax, dim in zip(axes.flat, dims):
    for cat, color in ((HIGH, "C2"), (LOW, "C1"), (WRONG, "C3")):
      vals = [t.scores[dim] for t in scored if t.quality == cat and dim in t.scores]
      if vals:
        ax.hist(vals, bins=20, range=(0, 1), weights=[1 / len(vals)] * len(vals), alpha=0.55, color=color,
                label=f"{cat} (n={len(vals)})")
    ax.set_title(DIM_NOTES.get(dim, dim), fontsize=9)
    ax.set_xlabel(f"{dim} score")
    ax.set_ylabel("fraction of the class")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(dims):]:
    ax.set_visible(False)
  fig.suptitle("Stage-1 candidates: quality scores by class", fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def write_report(out_dir: str, scored: Sequence[Trajectory], summary: dict[str, Any]) -> str:
  """`stats.md`, `stats.json` and `scores.png` (score histograms per class); returns the md path."""
  os.makedirs(out_dir, exist_ok=True)
  write_json(os.path.join(out_dir, "stats.json"), summary)
  plot_score_histograms(scored, os.path.join(out_dir, "scores.png"))
  lines = ["# Stage 1 statistics", "", "| quantity | value |", "|---|---|"]
  for k, v in summary.items():
    if isinstance(v, dict):
      v = ", ".join(f"{a}: {b:.3f}" if isinstance(b, float) else f"{a}: {b}" for a, b in v.items()) or "-"
    elif isinstance(v, float):
      v = f"{v:.3f}"
    lines.append(f"| {k} | {v} |")
  lines += ["", "## Score histograms (each class normalised to its own count)", "", "![scores](scores.png)"]
  path = os.path.join(out_dir, "stats.md")
  write_text(path, "\n".join(lines) + "\n")
  return path
