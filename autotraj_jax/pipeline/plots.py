"""The run's training plots, drawn from the metric logs: what a talk slide needs.

Every panel has labelled axes with units, integer steps, and a smoothed curve (exponential moving
average) over the raw one drawn faintly behind it. RL rewards are plotted per component before
normalisation, so a panel shows what the component actually did.
"""

from __future__ import annotations

import glob
import math
import os
import shutil
from typing import Any, Mapping, Sequence

from autotraj_jax.metrics import read_metrics

# (metric key, panel title, y-axis label) of the RL dynamics figure.
RL_DYNAMICS = (("accuracy", "training accuracy", "fraction correct"),
               ("kl", "KL(policy || reference)", "nats / token"),
               ("clip_frac", "clipped ratio", "fraction of tokens"),
               ("entropy", "policy entropy", "nats / token"),
               ("response_tokens", "response length", "model tokens"),
               ("grad_norm", "gradient norm", "global L2 norm"))


def find_logs(run_dir: str) -> list[dict[str, Any]]:
  """Metric records of a training dir; LoRA runs log under `train/`."""
  for sub in ("logs", os.path.join("train", "logs")):
    records = read_metrics(os.path.join(run_dir, sub))
    if records:
      return records
  return []


def series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
  pts = [(int(r["step"]), float(r[key])) for r in records
         if "step" in r and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
  return [p[0] for p in pts], [p[1] for p in pts]


def smooth(y: Sequence[float], weight: float | None = None) -> list[float]:
  """Bias-corrected exponential moving average (TensorBoard's smoothing); lighter on short runs."""
  if weight is None:
    weight = 0.6 if len(y) >= 20 else 0.3
  out, avg = [], 0.0
  for i, v in enumerate(y, start=1):
    avg = weight * avg + (1 - weight) * v
    out.append(avg / (1 - weight**i))
  return out


def _curve(ax, x: Sequence[int], y: Sequence[float], color: str, label: str, **kw: Any) -> None:
  if len(x) < 3:
    ax.plot(x, y, color=color, marker="o", label=label, **kw)
    return
  ax.plot(x, y, color=color, alpha=0.25, linewidth=1)
  ax.plot(x, smooth(y), color=color, label=label, linewidth=2, **kw)


def _axes(ax, title: str, ylabel: str, xlabel: str = "step") -> None:
  from matplotlib.ticker import MaxNLocator
  ax.set_title(title, fontsize=10)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7)


def _panels(keys: Sequence[tuple[str, str, str]], runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str) -> bool:
  """One panel per (key, title, ylabel) that some run logged, one colour per run; False if none."""
  import matplotlib.pyplot as plt
  keys = [k for k in keys if any(series(recs, k[0])[0] for recs in runs.values())]
  if not keys:
    return False
  cols = min(3, len(keys))
  rows = math.ceil(len(keys) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.1 * rows), squeeze=False)
  for ax, (key, title, ylabel) in zip(axes.flat, keys):
    for i, (name, recs) in enumerate(runs.items()):
      x, y = series(recs, key)
      if x:
        _curve(ax, x, y, f"C{i}", name)
    _axes(ax, title, ylabel)
  for ax in list(axes.flat)[len(keys):]:
    ax.set_visible(False)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return True


def reward_keys(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[tuple[str, str, str]]:
  """The total reward, then each component as computed (before normalisation and weighting)."""
  comps = sorted({k for recs in runs.values() for r in recs for k in r if k.startswith("reward/")})
  return [("reward", "total reward", "reward / trajectory")] + [
      (k, f"{k.split('/', 1)[1]} component (raw)", "mean / trajectory") for k in comps]


def training_losses(root: str, path: str) -> bool:
  """SFT and RM train / held-out loss over steps (and the RM's held-out pair accuracy)."""
  import matplotlib.pyplot as plt
  runs = {os.path.basename(d): find_logs(d) for d in sorted(glob.glob(os.path.join(root, "sft_*")))}
  runs["rm"] = find_logs(os.path.join(root, "rm"))
  runs = {k: v for k, v in runs.items() if v}
  if not runs:
    return False
  rm = runs.get("rm")
  fig, axes = plt.subplots(1, 3 if rm else 1, figsize=(12.6 if rm else 4.6, 3.2), squeeze=False)
  ax = axes[0][0]
  for i, (name, recs) in enumerate((k, v) for k, v in runs.items() if k != "rm"):
    _curve(ax, *series(recs, "loss"), f"C{i}", f"{name} train")
    x, y = series(recs, "eval/loss")
    if x:
      ax.plot(x, y, color=f"C{i}", linestyle="--", marker="o", label=f"{name} held-out")
  _axes(ax, "SFT loss", "nats / model token")
  if rm:
    _curve(axes[0][1], *series(rm, "loss"), "C3", "train")
    _axes(axes[0][1], "reward model loss", "-log sigmoid(r_c - r_r) / pair")
    x, y = series(rm, "eval/pair_accuracy")
    axes[0][2].plot(x, y, color="C3", marker="o", label="held-out pairs")
    axes[0][2].set_ylim(-0.02, 1.02)
    _axes(axes[0][2], "reward model pair accuracy", "fraction r_chosen > r_rejected")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return True


def make_plots(root: str, curves: Sequence[str], out_dir: str) -> dict[str, str]:
  """Writes the PNGs it has data for; returns `{file name: ''}` for written and the reason for skipped."""
  import matplotlib
  matplotlib.use("Agg")
  os.makedirs(out_dir, exist_ok=True)
  notes: dict[str, str] = {}
  rl = {v: find_logs(os.path.join(root, f"rl_{v}")) for v in curves}
  rl = {v: recs for v, recs in rl.items() if recs}
  absent = f"no logs in {', '.join(f'rl_{v}/logs' for v in curves) or 'results.curves'}"
  for name, ok, why in (
      ("rl_reward.png", rl and _panels(reward_keys(rl), rl, os.path.join(out_dir, "rl_reward.png")), absent),
      ("rl_dynamics.png", rl and _panels(RL_DYNAMICS, rl, os.path.join(out_dir, "rl_dynamics.png")), absent),
      ("training_loss.png", training_losses(root, os.path.join(out_dir, "training_loss.png")),
       "no sft_*/logs or rm/logs")):
    notes[name] = "" if ok else why
  png = os.path.join(root, "rm", "scores.png")  # drawn by the RM stage on held-out candidates
  if os.path.exists(png):
    shutil.copyfile(png, os.path.join(out_dir, "rm_scores.png"))
    notes["rm_scores.png"] = ""
  else:
    notes["rm_scores.png"] = "no rm/scores.png"
  return notes
