"""Framing between host, supervisor and cell: 4-byte length + JSON over raw fds, no buffering.

Standard library only: this module also runs inside the sandbox's supervisor.
"""

from __future__ import annotations

import json
import os
import select
import struct
import time
from typing import Any

MAX_FRAME = 64 << 20


def _write_all(fd: int, data: bytes, deadline: float | None = None) -> None:
  view = memoryview(data)
  while view:
    if deadline is not None:
      left = deadline - time.monotonic()
      if left <= 0 or not select.select([], [fd], [], left)[1]:
        raise TimeoutError("write timed out")
    try:
      n = os.write(fd, view)
    except BlockingIOError:
      continue
    view = view[n:]


def _send(fd: int, obj: Any, deadline: float | None = None) -> None:
  body = json.dumps(obj).encode()
  _write_all(fd, struct.pack(">I", len(body)) + body, deadline)


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes | None:
  buf = bytearray()
  while len(buf) < n:
    if deadline is not None:
      left = deadline - time.monotonic()
      if left <= 0 or not select.select([fd], [], [], left)[0]:
        raise TimeoutError("read timed out")
    try:
      chunk = os.read(fd, n - len(buf))
    except BlockingIOError:
      continue
    if not chunk:
      return None
    buf += chunk
  return bytes(buf)


def _recv(fd: int, deadline: float | None = None) -> Any:
  """One framed message, or None at end of stream."""
  head = _read_exact(fd, 4, deadline)
  if head is None:
    return None
  (n,) = struct.unpack(">I", head)
  if n > MAX_FRAME:
    raise ValueError(f"frame too large: {n}")
  body = _read_exact(fd, n, deadline)
  return None if body is None else json.loads(body)



def _read_some(fd: int | None, drain: bool = False) -> bytes | None:
  """Non-blocking read: bytes, b'' at EOF, None when nothing is there (or the fd is closed).

  `drain` reads (and returns) whatever is buffered, up to 1 MiB.
  """
  if fd is None:
    return None
  got = bytearray()
  while len(got) < 1 << 20:
    try:
      chunk = os.read(fd, 65536)
    except (BlockingIOError, InterruptedError):
      return bytes(got) if got else None
    except OSError:
      return None
    if not drain:
      return chunk
    if not chunk:
      return bytes(got)
    got += chunk
  return bytes(got)



def _report(fd: int, msg: dict) -> None:
  try:
    os.write(fd, json.dumps(msg).encode() + b"\n")
  except OSError:
    pass

