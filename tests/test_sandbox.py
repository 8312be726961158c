"""The python tool under hostile programs: each is contained, and the host and the next call are fine.

Every cell runs in its own PID namespace below a supervisor that is itself pid 1 of another one,
so a fork bomb cannot reach the machine; `test_isolation_layers` fails loudly where a layer is
missing, and tests that need a layer skip without it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from autotraj_jax.tir.sandbox import LAYERS, PythonSandbox, SandboxStartupError
from autotraj_jax.tir.tools import ToolResult, make_tool

SECRET = "autotraj-sandbox-secret-7f3a9"
os.environ["AUTOTRAJ_SANDBOX_TEST_SECRET"] = SECRET  # set before any sandbox starts
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def sb():
  with PythonSandbox(timeout_s=TIMEOUT_S, cpu_s=3, memory_mb=512, max_procs=32,
                     max_output_chars=2000, workers=2) as sandbox:
    yield sandbox


@pytest.fixture(scope="module")
def layers(sb):
  return sb.isolation


def _need(layers: dict, *names: str) -> None:
  missing = [n for n in names if not layers.get(n)]
  if missing:
    pytest.skip(f"isolation layer(s) unavailable here: {missing}")


def _nprocs() -> int:
  """Processes on the machine (other jobs share it, so bounds on this are loose)."""
  return sum(name.isdigit() for name in os.listdir("/proc"))


def _our_procs() -> int:
  """Processes descending from this test process: the sandbox's supervisors and cells."""
  parent = {}
  for name in os.listdir("/proc"):
    if name.isdigit():
      try:
        with open(f"/proc/{name}/stat") as f:
          parent[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
      except (OSError, ValueError, IndexError):
        pass
  me, count = os.getpid(), 0
  for pid in parent:
    seen = 0
    while pid in parent and pid != me and seen < 64:
      pid, seen = parent[pid], seen + 1
    count += pid == me and seen > 0
  return count


def _limit_hit(r: ToolResult) -> bool:
  """Stopped by the wall clock or, when the machine is idle enough, by the CPU limit."""
  return not r.ok and ("TimeoutError" in r.error or "CPU time limit" in r.error)


def _healthy(sb: PythonSandbox) -> None:
  """The host is alive (we are running) and a normal call still works."""
  r = sb("print(sum(range(10)))")
  assert r.ok and r.output == "45\n", r


# ---------------------------------------------------------------------------------------------
# Normal behaviour.


def test_isolation_layers(layers):
  assert set(LAYERS) <= set(layers)
  if os.geteuid() == 0 and sys.platform == "linux":
    for name in ("uid_drop", "mount_ns", "net_ns", "pid_ns", "seccomp", "readonly_fs", "proc"):
      assert layers[name], (name, layers)
  assert {"numpy", "sympy"} <= set(layers["preimported"])


def test_print_ok(sb):
  r = sb("print('hello'); print(2 + 3)")
  assert isinstance(r, ToolResult)
  assert r.ok and r.error is None and r.output == "hello\n5\n"
  assert r.elapsed_s > 0


def test_exception_gives_short_error_and_user_traceback(sb):
  r = sb("x = 1\ny = x / 0\n")
  assert not r.ok
  assert r.error == "ZeroDivisionError: division by zero"
  assert 'File "<code>", line 2' in r.output and "y = x / 0" in r.output
  assert "sandbox.py" not in r.output


def test_syntax_error(sb):
  r = sb("def f(:\n  pass")
  assert not r.ok and r.error.startswith("SyntaxError")


def test_final_expression_is_displayed_only_if_nothing_else_was_printed(sb):
  assert sb("x = 6 * 7\nx").output == "42\n"
  assert sb("print('a')\n5").output == "a\n"
  assert sb("None").output == ""


def test_markdown_fence_is_stripped(sb):
  assert sb("```python\nprint('fenced')\n```").output == "fenced\n"


def test_empty_code(sb):
  r = sb("   \n")
  assert not r.ok and r.error == "empty code block"


def test_numpy_and_sympy(sb):
  r = sb("import numpy as np\na = np.ones((200, 200))\nprint((a @ a)[0, 0])\n"
         "import sympy as sp\nx = sp.symbols('x')\nprint(sp.solve(x**2 - 4, x))")
  assert r.ok, r
  assert r.output == "200.0\n[-2, 2]\n"


def test_session_keeps_globals_and_isolates_sessions(sb):
  assert sb("secret_value = 41", session="s-a").ok
  r = sb("print(secret_value + 1)", session="s-a")
  assert r.ok and r.output == "42\n"
  other = sb("print(secret_value)", session="s-b")
  assert not other.ok and "NameError" in other.error
  assert not sb("print(secret_value)").ok  # calls without a session start fresh
  sb.close_session("s-a")
  again = sb("print(secret_value)", session="s-a")
  assert not again.ok and "reset" not in again.output  # explicitly closed: fresh, no note
  sb.close_session("s-a")
  sb.close_session("s-b")
  sb.close_session("never-used")  # unknown ids are a no-op


def test_session_files_persist_in_scratch(sb):
  assert sb("open('notes.txt', 'w').write('kept')", session="files").ok
  assert sb("print(open('notes.txt').read())", session="files").output == "kept\n"
  assert sb("import os; print(os.path.exists('notes.txt'))").output == "False\n"
  sb.close_session("files")


def test_session_timeout_resets_state_with_a_note(sb):
  assert sb("v = 1", session="slow").ok
  r = sb("while True: pass", session="slow")
  assert _limit_hit(r) and "session was reset" in r.output
  r = sb("print(v)", session="slow")
  assert not r.ok and "NameError" in r.error
  assert sb("print('alive')", session="slow").output == "alive\n"
  sb.close_session("slow")


def test_session_eviction_and_idle_expiry():
  with PythonSandbox(workers=1, max_sessions=2, session_idle_s=0.5, preimport=("math",)) as sb:
    for sid in ("a", "b", "c"):  # "a" is the least recently used when "c" arrives
      assert sb(f"v = '{sid}'", session=sid).ok
    r = sb("print(v)", session="a")
    assert not r.ok and "session was reset" in r.output and "NameError" in r.output
    assert sb("print(v)", session="c").output == "c\n"
    time.sleep(0.7)
    r = sb("print(v)", session="c")
    assert not r.ok and "session was reset" in r.output


def test_warm_trivial_call_latency(sb):
  sb("pass")
  times = []
  for _ in range(7):
    r = sb("print(1 + 1)")
    assert r.ok
    times.append(r.elapsed_s)
  assert sorted(times)[3] < 1.0, times  # typically a few milliseconds


def test_concurrent_calls(sb):
  results = [None] * 6

  def work(i):
    results[i] = sb(f"import time; time.sleep(0.2); print({i} * {i})")

  threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert [r.output for r in results] == [f"{i * i}\n" for i in range(6)]


def test_random_state_differs_between_calls(sb):
  code = "import random, numpy as np; print(random.random(), np.random.rand())"
  assert sb(code).output != sb(code).output


def test_registry_and_cli(tmp_path):
  tool = make_tool("code", workers=1, preimport=(), timeout_s=10.0)
  try:
    assert tool.name == "code" and tool("print('via registry')").output == "via registry\n"
    r = tool("import numpy\nprint(numpy.ones(3).sum())")  # importing numpy fits the default memory
    assert r.ok and r.output == "3.0\n", r
  finally:
    tool.close()
  path = tmp_path / "prog.py"
  path.write_text("print('from cli')\n")
  proc = subprocess.run([sys.executable, "-m", "autotraj_jax.tir.sandbox", str(path)],
                        capture_output=True, text=True, timeout=120, cwd=REPO)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 1
  out = json.loads(lines[0])
  assert set(out) == {"ok", "output", "error", "elapsed_s"}
  assert out["ok"] and out["output"] == "from cli\n"


# ---------------------------------------------------------------------------------------------
# Hostile programs.


def test_infinite_loop_times_out(sb):
  t = time.perf_counter()
  r = sb("while True:\n  pass")
  assert _limit_hit(r), r
  assert time.perf_counter() - t < TIMEOUT_S + 3
  _healthy(sb)


def test_cpu_limit_with_threads(sb):
  r = sb("import threading\ndef burn():\n  while True: pass\n"
         "for _ in range(4):\n  threading.Thread(target=burn, daemon=True).start()\nburn()")
  assert _limit_hit(r), r
  _healthy(sb)


def test_sleep_past_timeout(sb):
  r = sb("import time; print('before', flush=True); time.sleep(60)")
  assert not r.ok and "TimeoutError" in r.error and r.output.startswith("before\n")
  _healthy(sb)


def _peak_procs_during(fn, count=_our_procs):
  """Runs fn() while sampling a process count; returns (result, before, peak)."""
  before = count()
  peak = [before]
  stop = threading.Event()

  def sample():
    while not stop.is_set():
      peak[0] = max(peak[0], count())
      time.sleep(0.02)

  sampler = threading.Thread(target=sample)
  sampler.start()
  try:
    return fn(), before, peak[0]
  finally:
    stop.set()
    sampler.join()


def _need_nproc(layers: dict) -> None:
  if not (layers.get("uid_drop") or layers.get("userns")):
    pytest.skip("RLIMIT_NPROC is not enforced without a uid drop or a user namespace")


@pytest.mark.parametrize("code", [
  "import os\nwhile True:\n  try:\n    os.fork()\n  except OSError:\n    pass\n",
  "import os\nwhile True:\n  os.fork()\n",
  "import subprocess, time\nsubprocess.run(['sh', '-c', 'b() { b | b & }; b'])\ntime.sleep(60)",
], ids=["fork-loop", "fork-until-error", "shell"])
def test_fork_bomb_is_bounded(sb, layers, code):
  _need(layers, "pid_ns")
  _need_nproc(layers)
  machine_before = _nprocs()
  r, before, peak = _peak_procs_during(lambda: sb(code))
  assert not r.ok
  assert peak - before <= 32 + 4, (before, peak)  # max_procs (+ the next spare cell)
  assert _nprocs() - machine_before < 500  # the machine did not fill up
  deadline = time.monotonic() + 5
  while _our_procs() - before > 2 and time.monotonic() < deadline:
    time.sleep(0.05)
  assert _our_procs() - before <= 2  # the bomb is gone (a new spare cell may have started)
  _healthy(sb)


def test_thread_bomb(sb):
  r = sb("import threading, time\n"
         "while True:\n  threading.Thread(target=time.sleep, args=(30,)).start()")
  assert not r.ok
  assert "can't start new thread" in r.error or "TimeoutError" in r.error or "limit" in r.error
  _healthy(sb)


def test_memory_bomb(sb):
  r = sb("xs = []\nwhile True:\n  xs.append(bytearray(50 * 2**20))")
  assert not r.ok and ("MemoryError" in r.error or "killed" in r.error or _limit_hit(r)), r
  r = sb("b = bytearray(8 * 2**30)")
  assert not r.ok and "MemoryError" in r.error
  _healthy(sb)


def test_huge_output_is_truncated(sb):
  r = sb("print('x' * 10**7)\nprint('END')")
  assert r.ok
  assert len(r.output) <= 2000 and "characters elided" in r.output and r.output.endswith("END\n")
  r = sb("while True:\n  print('spam ' * 200)")
  assert _limit_hit(r) and len(r.output) <= 2000 + 200, r
  _healthy(sb)


def test_writes_outside_scratch_do_not_reach_the_host(sb):
  probe = f"sandbox-probe-{os.getpid()}"
  targets = [f"/tmp/{probe}", f"/root/{probe}", os.path.join(REPO, probe), f"/var/tmp/{probe}",
             f"/dev/shm/{probe}", f"/etc/{probe}"]
  code = ("import os\n"
          f"for p in {targets!r}:\n"
          "  try:\n"
          "    open(p, 'w').write('x')\n"
          "    print('wrote', p)\n"
          "  except OSError as e:\n"
          "    print('denied', p, type(e).__name__)\n")
  r = sb(code)
  assert r.ok, r
  for p in targets:
    assert not os.path.exists(p), p
  assert "wrote /etc" not in r.output and f"wrote {REPO}" not in r.output
  _healthy(sb)


def test_host_files_cannot_be_deleted_or_changed(sb):
  d = tempfile.mkdtemp(dir="/var/tmp", prefix="sandbox-victim-")
  try:
    os.chmod(d, 0o777)
    victim = os.path.join(d, "keep.txt")
    with open(victim, "w") as f:
      f.write("precious")
    os.chmod(victim, 0o666)
    r = sb("import os, shutil\n"
           f"for f in (lambda: os.remove({victim!r}), lambda: open({victim!r}, 'w').write('gone'),\n"
           f"          lambda: shutil.rmtree({d!r})):\n"
           "  try:\n    f()\n  except OSError as e:\n    print(type(e).__name__)\n")
    assert r.ok, r
    with open(victim) as f:
      assert f.read() == "precious"
  finally:
    shutil.rmtree(d, ignore_errors=True)
  _healthy(sb)


def test_no_host_secrets_in_env_or_proc(sb):
  r = sb("import os, subprocess\n"
         "print(sorted(os.environ))\n"
         "print(open('/proc/self/environ', 'rb').read())\n"
         "try:\n  print(open('/proc/1/environ', 'rb').read())\nexcept OSError as e:\n  print(e)\n"
         "print(subprocess.run(['env'], capture_output=True, text=True).stdout)\n")
  assert r.ok, r
  assert SECRET not in r.output and "AUTOTRAJ_SANDBOX_TEST_SECRET" not in r.output
  r = sb("print(open('/etc/shadow').read())")
  assert not r.ok and "PermissionError" in r.error
  _healthy(sb)


def test_host_processes_are_invisible(sb, layers):
  _need(layers, "pid_ns", "proc")
  r = sb("import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))")
  assert r.ok and r.output == "[1, 2]\n", r  # the cell's reaper and the cell itself


def test_network_is_unreachable(sb):
  srv = socket.socket()
  srv.bind(("127.0.0.1", 0))
  srv.listen(1)
  srv.settimeout(0.5)
  port = srv.getsockname()[1]
  try:
    r = sb("import socket\n"
           f"for addr in [('127.0.0.1', {port}), ('1.1.1.1', 80)]:\n"
           "  try:\n"
           "    socket.create_connection(addr, timeout=1)\n"
           "    print('connected', addr)\n"
           "  except OSError as e:\n"
           "    print('failed', type(e).__name__)\n"
           "try:\n  socket.socket(socket.AF_UNIX).connect('/run/dbus/system_bus_socket')\n"
           "except OSError as e:\n  print('unix failed')\n")
    assert r.ok, r
    assert "connected" not in r.output and r.output.count("failed") == 3
    with pytest.raises(socket.timeout):
      srv.accept()
  finally:
    srv.close()
  _healthy(sb)


def test_killing_parent_and_everyone(sb):
  code = ("import os, signal\n"
          f"for target in (os.getppid(), -1, {os.getpid()}, 1):\n"
          "  try:\n    os.kill(target, signal.SIGKILL)\n"
          "  except OSError as e:\n    print(target, type(e).__name__)\n"
          "try:\n  os.killpg(0, signal.SIGKILL)\nexcept OSError:\n  pass\n"
          "print('still here')")
  r = sb(code)
  assert os.getpid() > 0  # we are alive
  assert r.output.endswith("still here\n") or not r.ok
  _healthy(sb)


def test_subprocesses_run_but_do_not_outlive_the_call(sb, layers):
  r = sb("import subprocess\nprint(subprocess.run(['sh', '-c', 'echo hi from sh'], "
         "capture_output=True, text=True).stdout, end='')")
  assert r.ok and r.output == "hi from sh\n"
  marker = "987654"
  r = sb(f"import subprocess\nsubprocess.Popen(['sleep', '{marker}'])\nprint('spawned')")
  assert r.ok
  time.sleep(0.3)
  assert not [p for p in os.listdir("/proc") if p.isdigit() and _cmdline_has(p, marker)]
  _healthy(sb)


def test_deep_recursion_is_contained(sb):
  r = sb("def f(n):\n  return f(n + 1)\nf(0)")
  assert not r.ok and "RecursionError" in r.error
  assert len(r.output) <= 2000
  r = sb("import sys\nsys.setrecursionlimit(10**7)\ndef f(n):\n  return f(n + 1)\nf(0)")
  assert not r.ok
  _healthy(sb)


def test_huge_file_write_hits_the_size_limit(sb):
  r = sb("with open('big.bin', 'wb') as f:\n  for _ in range(200):\n    f.write(b'0' * 2**20)")
  assert not r.ok and "File too large" in r.error, r
  _healthy(sb)


@pytest.mark.parametrize("code,ok", [
  ("import sys; sys.exit(3)", False), ("import sys; sys.exit(0)", True),
  ("import os; os._exit(7)", False), ("import os; os._exit(0)", True),
  ("raise KeyboardInterrupt", False), ("quit()", True)])
def test_exits(sb, code, ok):
  r = sb(code)
  assert r.ok is ok, r
  _healthy(sb)


def test_closing_stdout_and_result_channel(sb):
  r = sb("import os, sys\nprint('bye', flush=True)\nos.close(1)\nos.close(2)\nprint('lost')")
  assert r.output.startswith("bye")
  r = sb("import os\nfor fd in range(3, 64):\n  try:\n    os.close(fd)\n  except OSError:\n    pass\n")
  assert r.ok  # exit status 0 without a report still reads as success
  r = sb("import os\nos.write(4, b'{\"ok\": true}\\n')\nwhile True: pass")  # a forged report
  assert isinstance(r, ToolResult)
  r = sb("import os\nwhile True:\n  os.write(4, b'x' * 65536)")  # a flood on the report channel
  assert not r.ok and "protocol" in r.error and r.elapsed_s < TIMEOUT_S
  _healthy(sb)


def test_interpreter_tampering_does_not_leak_between_sessions(sb):
  r = sb("import builtins, sys, math\nbuiltins.print = None\nsys.modules['math'] = None\n"
         "math.pi = 3\nimport os\nos.environ['PATH'] = ''", session="tamper")
  assert r.ok, r
  for session in ("other", None):
    r = sb("import math, os\nprint(math.pi > 3.1, bool(os.environ['PATH']))", session=session)
    assert r.ok and r.output == "True True\n", r
  sb.close_session("tamper")
  sb.close_session("other")


def test_pickle_and_marshal_tricks(sb):
  probe = f"/tmp/pwned-{os.getpid()}"
  payload = f"cos\nsystem\n(S'touch {probe}'\ntR.".encode()
  r = sb(f"import pickle\npickle.loads({payload!r})\nimport os\nprint(os.path.exists({probe!r}))")
  assert r.ok and r.output.endswith("True\n"), r  # it ran, inside the sandbox only
  assert not os.path.exists(probe)
  r = sb("import types\nc = (lambda: 0).__code__\n"
         "bad = c.replace(co_code=bytes([100, 255, 83, 0] * 8), co_consts=())\n"
         "types.FunctionType(bad, {})()")
  assert not r.ok
  r = sb("import ctypes\nctypes.string_at(0)")
  assert not r.ok and "SIGSEGV" in r.error
  _healthy(sb)


def test_signals(sb):
  for code in ("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\nprint('x')",
               "import signal, time\nsignal.alarm(1)\ntime.sleep(5)",
               "import os, signal\nos.kill(os.getpid(), signal.SIGSTOP)",
               "import signal, threading\n"
               "signal.pthread_kill(threading.main_thread().ident, signal.SIGKILL)"):
    r = sb(code)
    assert isinstance(r, ToolResult) and not r.ok, (code, r)
  _healthy(sb)


def test_escape_attempts_via_namespaces_are_refused(sb, layers):
  _need(layers, "seccomp")
  r = sb("import os, ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
         "print(libc.unshare(0x10000000), libc.unshare(0x20000),\n"
         "      libc.mount(b'none', b'/mnt', b'tmpfs', 0, None))\n"
         "import subprocess\nprint(subprocess.run(['unshare', '-U', 'true']).returncode)")
  lines = r.output.splitlines()
  assert r.ok and lines[:2] == ["-1 -1 -1", "unshare: unshare failed: Operation not permitted"], r
  _healthy(sb)


def test_fallbacks_without_namespaces():
  """As root with no namespaces: uid drop, rlimits, seccomp and the uid sweep still contain."""
  if os.geteuid() != 0:
    pytest.skip("needs root")
  with pytest.warns(RuntimeWarning) if not _world_readable(sys.prefix) else contextlib.nullcontext():
    sb = PythonSandbox(workers=1, timeout_s=2.0, cpu_s=3, memory_mb=256, max_procs=16,
                       preimport=("math", "socket", "subprocess"),
                       disable=("mount_ns", "net_ns", "pid_ns"))
    layers = sb.isolation
  try:
    assert layers["uid_drop"] and layers["seccomp"] and not layers["pid_ns"]
    r = sb("import os\nprint(os.getcwd().startswith(os.environ['TMPDIR']), os.getuid() >= 10**6)\n"
           "try:\n  open('/etc/sandbox-probe', 'w')\nexcept OSError as e:\n  print(type(e).__name__)")
    assert r.output == "True True\nPermissionError\n", r
    r = sb("import socket\nsocket.socket()")
    assert not r.ok and "PermissionError" in r.error
    marker = "876543"
    r = sb(f"import subprocess, os\nsubprocess.Popen(['sleep', '{marker}'], start_new_session=True)\n"
           "print(os.getcwd())")
    scratch = r.output.strip()
    deadline = time.monotonic() + 5
    while os.path.exists(scratch) and time.monotonic() < deadline:
      time.sleep(0.05)
    assert not os.path.exists(scratch)  # removed once the cell is gone
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _cmdline_has(p, marker)]
    r, before, peak = _peak_procs_during(lambda: sb("import os\nwhile True:\n  try:\n    os.fork()\n"
                                                    "  except OSError:\n    pass\n"))
    assert not r.ok and peak - before <= 16 + 4, (before, peak)
  finally:
    sb.close()


def _world_readable(path: str) -> bool:
  path = os.path.realpath(path)
  while path != "/":
    if not os.stat(path).st_mode & 0o001:
      return False
    path = os.path.dirname(path)
  return True


def _cmdline_has(pid: str, marker: str) -> bool:
  try:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      return marker.encode() in f.read()
  except OSError:
    return False


# ---------------------------------------------------------------------------------------------
# Fairness of the worker pool.


def test_pool_serves_waiters_first_in_first_out():
  """200 calls from 8 threads: no call waits longer than the calls queued ahead of it take.

  (Before the queue, a thread that released a worker took it straight back, and a few early
  callers waited for most of the run.)

  Arrival is recorded under the pool's own lock (so it is the queue order); each call's wait is
  bounded by the (at most 7) calls ahead of it, each at most the slowest call seen.
  """
  threads, per_thread = 8, 25
  with PythonSandbox(workers=2, timeout_s=TIMEOUT_S, preimport=("math",)) as sb:
    assert sb("pass").ok
    orig_acquire, orig_release = sb._acquire, sb._release
    waits, services, started = [], [], threading.local()
    lock = threading.Lock()

    def acquire(sid):
      with sb._cv:
        arrived = time.monotonic()
      w = orig_acquire(sid)
      started.t = time.monotonic()
      with lock:
        waits.append(started.t - arrived)
      return w

    def release(w):
      with lock:
        services.append(time.monotonic() - started.t)
      orig_release(w)

    sb._acquire, sb._release = acquire, release
    failures = []

    def work(k):
      for i in range(per_thread):
        r = sb(f"import time; time.sleep(0.05); print({k * per_thread + i})")
        if not r.ok or r.output != f"{k * per_thread + i}\n":
          failures.append(r)

    pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in pool:
      t.start()
    for t in pool:
      t.join()
  assert not failures, failures[:3]
  assert len(waits) == threads * per_thread
  bound = (threads - 1) * max(services) + 0.5
  assert max(waits) <= bound, (max(waits), bound, sorted(waits)[-5:])


# ---------------------------------------------------------------------------------------------
# Start-up: where the interpreter lives, what must import, the CLI.


def _venv_under_tmp(root: str) -> str:
  """A virtualenv in /tmp whose own site-packages physically hold numpy, sympy and mpmath.

  Hard links (copies across file systems) of the installed packages: fast, and no index needed.
  """
  import numpy
  import sympy
  venv = os.path.join(root, "venv")
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=60)
  site = subprocess.run([os.path.join(venv, "bin", "python"), "-c",
                         "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        check=True, capture_output=True, text=True, timeout=60).stdout.strip()
  assert site.startswith(venv + "/"), site
  host_site = os.path.dirname(os.path.dirname(numpy.__file__))
  names = ["numpy", "sympy", "mpmath", *[n for n in os.listdir(host_site) if n.startswith("numpy.libs")]]
  assert os.path.dirname(os.path.dirname(sympy.__file__)) == host_site
  for name in names:
    try:
      shutil.copytree(os.path.join(host_site, name), os.path.join(site, name), copy_function=os.link)
    except OSError:
      shutil.copytree(os.path.join(host_site, name), os.path.join(site, name), dirs_exist_ok=True)
  os.makedirs(os.path.join(site, "venvprobe"))
  with open(os.path.join(site, "venvprobe", "__init__.py"), "w") as f:
    f.write("WHERE = __file__\n")
  return venv


def test_virtualenv_under_tmp_keeps_numpy_and_sympy():
  """The supervisor covers /tmp; the venv's prefix and site-packages must still be bound in."""
  root = tempfile.mkdtemp(dir="/tmp", prefix="sandbox-venv-")
  try:
    venv = _venv_under_tmp(root)
    prog = ("import json\n"
            "from autotraj_jax.tir.sandbox import PythonSandbox\n"
            "with PythonSandbox(workers=1, timeout_s=20.0, cpu_s=20) as sb:\n"
            "  layers = sb.isolation\n"
            "  r = sb('import numpy, sympy, venvprobe\\n'\n"
            "         'print(numpy.__file__, sympy.__file__, venvprobe.WHERE)\\n'\n"
            "         'print(int(numpy.ones(3).sum()), sympy.factorint(12))')\n"
            "print(json.dumps({'mount_ns': layers['mount_ns'], 'pre': layers['preimported'],\n"
            "                  'ok': r.ok, 'out': r.output}))\n")
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run([os.path.join(venv, "bin", "python"), "-c", prog], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"numpy", "sympy"} <= set(got["pre"]), got
    assert got["ok"], got
    paths, values = got["out"].splitlines()
    assert all(p.startswith(venv + "/") for p in paths.split()), paths  # not the host's copies
    assert values == "3 {2: 2, 3: 1}"
  finally:
    shutil.rmtree(root, ignore_errors=True)


def test_failed_preimport_is_a_startup_error():
  with PythonSandbox(workers=1, preimport=("math", "autotraj_no_such_module")) as sb:
    r = sb("print(1)")
    assert not r.ok and r.error.startswith("SandboxStartupError"), r
    assert "autotraj_no_such_module" in r.error and "pre-import" in r.error
    r2 = sb("print(2)")  # not retried: the same clear answer, at once
    assert not r2.ok and r2.error == r.error
    with pytest.raises(SandboxStartupError, match="autotraj_no_such_module"):
      sb.isolation


@pytest.mark.parametrize("content", [None, b"print('\\xff')\n\xff\xfe"], ids=["missing", "not-utf8"])
def test_cli_bad_file_prints_one_json_object(tmp_path, content):
  path = tmp_path / "prog.py"
  if content is not None:
    path.write_bytes(content)
  proc = subprocess.run([sys.executable, "-m", "autotraj_jax.tir.sandbox", str(path)],
                        capture_output=True, text=True, timeout=60, cwd=REPO)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 1, proc.stdout
  out = json.loads(lines[0])
  assert set(out) == {"ok", "output", "error", "elapsed_s"}
  assert out["ok"] is False and out["error"].startswith(f"cannot read {path}"), out


def test_supervisor_modules_use_only_the_standard_library():
  """The supervisor runs these sources in `python -I`: nothing outside the stdlib may be imported."""
  import ast as ast_mod

  from autotraj_jax.tir.sandbox.worker import BUNDLE
  pkg = os.path.join(REPO, "autotraj_jax", "tir", "sandbox")
  for name in BUNDLE:
    with open(os.path.join(pkg, f"{name}.py"), encoding="utf-8") as f:
      tree = ast_mod.parse(f.read())
    for node in ast_mod.walk(tree):
      if isinstance(node, ast_mod.Import):
        mods = [a.name for a in node.names]
      elif isinstance(node, ast_mod.ImportFrom):
        mods = [] if node.level else [node.module]
        if node.level:
          assert node.module in BUNDLE, (name, node.module)
      else:
        continue
      for m in mods:
        assert m.split(".")[0] in sys.stdlib_module_names or m == "__future__", (name, m)
