"""Supervisor entry point. Standard library only, like every module it imports.

The host does not import this package in the supervisor: it sends the sources of `BUNDLE` over
stdin and a small boot script runs them as the package `_autotraj_sandbox`, so a long-running
host that restarts a supervisor never mixes its protocol with a newer version of these files.
"""

from __future__ import annotations

import os
import signal
import sys

from .framing import _send
from .isolate import _isolate_supervisor
from .kernel import _CLONE_NEWPID, _PR_SET_PDEATHSIG, _prctl, _sys
from .supervisor import _Supervisor

BUNDLE = ("kernel", "framing", "isolate", "cell", "supervisor", "worker")  # dependency order
PACKAGE = "_autotraj_sandbox"

# Run by `python -I -B -c BOOT`: the first stdin frame carries every module of `BUNDLE` and the
# configuration (kept off the command line, so out of `ps`).
BOOT = (
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
  f"pkg = types.ModuleType({PACKAGE!r})\n"
  "pkg.__path__ = []\n"
  "sys.modules[pkg.__name__] = pkg\n"
  "for name, path, source in msg['modules']:\n"
  "  mod = types.ModuleType(pkg.__name__ + '.' + name)\n"
  "  mod.__file__, mod.__package__ = path, pkg.__name__\n"
  "  sys.modules[mod.__name__] = mod\n"
  "  setattr(pkg, name, mod)\n"
  "  exec(compile(source, path, 'exec'), mod.__dict__)\n"
  "pkg.worker.worker_main(msg['cfg'])\n"
)


def worker_main(cfg: dict) -> None:
  """Supervisor entry point, run by `BOOT` in a fresh `python -I` with a clean environment."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  for p in cfg["extra_paths"]:
    if p not in sys.path:
      sys.path.append(p)
  feats = _isolate_supervisor(cfg)
  if "pid_ns" not in cfg["disable"]:
    _enter_pid_namespace(feats)
  error = _preimport(cfg["preimport"])
  if error:  # fatal: every cell would fail at `import numpy` with a misleading message
    _send(1, {"op": "ready", "features": feats, "fatal": error})
    sys.exit(1)
  feats["preimported"] = list(cfg["preimport"])
  import gc
  gc.collect()
  gc.freeze()  # fewer copy-on-write faults in forked cells
  _Supervisor(cfg, feats).serve()


def _enter_pid_namespace(feats: dict) -> None:
  """Makes the rest of the supervisor pid 1 of a new PID namespace; its parent only waits.

  Killing the parent (the host's handle) then kills the supervisor and every cell below it.
  """
  try:
    _sys("unshare", _CLONE_NEWPID)
    pid = os.fork()
  except OSError:
    return
  if pid == 0:
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    feats["supervisor_pid_ns"] = feats["pid_ns"] = True
    return
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


def _preimport(names: list[str]) -> str | None:
  """Imports `names` (inherited by every forked cell); the first failure as one line, or None."""
  for name in names:
    try:
      __import__(name)
    except BaseException as e:  # noqa: BLE001 - reported to the host, which refuses to run code
      where = ", ".join(p for p in sys.path if p) or "(empty)"
      return (f"the sandbox could not pre-import {name!r} ({type(e).__name__}: {e}); "
              f"sys.path inside the sandbox: {where}")[:2000]
  return None
