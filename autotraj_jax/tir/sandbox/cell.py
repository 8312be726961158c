"""Cell side: reaper G (pid 1 of the cell's namespace) and the process H that runs the code.

Standard library only: this module runs inside the sandbox's supervisor and its cells.
"""

from __future__ import annotations

import ast
import io
import os
import resource
import signal
import sys
import tempfile
import traceback
import types

from .framing import _recv, _report
from .kernel import (
  _CLONE_NEWNS,
  _CLONE_NEWUSER,
  _MS_NODEV,
  _MS_NOEXEC,
  _MS_NOSUID,
  _PR_SET_DUMPABLE,
  _PR_SET_NO_NEW_PRIVS,
  _PR_SET_PDEATHSIG,
  _SESSION_CPU_FACTOR,
  _UID_BASE,
  _audit_guard,
  _install_seccomp,
  _mount_over,
  _nspids,
  _prctl,
  _sys,
  _try_mount,
)


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
      if not _mount_over("/tmp", size + ",mode=0700", _MS_NOSUID | _MS_NODEV, cfg["bind_paths"]):
        raise OSError("cannot mount the scratch tmpfs on /tmp")
      _mount_over("/dev/shm", size + ",mode=1777", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
                  cfg["bind_paths"])
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
