"""The one record every stage reads and writes: a tool-use trajectory, token-in/token-out.

A trajectory is the prompt token ids followed by ordered segments. Model segments hold the
sampler's token ids and logprobs (loss mask 1); tool segments hold the tokenised `<result>` blocks
inserted between them (loss mask 0). Training uses these ids as they are: model text is never
re-tokenised, so what is trained on is exactly what was sampled.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Literal

from autotraj_jax.tir.records import (
  JsonlAppender,
  RecordError,
  as_object,
  dict_of,
  field,
  is_bool,
  is_int,
  is_number,
  is_object,
  is_str,
  iter_records,
  kind_of,
  list_of,
  one_of,
  optional,
)

SCHEMA_VERSION = 1

SegmentKind = Literal["model", "tool"]


@dataclasses.dataclass
class Segment:
  kind: SegmentKind
  token_ids: list[int]
  text: str
  logprobs: list[float] | None = None

  @property
  def loss_mask(self) -> list[int]:
    return [1 if self.kind == "model" else 0] * len(self.token_ids)


@dataclasses.dataclass
class ToolCall:
  tool: str
  input: str
  output: str
  ok: bool
  elapsed_s: float
  error: str | None = None


@dataclasses.dataclass
class Trajectory:
  id: str
  question_id: str
  question: str
  prompt_ids: list[int]
  segments: list[Segment] = dataclasses.field(default_factory=list)
  tool_calls: list[ToolCall] = dataclasses.field(default_factory=list)
  gold: str | list[str] | None = None   # several acceptable answers: a list
  domain: str = "math"
  finish_reason: str = ""          # answer | eos | length | budget | prompt_too_long | error
  answer: str | None = None
  scores: dict[str, float] = dataclasses.field(default_factory=dict)
  quality: str = ""                # high | low | wrong, once scored
  diagnosis: list[str] = dataclasses.field(default_factory=list)  # what the scorers found wrong
  provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
  version: int = SCHEMA_VERSION

  @property
  def text(self) -> str:
    """The response: model text and tool results in order (the prompt excluded)."""
    return "".join(s.text for s in self.segments)

  @property
  def response_ids(self) -> list[int]:
    return [t for s in self.segments for t in s.token_ids]

  @property
  def num_model_tokens(self) -> int:
    return sum(len(s.token_ids) for s in self.segments if s.kind == "model")

  def training_example(self, *, mask_tool_results: bool = True) -> dict[str, list[int]]:
    """`{"tokens", "loss_mask"}` over prompt + response; the prompt is never trained on."""
    tokens = list(self.prompt_ids)
    mask = [0] * len(self.prompt_ids)
    for s in self.segments:
      tokens += s.token_ids
      mask += s.loss_mask if mask_tool_results else [1] * len(s.token_ids)
    return {"tokens": tokens, "loss_mask": mask}

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), ensure_ascii=False)

  @classmethod
  def from_dict(cls, d: Any, where: str = "record", path: str = "") -> "Trajectory":
    """A trajectory from its JSON form; any missing or wrong-typed field, at any depth, raises
    RecordError naming `where` (file:line) and the field's path (prefixed by `path`)."""
    as_object(d, where, "a trajectory object" if not path else f"an object at {path.rstrip('.')}")
    version = field(d, "version", is_int, where, path, default=SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
      raise RecordError(f"{where}: unsupported trajectory schema version {version} (expected {SCHEMA_VERSION})")
    segments = [_segment(s, where, f"{path}segments[{i}].")
                for i, s in enumerate(field(d, "segments", list_of(is_object), where, path))]
    calls = [_tool_call(c, where, f"{path}tool_calls[{i}].")
             for i, c in enumerate(field(d, "tool_calls", list_of(is_object), where, path, default=[]))]
    opt = lambda key, check, default: field(d, key, check, where, path, default=default)
    return cls(
        id=field(d, "id", is_str, where, path),
        question_id=field(d, "question_id", is_str, where, path),
        question=field(d, "question", is_str, where, path),
        prompt_ids=field(d, "prompt_ids", list_of(is_int), where, path),
        segments=segments, tool_calls=calls,
        gold=opt("gold", check_gold, None),
        domain=opt("domain", is_str, "math"),
        finish_reason=opt("finish_reason", is_str, ""),
        answer=opt("answer", optional(is_str), None),
        scores=opt("scores", dict_of(is_number), {}),
        quality=opt("quality", is_str, ""),
        diagnosis=opt("diagnosis", list_of(is_str), []),
        provenance=opt("provenance", is_object, {}),
        version=version)


def check_gold(value: Any, where: str, field_name: str) -> str | list[str] | None:
  """A gold answer: a string, a non-empty list of acceptable strings, or null."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, list) and value:
    return list_of(is_str)(value, where, field_name)
  raise RecordError(f"{where}: field {field_name} must be a string, a non-empty list of strings or null, "
                    f"got {kind_of(value) if value != [] else 'an empty list'}")


def _segment(s: dict[str, Any], where: str, path: str) -> Segment:
  kind = field(s, "kind", one_of("model", "tool"), where, path)
  ids = field(s, "token_ids", list_of(is_int), where, path)
  lps = field(s, "logprobs", optional(list_of(is_number)), where, path, default=None)
  if lps is not None and len(lps) != len(ids):
    raise RecordError(f"{where}: field {path}logprobs has {len(lps)} entries for {len(ids)} tokens")
  return Segment(kind=kind, token_ids=ids, text=field(s, "text", is_str, where, path), logprobs=lps)


def _tool_call(c: dict[str, Any], where: str, path: str) -> ToolCall:
  return ToolCall(tool=field(c, "tool", is_str, where, path), input=field(c, "input", is_str, where, path),
                  output=field(c, "output", is_str, where, path), ok=field(c, "ok", is_bool, where, path),
                  elapsed_s=field(c, "elapsed_s", is_number, where, path, default=0.0),
                  error=field(c, "error", optional(is_str), where, path, default=None))


def read_trajectories(path: str | os.PathLike) -> list[Trajectory]:
  return list(iter_trajectories(path))


def iter_trajectories(path: str | os.PathLike) -> Iterator[Trajectory]:
  """Trajectories of a JSONL file (see `records.iter_records`: file:line errors, a cut last line
  skipped)."""
  return iter_records(path, lambda d, where: Trajectory.from_dict(d, where=where))


# ---- stage-1 records that hold trajectories -----------------------------------------------------

REPAIR_VERSION = 1
PAIR_VERSION = 1
FailureType = Literal["low", "wrong"]


def _check_version(d: dict[str, Any], expected: int, what: str, where: str) -> int:
  """Files written before records carried a version are version 1."""
  version = field(d, "version", is_int, where, default=1)
  if version != expected:
    raise RecordError(f"{where}: unsupported {what} schema version {version} (expected {expected})")
  return version


@dataclasses.dataclass
class RepairRecord:
  """One line of `repairs.jsonl`: every attempt at repairing one original, and the accepted one."""

  original_id: str
  accepted: bool
  repaired: Trajectory | None                       # the accepted repair (policy prompt attached)
  attempts: list[tuple[Trajectory, list[str]]]      # every attempt and why it was rejected
  version: int = REPAIR_VERSION

  def to_dict(self) -> dict[str, Any]:
    return {"original_id": self.original_id, "accepted": self.accepted,
            "repaired": self.repaired.to_dict() if self.repaired is not None else None,
            "attempts": [{"trajectory": t.to_dict(), "reasons": list(r)} for t, r in self.attempts],
            "version": self.version}

  @classmethod
  def from_dict(cls, d: Any, where: str = "record") -> "RepairRecord":
    as_object(d, where, "a repair record object")
    version = _check_version(d, REPAIR_VERSION, "repair record", where)
    accepted = field(d, "accepted", is_bool, where)
    raw = field(d, "repaired", optional(is_object), where)
    repaired = None if raw is None else Trajectory.from_dict(raw, where, "repaired.")
    if accepted != (repaired is not None):
      raise RecordError(f"{where}: field accepted is {str(accepted).lower()} but repaired is "
                        f"{'null' if repaired is None else 'a trajectory'}")
    attempts = []
    for i, a in enumerate(field(d, "attempts", list_of(is_object), where)):
      path = f"attempts[{i}]."
      traj = Trajectory.from_dict(field(a, "trajectory", is_object, where, path), where, f"{path}trajectory.")
      attempts.append((traj, field(a, "reasons", list_of(is_str), where, path)))
    return cls(original_id=field(d, "original_id", is_str, where), accepted=accepted, repaired=repaired,
               attempts=attempts, version=version)


@dataclasses.dataclass
class PreferencePair:
  """One line of `pairs.jsonl`: an accepted repair (chosen) over its original (rejected)."""

  id: str
  question_id: str
  failure_type: FailureType                          # the original's quality
  chosen: Trajectory
  rejected: Trajectory
  version: int = PAIR_VERSION

  def to_dict(self) -> dict[str, Any]:
    return {"id": self.id, "question_id": self.question_id, "failure_type": self.failure_type,
            "chosen": self.chosen.to_dict(), "rejected": self.rejected.to_dict(), "version": self.version}

  @classmethod
  def from_dict(cls, d: Any, where: str = "record") -> "PreferencePair":
    as_object(d, where, "a preference pair object")
    version = _check_version(d, PAIR_VERSION, "preference pair", where)
    qid = field(d, "question_id", is_str, where)
    sides = {}
    for side in ("chosen", "rejected"):
      t = Trajectory.from_dict(field(d, side, is_object, where), where, f"{side}.")
      if t.question_id != qid:  # a pair mixes two questions: a bug upstream, never a training signal
        raise RecordError(f"{where}: field {side}.question_id is {t.question_id!r} but the pair's "
                          f"question_id is {qid!r}")
      sides[side] = t
    return cls(id=field(d, "id", is_str, where), question_id=qid,
               failure_type=field(d, "failure_type", one_of("low", "wrong"), where),
               chosen=sides["chosen"], rejected=sides["rejected"], version=version)


def iter_repairs(path: str | os.PathLike) -> Iterator[RepairRecord]:
  """Records of `repairs.jsonl`, validated (file:line: field errors; a cut last line skipped)."""
  return iter_records(path, lambda d, where: RepairRecord.from_dict(d, where))


def iter_pairs(path: str | os.PathLike) -> Iterator[PreferencePair]:
  """Records of `pairs.jsonl`, validated (file:line: field errors; a cut last line skipped)."""
  return iter_records(path, lambda d, where: PreferencePair.from_dict(d, where))


__all__ = ["FailureType", "JsonlAppender", "PAIR_VERSION", "PreferencePair", "REPAIR_VERSION", "RecordError",
           "RepairRecord", "SCHEMA_VERSION", "Segment", "ToolCall", "Trajectory", "check_gold", "iter_pairs",
           "iter_repairs", "iter_trajectories", "read_trajectories"]
