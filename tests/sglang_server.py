"""A real sglang-jax server for integration tests, in its own Python 3.12 venv.

sglang-jax needs Python >= 3.12 and pins versions that clash with ours, so it lives in a
cached venv outside the project environment and runs as a separate process group that is
always killed on exit. Import this module from tests; it is not a test file itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Iterator

SGLANG_JAX_SPEC = "sglang-jax[cpu]==0.1.0rc0"
VENV_NAME = "sglang-jax-venv"
MARKER = ".autotraj-installed"  # holds the installed spec; written only after a full install


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("AUTOTRAJ_CACHE") or pathlib.Path.home() / ".cache" / "autotraj")


def _probe(cmd: list[str], env: dict[str, str]) -> str | None:
  """sys.executable of a Python 3.12 started by `cmd`, or None."""
  try:
    out = subprocess.run(cmd + ["-c", "import sys; assert sys.version_info[:2] == (3, 12); "
                                "print(sys.executable)"],
                         env=env, capture_output=True, text=True, timeout=60)
  except (OSError, subprocess.TimeoutExpired):
    return None
  return (out.stdout.strip() or None) if out.returncode == 0 else None


def find_python312() -> str | None:
  """A Python 3.12 interpreter: $AUTOTRAJ_PYTHON312, `python3.12` on PATH, or a pyenv 3.12.x."""
  env = dict(os.environ)
  explicit = os.environ.get("AUTOTRAJ_PYTHON312")
  if explicit:
    return _probe([explicit], env)
  found = _probe(["python3.12"], env)
  if found:
    return found
  if shutil.which("pyenv"):  # a pyenv shim only runs a version that is selected
    try:
      versions = subprocess.run(["pyenv", "versions", "--bare"], capture_output=True, text=True,
                                timeout=60).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
      versions = []
    for v in sorted((v for v in versions if v.startswith("3.12")), reverse=True):
      found = _probe(["python3.12"], {**env, "PYENV_VERSION": v})
      if found:
        return found
  return None


def _venv_python(venv: pathlib.Path) -> pathlib.Path:
  return venv / "bin" / "python"


def _installed(venv: pathlib.Path) -> bool:
  marker = venv / MARKER
  return (_venv_python(venv).exists() and marker.is_file()
          and marker.read_text().strip() == SGLANG_JAX_SPEC)


def ensure_sglang_venv() -> str:
  """Path of the venv's python with sglang-jax installed; installs once (minutes) under a lock."""
  root = cache_dir()
  venv = root / VENV_NAME
  if _installed(venv):
    return str(_venv_python(venv))
  root.mkdir(parents=True, exist_ok=True)
  with open(root / (VENV_NAME + ".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here, then finds the marker
    if _installed(venv):
      return str(_venv_python(venv))
    python = find_python312()
    if python is None:
      raise RuntimeError("sglang-jax needs Python 3.12; none found (set AUTOTRAJ_PYTHON312)")
    shutil.rmtree(venv, ignore_errors=True)  # a half-finished earlier install
    log_path = root / "sglang-jax-install.log"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")}
    with open(log_path, "w") as log:
      for cmd in ([python, "-m", "venv", str(venv)],
                  [str(_venv_python(venv)), "-m", "pip", "install", "--upgrade", "pip"],
                  [str(_venv_python(venv)), "-m", "pip", "install", SGLANG_JAX_SPEC]):
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        if rc != 0:
          raise RuntimeError(f"installing {SGLANG_JAX_SPEC} failed (exit {rc}) at `{' '.join(cmd)}`:\n"
                             + _tail(log_path))
    tmp = venv / (MARKER + ".tmp")
    tmp.write_text(SGLANG_JAX_SPEC + "\n")
    os.replace(tmp, venv / MARKER)
  return str(_venv_python(venv))


def _tail(path: str | os.PathLike, n: int = 60) -> str:
  try:
    lines = pathlib.Path(path).read_text(errors="replace").splitlines()
  except OSError:
    return "(no log)"
  return "\n".join(lines[-n:])


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _healthy(url: str) -> bool:
  try:
    with urllib.request.urlopen(url + "/health", timeout=5) as r:
      return r.status == 200
  except (urllib.error.URLError, OSError):
    return False


def server_command(python: str, model_dir: str | os.PathLike, port: int) -> list[str]:
  """The launch line: CPU, loopback only, fp32, with memory caps (uncapped it plans for
  hundreds of GB) and a small set of precompiled shapes.

  Per-request seeds only work with --enable-deterministic-sampling. The warm-up request is
  skipped (precompilation already warms every shape): it asks for no logprobs, and sglang-jax
  0.1.0rc0 crashes when such a request shares a batch with one that does. The radix (prefix)
  cache is off so that no request's output depends on what earlier requests left in the cache
  (it does not cure the intermittent disagreement noted in test_backend_contract.py). The
  context holds a repair prompt (question + a 384-token trajectory + diagnosis) plus a turn.
  """
  return [python, "-m", "sgl_jax.launch_server", "--model-path", os.fspath(model_dir),
          "--device", "cpu", "--attention-backend", "native",
          "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
          "--max-total-tokens", "8192", "--max-running-requests", "8",
          "--chunked-prefill-size", "512", "--max-prefill-tokens", "512", "--context-length", "2048",
          "--precompile-token-paddings", "64", "128", "256", "512",
          "--precompile-bs-paddings", "1", "2", "4", "8", "--random-seed", "0",
          "--enable-deterministic-sampling", "--skip-server-warmup", "--disable-radix-cache"]


def _server_env(tmp: str) -> dict[str, str]:
  drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "XLA_FLAGS", "PYENV_VERSION")
  env = {k: v for k, v in os.environ.items() if k not in drop}
  # The test session fakes 8 host devices through XLA_FLAGS; the server must see one CPU.
  env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
             HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false",
             TMPDIR=tmp)  # its ZMQ ipc files go here and are removed with it
  return env


def _kill_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
  if proc.poll() is None:
    with contextlib.suppress(ProcessLookupError):
      os.killpg(proc.pid, signal.SIGTERM)
    try:
      proc.wait(grace_s)
    except subprocess.TimeoutExpired:
      pass
  with contextlib.suppress(ProcessLookupError):  # children that outlived the leader
    os.killpg(proc.pid, signal.SIGKILL)
  with contextlib.suppress(subprocess.TimeoutExpired):
    proc.wait(10)


@contextlib.contextmanager
def running_server(model_dir: str | os.PathLike, port: int | None = None, *,
                   python: str | None = None, startup_timeout_s: float = 600.0,
                   log_path: str | os.PathLike | None = None) -> Iterator[str]:
  """Start sglang-jax on `model_dir` (127.0.0.1 only); yield its base URL; kill it on exit.

  Startup precompiles every padding bucket, so allow minutes. On failure the error carries
  the tail of the server log (kept at `log_path` when given).
  """
  python = python or ensure_sglang_venv()
  port = port or free_port()
  url = f"http://127.0.0.1:{port}"
  tmp = tempfile.mkdtemp(prefix="sgl-")  # short: ipc socket paths are length-limited
  log_file = pathlib.Path(log_path) if log_path else pathlib.Path(tmp) / "server.log"
  log_file.parent.mkdir(parents=True, exist_ok=True)
  with open(log_file, "w") as log:
    proc = subprocess.Popen(server_command(python, model_dir, port), stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp,
                            env=_server_env(tmp), start_new_session=True)
  try:
    deadline = time.monotonic() + startup_timeout_s
    while not _healthy(url):
      if proc.poll() is not None:
        raise RuntimeError(f"sglang-jax server exited with code {proc.returncode} before it was "
                           f"healthy; log {log_file}:\n{_tail(log_file)}")
      if time.monotonic() > deadline:
        raise TimeoutError(f"sglang-jax server at {url} not healthy after {startup_timeout_s:.0f} s; "
                           f"log {log_file}:\n{_tail(log_file)}")
      time.sleep(1.0)
    yield url
  finally:
    _kill_group(proc)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":  # python tests/sglang_server.py: install (or find) the venv
  print(ensure_sglang_venv())
  sys.exit(0)
