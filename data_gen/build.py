"""Stage-1 outputs: the SFT set, the preference pairs and a stats report.

SFT set = high-quality candidates + accepted repairs; preference pairs = (repair, original).
Both are JSONL of Trajectory records (token ids and loss masks included), deduplicated on the
response token ids, with provenance. The report counts categories, plots the score histograms
per dimension and gives the repair acceptance rate per failure type.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from typing import Any, Iterable, Sequence

from autotraj_jax.tir.trajectory import JsonlAppender, Trajectory
from autotraj_jax.scoring import HIGH, LOW, WRONG


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


def build_sft_and_pairs(scored: Sequence[Trajectory], repairs: Sequence[dict[str, Any]]
                        ) -> tuple[list[Trajectory], list[dict[str, Any]]]:
  by_id = {t.id: t for t in scored}
  accepted = [(Trajectory.from_dict(r["repaired"]), by_id[r["original_id"]]) for r in repairs
              if r["accepted"] and r["original_id"] in by_id]
  sft = dedupe([t for t in scored if t.quality == HIGH] + [rep for rep, _ in accepted])
  pairs, seen = [], set()
  for rep, orig in accepted:
    key = (response_key(rep), response_key(orig))
    if key in seen:
      continue
    seen.add(key)
    pairs.append({"id": f"{orig.id}>{rep.id}", "question_id": orig.question_id,
                  "failure_type": orig.quality, "chosen": rep.to_dict(), "rejected": orig.to_dict()})
  return sft, pairs


def write_jsonl(path: str, records: Iterable[Any]) -> int:
  tmp = path + ".tmp"
  if os.path.exists(tmp):
    os.remove(tmp)
  n = 0
  with JsonlAppender(tmp) as w:
    for r in records:
      w.write(r)
      n += 1
  os.replace(tmp, path)
  return n


def stats(scored: Sequence[Trajectory], repairs: Sequence[dict[str, Any]], sft: Sequence[Trajectory],
          pairs: Sequence[dict[str, Any]]) -> dict[str, Any]:
  cats = collections.Counter(t.quality for t in scored)
  by_type: dict[str, list[bool]] = collections.defaultdict(list)
  by_id = {t.id: t for t in scored}
  for r in repairs:
    orig = by_id.get(r["original_id"])
    if orig is not None:
      by_type[orig.quality].append(bool(r["accepted"]))
  questions = {t.question_id for t in scored}
  return {
      "candidates": len(scored), "questions": len(questions),
      "high": cats.get(HIGH, 0), "low": cats.get(LOW, 0), "wrong": cats.get(WRONG, 0),
      "candidate_accuracy": (cats.get(HIGH, 0) + cats.get(LOW, 0)) / max(len(scored), 1),
      "repairs_attempted": len(repairs),
      "repairs_accepted": sum(r["accepted"] for r in repairs),
      "acceptance_by_failure": {k: sum(v) / len(v) for k, v in by_type.items() if v},
      "attempted_by_failure": {k: len(v) for k, v in by_type.items()},
      "sft_size": len(sft), "pairs": len(pairs),
      "hard_cases": sum(not r["accepted"] for r in repairs),
  }


def write_report(out_dir: str, scored: Sequence[Trajectory], summary: dict[str, Any]) -> str:
  """`stats.md`, `stats.json` and one score-histogram PNG per dimension; returns the md path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "stats.json"), "w") as f:
    json.dump(summary, f, indent=2)
  dims = sorted({k for t in scored for k in t.scores})
  plots = []
  for dim in dims:
    fig, ax = plt.subplots(figsize=(4, 3))
    for cat in (HIGH, LOW, WRONG):
      vals = [t.scores[dim] for t in scored if t.quality == cat and dim in t.scores]
      if vals:
        ax.hist(vals, bins=20, range=(0, 1), alpha=0.6, label=cat)
    ax.set_title(dim)
    ax.set_xlabel("score")
    ax.legend()
    fig.tight_layout()
    name = f"score_{dim}.png"
    fig.savefig(os.path.join(out_dir, name), dpi=80)
    plt.close(fig)
    plots.append(name)
  lines = ["# Stage 1 statistics", "", "| quantity | value |", "|---|---|"]
  for k, v in summary.items():
    if isinstance(v, dict):
      v = ", ".join(f"{a}: {b:.3f}" if isinstance(b, float) else f"{a}: {b}" for a, b in v.items()) or "-"
    elif isinstance(v, float):
      v = f"{v:.3f}"
    lines.append(f"| {k} | {v} |")
  lines += ["", "## Score histograms per dimension", ""] + [f"![{p}]({p})" for p in plots]
  path = os.path.join(out_dir, "stats.md")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path
