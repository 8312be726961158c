"""The supervisor: serves run/close requests from the host, one at a time, forking cells.

Standard library only: this module runs inside the sandbox's supervisor.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import tempfile
import time
from typing import Any

from .cell import _cell_reaper
from .framing import _read_some, _recv, _send
from .kernel import _CLONE_NEWPID, _MAX_REPORT, _sys


class _Cell:
  """The supervisor's handle on one cell: reaper pid, pipes, and what the cell reported."""

  def __init__(self, pid: int, cmd_w: int, out_r: int, res_r: int, scratch: str | None):
    self.pid, self.cmd_w, self.out_r, self.res_r, self.scratch = pid, cmd_w, out_r, res_r, scratch
    try:
      self.pidfd: int | None = os.pidfd_open(pid)
    except (AttributeError, OSError):
      self.pidfd = None
    self.info: dict | None = None  # the ready message: uid, memory baseline, layer report
    self.res_buf = bytearray()
    self.status: int | None = None  # wait status, once reaped


class _Supervisor:
  """Serves run/close requests from the host, one at a time, with a pre-forked spare cell."""

  def __init__(self, cfg: dict, feats: dict):
    self.cfg, self.feats = cfg, feats
    self.sessions: dict[str, _Cell] = {}
    self.spare: _Cell | None = None
    self.dead: list[_Cell] = []
    self.pidns_fd = os.open("/proc/self/ns/pid", os.O_RDONLY) if feats["pid_ns"] else -1
    self.head = self.tail = max(4 * int(cfg["max_output_chars"]), 1024)

  # -- cell lifecycle ------------------------------------------------------------------------

  def spawn(self) -> _Cell:
    cmd_r, cmd_w = os.pipe()
    out_r, out_w = os.pipe()
    res_r, res_w = os.pipe()
    scratch = None
    if not self.feats["mount_ns"]:
      scratch = tempfile.mkdtemp(prefix="autotraj-sandbox-")
    newpid = False
    if self.feats["pid_ns"]:
      try:
        _sys("unshare", _CLONE_NEWPID)
        newpid = True
      except OSError:
        self.feats["pid_ns"] = False
    try:
      pid = os.fork()
    except OSError:
      if newpid:
        _sys("setns", self.pidns_fd, _CLONE_NEWPID)
      for fd in (cmd_r, cmd_w, out_r, out_w, res_r, res_w):
        os.close(fd)
      raise
    if pid == 0:
      try:
        _cell_reaper(self.cfg, self.feats, cmd_r, out_w, res_w, scratch)
      finally:
        os._exit(70)
    if newpid:
      _sys("setns", self.pidns_fd, _CLONE_NEWPID)  # later forks stay in our namespace
    for fd in (cmd_r, out_w, res_w):
      os.close(fd)
    for fd in (cmd_w, out_r, res_r):
      os.set_blocking(fd, False)
    return _Cell(pid, cmd_w, out_r, res_r, scratch)

  def handshake(self, cell: _Cell, timeout: float = 30.0) -> str | None:
    """Waits for the cell's ready message; returns an error string if setup failed."""
    if cell.info is not None:
      return None
    deadline = time.monotonic() + timeout
    while b"\n" not in cell.res_buf:
      left = deadline - time.monotonic()
      if left <= 0:
        return "sandbox cell did not start in time"
      ready = select.select([cell.res_r], [], [], left)[0]
      if ready:
        chunk = _read_some(cell.res_r)
        if chunk == b"":
          return "sandbox cell exited during setup"
        cell.res_buf += chunk or b""
        if len(cell.res_buf) > _MAX_REPORT:
          return "sandbox cell sent an oversized ready message"
    line, _, rest = bytes(cell.res_buf).partition(b"\n")
    cell.res_buf = bytearray(rest)
    try:
      cell.info = json.loads(line)
    except ValueError:
      return "sandbox cell sent a malformed ready message"
    if "setup_error" in cell.info:
      return f"sandbox setup failed: {cell.info['setup_error']}"
    return None

  def take_spare(self) -> tuple[_Cell | None, str | None]:
    cell, self.spare = self.spare or self.spawn(), None
    err = self.handshake(cell)
    if err:
      self.kill(cell)
    return (None, err) if err else (cell, None)

  def alive(self, cell: _Cell) -> bool:
    if cell.status is not None:
      return False
    if cell.pidfd is not None:
      return not select.select([cell.pidfd], [], [], 0)[0]
    return not self.try_reap(cell)

  def try_reap(self, cell: _Cell, block: bool = False) -> bool:
    """Collects the cell's exit status; True once it has exited."""
    if cell.status is None:
      try:
        pid, status = os.waitpid(cell.pid, 0 if block else os.WNOHANG)
      except ChildProcessError:
        pid, status = cell.pid, 0
      if pid == 0:
        return False
      cell.status = status
    return True

  def kill(self, cell: _Cell) -> None:
    """SIGKILLs the cell's namespace (or process group and uid), then queues it for reaping."""
    for target in ((lambda: os.kill(cell.pid, signal.SIGKILL)),
                   (lambda: os.killpg(cell.pid, signal.SIGKILL))):
      try:
        target()
      except OSError:
        pass
    uid = (cell.info or {}).get("uid")
    if not self.feats["pid_ns"] and self.feats["uid_drop"] and isinstance(uid, int):
      _sweep_uid(uid)
    for fd in (cell.cmd_w, cell.out_r, cell.res_r):
      try:
        os.close(fd)
      except OSError:
        pass
    cell.cmd_w = cell.out_r = cell.res_r = None
    self.dead.append(cell)

  def reap(self) -> None:
    keep = []
    for cell in self.dead:
      if not self.try_reap(cell):
        keep.append(cell)
        continue
      if cell.pidfd is not None:
        os.close(cell.pidfd)
      if cell.scratch:
        shutil.rmtree(cell.scratch, ignore_errors=True)
    self.dead = keep

  def close_session(self, sid: str) -> None:
    cell = self.sessions.pop(sid, None)
    if cell is not None:
      self.kill(cell)

  def shutdown(self) -> None:
    for cell in [*self.sessions.values(), *([self.spare] if self.spare else [])]:
      self.kill(cell)
    self.sessions.clear()
    self.spare = None
    deadline = time.monotonic() + 2.0
    while self.dead and time.monotonic() < deadline:
      self.reap()
      time.sleep(0.01)

  # -- one request ---------------------------------------------------------------------------

  def run(self, req: dict) -> dict:
    """Runs one cell. `reset_before`: the session's process had died since its last call;
    `reset_after`: it died in this call (its state is gone either way)."""
    for sid in req.get("close") or ():
      self.close_session(sid)
    sid = req.get("session")
    cell, reset_before = (self.sessions.get(sid) if sid is not None else None), False
    if cell is not None and not self.alive(cell):
      self.close_session(sid)
      cell, reset_before = None, True
    new = cell is None
    if new:
      cell, err = self.take_spare()
      if cell is None:
        return _reply(False, err, reset_before=reset_before)
      if sid is not None:
        self.sessions[sid] = cell
    else:  # output and reports written since the last call belong to no one
      _read_some(cell.out_r, drain=True)
      _read_some(cell.res_r, drain=True)
      cell.res_buf.clear()
    t0 = time.monotonic()
    deadline = t0 + float(self.cfg["timeout_s"])
    try:
      _send(cell.cmd_w, {"code": req["code"], "persist": sid is not None}, deadline)
      state, ok, error, out = self.collect(cell, deadline)
    except (OSError, TimeoutError):
      state, ok, error, out = "broken", False, "the sandbox process stopped responding", {}
    if state == "timeout":
      ok, error = False, f"TimeoutError: execution exceeded the {self.cfg['timeout_s']:g} s limit"
    elif state == "exited":
      ok, error = self.describe_exit(cell)
    if sid is None or state != "result":
      if sid is not None:
        self.sessions.pop(sid, None)
      self.kill(cell)
    return _reply(ok, error, reset_before=reset_before,
                  reset_after=sid is not None and state != "result",
                  new_session=new and sid is not None, exec_s=time.monotonic() - t0,
                  append_error=state != "result" and error is not None, **out)

  def collect(self, cell: _Cell, deadline: float) -> tuple[str, bool, str | None, dict]:
    """Reads output and the result until the result, the cell's exit, or the deadline."""
    head, tail, total = bytearray(), bytearray(), 0

    def feed(chunk: bytes) -> None:
      nonlocal total
      total += len(chunk)
      take = max(self.head - len(head), 0)
      head.extend(chunk[:take])
      if len(chunk) > take:
        tail.extend(chunk[take:])
        if len(tail) > 2 * self.tail:
          del tail[:-self.tail]

    watch = [cell.out_r, cell.res_r] + ([cell.pidfd] if cell.pidfd is not None else [])
    state, ok, error = None, False, None
    while state is None:
      left = deadline - time.monotonic()
      if left <= 0:
        state = "timeout"
        break
      ready = select.select(watch, [], [], left if cell.pidfd is not None else min(left, 0.05))[0]
      if cell.out_r in ready:
        chunk = _read_some(cell.out_r)
        if chunk == b"":
          watch.remove(cell.out_r)
        elif chunk:
          feed(chunk)
      exited = (cell.pidfd in ready) if cell.pidfd is not None else not self.alive(cell)
      if cell.res_r in ready or exited:
        chunk = _read_some(cell.res_r)
        if chunk == b"" and cell.res_r in watch:
          watch.remove(cell.res_r)
        cell.res_buf += chunk or b""
        if len(cell.res_buf) > _MAX_REPORT and b"\n" not in cell.res_buf:
          state, ok, error = "broken", False, "sandbox protocol error (oversized report)"
          break
        if b"\n" in cell.res_buf:
          line, _, rest = bytes(cell.res_buf).partition(b"\n")
          cell.res_buf = bytearray(rest)
          try:
            msg = json.loads(line)
            state, ok, error = "result", bool(msg.get("ok")), msg.get("error")
          except ValueError:
            state, ok, error = "result", False, "sandbox protocol error"
          continue
      if exited:
        state = "exited"
    end = time.monotonic() + 0.05
    while time.monotonic() < end:  # what the cell wrote before reporting is already in the pipe
      chunk = _read_some(cell.out_r)
      if not chunk:
        break
      feed(chunk)
    tail_bytes = bytes(tail[-self.tail:]) if tail else b""
    out = {"head": bytes(head).decode("utf-8", "replace"),
           "tail": tail_bytes.decode("utf-8", "replace"),
           "dropped": total - len(head) - len(tail_bytes)}
    return state, ok, (str(error)[:300] if error is not None else None), out

  def describe_exit(self, cell: _Cell) -> tuple[bool, str | None]:
    self.try_reap(cell, block=True)  # it has exited: this does not wait
    code = os.waitstatus_to_exitcode(cell.status)
    if code == 0:
      return True, None
    sig = code - 128 if code > 128 else (-code if code < 0 else 0)
    if sig == signal.SIGXCPU:
      return False, f"CPU time limit exceeded ({self.cfg['cpu_s']} s)"
    if sig == signal.SIGKILL:
      return False, "killed (SIGKILL): CPU or memory limit exceeded"
    if sig == signal.SIGSEGV:
      return False, "crashed with SIGSEGV (segmentation fault, e.g. from unbounded recursion)"
    if sig:
      name = signal.Signals(sig).name if sig in signal.valid_signals() else sig
      return False, f"killed by signal {name}"
    return False, f"process exited with status {code}"

  # -- main loop -----------------------------------------------------------------------------

  def serve(self) -> None:
    self.spare = self.spawn()
    err = self.handshake(self.spare, timeout=60.0)
    cell_feats = (self.spare.info or {}).get("features", {})
    self.feats.update(cell_feats)
    _send(1, {"op": "ready", "features": self.feats, "error": err})
    while True:
      while self.dead and not select.select([0], [], [], 0.05)[0]:
        self.reap()  # idle: finish off killed cells (and their scratch dirs) promptly
      try:
        req = _recv(0)
      except (OSError, ValueError):
        req = None
      if req is None:
        break
      try:
        if req.get("op") == "run":
          reply = self.run(req)
        elif req.get("op") == "close":
          for sid in req.get("sessions") or ():
            self.close_session(sid)
          reply = {"op": "closed"}
        else:
          reply = _reply(False, f"unknown op {req.get('op')!r}")
      except Exception as e:  # keep serving: one bad request must not take the pool down
        reply = _reply(False, f"sandbox internal error: {type(e).__name__}: {e}")
      try:
        _send(1, reply)
      except OSError:  # the host is gone
        break
      if self.spare is None:
        try:
          self.spare = self.spawn()
        except OSError:
          pass
      self.reap()
    self.shutdown()


def _reply(ok: bool, error: str | None, **kw: Any) -> dict:
  out = {"ok": ok, "error": error, "head": "", "tail": "", "dropped": 0, "reset_before": False,
         "reset_after": False, "new_session": False, "exec_s": 0.0,
         "append_error": error is not None and not ok}
  out.update(kw)
  return out


def _sweep_uid(uid: int) -> None:
  """Kills every process of `uid` (fallback when the cell has no PID namespace)."""
  pid = os.fork()
  if pid == 0:
    try:
      os.setgroups([])
      os.setresgid(uid, uid, uid)
      os.setresuid(uid, uid, uid)
      os.kill(-1, signal.SIGKILL)
    finally:
      os._exit(0)
  os.waitpid(pid, 0)

