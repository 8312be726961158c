"""Stage-1 rollout throughput against sglang-jax (CPU): one server vs two behind one SGLangBackend.

    python benchmarks/sglang_throughput.py [--trajectories 32] [--response-tokens 64]
                                           [--tokens-per-turn 32] [--concurrency 8]

Exports a random demo-shaped model (fp32) with the demo tokenizer, starts one sglang-jax server
(tests/sglang_server.py: CPU, loopback, cached Python 3.12 venv), runs the tool loop
(`run_rollouts` with the python tool, sampled, as stage 1 does), then starts a second server on
the same weights and runs the same rollouts over both. Prints trajectories/s (and generated
tokens/s) of each and the ratio. The second server starts only after the first measurement: an
idle sglang-jax scheduler keeps a core busy, which would slow the single-server figure.
Servers are stopped on exit, also on errors. Each start precompiles its shapes (minutes on CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import sglang_server

from autotraj_jax.engine.backend import SamplingParams
from autotraj_jax.engine.sglang_backend import SGLangBackend
from autotraj_jax.models import get_preset, init_model
from autotraj_jax.models.hf import save_hf
from autotraj_jax.questions import Query
from autotraj_jax.tir.rollout import RolloutConfig, run_rollouts
from autotraj_jax.tir.tools import make_tool
from autotraj_jax.tokenizer import build_demo_tokenizer

QUESTIONS = ["What is {a} times {b}?", "Alice has {a} apples and buys {b} more. How many now?",
             "Compute {a} + {b} with python.", "What is {a} minus {b}?"]


def queries(n: int) -> list[Query]:
  return [Query(id=f"q{i}", question=QUESTIONS[i % len(QUESTIONS)].format(a=7 + i, b=3 + 2 * i), gold=str(i))
          for i in range(n)]


def export_model(root: str) -> tuple[str, object]:
  """A random fp32 demo model in HF format (what sglang-jax loads) and its tokenizer."""
  tok_dir, hf_dir = os.path.join(root, "tokenizer"), os.path.join(root, "model")
  tok = build_demo_tokenizer(tok_dir)
  cfg = get_preset("demo", param_dtype="float32", dtype="float32")
  _, params = init_model(cfg, seed=0)
  save_hf(hf_dir, params, cfg, tokenizer_dir=tok_dir, token_ids={"eos_token_id": tok.eos_token_id})
  return hf_dir, tok


def measure(urls: list[str], tok, tools, qs: list[Query], rcfg: RolloutConfig, concurrency: int) -> dict:
  """Trajectories/s of one run_rollouts call (after a small warm-up batch) over `urls`."""
  with SGLangBackend(urls, tok, max_concurrency=concurrency, timeout_s=600) as backend:
    run_rollouts(backend, tok, qs[:2], tools, rcfg, id_prefix="warm/")
    t = time.perf_counter()
    trajs = run_rollouts(backend, tok, qs, tools, rcfg)
    dt = time.perf_counter() - t
    served = {u: s["served"] for u, s in backend.stats().items()}
  tokens = sum(len(seg.token_ids) for tr in trajs for seg in tr.segments if seg.kind == "model")
  calls = sum(len(tr.tool_calls) for tr in trajs)
  return {"traj_s": len(trajs) / dt, "tok_s": tokens / dt, "seconds": dt, "trajectories": len(trajs),
          "tool_calls": calls, "served": served}


def report(name: str, r: dict) -> None:
  served = ", ".join(f"{u}: {n}" for u, n in r["served"].items())
  print(f"{name:<10} {r['traj_s']:8.2f} traj/s {r['tok_s']:9.1f} tok/s  ({r['trajectories']} trajectories, "
        f"{r['tool_calls']} tool calls, {r['seconds']:.1f} s; requests per server: {served})", flush=True)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--trajectories", type=int, default=32)
  p.add_argument("--response-tokens", type=int, default=64, help="token budget of a trajectory")
  p.add_argument("--tokens-per-turn", type=int, default=32)
  p.add_argument("--concurrency", type=int, default=8, help="requests in flight per server (the server "
                 "command caps running requests at 8)")
  p.add_argument("--startup-timeout", type=float, default=900.0, help="seconds a server may take to start")
  args = p.parse_args()
  logging.basicConfig(level=logging.WARNING)
  if sglang_server.find_python312() is None:
    sys.exit("sglang-jax needs Python 3.12 and none was found (set AUTOTRAJ_PYTHON312)")
  python = sglang_server.ensure_sglang_venv()
  rcfg = RolloutConfig(max_tool_calls=2, max_response_tokens=args.response_tokens,
                       max_tokens_per_turn=args.tokens_per_turn, tool_workers=2,
                       sampling=SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=args.tokens_per_turn,
                                               seed=0))
  qs = queries(args.trajectories)
  with tempfile.TemporaryDirectory(prefix="sgl-bench-") as tmp, contextlib.ExitStack() as stack:
    hf_dir, tok = export_model(tmp)
    tools = {"code": make_tool("code", timeout_s=10.0, workers=1)}
    stack.callback(lambda: [getattr(t, "close", lambda: None)() for t in tools.values()])
    start = lambda i: stack.enter_context(sglang_server.running_server(
        hf_dir, python=python, startup_timeout_s=args.startup_timeout, log_path=os.path.join(tmp, f"server{i}.log")))
    t = time.perf_counter()
    first = start(0)
    print(f"server 1 up at {first} after {time.perf_counter() - t:.0f} s", flush=True)
    one = measure([first], tok, tools, qs, rcfg, args.concurrency)
    report("1 server", one)
    t = time.perf_counter()
    second = start(1)
    print(f"server 2 up at {second} after {time.perf_counter() - t:.0f} s", flush=True)
    two = measure([first, second], tok, tools, qs, rcfg, args.concurrency)
    report("2 servers", two)
    print(f"ratio (2 servers / 1 server): {two['traj_s'] / one['traj_s']:.2f}x trajectories/s "
          f"on {os.cpu_count()} CPU cores", flush=True)


if __name__ == "__main__":
  main()
