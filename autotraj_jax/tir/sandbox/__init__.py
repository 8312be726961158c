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

Interpreter paths: the prefixes, standard library, site-packages and `sys.path` entries are
bound read-only at their own paths even under /tmp or a home directory (a virtualenv in /tmp
works). A module in `preimport` that fails to import is a start-up error
(`SandboxStartupError`; every call then answers ok=False naming the module), never silence.

Fairness: callers wait in one queue and are served first in first out (a session's call waits
for the worker that holds its process).

Modules: `pool` (host side), `worker` (supervisor entry point) with `isolate`, `supervisor`,
`cell`, `kernel` and `framing`. The supervisor runs those sources, not this package: they use
the standard library only.

CLI: `python -m autotraj_jax.tir.sandbox FILE` prints one JSON object
`{"ok", "output", "error", "elapsed_s"}`, also when FILE cannot be read (then ok=false, exit 2).
"""

from __future__ import annotations

from collections.abc import Sequence

from autotraj_jax.tir.sandbox.kernel import LAYERS
from autotraj_jax.tir.sandbox.pool import (
  PythonSandbox,
  SandboxStartupError,
  interpreter_paths,
)
from autotraj_jax.tir.tools import register_tool

__all__ = ["LAYERS", "PythonSandbox", "SandboxStartupError", "interpreter_paths", "main"]


def main(argv: Sequence[str] | None = None) -> int:
  """CLI: run FILE in the sandbox and print exactly one JSON object (see `__main__`)."""
  from autotraj_jax.tir.sandbox import __main__ as cli  # not at import time: `-m` runs it fresh
  return cli.main(argv)


register_tool("code", PythonSandbox)
