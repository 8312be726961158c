"""The `code` tool: runs model-written Python in a separate, locked-down process.

Why so many layers: a policy under RL will write every kind of program (infinite loops, fork
bombs, `rm -rf`, reads of `/proc`), and the reference code only blocked `input(` and `os.system(`.
Here each layer is detected at start-up and the strongest available set is used; the answer is
in `PythonSandbox.isolation`.

Process layout (one per pool worker)::

  host (trainer / rollout loop)
    └─ supervisor (fresh `python -I`, clean env, numpy/sympy pre-imported, single-threaded)
         new mount + network namespace; every mount re-bound read-only; home dirs hidden;
         itself pid 1 of its own PID namespace (safety net: killing it kills everything below)
       └─ cell reaper G (pid 1 of a fresh PID namespace, own mount namespace with a private
          tmpfs on /tmp and /dev/shm and a fresh /proc)
            └─ cell H: rlimits (CPU, address space, file size, processes, no core), unprivileged
               uid, no_new_privs + a seccomp filter, cwd = the empty tmpfs, env = a fixed
               minimal set; executes the code and reports on a private pipe.

Layers and their fallbacks:
- separate process: always (forked from the warm supervisor, so a call costs milliseconds).
- unprivileged uid (`uid_drop`): as root, each cell runs as uid 1000000+pid (unique, so
  RLIMIT_NPROC counts only that cell). Without root, a user namespace (`userns`) is created and
  each cell enters a nested one, which drops every capability; RLIMIT_NPROC is then counted per
  namespace. Without either, RLIMIT_NPROC is not set (it would count the host user's processes).
- file system (`mount_ns`): read-only bind of every mount, tmpfs scratch, secrets hidden.
  Fallback: a fresh scratch directory owned by the cell's uid (writes elsewhere are stopped by
  permissions only when `uid_drop` is active).
- network (`net_ns`): an empty network namespace (loopback down). Independently, `seccomp`
  makes socket() fail (also blocks io_uring, mount, unshare, ptrace, bpf, user namespaces).
  Fallback when neither is available: an audit hook that rejects socket and subprocess use
  (best effort: ctypes can bypass it).
- processes (`pid_ns`): the cell cannot see or signal anything outside its namespace and all of
  it dies with G. Fallback: process-group kill plus, with `uid_drop`, a kill(-1) sweep as the
  cell's uid; seccomp refuses kill(-1) in every mode.
- time: RLIMIT_CPU (SIGXCPU, then SIGKILL) and a wall-clock deadline in the supervisor, which
  then kills the cell's whole namespace. The host has its own deadline on the supervisor and
  replaces a supervisor that stops answering.

Sessions: `session=<id>` pins a warm cell process to that id; later calls run in the same
globals (like notebook cells) until `close_session(id)`, the idle timeout, LRU eviction, or a
timeout/crash (then the next call starts fresh and the output says the state was reset). A
live process was chosen over replaying earlier cells: replay repeats side effects and costs grow
with the trajectory. Each call gets `cpu_s` of CPU; a session's process also has a lifetime cap
of 20 x `cpu_s` (an unprivileged process cannot raise its hard limit back).

Display: like a notebook, the value of a final bare expression is printed, but only if the cell
wrote nothing else to stdout (so `print(x)` followed by `x` does not print twice).
Output: stdout and stderr are merged in order, captured with bounded memory (head and tail) and
truncated in the middle. Exceptions give ok=False, the traceback (user frames only) in the
output and its last line as `error`. Known limit: the cell can lie about its own result.

CLI: `python -m autotraj_jax.tir.sandbox FILE` prints one JSON object
`{"ok", "output", "error", "elapsed_s"}`.
"""

from __future__ import annotations

import argparse
import ast
import collections
import ctypes
import io
import json
import os
import platform
import re
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
import types
import warnings
import weakref
from typing import Any, Sequence

_WORKER_MODULE = "_autotraj_sandbox_worker"  # the supervisor runs this source alone, stdlib only
if __name__ != _WORKER_MODULE:
  from autotraj_jax.tir.tools import ToolResult, register_tool, truncate_middle

  # Supervisors run the source the host imported, so a long-running host that restarts a worker
  # never mixes its own protocol with a newer version of this file.
  with open(__file__, encoding="utf-8") as _f:
    _SOURCE = _f.read()

__all__ = ["PythonSandbox", "main"]

LAYERS = ("uid_drop", "userns", "mount_ns", "net_ns", "pid_ns", "seccomp")
_UID_BASE = 1_000_000
_SESSION_CPU_FACTOR = 20  # a session's processes may use 20 x cpu_s CPU seconds in total
_MAX_REPORT = 64 << 10  # bytes of a cell's result line
_READY_TIMEOUT_S = 120.0  # first start imports numpy/sympy on a busy 2-core box

_CLONE_NEWNS, _CLONE_NEWUSER = 0x00020000, 0x10000000
_CLONE_NEWPID, _CLONE_NEWNET = 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_NOATIME, _MS_NODIRATIME, _MS_BIND = 32, 1024, 2048, 4096
_MS_REC, _MS_PRIVATE, _MS_RELATIME = 1 << 14, 1 << 18, 1 << 21
_MOUNT_FLAGS = {"nosuid": _MS_NOSUID, "nodev": _MS_NODEV, "noexec": _MS_NOEXEC,
                "noatime": _MS_NOATIME, "nodiratime": _MS_NODIRATIME, "relatime": _MS_RELATIME}
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_SECCOMP, _PR_SET_NO_NEW_PRIVS = 1, 4, 22, 38

# Syscalls the cell never needs; numbers per architecture (x32 and foreign ABIs are refused too).
_SYSCALLS = {
  "x86_64": dict(arch=0xC000003E, socket=41, io_uring_setup=425, unshare=272, setns=308,
                 mount=165, umount2=166, pivot_root=155, ptrace=101, bpf=321, perf_event_open=298,
                 keyctl=250, add_key=248, request_key=249, userfaultfd=323,
                 process_vm_writev=311, kexec_load=246, open_by_handle_at=304,
                 clone=56, clone3=435, kill=62),
  "aarch64": dict(arch=0xC00000B7, socket=198, io_uring_setup=425, unshare=97, setns=268,
                  mount=40, umount2=39, pivot_root=41, ptrace=117, bpf=280, perf_event_open=241,
                  keyctl=219, add_key=217, request_key=218, userfaultfd=282,
                  process_vm_writev=271, kexec_load=104, open_by_handle_at=265,
                  clone=220, clone3=435, kill=129),
}
_AUDIT_BLOCKED = frozenset({"socket.__new__", "socket.connect", "socket.bind", "socket.sendto",
                            "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn",
                            "os.spawn", "ctypes.dlopen"})
_SECRET_NAMES = (".ssh", ".aws", ".gnupg", ".config/gcloud", ".docker", ".kube", ".netrc",
                 ".git-credentials", ".pypirc", ".cache/huggingface", ".huggingface", ".azure")


# --------------------------------------------------------------------------------------------
# Framing: 4-byte length + JSON, over raw fds (no buffering between processes).


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
  if n > 64 << 20:
    raise ValueError(f"frame too large: {n}")
  body = _read_exact(fd, n, deadline)
  return None if body is None else json.loads(body)


# --------------------------------------------------------------------------------------------
# Kernel interfaces (ctypes; each use is guarded so a missing one only disables its layer).

try:
  _libc = ctypes.CDLL(None, use_errno=True)
  _libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                          ctypes.c_char_p]
  _libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                          ctypes.c_ulong]
except (OSError, AttributeError):  # not Linux/glibc: every namespace layer reports unavailable
  _libc = None


def _sys(name: str, *args: Any) -> None:
  if _libc is None or not hasattr(_libc, name):
    raise OSError(38, f"{name} unavailable")
  if getattr(_libc, name)(*args) != 0:
    err = ctypes.get_errno()
    raise OSError(err, f"{name}: {os.strerror(err)}")


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None):
  enc = lambda s: None if s is None else s.encode()
  _sys("mount", enc(src), enc(target), enc(fstype), flags, enc(data))


def _prctl(option: int, arg: int) -> None:
  _sys("prctl", option, arg, 0, 0, 0)


def _nspids() -> list[int]:
  """This process's pid in each PID namespace, outermost (as seen by the mounted /proc) first."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("NSpid:"):
        return [int(x) for x in line.split()[1:]]
  return [os.getpid()]


def _seccomp_program() -> bytes | None:
  """A BPF filter (struct sock_filter[]) denying the syscalls in `_SYSCALLS`, or None."""
  nr = _SYSCALLS.get(platform.machine())
  if nr is None:
    return None
  ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
  errno_ret = lambda e: (ret, 0, 0, 0x00050000 | e)
  eperm, allow = errno_ret(1), (ret, 0, 0, 0x7FFF0000)
  prog = [(ld, 0, 0, 4), (jeq, 1, 0, nr["arch"]), eperm, (ld, 0, 0, 0)]
  if platform.machine() == "x86_64":
    prog += [(jge, 0, 1, 0x40000000), eperm]  # x32 syscalls
  for name in ("socket", "io_uring_setup", "unshare", "setns", "mount", "umount2", "pivot_root",
               "ptrace", "bpf", "perf_event_open", "keyctl", "add_key", "request_key",
               "userfaultfd", "process_vm_writev", "kexec_load", "open_by_handle_at"):
    prog += [(jeq, 0, 1, nr[name]), eperm]
  prog += [(jeq, 0, 1, nr["clone3"]), errno_ret(38)]  # ENOSYS: libc falls back to clone()
  prog += [(jeq, 0, 3, nr["clone"]), (ld, 0, 0, 16), (jset, 0, 1, _CLONE_NEWUSER), eperm]
  prog += [(ld, 0, 0, 0), (jeq, 0, 3, nr["kill"]), (ld, 0, 0, 16), (jeq, 0, 1, 0xFFFFFFFF), eperm]
  prog.append(allow)
  return b"".join(struct.pack("=HBBI", *ins) for ins in prog)


def _install_seccomp() -> bool:
  prog = _seccomp_program()
  if prog is None or _libc is None:
    return False
  buf = ctypes.create_string_buffer(prog, len(prog))
  fprog = struct.pack("=HxxxxxxQ", len(prog) // 8, ctypes.addressof(buf))
  fbuf = ctypes.create_string_buffer(fprog, len(fprog))
  try:
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    _sys("prctl", _PR_SET_SECCOMP, 2, ctypes.addressof(fbuf), 0, 0)
    return True
  except OSError:
    return False


def _audit_guard(event: str, args: tuple) -> None:
  if event in _AUDIT_BLOCKED:
    raise PermissionError(f"{event} is disabled in the sandbox")


# --------------------------------------------------------------------------------------------
# Supervisor side (runs in the worker process; stdlib only).


def _isolate_supervisor(cfg: dict) -> dict:
  """Enters new namespaces where allowed and returns which layers are active."""
  off = set(cfg["disable"])
  feats = {k: False for k in LAYERS}
  feats.update(readonly_fs=False, supervisor_pid_ns=False, proc=False, audit_hook=False)
  if os.geteuid() == 0:
    feats["uid_drop"] = "uid_drop" not in off
    for layer, flag in (("mount_ns", _CLONE_NEWNS), ("net_ns", _CLONE_NEWNET)):
      if layer not in off:
        try:
          _sys("unshare", flag)
          feats[layer] = True
        except OSError:
          pass
  elif "userns" not in off:
    flags = _CLONE_NEWUSER | (0 if "mount_ns" in off else _CLONE_NEWNS)
    flags |= 0 if "net_ns" in off else _CLONE_NEWNET
    uid, gid = os.getuid(), os.getgid()
    try:
      _sys("unshare", flags)
      maps = (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1"))
      for path, text in maps:
        with open(f"/proc/self/{path}", "w") as f:
          f.write(text)
      feats.update(userns=True, mount_ns=bool(flags & _CLONE_NEWNS),
                   net_ns=bool(flags & _CLONE_NEWNET))
    except OSError:
      pass
  if feats["mount_ns"]:
    try:
      _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing below may propagate to the host
    except OSError:
      feats["mount_ns"] = False
  if feats["mount_ns"]:
    _hide_homes(cfg)
    feats["readonly_fs"] = _remount_readonly()
  elif feats["uid_drop"] and not _others_can_read(sys.prefix):
    feats["warning"] = (f"{sys.prefix} is not readable by the sandbox's uid and there is no mount "
                        "namespace to expose it: only pre-imported modules can be imported")
  return feats


def _others_can_read(path: str) -> bool:
  """Whether every directory from / down to `path` is searchable by any uid."""
  path = os.path.realpath(path)
  while True:
    try:
      if not os.stat(path).st_mode & 0o001:
        return False
    except OSError:
      return False
    if path == "/":
      return True
    path = os.path.dirname(path)


def _mounts() -> list[tuple[str, set[str]]]:
  out = []
  with open("/proc/self/mountinfo") as f:
    for line in f:
      parts = line.split()
      path = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[4])
      out.append((path, set(parts[5].split(","))))
  return out


def _remount_readonly() -> bool:
  """Re-binds every mount read-only (keeping its nosuid/nodev/... flags); True if / succeeded."""
  root_ok = False
  for path, opts in _mounts():
    flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
    for name, bit in _MOUNT_FLAGS.items():
      flags |= bit if name in opts else 0
    try:
      _mount(None, path, None, flags)
      root_ok = root_ok or path == "/"
    except OSError:
      pass
  return root_ok


def _hide_homes(cfg: dict) -> None:
  """Covers home directories with an empty tmpfs, binding back only what the interpreter needs.

  Besides hiding secrets (keys, tokens, caches), this makes e.g. a pyenv under a 0700 /root
  traversable for the cell's unprivileged uid.
  """
  needed = set()
  for p in cfg["keep_paths"]:
    p = os.path.realpath(p) if p else ""
    p = p if os.path.isdir(p) else os.path.dirname(p)
    if p and os.path.isdir(p):
      needed.add(p)
  homes = {"/root"}
  if re.match(r"^/(home|root|Users)/[^/]+", cfg.get("host_home") or ""):
    homes.add(cfg["host_home"])
  try:
    homes.update(os.path.join("/home", d) for d in os.listdir("/home"))
  except OSError:
    pass
  homes = sorted({os.path.realpath(h) for h in homes if os.path.isdir(h)})
  if not _try_mount("tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=0700"):
    return  # no private staging area: leave homes alone rather than write to the host's disk
  for i, home in enumerate(homes):
    if any(home == p or home.startswith(p + "/") for p in needed):
      _hide_secret_files(home)  # the home (or a parent) is itself needed: hide known secrets
      continue
    inside = sorted(p for p in needed if p.startswith(home + "/"))
    inside = [p for j, p in enumerate(inside) if not any(p.startswith(q + "/") for q in inside[:j])]
    stage = f"/tmp/stage{i}"
    if inside:
      os.mkdir(stage)
      if not _try_mount(home, stage, None, _MS_BIND | _MS_REC):
        continue
    if _try_mount("tmpfs", home, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=0755"):
      for p in inside:
        rel = os.path.relpath(p, home)
        os.makedirs(os.path.join(home, rel), mode=0o755, exist_ok=True)
        _try_mount(os.path.join(stage, rel), os.path.join(home, rel), None, _MS_BIND | _MS_REC)
    if inside:
      try:
        _sys("umount2", stage.encode(), 2)  # MNT_DETACH
      except OSError:
        pass


def _hide_secret_files(home: str) -> None:
  for name in _SECRET_NAMES:
    path = os.path.join(home, name)
    if os.path.isdir(path):
      _try_mount("tmpfs", path, "tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV, "size=4k,mode=0700")
    elif os.path.exists(path):
      _try_mount("/dev/null", path, None, _MS_BIND)


def _try_mount(*args: Any) -> bool:
  try:
    _mount(*args)
    return True
  except OSError:
    return False


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


# --------------------------------------------------------------------------------------------
# Cell side: reaper G (pid 1 of the cell's namespace) and the process H that runs the code.


def _cell_reaper(cfg: dict, feats: dict, cmd_r: int, out_w: int, res_w: int,
                 scratch: str | None) -> None:
  """G: private mounts, then forks H and reaps until H exits; exits with H's status."""
  try:
    os.setsid()
    uid = None
    if feats["uid_drop"]:
      uid = _UID_BASE + _nspids()[0]
    proc_ok = False
    if feats["mount_ns"]:
      _sys("unshare", _CLONE_NEWNS)
      size = f"size={int(cfg['scratch_mb'])}m,nr_inodes=16384"
      _mount("tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, size + ",mode=0700")
      _try_mount("tmpfs", "/dev/shm", "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
                 size + ",mode=1777")
      scratch = "/tmp"
    if uid is not None:
      os.chown(scratch, uid, uid)
    flag_r, flag_w = os.pipe()  # G -> H: whether the cell's own /proc got mounted
    pid = os.fork()
    if pid == 0:
      try:
        os.close(flag_w)
        _cell_main(cfg, feats, cmd_r, out_w, res_w, scratch, uid, flag_r)
      finally:
        os._exit(73)
    os.close(flag_r)
    if feats["mount_ns"] and feats["pid_ns"]:
      proc_ok = _try_mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    os.write(flag_w, b"P" if proc_ok else b"-")
  except BaseException as e:  # noqa: BLE001 - report, never fall back into the supervisor
    _report(res_w, {"setup_error": f"{type(e).__name__}: {e}"[:300]})
    os._exit(71)
  null = os.open(os.devnull, os.O_RDWR)
  for fd in (0, 1, 2):
    os.dup2(null, fd)
  os.closerange(3, _max_fd())
  if uid is not None:
    _drop_to(uid)
  try:
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
  except OSError:
    pass
  while True:
    try:
      done, status = os.wait()
    except ChildProcessError:
      os._exit(0)
    except InterruptedError:
      continue
    if done == pid:
      code = os.waitstatus_to_exitcode(status)
      os._exit(128 - code if code < 0 else min(code, 127))


def _report(fd: int, msg: dict) -> None:
  try:
    os.write(fd, json.dumps(msg).encode() + b"\n")
  except OSError:
    pass


def _max_fd() -> int:
  try:
    return int(os.sysconf("SC_OPEN_MAX"))
  except (ValueError, OSError):
    return 4096


def _drop_to(uid: int) -> None:
  os.setgroups([])
  try:
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
  except OSError:  # a container whose uid map is narrow: nobody is the next best
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)


def _cell_main(cfg: dict, feats: dict, cmd_r: int, out_w: int, res_w: int, scratch: str,
               uid: int | None, flag_r: int) -> None:
  """H: limits, privilege drop, filters, clean interpreter state; then runs cells."""
  report_fd = res_w
  try:
    proc_ok = os.read(flag_r, 1) == b"P"
    # fds: 0 null, 1+2 output pipe, 3 commands, 4 results; nothing else survives.
    moved = [_dup_at_least(fd, 100) for fd in (cmd_r, out_w, res_w)]
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(moved[1], 1)
    os.dup2(moved[1], 2)
    os.dup2(moved[0], 3)
    os.dup2(moved[2], 4)
    os.closerange(5, _max_fd())
    report_fd = 4
    mb = 1 << 20
    _set_limit(resource.RLIMIT_CORE, 0, 0)
    cpu = int(cfg["cpu_s"])  # the hard cap is a session's lifetime budget; one-shot cells lower it
    _set_limit(resource.RLIMIT_CPU, cpu, cpu * _SESSION_CPU_FACTOR)
    _set_limit(resource.RLIMIT_FSIZE, int(cfg["max_file_mb"]) * mb, int(cfg["max_file_mb"]) * mb)
    _set_limit(resource.RLIMIT_NOFILE, 1024, 1024)
    with open("/proc/self/statm") as f:
      baseline = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    mem = baseline + int(cfg["memory_mb"]) * mb
    _set_limit(resource.RLIMIT_AS, mem, mem)
    if feats["uid_drop"] or feats["userns"]:
      _set_limit(resource.RLIMIT_NPROC, int(cfg["max_procs"]), int(cfg["max_procs"]))
    if uid is not None:
      _drop_to(uid)
    elif feats["userns"]:
      _sys("unshare", _CLONE_NEWUSER)  # a nested user namespace: no capabilities over ours
    for option, value in ((_PR_SET_PDEATHSIG, signal.SIGKILL), (_PR_SET_NO_NEW_PRIVS, 1),
                          (_PR_SET_DUMPABLE, 1)):  # dumpable: /proc/self readable after setuid
      try:
        _prctl(option, value)
      except OSError:
        pass
    seccomp = _install_seccomp() if "seccomp" not in cfg["disable"] else False
    audit = False
    if not seccomp and not feats["net_ns"]:
      sys.addaudithook(_audit_guard)
      audit = True
    os.chdir(scratch)
    _reset_interpreter(cfg, scratch)
    _report(4, {"uid": uid, "baseline_mb": baseline / mb,
                "features": {"seccomp": seccomp, "audit_hook": audit, "proc": proc_ok}})
  except BaseException as e:  # noqa: BLE001
    _report(report_fd, {"setup_error": f"{type(e).__name__}: {e}"[:300]})
    os._exit(72)
  _serve_cells(int(cfg["cpu_s"]))


def _dup_at_least(fd: int, low: int) -> int:
  """Moves `fd` to a number >= `low`, so dup2 onto 0..4 cannot clobber another of ours."""
  import fcntl
  new = fcntl.fcntl(fd, fcntl.F_DUPFD, low)
  os.close(fd)
  return new


def _set_limit(which: int, soft: int, hard: int) -> None:
  try:
    resource.setrlimit(which, (soft, hard))
  except (ValueError, OSError):
    cur_hard = resource.getrlimit(which)[1]
    if cur_hard != resource.RLIM_INFINITY:
      resource.setrlimit(which, (min(soft, cur_hard), cur_hard))


def _reset_interpreter(cfg: dict, scratch: str) -> None:
  """Fresh `__main__`, env, argv, stdio; reseeds RNGs the fork would otherwise share."""
  os.environ.clear()
  os.environ.update(cfg["env"])
  os.environ.update(HOME=scratch, TMPDIR=scratch, PWD=scratch)
  sys.argv = [""]
  sys.path[:0] = [scratch]
  tempfile.tempdir = None
  sys.stdin = open(os.devnull)
  _restore_stdio()
  npr = sys.modules.get("numpy.random")  # (not imported here if absent: that costs ~50 ms)
  if npr is not None:
    npr.seed(None)
  signal.signal(signal.SIGINT, signal.default_int_handler)


_STDIO: list[io.TextIOWrapper] = []


def _restore_stdio() -> None:
  """Points sys.stdout/stderr at the output pipe again (a session cell may have replaced them)."""
  if not _STDIO or _STDIO[0].closed or _STDIO[1].closed:
    # line buffering, like a terminal: prints and subprocess output interleave in order
    _STDIO[:] = [cls(io.FileIO(fd, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
                     line_buffering=True) for cls, fd in ((_Stdout, 1), (_Stderr, 2))]
  sys.stdout, sys.stderr = _STDIO


class _Stdout(io.TextIOWrapper):
  """Remembers whether the cell printed anything (for the bare-expression display rule)."""

  wrote = False

  def write(self, s: str) -> int:
    if s:
      type(self).wrote = True
    return super().write(s)


class _Stderr(io.TextIOWrapper):
  """Flushes stdout first so merged output keeps its order."""

  def write(self, s: str) -> int:
    try:
      sys.stdout.flush()
    except Exception:  # noqa: BLE001 - the cell may have closed or replaced stdout
      pass
    return super().write(s)


def _arm_cpu(cpu_s: int, persist: bool) -> None:
  """Gives the next cell `cpu_s` CPU seconds beyond what this process has used so far.

  A one-shot cell gets a hard limit just above that; a session keeps its lifetime hard cap, as an
  unprivileged process cannot raise a hard limit again (and prlimit on another uid is not
  reliably permitted even to root).
  """
  ru = resource.getrusage(resource.RUSAGE_SELF)
  soft = int(ru.ru_utime + ru.ru_stime) + 1 + cpu_s
  hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
  if not persist:
    hard = soft + 1 if hard == resource.RLIM_INFINITY else min(hard, soft + 1)
  try:
    resource.setrlimit(resource.RLIMIT_CPU, (min(soft, hard), hard))
  except (ValueError, OSError):
    pass


def _serve_cells(cpu_s: int) -> None:
  """H's loop: one framed request per cell on fd 3, one JSON line per result on fd 4."""
  import builtins
  main = types.ModuleType("__main__")
  main.__dict__["__builtins__"] = builtins
  sys.modules["__main__"] = main
  me, n = os.getpid(), 0
  while True:
    try:
      req = _recv(3)
    except Exception:  # noqa: BLE001
      req = None
    if req is None:
      os._exit(0)
    _restore_stdio()
    _Stdout.wrote = False
    _arm_cpu(cpu_s, bool(req.get("persist")))
    n += 1  # later cells of a session get their own name, so tracebacks quote the right source
    ok, error = _exec_cell(req["code"], main.__dict__, "<code>" if n == 1 else f"<code-{n}>")
    for stream in (sys.stdout, sys.stderr):
      try:
        stream.flush()
      except Exception:  # noqa: BLE001
        pass
    if os.getpid() != me:  # a process the cell forked fell off the end of the code: just exit
      os._exit(0 if ok else 1)
    _report(4, {"ok": ok, "error": error})
    if not req.get("persist"):
      os._exit(0)


def _exec_cell(source: str, ns: dict, name: str) -> tuple[bool, str | None]:
  import linecache
  try:
    tree = ast.parse(source, name, "exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
      last = ast.Expression(tree.body.pop().value)
    linecache.cache[name] = (len(source), None, source.splitlines(True), name)
    exec(compile(tree, name, "exec", dont_inherit=True), ns)
    if last is not None:
      value = eval(compile(last, name, "eval", dont_inherit=True), ns)
      if value is not None and not _Stdout.wrote:
        print(repr(value))
    return True, None
  except SystemExit as e:
    if e.code is None or e.code == 0:
      return True, None
    return False, f"SystemExit: {e.code}"[:300]
  except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt, MemoryError etc. are the cell's
    return False, _print_exception(e)


def _print_exception(e: BaseException) -> str:
  """Prints the traceback without sandbox frames; returns its last line."""
  try:
    tb = e.__traceback__
    while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<code"):
      tb = tb.tb_next
    lines = traceback.format_exception(type(e), e, tb)
    sys.stderr.write("".join(lines))
    return lines[-1].strip()[:300]
  except BaseException:  # noqa: BLE001 - e.g. MemoryError while formatting
    return type(e).__name__


# --------------------------------------------------------------------------------------------
# Worker entry point.


def _worker_main(cfg: dict) -> None:
  """Supervisor entry point, run by `_BOOT` in a fresh `python -I` with a clean environment."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  for p in cfg["extra_paths"]:
    if p not in sys.path:
      sys.path.append(p)
  feats = _isolate_supervisor(cfg)
  if "pid_ns" not in cfg["disable"]:
    try:
      _sys("unshare", _CLONE_NEWPID)
      pid = os.fork()
    except OSError:
      pid = -1
    if pid > 0:  # outer: stays only to be the host's handle; killing it kills everything
      null = os.open(os.devnull, os.O_RDWR)
      for fd in (0, 1):
        os.dup2(null, fd)
      while True:
        try:
          _, status = os.waitpid(pid, 0)
          break
        except InterruptedError:
          continue
      os._exit(max(os.waitstatus_to_exitcode(status), 0))
    if pid == 0:
      _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
      feats["supervisor_pid_ns"] = feats["pid_ns"] = True
  preimported = []
  for name in cfg["preimport"]:
    try:
      __import__(name)
      preimported.append(name)
    except Exception:  # noqa: BLE001 - a missing optional library is not fatal
      pass
  feats["preimported"] = preimported
  import gc
  gc.collect()
  gc.freeze()  # fewer copy-on-write faults in forked cells
  _Supervisor(cfg, feats).serve()


# The supervisor's first stdin message carries this module's source and the configuration (kept
# off the command line, so out of `ps`).
_BOOT = (
  "import json, os, struct, sys, types\n"
  "def read(n):\n"
  "  buf = b''\n"
  "  while len(buf) < n:\n"
  "    chunk = os.read(0, n - len(buf))\n"
  "    if not chunk:\n"
  "      sys.exit(0)\n"
  "    buf += chunk\n"
  "  return buf\n"
  "msg = json.loads(read(struct.unpack('>I', read(4))[0]))\n"
  f"mod = types.ModuleType({_WORKER_MODULE!r})\n"
  "mod.__file__ = msg['path']\n"
  "sys.modules[mod.__name__] = mod\n"
  "exec(compile(msg['source'], msg['path'], 'exec'), mod.__dict__)\n"
  "mod._worker_main(msg['cfg'])\n"
)


# --------------------------------------------------------------------------------------------
# Host side.


class _WorkerError(RuntimeError):
  """The supervisor died, hung or spoke garbage: the host replaces it."""


class _Worker:
  """The host's handle on one supervisor process (one call at a time)."""

  def __init__(self, argv: list[str], env: dict[str, str], cfg: dict, debug: bool):
    self.argv, self.env, self.cfg, self.debug = argv, env, cfg, debug
    self.proc: subprocess.Popen | None = None
    self.features: dict | None = None
    self.busy = False
    self.sessions: set[str] = set()
    self.pending_close: list[str] = []

  def start(self) -> None:
    self.proc = subprocess.Popen(
      self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
      stderr=None if self.debug else subprocess.DEVNULL, env=self.env, cwd="/",
      start_new_session=True, close_fds=True)
    self.features = None
    try:
      boot = {"source": _SOURCE, "path": os.path.abspath(__file__), "cfg": self.cfg}
      _send(self.proc.stdin.fileno(), boot, time.monotonic() + 10.0)
    except (OSError, TimeoutError):
      pass  # it died at once; ensure_ready reports that

  def ensure_ready(self) -> dict:
    if self.proc is None or self.proc.poll() is not None:
      self.start()
    if self.features is None:
      try:
        msg = _recv(self.proc.stdout.fileno(), time.monotonic() + _READY_TIMEOUT_S)
      except (OSError, ValueError, TimeoutError) as e:
        raise _WorkerError(f"supervisor did not start: {e}") from e
      if not msg or msg.get("op") != "ready":
        raise _WorkerError("supervisor exited during start-up")
      self.features = msg["features"]
      if msg.get("error"):
        self.features["startup_error"] = msg["error"]
      if self.features.get("warning"):
        warnings.warn(f"python sandbox: {self.features['warning']}", RuntimeWarning, stacklevel=3)
    return self.features

  def request(self, msg: dict, timeout: float) -> dict:
    self.ensure_ready()
    deadline = time.monotonic() + timeout
    try:
      _send(self.proc.stdin.fileno(), msg, deadline)
      reply = _recv(self.proc.stdout.fileno(), deadline)
    except (OSError, ValueError, TimeoutError) as e:
      raise _WorkerError(f"{type(e).__name__}: {e}") from e
    if reply is None:
      raise _WorkerError("supervisor exited")
    return reply

  def kill(self) -> None:
    _stop(self.proc, graceful=False)
    self.proc, self.features = None, None
    self.sessions.clear()
    self.pending_close.clear()


def _stop(proc: subprocess.Popen | None, graceful: bool = True) -> None:
  if proc is None or proc.poll() is not None:
    return
  try:
    if graceful:  # end of stdin: the supervisor kills its cells and exits
      proc.stdin.close()
      try:
        proc.wait(timeout=2.0)
        return
      except subprocess.TimeoutExpired:
        pass
    proc.kill()
    proc.wait(timeout=5.0)
  except (OSError, subprocess.TimeoutExpired):
    pass
  finally:
    for f in (proc.stdin, proc.stdout):
      try:
        f.close()
      except (OSError, ValueError):
        pass


def _shutdown(workers: list[_Worker]) -> None:
  for w in workers:
    _stop(w.proc)


def _clean_env() -> dict[str, str]:
  """The only environment the sandbox sees: nothing from the host (no tokens, no proxies)."""
  path = [os.path.dirname(sys.executable), "/usr/local/sbin", "/usr/local/bin", "/usr/sbin",
          "/usr/bin", "/sbin", "/bin"]
  threads = {k: "1" for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                              "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")}
  return {"PATH": ":".join(dict.fromkeys(path)), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
          "HOME": "/tmp", "TMPDIR": "/tmp", "MPLBACKEND": "Agg", **threads}


def _strip_fences(text: str) -> str:
  """Code as the model wrote it, minus a Markdown fence and a common indent."""
  m = re.match(r"^\s*```[\w+.-]*[^\n]*\n(.*?)\n?[ \t]*```\s*$", text, re.S)
  return textwrap.dedent(m.group(1) if m else text).strip("\n")


class PythonSandbox:
  """Runs Python code in isolated, resource-limited processes from a pool of warm workers.

  `memory_mb` is the address space a cell may add on top of the worker's (the pre-imported
  libraries), so the budget does not shrink when `preimport` grows. `max_procs` bounds processes
  and threads of one cell. `session=<id>` keeps globals between calls when `persistent`.
  `disable` turns off isolation layers by name (see `LAYERS`), for tests and odd hosts.
  Thread-safe: at most `workers` cells run at once; other callers wait.
  """

  name = "code"

  def __init__(self, timeout_s: float = 5.0, cpu_s: int = 5, memory_mb: int = 1024,
               max_file_mb: int = 16, max_procs: int = 64, max_output_chars: int = 2000,
               workers: int = 2, persistent: bool = True,
               preimport: Sequence[str] = ("math", "fractions", "itertools", "numpy",
                                           "numpy.random", "sympy"),
               *, session_idle_s: float = 600.0, max_sessions: int = 128, scratch_mb: int = 64,
               disable: Sequence[str] = (), debug: bool = False):
    for k, v in dict(timeout_s=timeout_s, cpu_s=cpu_s, memory_mb=memory_mb, max_file_mb=max_file_mb,
                     max_procs=max_procs, max_output_chars=max_output_chars, workers=workers,
                     max_sessions=max_sessions, scratch_mb=scratch_mb).items():
      if not v > 0:
        raise ValueError(f"{k} must be positive, got {v!r}")
    unknown = set(disable) - set(LAYERS)
    if unknown:
      raise ValueError(f"unknown isolation layers {sorted(unknown)}; known: {LAYERS}")
    self.timeout_s, self.cpu_s, self.memory_mb = float(timeout_s), int(cpu_s), int(memory_mb)
    self.max_output_chars, self.persistent = int(max_output_chars), bool(persistent)
    self.session_idle_s, self.max_sessions = float(session_idle_s), int(max_sessions)
    keep = [sys.prefix, sys.base_prefix, os.path.dirname(sys.executable), *filter(None, sys.path)]
    cfg = dict(timeout_s=self.timeout_s, cpu_s=self.cpu_s, memory_mb=self.memory_mb,
               max_file_mb=int(max_file_mb), max_procs=int(max_procs),
               max_output_chars=self.max_output_chars, scratch_mb=int(scratch_mb),
               preimport=list(preimport), disable=list(disable), env=_clean_env(),
               extra_paths=[p for p in sys.path if "-packages" in p], keep_paths=keep,
               host_home=os.path.expanduser("~"))
    argv = [sys.executable, "-I", "-B", "-c", _BOOT]
    self._workers = [_Worker(argv, _clean_env(), cfg, debug) for _ in range(int(workers))]
    for w in self._workers:
      w.start()  # warm up in the background while the caller does other work
    self._cv = threading.Condition()
    self._sessions: collections.OrderedDict[str, _Worker] = collections.OrderedDict()
    self._last_used: dict[str, float] = {}
    self._lost: collections.OrderedDict[str, None] = collections.OrderedDict()
    self._closed = False
    self._finalizer = weakref.finalize(self, _shutdown, list(self._workers))

  # -- public API --------------------------------------------------------------------------

  @property
  def isolation(self) -> dict:
    """Which isolation layers are active (waits for the first worker to start)."""
    w = self._acquire(None)
    try:
      return dict(w.ensure_ready())
    finally:
      self._release(w)

  def __call__(self, text: str, *, session: str | None = None) -> ToolResult:
    t0 = time.perf_counter()
    try:
      return self._run(text, session, t0)
    except Exception as e:  # noqa: BLE001 - a tool never raises into the rollout loop
      err = f"{type(e).__name__}: {e}"[:300]
      return ToolResult(f"Error: the code tool failed ({err})", ok=False,
                        elapsed_s=time.perf_counter() - t0, error=err)

  def close_session(self, session: str) -> None:
    """Frees a session's process (delivered with that worker's next request). Never raises."""
    with self._cv:
      self._lost.pop(session, None)
      if session in self._sessions:
        self._forget(session, lost=False)

  def close(self) -> None:
    """Stops all workers; the sandbox cannot be used afterwards."""
    with self._cv:
      self._closed = True
    self._finalizer()

  def __enter__(self) -> PythonSandbox:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  # -- internals ---------------------------------------------------------------------------

  def _run(self, text: str, session: str | None, t0: float) -> ToolResult:
    code = _strip_fences(text or "")
    if not code.strip():
      return ToolResult("Error: empty code block.", ok=False, elapsed_s=time.perf_counter() - t0,
                        error="empty code block")
    sid = session if self.persistent and session is not None else None
    w = self._acquire(sid)
    try:
      closes, w.pending_close = w.pending_close, []
      try:
        reply = w.request({"op": "run", "code": code, "session": sid, "close": closes},
                          timeout=self.timeout_s + 30.0)
      except _WorkerError as e:
        self._restart(w)
        with self._cv:
          self._lost.pop(sid, None)  # told below; no second note on the next call
        err = f"sandbox worker failed ({e}); it was restarted"
        out = f"Error: {err}" + (f"\n{_RESET_NOTE}" if sid is not None else "")
        return ToolResult(out, ok=False, elapsed_s=time.perf_counter() - t0, error=err[:300])
    finally:
      self._release(w)
    return self._result(reply, sid, t0)

  def _result(self, reply: dict, sid: str | None, t0: float) -> ToolResult:
    text = reply["head"] + reply["tail"]
    out = truncate_middle(text, self.max_output_chars, elided=int(reply["dropped"]))
    ok, error = bool(reply["ok"]), reply.get("error")
    if reply.get("append_error") and error:
      out += ("" if not out or out.endswith("\n") else "\n") + error
    note = False
    if sid is not None:
      with self._cv:
        note = bool(reply.get("reset_before") or reply.get("reset_after"))
        if reply.get("new_session"):
          note = note or sid in self._lost
          self._lost.pop(sid, None)
        if reply.get("reset_after") and sid in self._sessions:
          self._forget(sid, lost=False)  # the note goes out now, not again on the next call
    if note:
      out += ("" if not out or out.endswith("\n") else "\n") + _RESET_NOTE
    return ToolResult(out, ok=ok, elapsed_s=time.perf_counter() - t0,
                      error=None if ok else (error or "failed"))

  def _acquire(self, sid: str | None) -> _Worker:
    with self._cv:
      while True:
        if self._closed:
          raise RuntimeError("the sandbox is closed")
        self._expire(time.monotonic())
        if sid is not None and sid in self._sessions:
          w = self._sessions[sid]
          if not w.busy:
            break
        else:
          idle = [w for w in self._workers if not w.busy]
          if idle:
            w = min(idle, key=lambda w: len(w.sessions))
            if sid is not None:
              self._sessions[sid] = w
              w.sessions.add(sid)
              while len(self._sessions) > self.max_sessions:
                self._forget(next(iter(self._sessions)), lost=True)
            break
        self._cv.wait()
      w.busy = True
      if sid is not None:
        self._sessions.move_to_end(sid)
        self._last_used[sid] = time.monotonic()
      return w

  def _release(self, w: _Worker) -> None:
    with self._cv:
      w.busy = False
      self._cv.notify_all()

  def _forget(self, sid: str, lost: bool) -> None:
    w = self._sessions.pop(sid)
    self._last_used.pop(sid, None)
    w.sessions.discard(sid)
    w.pending_close.append(sid)
    if lost:
      self._lost[sid] = None
      while len(self._lost) > 4096:
        self._lost.popitem(last=False)

  def _expire(self, now: float) -> None:
    for sid in [s for s, t in self._last_used.items() if now - t > self.session_idle_s]:
      if not self._sessions[sid].busy:
        self._forget(sid, lost=True)

  def _restart(self, w: _Worker) -> None:
    with self._cv:
      for sid in list(w.sessions):
        self._forget(sid, lost=True)
    w.kill()
    if not self._closed:
      try:
        w.start()
      except OSError:
        pass


_RESET_NOTE = "[note: the session was reset; variables from earlier calls are gone]"


def main(argv: Sequence[str] | None = None) -> int:
  """CLI: run FILE in the sandbox and print exactly one JSON object."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("file", help="Python file to run ('-' for stdin)")
  p.add_argument("--timeout", type=float, default=5.0, help="wall-clock limit in seconds")
  p.add_argument("--memory-mb", type=int, default=1024)
  p.add_argument("--max-output-chars", type=int, default=2000)
  args = p.parse_args(argv)
  code = sys.stdin.read() if args.file == "-" else open(args.file, encoding="utf-8").read()
  with PythonSandbox(timeout_s=args.timeout, cpu_s=max(int(args.timeout), 1),
                     memory_mb=args.memory_mb, max_output_chars=args.max_output_chars,
                     workers=1, persistent=False) as sandbox:
    r = sandbox(code)
  print(json.dumps({"ok": r.ok, "output": r.output, "error": r.error,
                    "elapsed_s": round(r.elapsed_s, 4)}))
  return 0


if __name__ == "autotraj_jax.tir.sandbox":
  register_tool("code", PythonSandbox)

if __name__ == "__main__":
  sys.exit(main())
