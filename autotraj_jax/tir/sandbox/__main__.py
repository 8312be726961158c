"""CLI: `python -m autotraj_jax.tir.sandbox FILE` runs FILE in the sandbox.

Prints exactly one JSON object `{"ok", "output", "error", "elapsed_s"}` on stdout, whatever
happens: exit 0 when the code ran (even if it failed), 2 when FILE could not be read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from autotraj_jax.tir.sandbox.pool import PythonSandbox


def _read_code(path: str) -> str:
  """The program text; OSError/UnicodeDecodeError name the file."""
  if path == "-":
    return sys.stdin.read()
  with open(path, encoding="utf-8") as f:
    return f.read()


def main(argv: Sequence[str] | None = None) -> int:
  """Runs one file and prints one JSON line; see the module docstring for the exit status."""
  p = argparse.ArgumentParser(prog="python -m autotraj_jax.tir.sandbox",
                              description="Run a Python file in the code tool's sandbox.")
  p.add_argument("file", help="Python file to run ('-' for stdin)")
  p.add_argument("--timeout", type=float, default=5.0, help="wall-clock limit in seconds")
  p.add_argument("--memory-mb", type=int, default=1024)
  p.add_argument("--max-output-chars", type=int, default=2000)
  args = p.parse_args(argv)
  t0 = time.perf_counter()
  try:
    code = _read_code(args.file)
  except (OSError, UnicodeDecodeError) as e:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    err = f"cannot read {args.file}: {reason}"
    print(json.dumps({"ok": False, "output": "", "error": err,
                      "elapsed_s": round(time.perf_counter() - t0, 4)}))
    return 2
  with PythonSandbox(timeout_s=args.timeout, cpu_s=max(int(args.timeout), 1),
                     memory_mb=args.memory_mb, max_output_chars=args.max_output_chars,
                     workers=1, persistent=False) as sandbox:
    r = sandbox(code)
  print(json.dumps({"ok": r.ok, "output": r.output, "error": r.error,
                    "elapsed_s": round(r.elapsed_s, 4)}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
