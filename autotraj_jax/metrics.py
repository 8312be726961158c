"""One scalar logger: TensorBoard event files plus a JSONL file that is easy to plot.

A run that resumes from a checkpoint at step s redoes the steps after s. Given `start_step=s`,
the writer first drops the records past s from `metrics.jsonl` (and tells TensorBoard to purge
them), so every step appears once and plots never double-count. `read_metrics` also copes with
files written before that: it keeps the last record of each (step, metric names) and drops a
last line cut by a kill.

In a multi-host run only process 0 logs: on the others the writer touches no file, so they
neither duplicate nor truncate process 0's records.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

import numpy as np

from autotraj_jax.distributed import is_primary
from autotraj_jax.tir.records import RecordError, iter_records, write_jsonl

FILENAME = "metrics.jsonl"


def _record(obj: Any, where: str) -> dict[str, Any]:
  if not isinstance(obj, dict) or not isinstance(obj.get("step"), int) or isinstance(obj.get("step"), bool):
    raise RecordError(f"{where}: a metrics record needs an int field step, got {str(obj)[:80]}")
  return obj


def _truncate_after(path: str, step: int) -> None:
  """Rewrites `path` without records past `step` (and without a cut last line), if it has any."""
  if not os.path.exists(path):
    return
  records = list(iter_records(path, _record))
  kept = [r for r in records if r["step"] <= step]
  with open(path, "rb") as f:
    clean = f.read().endswith(b"\n") or os.path.getsize(path) == 0
  if len(kept) != len(records) or not clean:
    write_jsonl(path, kept)


class MetricWriter:
  """Appends `{"step", "time", **scalars}` lines to `metrics.jsonl` and TB event files.

  `start_step`: the step a resumed run restarts from; records with a larger step, left by the
  interrupted run, are dropped before anything is appended. None: append to what is there.
  `enabled`: False makes every method a no-op that touches no file; None (default) enables the
  writer on JAX process 0 only.
  """

  def __init__(self, logdir: str | os.PathLike, start_step: int | None = None, *, tensorboard: bool = True,
               enabled: bool | None = None):
    if start_step is not None and (isinstance(start_step, bool) or not isinstance(start_step, int)
                                   or start_step < 0):
      raise ValueError(f"start_step must be a non-negative int or None, got {start_step!r}")
    self.logdir = str(logdir)
    self.enabled = is_primary() if enabled is None else bool(enabled)
    self._jsonl = self._tb = None
    if not self.enabled:
      return
    os.makedirs(logdir, exist_ok=True)
    path = os.path.join(self.logdir, FILENAME)
    _truncate_after(path, start_step if start_step is not None else float("inf"))
    self._jsonl = open(path, "a", buffering=1, encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter
      # purge_step: TensorBoard hides the interrupted run's events from that step on.
      self._tb = SummaryWriter(self.logdir, purge_step=None if start_step is None else start_step + 1)

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if self._jsonl is None:
      return
    clean = {k: float(np.asarray(v)) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **clean}) + "\n")
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(k, v, int(step))

  def flush(self) -> None:
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(logdir: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of `<logdir>/metrics.jsonl`, in file order.

  A last line cut by a kill is dropped. Where a step was logged twice with the same metric
  names (a resumed run, before `start_step` existed), only the later record is kept, at its
  place; records of one step with different names (train and eval) are all kept.
  """
  path = os.path.join(logdir, FILENAME)
  if not os.path.exists(path):
    return []
  records = list(iter_records(path, _record))
  key = lambda r: (r["step"], frozenset(k for k in r if k != "time"))
  last = {key(r): i for i, r in enumerate(records)}
  return [r for i, r in enumerate(records) if last[key(r)] == i]
