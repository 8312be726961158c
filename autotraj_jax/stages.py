"""Config-driven stages over one work directory.

A stage is a function `(config, workdir) -> None` registered by name; `config.stages` lists the
ones to run, in order. `kind:variant` runs stage `kind` as `fn(config, workdir, variant)`, so one
stage can run several times with different settings (`sft:high_only`, `eval:rl_autotraj`). Each stage reads earlier stages' files from the work directory and marks
itself done when its outputs are complete, so rerunning a killed run continues where it stopped.
Stages that take long (generation, repair, training) also resume inside themselves.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable

import ml_collections

log = logging.getLogger(__name__)

StageFn = Callable[[ml_collections.ConfigDict, "Workdir"], None]
STAGES: dict[str, StageFn] = {}


def register_stage(name: str) -> Callable[[StageFn], StageFn]:
  def deco(fn: StageFn) -> StageFn:
    if name in STAGES and STAGES[name] is not fn:
      raise ValueError(f"stage {name!r} is already registered")
    STAGES[name] = fn
    return fn
  return deco


class Workdir:
  """Paths and done-markers of one run."""

  def __init__(self, root: str):
    self.root = os.path.abspath(root)
    os.makedirs(os.path.join(self.root, ".done"), exist_ok=True)

  def path(self, *parts: str) -> str:
    p = os.path.join(self.root, *parts)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    return p

  def done(self, stage: str) -> bool:
    return os.path.exists(os.path.join(self.root, ".done", stage))

  def mark_done(self, stage: str, info: dict[str, Any]) -> None:
    tmp = os.path.join(self.root, ".done", f".{stage}.tmp")
    with open(tmp, "w") as f:
      json.dump(info, f, indent=2)
    os.replace(tmp, os.path.join(self.root, ".done", stage))

  def skip(self, model: str, reason: str) -> None:
    """Records that the model `model` was not trained, and why: later stages and the results table
    report the reason instead of failing on a missing checkpoint."""
    log.warning("%s: not trained: %s", model, reason)
    with open(self.path(model, "skipped.json"), "w") as f:
      json.dump({"reason": reason}, f, indent=2)

  def skipped(self, model: str) -> str | None:
    """Why `model` was not trained, if it was skipped."""
    try:
      with open(os.path.join(self.root, model, "skipped.json")) as f:
        return json.load(f)["reason"]
    except FileNotFoundError:
      return None

  def stage_info(self) -> dict[str, dict[str, Any]]:
    out = {}
    for name in sorted(os.listdir(os.path.join(self.root, ".done"))):
      if not name.startswith("."):
        with open(os.path.join(self.root, ".done", name)) as f:
          out[name] = json.load(f)
    return out


def run_stages(config: ml_collections.ConfigDict) -> Workdir:
  if not config.get("workdir"):
    raise ValueError("config.workdir is not set: pass --config.workdir=DIR")
  unknown = [s for s in config.stages if s.split(":")[0] not in STAGES]
  if unknown:
    raise ValueError(f"unknown stages {unknown}; registered: {sorted(STAGES)}")
  wd = Workdir(config.workdir)
  with open(wd.path("config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  for name in config.stages:
    if wd.done(name):
      log.info("stage %s: already done, skipping", name)
      continue
    log.info("stage %s: running", name)
    t0 = time.time()
    kind, _, variant = name.partition(":")
    if variant:
      STAGES[kind](config, wd, variant)
    else:
      STAGES[kind](config, wd)
    info = {"wall_s": round(time.time() - t0, 2), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    wd.mark_done(name, info)
    log.info("stage %s: done in %.1fs", name, info["wall_s"])
  return wd
