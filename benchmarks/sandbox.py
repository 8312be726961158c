"""Latency and throughput of the `code` tool (the python sandbox).

    python benchmarks/sandbox.py [--calls 200] [--workers 2] [--threads 1,2,4,8]

Programs: a trivial `print(1+1)` and a numpy 200x200 matmul. Reports the cold start (sandbox
construction to first result), p50/p95 latency and calls/s of back-to-back calls from one
thread ("sequential": bound by forking and isolating the next cell), of calls 50 ms apart
("spaced": the next cell is already waiting, as between LLM turns), inside a persistent
session, and with several threads sharing the worker pool ("concurrent", served first in first
out; the slowest call is reported too). Every call is a fresh, fully isolated process (see
autotraj_jax/tir/sandbox/__init__.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autotraj_jax.tir.sandbox import LAYERS, PythonSandbox

PROGRAMS = {
  "trivial": "print(1+1)",
  "numpy": "import numpy as np\na = np.random.rand(200, 200)\nprint(float((a @ a).sum()) > 0)",
}


def percentile(xs: list[float], q: float) -> float:
  xs = sorted(xs)
  return xs[min(int(q * len(xs)), len(xs) - 1)]


def sequential(sb: PythonSandbox, code: str, calls: int, session: str | None = None,
               gap_s: float = 0.0) -> dict:
  """Back-to-back calls, or calls `gap_s` apart (as when the LLM generates between tool calls:
  the supervisor then has a pre-forked cell ready). calls/s counts call time only."""
  times = []
  for _ in range(calls):
    t = time.perf_counter()
    r = sb(code, session=session)
    times.append(time.perf_counter() - t)
    assert r.ok, r
    time.sleep(gap_s)
  wall = sum(times)
  return {"p50_ms": 1e3 * statistics.median(times), "p95_ms": 1e3 * percentile(times, 0.95),
          "max_ms": 1e3 * max(times), "calls_s": calls / wall}


def concurrent(sb: PythonSandbox, code: str, calls: int, threads: int) -> dict:
  per = max(calls // threads, 1)
  times: list[float] = []
  lock = threading.Lock()

  def work():
    local = []
    for _ in range(per):
      t = time.perf_counter()
      r = sb(code)
      local.append(time.perf_counter() - t)
      assert r.ok, r
    with lock:
      times.extend(local)

  t0 = time.perf_counter()
  pool = [threading.Thread(target=work) for _ in range(threads)]
  for t in pool:
    t.start()
  for t in pool:
    t.join()
  wall = time.perf_counter() - t0
  return {"p50_ms": 1e3 * statistics.median(times), "p95_ms": 1e3 * percentile(times, 0.95),
          "max_ms": 1e3 * max(times), "calls_s": len(times) / wall}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--calls", type=int, default=200)
  p.add_argument("--workers", type=int, default=2)
  p.add_argument("--threads", default="1,2,4,8")
  p.add_argument("--gap", type=float, default=0.05, help="seconds between 'spaced' calls")
  args = p.parse_args()

  t = time.perf_counter()
  sb = PythonSandbox(workers=args.workers)
  assert sb("print('warm')").ok
  cold = time.perf_counter() - t
  layers = sb.isolation
  active = [k for k in LAYERS if layers.get(k)]
  print(f"cpus={os.cpu_count()} workers={args.workers} layers={','.join(active)}")
  print(f"cold start (construct + first call): {cold:.2f} s\n")

  rows = []
  for name, code in PROGRAMS.items():
    sequential(sb, code, 10)  # warm-up
    rows.append((name, "sequential", 1, sequential(sb, code, args.calls)))
    rows.append((name, "spaced", 1, sequential(sb, code, args.calls // 2, gap_s=args.gap)))
    rows.append((name, "session", 1, sequential(sb, code, args.calls, session=f"bench-{name}")))
    sb.close_session(f"bench-{name}")
    for n in (int(x) for x in args.threads.split(",")):
      rows.append((name, "concurrent", n, concurrent(sb, code, args.calls, n)))
  sb.close()

  print(f"{'program':<8} {'mode':<11} {'threads':>7} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} "
        f"{'calls/s':>8}")
  for name, mode, n, r in rows:
    print(f"{name:<8} {mode:<11} {n:>7} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} {r['max_ms']:>8.1f} "
          f"{r['calls_s']:>8.1f}")


if __name__ == "__main__":
  main()
