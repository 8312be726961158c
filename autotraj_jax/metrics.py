"""One scalar logger: TensorBoard event files plus a JSONL file that is easy to plot."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

import numpy as np


class MetricWriter:
  """Appends `{"step", "time", **scalars}` lines to `metrics.jsonl` and TB event files."""

  def __init__(self, logdir: str | os.PathLike, *, tensorboard: bool = True):
    os.makedirs(logdir, exist_ok=True)
    self.logdir = str(logdir)
    self._jsonl = open(os.path.join(self.logdir, "metrics.jsonl"), "a", buffering=1)
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(self.logdir)

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    clean = {k: float(np.asarray(v)) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **clean}) + "\n")
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(k, v, int(step))

  def flush(self) -> None:
    self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(logdir: str | os.PathLike) -> list[dict[str, Any]]:
  path = os.path.join(logdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
