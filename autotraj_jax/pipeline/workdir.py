"""One run's work directory: where each stage's outputs live and which stages are done.

A stage's done-marker records the fingerprint of what it depended on (its config fields and
input files); a marker whose fingerprint no longer matches is stale, so a changed input reruns
the stage instead of being silently skipped.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from autotraj_jax.tir.records import write_json

log = logging.getLogger(__name__)


class Workdir:
  """Paths, done-markers and not-trained records of one run."""

  def __init__(self, root: str | os.PathLike):
    self.root = os.path.abspath(os.fspath(root))
    if os.path.exists(self.root) and not os.path.isdir(self.root):
      raise NotADirectoryError(f"workdir {self.root} exists and is not a directory")
    os.makedirs(os.path.join(self.root, ".done"), exist_ok=True)

  def path(self, *parts: str) -> str:
    """`root/parts...`, creating its parent directory."""
    p = os.path.join(self.root, *parts)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    return p

  def model_dir(self, name: str) -> str:
    """Checkpoint directory of a model trained in this workdir ('policy', 'sft_autotraj', 'rm')."""
    return os.path.join(self.root, name, "checkpoints")

  def _marker(self, stage: str) -> str:
    return os.path.join(self.root, ".done", stage)

  def marker(self, stage: str) -> dict[str, Any] | None:
    """The done-marker of `stage`, or None if it has not finished."""
    try:
      with open(self._marker(stage)) as f:
        return json.load(f)
    except FileNotFoundError:
      return None

  def done(self, stage: str) -> bool:
    return os.path.exists(self._marker(stage))

  def mark_done(self, stage: str, info: dict[str, Any]) -> None:
    write_json(self._marker(stage), info)

  def undo(self, stage: str) -> None:
    """Forgets that `stage` finished (its outputs stay; the stage decides what to redo)."""
    if os.path.exists(self._marker(stage)):
      os.remove(self._marker(stage))

  def stage_info(self) -> dict[str, dict[str, Any]]:
    """Every finished stage's marker (wall time, finish time, fingerprint), by stage name."""
    out = {}
    for name in os.listdir(os.path.join(self.root, ".done")):
      if not name.startswith(".") and (m := self.marker(name)) is not None:
        out[name] = m
    return out

  def skip(self, model: str, reason: str) -> None:
    """Records that model `model` was not trained, and why: later stages and the results table
    report the reason instead of failing on a missing checkpoint."""
    log.warning("%s: not trained: %s", model, reason)
    write_json(self.path(model, "skipped.json"), {"reason": reason})

  def skipped(self, model: str) -> str | None:
    """Why `model` was not trained, if it was skipped."""
    try:
      with open(os.path.join(self.root, model, "skipped.json")) as f:
        return json.load(f)["reason"]
    except FileNotFoundError:
      return None
