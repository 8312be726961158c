"""Runs the stages a config lists, in order, over one work directory.

A stage is a `Stage`: a function `(config, workdir[, variant]) -> None` plus what it depends on
(config fields and input files). `config.stages` names the stages to run; `kind:variant` runs
stage `kind` as `fn(config, workdir, variant)` (`sft:high_only`, `eval:rl_autotraj`).

Each finished stage leaves a done-marker with the fingerprint of its dependencies. A rerun skips
a stage whose fingerprint still matches, so a killed run continues where it stopped (long stages
also resume inside themselves); a stage whose inputs changed is refused with a message naming
what changed, and `config.redo` reruns it and every stage after it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any, Callable, Mapping, Sequence

import ml_collections

from autotraj_jax.distributed import is_primary
from autotraj_jax.pipeline.workdir import Workdir
from autotraj_jax.tir.records import write_json

log = logging.getLogger(__name__)

StageFn = Callable[..., None]
# (config, variant) -> dotted config keys / workdir-relative paths a stage depends on.
DepsFn = Callable[[ml_collections.ConfigDict, str], Sequence[str]]


class StaleStageError(RuntimeError):
  """A finished stage whose inputs changed since it ran."""


@dataclasses.dataclass(frozen=True)
class Stage:
  fn: StageFn
  reads: DepsFn = lambda config, variant: ()      # dotted config keys; file/dir values are hashed too
  inputs: DepsFn = lambda config, variant: ()     # workdir-relative files or dirs it reads
  outputs: DepsFn = lambda config, variant: ()    # workdir-relative paths `redo` removes
  always: bool = False                            # cheap summaries: rerun every time
  host_only: bool = False                         # no device work: on several hosts process 0 runs it alone


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  node: Any = config
  for part in key.split("."):
    node = node[part]
  return node.to_dict() if isinstance(node, ml_collections.ConfigDict) else node


def _digest(path: str) -> str:
  """Content hash of a file; for a directory, a hash of its files' names and sizes."""
  h = hashlib.sha256()
  if os.path.isdir(path):
    for root, dirs, files in sorted(os.walk(path)):
      dirs.sort()
      for name in sorted(files):
        p = os.path.join(root, name)
        h.update(f"{os.path.relpath(p, path)}:{os.path.getsize(p)};".encode())
  else:
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
  return h.hexdigest()[:16]


def fingerprint(stage: Stage, config: ml_collections.ConfigDict, wd: Workdir, variant: str) -> dict[str, Any]:
  """What a stage depended on: its config values (and the files they name) and its input files."""
  values = {k: _get(config, k) for k in stage.reads(config, variant)}
  files = {}
  for v in values.values():
    if isinstance(v, str) and v and os.path.exists(os.path.expanduser(v)):
      files[v] = _digest(os.path.expanduser(v))
  for rel in stage.inputs(config, variant):
    p = os.path.join(wd.root, rel)
    files[rel] = _digest(p) if os.path.exists(p) else None
  return {"values": json.loads(json.dumps(values, default=str)), "files": files}


def _schema_defaults(keys: Sequence[str]) -> dict[str, Any]:
  """The base config's values of fingerprinted keys (None where the base has no such key)."""
  from autotraj_jax.pipeline.config import base_config
  base, out = base_config(), {}
  for k in keys:
    try:
      out[k] = _get(base, k)
    except (KeyError, AttributeError):
      out[k] = None
  return json.loads(json.dumps(out, default=str))


def _value_changes(key: str, a: Any, b: Any, default: Any) -> list[str]:
  """Differences of one fingerprinted value, field by field inside sections. A field the old
  fingerprint lacks (added to the schema since the stage ran) counts as unchanged while it keeps
  its default: the stage ran with what is now the default behaviour."""
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      d = default.get(k) if isinstance(default, dict) else None
      if k not in a and isinstance(default, dict) and k in default and b.get(k) == d:
        continue
      out += _value_changes(f"{key}.{k}", a.get(k, "<unset>"), b.get(k, "<unset>"), d)
    return out
  return [] if a == b else [f"config field {key} changed ({a!r} -> {b!r})"]


def _changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  out = []
  old_values = old.get("values", {})
  defaults = _schema_defaults(list(new["values"]))
  for k in sorted(set(old_values) | set(new["values"])):
    out += _value_changes(k, old_values.get(k, "<unset>"), new["values"].get(k, "<unset>"), defaults.get(k))
  for k in sorted(set(old.get("files", {})) | set(new["files"])):
    if old.get("files", {}).get(k) != new["files"].get(k):
      out.append(f"input {k} changed")
  return out


@dataclasses.dataclass
class StageResult:
  name: str
  status: str          # 'ran' | 'skipped (done)'
  wall_s: float = 0.0


def _remove(path: str) -> None:
  import shutil
  if os.path.isdir(path):
    shutil.rmtree(path)
  elif os.path.exists(path):
    os.remove(path)


def _sync(tag: str) -> None:
  """A barrier across hosts (nothing on one host)."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(tag)


def run_stages(config: ml_collections.ConfigDict, stages: Mapping[str, Stage]) -> tuple[Workdir, list[StageResult]]:
  """Runs `config.stages` with the stage table `stages`; returns the workdir and what each did."""
  unknown = [s for s in config.stages if s.split(":")[0] not in stages]
  if unknown:
    raise ValueError(f"config.stages: unknown stages {unknown}; known: {sorted(stages)}")
  wd = Workdir(config.workdir)
  order = list(config.stages)
  redo = [s for s in config.redo]
  for name in redo:
    if name not in order:
      raise ValueError(f"config.redo: {name!r} is not in config.stages {order}")
  if redo:
    first = min(order.index(s) for s in redo)
    for name in order[first:]:
      kind, _, variant = name.partition(":")
      log.info("redo: forgetting stage %s and its outputs", name)
      wd.undo(name)
      for rel in stages[kind].outputs(config, variant):
        if is_primary():
          _remove(os.path.join(wd.root, rel))
    _sync("redo")
  if is_primary():
    write_json(wd.path("config.json"), json.loads(config.to_json_best_effort()))
  results = []
  for name in order:
    kind, _, variant = name.partition(":")
    stage = stages[kind]
    marker = wd.marker(name)
    if marker is not None and not stage.always:
      changed = _changes(marker.get("fingerprint", {}), fingerprint(stage, config, wd, variant))
      if changed:
        raise StaleStageError(f"stage {name} already ran with other inputs: {'; '.join(changed)}. Pass "
                              f"--config.redo=\"('{name}',)\" to rerun it and the stages after it, or use a "
                              "new workdir")
      log.info("stage %s: already done, skipping", name)
      results.append(StageResult(name, "skipped (done)"))
      continue
    log.info("stage %s: running", name)
    fp = fingerprint(stage, config, wd, variant)
    t0 = time.time()
    if is_primary() or not stage.host_only:
      stage.fn(config, wd, variant) if variant else stage.fn(config, wd)
    wall = round(time.time() - t0, 2)
    if is_primary():
      wd.mark_done(name, {"wall_s": wall, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "fingerprint": fp})
    _sync(f"stage {name}")  # no host reads a half-written marker
    log.info("stage %s: done in %.1fs", name, wall)
    results.append(StageResult(name, "ran", wall))
  return wd, results
