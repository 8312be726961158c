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
from typing import Any, Iterable, Iterator, Literal

SCHEMA_VERSION = 1

SegmentKind = Literal["model", "tool"]


class RecordError(ValueError):
  """A malformed trajectory record; the message names the file, line and field."""


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
  gold: str | None = None
  domain: str = "math"
  finish_reason: str = ""          # answer | eos | length | budget | error
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
  def from_dict(cls, d: dict[str, Any], where: str = "record") -> "Trajectory":
    def need(obj, key, kind, ctx):
      if key not in obj:
        raise RecordError(f"{where}: missing field {ctx}{key!r}")
      value = obj[key]
      if kind is not None and not isinstance(value, kind):
        raise RecordError(f"{where}: field {ctx}{key!r} must be {getattr(kind, '__name__', kind)}, "
                          f"got {type(value).__name__}")
      return value

    if not isinstance(d, dict):
      raise RecordError(f"{where}: expected a JSON object, got {type(d).__name__}")
    version = d.get("version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
      raise RecordError(f"{where}: unsupported trajectory schema version {version} (expected {SCHEMA_VERSION})")
    for key, kind in (("id", str), ("question_id", str), ("question", str), ("prompt_ids", list)):
      need(d, key, kind, "")
    segments = []
    for i, s in enumerate(need(d, "segments", list, "")):
      ctx = f"segments[{i}]."
      kind = need(s, "kind", str, ctx)
      if kind not in ("model", "tool"):
        raise RecordError(f"{where}: field {ctx}'kind' must be 'model' or 'tool', got {kind!r}")
      ids = need(s, "token_ids", list, ctx)
      lps = s.get("logprobs")
      if lps is not None and len(lps) != len(ids):
        raise RecordError(f"{where}: field {ctx}'logprobs' has {len(lps)} entries for {len(ids)} tokens")
      segments.append(Segment(kind=kind, token_ids=[int(t) for t in ids], text=need(s, "text", str, ctx),
                              logprobs=lps))
    calls = []
    for i, c in enumerate(d.get("tool_calls", [])):
      ctx = f"tool_calls[{i}]."
      calls.append(ToolCall(tool=need(c, "tool", str, ctx), input=need(c, "input", str, ctx),
                            output=need(c, "output", str, ctx), ok=bool(need(c, "ok", None, ctx)),
                            elapsed_s=float(c.get("elapsed_s", 0.0)), error=c.get("error")))
    known = {f.name for f in dataclasses.fields(cls)} - {"segments", "tool_calls"}
    rest = {k: v for k, v in d.items() if k in known}
    return cls(**{**rest, "segments": segments, "tool_calls": calls})


def read_trajectories(path: str | os.PathLike) -> list[Trajectory]:
  return list(iter_trajectories(path))


def iter_trajectories(path: str | os.PathLike) -> Iterator[Trajectory]:
  """Records of a JSONL file; a malformed line raises RecordError naming file:line and field.

  A final line without a newline (a write cut by a kill) is skipped, not an error: append-only
  writers rewrite it on resume.
  """
  path = os.fspath(path)
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  for n, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    if n == len(lines) and not line.endswith("\n"):
      return
    try:
      d = json.loads(line)
    except json.JSONDecodeError as e:
      raise RecordError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
    yield Trajectory.from_dict(d, where=f"{path}:{n}")


class JsonlAppender:
  """Append-only JSONL writer: one flushed line per record, so a killed process loses at most
  the line being written (which readers skip) and never a finished record. `close` also
  fsyncs, for machine crashes."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    _drop_partial_last_line(self.path)
    self._f = open(self.path, "a", encoding="utf-8")

  def write(self, record: dict[str, Any] | Trajectory) -> None:
    line = record.to_json() if isinstance(record, Trajectory) else json.dumps(record, ensure_ascii=False)
    self._f.write(line + "\n")
    self._f.flush()

  def write_all(self, records: Iterable[dict[str, Any] | Trajectory]) -> None:
    for r in records:
      self.write(r)

  def close(self) -> None:
    self._f.flush()
    os.fsync(self._f.fileno())
    self._f.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _drop_partial_last_line(path: str) -> None:
  if not os.path.exists(path) or os.path.getsize(path) == 0:
    return
  with open(path, "rb+") as f:
    f.seek(-1, os.SEEK_END)
    if f.read(1) == b"\n":
      return
    f.seek(0)
    data = f.read()
    f.truncate(data.rfind(b"\n") + 1)
