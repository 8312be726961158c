"""Host side of the sandbox: a pool of supervisor processes, served first in first out."""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import sysconfig
import textwrap
import threading
import time
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

from autotraj_jax.tir.sandbox.framing import _recv, _send
from autotraj_jax.tir.sandbox.kernel import LAYERS
from autotraj_jax.tir.sandbox.worker import BOOT, BUNDLE
from autotraj_jax.tir.tools import ToolResult, truncate_middle

_READY_TIMEOUT_S = 120.0  # first start imports numpy/sympy on a busy 2-core box


def _read_bundle() -> list[tuple[str, str, str]]:
  """(name, path, source) of each supervisor module, read once, when the host imports this."""
  here = os.path.dirname(os.path.abspath(__file__))
  out = []
  for name in BUNDLE:
    path = os.path.join(here, f"{name}.py")
    with open(path, encoding="utf-8") as f:
      out.append((name, path, f.read()))
  return out


_SOURCES = _read_bundle()


class SandboxStartupError(RuntimeError):
  """The sandbox cannot run code as configured (e.g. numpy is not importable inside it).

  Not retried: restarting the supervisor would fail the same way on every call.
  """


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
    self.fatal: str | None = None  # a start-up failure that a restart would repeat

  def start(self) -> None:
    if self.fatal is not None:
      return
    self.proc = subprocess.Popen(
      self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
      stderr=None if self.debug else subprocess.DEVNULL, env=self.env, cwd="/",
      start_new_session=True, close_fds=True)
    self.features = None
    try:
      boot = {"modules": _SOURCES, "cfg": self.cfg}
      _send(self.proc.stdin.fileno(), boot, time.monotonic() + 10.0)
    except (OSError, TimeoutError):
      pass  # it died at once; ensure_ready reports that

  def ensure_ready(self) -> dict:
    if self.fatal is not None:
      raise SandboxStartupError(self.fatal)
    if self.proc is None or self.proc.poll() is not None:
      self.start()
    if self.features is None:
      try:
        msg = _recv(self.proc.stdout.fileno(), time.monotonic() + _READY_TIMEOUT_S)
      except (OSError, ValueError, TimeoutError) as e:
        raise _WorkerError(f"supervisor did not start: {e}") from e
      if not msg or msg.get("op") != "ready":
        raise _WorkerError("supervisor exited during start-up")
      if msg.get("fatal"):
        self.fatal = str(msg["fatal"])
        _stop(self.proc, graceful=False)
        self.proc = None
        raise SandboxStartupError(self.fatal)
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


class _Waiter:
  """One caller in the pool's queue; `worker` is set when a worker is handed to it."""

  __slots__ = ("sid", "worker")

  def __init__(self, sid: str | None):
    self.sid, self.worker = sid, None


def interpreter_paths() -> list[str]:
  """Directories the sandbox must show at their own paths for this interpreter to work.

  The prefixes, the executable, the standard library, site-packages and `sys.path`, wherever
  they live (a virtualenv under /tmp, a pyenv under /root): the supervisor covers /tmp and home
  directories with empty mounts and binds these back read-only. Outermost directories only.
  """
  found = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
           os.path.dirname(sys.executable), os.path.dirname(os.path.realpath(sys.executable))]
  found += [sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")]
  found += [p for p in sys.path if p]
  dirs = set()
  for p in found:
    p = os.path.realpath(p)
    p = p if os.path.isdir(p) else os.path.dirname(p)
    if p not in ("", "/") and os.path.isdir(p):
      dirs.add(p)
  ordered = sorted(dirs)
  return [p for j, p in enumerate(ordered) if not any(p.startswith(q + "/") for q in ordered[:j])]


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
    cfg = dict(timeout_s=self.timeout_s, cpu_s=self.cpu_s, memory_mb=self.memory_mb,
               max_file_mb=int(max_file_mb), max_procs=int(max_procs),
               max_output_chars=self.max_output_chars, scratch_mb=int(scratch_mb),
               preimport=list(preimport), disable=list(disable), env=_clean_env(),
               extra_paths=[p for p in sys.path if "-packages" in p], bind_paths=interpreter_paths(),
               host_home=os.path.expanduser("~"))
    argv = [sys.executable, "-I", "-B", "-c", BOOT]
    self._workers = [_Worker(argv, _clean_env(), cfg, debug) for _ in range(int(workers))]
    for w in self._workers:
      w.start()  # warm up in the background while the caller does other work
    self._cv = threading.Condition(threading.RLock())
    self._queue: collections.deque[_Waiter] = collections.deque()  # first in, first served
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
    except SandboxStartupError as e:  # the whole message: it says what to install or change
      return ToolResult(f"Error: the code tool cannot start: {e}", ok=False,
                        elapsed_s=time.perf_counter() - t0, error=f"SandboxStartupError: {e}")
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
      self._cv.notify_all()  # queued callers see the closed sandbox and give up
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
    """Waits for a worker; waiters are served in arrival order (a session waits for its own)."""
    me = _Waiter(sid)
    with self._cv:
      self._queue.append(me)
      try:
        while me.worker is None:
          if self._closed:
            raise RuntimeError("the sandbox is closed")
          self._dispatch()
          if me.worker is None:
            self._cv.wait()
      except BaseException:
        if me.worker is not None:
          self._release(me.worker)
        elif me in self._queue:
          self._queue.remove(me)
        raise
      return me.worker

  def _dispatch(self) -> None:
    """Hands idle workers to waiters, oldest first. Caller holds `_cv`."""
    now = time.monotonic()
    self._expire(now)
    handed = False
    for waiter in list(self._queue):
      w = self._pick(waiter.sid)
      if w is None:
        continue
      self._queue.remove(waiter)
      w.busy, waiter.worker, handed = True, w, True
      if waiter.sid is not None:
        self._sessions.move_to_end(waiter.sid)
        self._last_used[waiter.sid] = now
    if handed:
      self._cv.notify_all()

  def _pick(self, sid: str | None) -> _Worker | None:
    """The worker `sid` must use if it is idle (pinning a new session to the least loaded)."""
    if sid is not None and sid in self._sessions:
      w = self._sessions[sid]
      return None if w.busy else w
    idle = [w for w in self._workers if not w.busy]
    if not idle:
      return None
    w = min(idle, key=lambda w: len(w.sessions))
    if sid is not None:
      self._sessions[sid] = w
      w.sessions.add(sid)
      while len(self._sessions) > self.max_sessions:
        self._forget(next(iter(self._sessions)), lost=True)
    return w

  def _release(self, w: _Worker) -> None:
    with self._cv:
      w.busy = False
      self._dispatch()

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
