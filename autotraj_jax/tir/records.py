"""The one JSONL layer of the pipeline: read with file:line errors, append, write atomically.

Every JSONL file a stage writes (candidates, scores, repairs, pairs, SFT sets, trajectories) goes
through `JsonlAppender` or `write_jsonl`, and every one is read through `iter_records`:

- a final line without a newline (a write cut by a kill) is dropped, never an error, and the
  appender truncates it before appending, so a resumed stage never duplicates or corrupts a record;
- a malformed line raises `RecordError` naming `file:line` and what is wrong, and the field
  checks below (`field`, `is_int`, `list_of`, ...) let each record type's `from_dict` name the
  field's path too (`segments[1].token_ids[3]`);
- whole-file outputs (`write_jsonl`, `write_json`, `write_text`) are written to a temporary file and renamed,
  so a reader sees the old file or the new one, never half of one;
- on several hosts only process 0 writes (every process computes the same records), so a shared
  work directory gets each record once.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, Iterator, TypeVar

from autotraj_jax.distributed import is_primary

T = TypeVar("T")


class RecordError(ValueError):
  """A malformed record; the message names the file, line and field."""


# ---- field checks -------------------------------------------------------------------------------
# A check takes (value, where, field) and returns the value or raises RecordError naming
# `where` (file:line) and the field's path, e.g. "runs.jsonl:7: field segments[1].token_ids[3]
# must be int, got bool". Record types compose them in their `from_dict`.

Check = Callable[[Any, str, str], Any]
_MISSING = object()


def kind_of(value: Any) -> str:
  """A value's type as error messages name it (`null` for None)."""
  return "null" if value is None else type(value).__name__


def fail(where: str, field: str, expected: str, value: Any) -> RecordError:
  return RecordError(f"{where}: field {field} must be {expected}, got {kind_of(value)}")


def is_str(value: Any, where: str, field: str) -> str:
  if not isinstance(value, str):
    raise fail(where, field, "str", value)
  return value


def is_int(value: Any, where: str, field: str) -> int:
  """An integer; JSON `true` is not one (Python's bool is an int subclass)."""
  if isinstance(value, bool) or not isinstance(value, int):
    raise fail(where, field, "int", value)
  return value


def is_number(value: Any, where: str, field: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise fail(where, field, "a number", value)
  return float(value)


def is_bool(value: Any, where: str, field: str) -> bool:
  if not isinstance(value, bool):
    raise fail(where, field, "bool", value)
  return value


def is_object(value: Any, where: str, field: str) -> dict[str, Any]:
  if not isinstance(value, dict):
    raise fail(where, field, "an object", value)
  return value


_ALL_OK: dict[Check, Callable[[list[Any]], bool]] = {
    is_int: lambda xs: all(type(x) is int for x in xs),
    is_number: lambda xs: all(type(x) is float or type(x) is int for x in xs),
    is_str: lambda xs: all(type(x) is str for x in xs),
}


def list_of(item: Check, *, non_empty: bool = False) -> Check:
  """A list whose every element passes `item` (checked as `field[i]`)."""

  def check(value: Any, where: str, field: str) -> list[Any]:
    if not isinstance(value, list):
      raise fail(where, field, "a list", value)
    if non_empty and not value:
      raise RecordError(f"{where}: field {field} must be a non-empty list")
    fast = _ALL_OK.get(item)
    if fast is not None and fast(value):  # token ids and logprobs: one pass, no per-element calls
      return value
    return [item(v, where, f"{field}[{i}]") for i, v in enumerate(value)]

  return check


def dict_of(value_check: Check) -> Check:
  """An object whose every value passes `value_check` (checked as `field.key`)."""

  def check(value: Any, where: str, field: str) -> dict[str, Any]:
    is_object(value, where, field)
    return {k: value_check(v, where, f"{field}.{k}") for k, v in value.items()}

  return check


def optional(inner: Check) -> Check:
  """None (JSON null) or a value that passes `inner`."""
  return lambda value, where, field: None if value is None else inner(value, where, field)


def one_of(*allowed: Any) -> Check:

  def check(value: Any, where: str, field: str) -> Any:
    if not any(type(value) is type(a) and value == a for a in allowed):
      raise RecordError(f"{where}: field {field} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value

  return check


def field(obj: dict[str, Any], key: str, check: Check, where: str, path: str = "",
          default: Any = _MISSING) -> Any:
  """`check(obj[key])`, naming the field `path + key`; a missing key is an error unless a
  `default` is given (returned as is)."""
  if key not in obj:
    if default is _MISSING:
      raise RecordError(f"{where}: missing field {path}{key}")
    return default
  return check(obj[key], where, f"{path}{key}")


def as_object(d: Any, where: str, what: str = "a JSON object") -> dict[str, Any]:
  """The record itself must be an object."""
  if not isinstance(d, dict):
    raise RecordError(f"{where}: expected {what}, got {kind_of(d)}")
  return d


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


def iter_records(path: str | os.PathLike, parse: Callable[[Any, str], T] = lambda d, where: d, *,
                 keep_unterminated: bool = False) -> Iterator[T]:
  """Parsed records of a JSONL file: `parse(obj, "file:line")` for each non-blank line.

  Lines are read one at a time. A final line without a newline is a write cut by a kill in the
  files the pipeline appends to, and is skipped; hand-made inputs (question files) often just
  lack the last newline: `keep_unterminated=True` parses that line too. Invalid JSON or
  non-UTF-8 bytes raise RecordError naming file:line.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    for n, raw in enumerate(f, start=1):
      if not raw.endswith(b"\n") and not keep_unterminated:
        return  # the appender drops it on resume
      where = f"{path}:{n}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise RecordError(f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise RecordError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
      yield parse(obj, where)


def read_records(path: str | os.PathLike, parse: Callable[[Any, str], T] = lambda d, where: d) -> list[T]:
  return list(iter_records(path, parse))


def _line(record: Any) -> str:
  if hasattr(record, "to_dict"):
    record = record.to_dict()
  return json.dumps(record, ensure_ascii=False)


class JsonlAppender:
  """Append-only JSONL writer: one flushed line per record, so a killed process loses at most
  the line being written (which readers skip) and never a finished record. `close` also
  fsyncs, for machine crashes. Records are dicts or objects with `to_dict()`."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    self._f = None
    if not is_primary():
      return
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    _drop_partial_last_line(self.path)
    self._f = open(self.path, "a", encoding="utf-8")

  def write(self, record: Any) -> None:
    if self._f is None:
      return
    self._f.write(_line(record) + "\n")
    self._f.flush()

  def write_all(self, records: Iterable[Any]) -> None:
    for r in records:
      self.write(r)

  def close(self) -> None:
    if self._f is None:
      return
    self._f.flush()
    os.fsync(self._f.fileno())
    self._f.close()

  def __enter__(self) -> "JsonlAppender":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> int:
  """Replaces `path` with `records`, atomically; returns how many were written."""
  path = os.fspath(path)
  if not is_primary():
    return sum(1 for _ in records)
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


def write_text(path: str | os.PathLike, text: str) -> None:
  """Replaces `path` with `text`, atomically (and durably: fsynced before the rename)."""
  path = os.fspath(path)
  if not is_primary():
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> None:
  """Replaces `path` with `obj` as JSON, like `write_text`."""
  write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def resume(path: str | os.PathLike, parse: Callable[[Any, str], T], key: Callable[[T], str],
           complete: Callable[[list[T]], bool] = lambda group: True) -> tuple[list[T], set[str]]:
  """(kept records, finished keys) of an append-only file, for a stage that resumes by id.

  Records are grouped by `key`; a group for which `complete(group)` is False (a kill in the
  middle of a unit of work) and a partial last line are dropped from the file, which is rewritten
  only if something was dropped. Resuming then never duplicates a record.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    return [], set()
  records = read_records(path, parse)
  groups: dict[str, list[T]] = {}
  for r in records:
    groups.setdefault(key(r), []).append(r)
  done = {k for k, g in groups.items() if complete(g)}
  kept = [r for r in records if key(r) in done]
  with open(path, "rb") as f:
    clean_end = f.read().endswith(b"\n") or os.path.getsize(path) == 0
  if len(kept) != len(records) or not clean_end:
    write_jsonl(path, kept)
  return kept, done
