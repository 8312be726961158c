"""Decode throughput: our JAX engine vs transformers `generate` (PyTorch CPU, fp32 and bf16) and,
when given, an SGLang / sglang-jax server, on the same random weights.

    python benchmarks/generate.py [--presets demo,bench-0.5b] [--batches 1,8,32]
                                  [--prompt-len 64] [--new-tokens 64] [--top-p P] [--sglang-url URL]
    python benchmarks/generate.py --start-sglang   # launches sglang-jax on each model (CPU)
    python benchmarks/generate.py --turns 3        # also: a multi-turn loop with and without the prefix cache

Prints one table (tokens/s of new tokens, all rows of the batch) with the ratio to our engine,
and the memory-bandwidth bound for batch-1 decode: weight bytes read per token divided by the
measured copy bandwidth of this machine. Our engine's prefix cache is emptied before each timed
call, so every prompt is prefilled in full, as the other backends do.

With `--turns N`, each batch size also runs an N-turn loop (each turn appends its completion
and a fixed 32-token "tool result" to the context) and prints its seconds with the prefix cache
and without, and the share of context tokens the model computed (`prefill/context`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

from autotraj_jax.engine import EngineConfig, GenerationRequest, JaxEngine, SamplingParams
from autotraj_jax.models import get_preset, init_model
from autotraj_jax.models.hf import save_hf
from autotraj_jax.tokenizer import build_demo_tokenizer, load_tokenizer


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
  """Bytes/s moved by a large array copy (read + write)."""
  a = np.ones(nbytes // 4, np.float32)
  b = np.empty_like(a)
  np.copyto(b, a)
  t = time.perf_counter()
  for _ in range(3):
    np.copyto(b, a)
  return 2 * a.nbytes * 3 / (time.perf_counter() - t)


def requests(batch: int, prompt_len: int, new_tokens: int, vocab: int, top_p: float | None = None):
  """Greedy, or sampled at temperature 1 with nucleus `top_p`."""
  rng = np.random.default_rng(0)
  sampling = (SamplingParams(temperature=0.0, max_new_tokens=new_tokens) if top_p is None else
              SamplingParams(temperature=1.0, top_p=top_p, max_new_tokens=new_tokens, seed=0))
  return [GenerationRequest(rng.integers(10, vocab, prompt_len).tolist(), sampling) for _ in range(batch)]


def time_engine(engine, reqs, new_tokens):
  # The timed call prefills every prompt in full, so the warm-up must too: otherwise it reuses
  # the previous batch's rows (the prompts share their first request) and compiles other shapes.
  engine.clear_prefix_cache()
  engine.generate(reqs)  # compile
  engine.clear_prefix_cache()
  t = time.perf_counter()
  outs = engine.generate(reqs)
  dt = time.perf_counter() - t
  return sum(len(o.token_ids) for o in outs) / dt


def multi_turn(engine, reqs, turns: int) -> tuple[float, float]:
  """(seconds, prefill/context) of `turns` rounds: each appends the completion and 32 tool tokens."""
  tool = list(range(20, 52))

  def run():
    ctx = [list(r.prompt_ids) for r in reqs]
    for _ in range(turns):
      outs = engine.generate([GenerationRequest(c, r.sampling) for c, r in zip(ctx, reqs)])
      ctx = [c + o.token_ids + tool for c, o in zip(ctx, outs)]
    engine.release(ctx)

  run()  # compile every shape
  engine.clear_prefix_cache()
  engine.reset_stats()
  t = time.perf_counter()
  run()
  return time.perf_counter() - t, engine.prefill_ratio


def time_transformers(hf_dir, reqs, new_tokens, dtype):
  import torch
  import transformers
  torch.set_num_threads(os.cpu_count())
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype)).eval()
  ids = torch.tensor([r.prompt_ids for r in reqs])
  s = reqs[0].sampling
  kw = dict(do_sample=s.temperature > 0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
  if s.temperature > 0:
    kw.update(temperature=s.temperature, top_p=s.top_p, top_k=0)
  with torch.no_grad():
    model.generate(ids, do_sample=False, max_new_tokens=4, min_new_tokens=4, pad_token_id=0)  # warm up
    t = time.perf_counter()
    out = model.generate(ids, **kw)
  dt = time.perf_counter() - t
  return (out.shape[1] - ids.shape[1]) * ids.shape[0] / dt


def time_sglang(url, tokenizer, reqs):
  from autotraj_jax.engine.sglang_backend import SGLangBackend
  backend = SGLangBackend(url, tokenizer, max_concurrency=len(reqs))
  backend.generate(reqs[:1])
  t = time.perf_counter()
  outs = backend.generate(reqs)
  dt = time.perf_counter() - t
  return sum(len(o.token_ids) for o in outs) / dt


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--presets", default="demo,bench-0.5b")
  p.add_argument("--batches", default="1,8,32")
  p.add_argument("--prompt-len", type=int, default=64)
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--top-p", type=float, default=None, help="sample at temperature 1 with this top-p "
                 "(default: greedy)")
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--torch-dtypes", default="float32,bfloat16")
  p.add_argument("--sglang-url", default=None, help="a running server that serves the same weights")
  p.add_argument("--start-sglang", action="store_true", help="launch sglang-jax (CPU) on each model")
  p.add_argument("--turns", type=int, default=0, help="also time a multi-turn loop with and without the "
                 "prefix cache")
  args = p.parse_args()
  batches = [int(b) for b in args.batches.split(",")]
  bw = copy_bandwidth()
  print(f"backend={jax.default_backend()} copy bandwidth={bw / 1e9:.1f} GB/s "
        f"prompt={args.prompt_len} new={args.new_tokens} "
        f"{'greedy' if args.top_p is None else f'sampled top_p={args.top_p}'} (tokens/s of generated tokens)")
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    tok_dir = os.path.join(tmp, "tok")
    build_demo_tokenizer(tok_dir)
    tokenizer = load_tokenizer(tok_dir)
    for preset in args.presets.split(","):
      cfg = get_preset(preset)
      graphdef, params = init_model(cfg)
      hf_dir = os.path.join(tmp, preset)
      save_hf(hf_dir, params, cfg, tokenizer_dir=tok_dir)
      weight_bytes = cfg.num_params() * 4
      bound = bw / weight_bytes
      engine = JaxEngine(graphdef, params, cfg, tokenizer,
                         config=EngineConfig(new_token_buckets=(args.new_tokens,), chunk_steps=args.new_tokens))
      vocab = min(cfg.vocab_size, len(tokenizer))
      make_reqs = lambda b, vocab=vocab: requests(b, args.prompt_len, args.new_tokens, vocab, args.top_p)
      results = {}
      if args.turns:
        # The same engine without a prefix cache: every turn prefills the whole context.
        plain = JaxEngine(graphdef, params, cfg, tokenizer, config=EngineConfig(
            new_token_buckets=(args.new_tokens,), chunk_steps=args.new_tokens, prefix_cache_rows=0))
        for b in batches:
          reqs = make_reqs(b)
          (t_on, ratio), (t_off, _) = multi_turn(engine, reqs, args.turns), multi_turn(plain, reqs, args.turns)
          print(f"{preset} batch {b}: {args.turns} turns in {t_on:.2f} s with the prefix cache, {t_off:.2f} s "
                f"without ({t_off / t_on:.2f}x); prefill/context: {ratio:.2f}", flush=True)
        del plain
      for b in batches:
        reqs = make_reqs(b)
        row = {"model": preset, "batch": b, "jax": time_engine(engine, reqs, args.new_tokens)}
        if not args.no_torch:
          for dt in args.torch_dtypes.split(","):
            row[f"hf-{dt}"] = time_transformers(hf_dir, reqs, args.new_tokens, dt)
        results[b] = row
      # The server runs alone: its scheduler keeps a core busy, which would slow the others.
      url = args.sglang_url
      server = None
      if args.start_sglang:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
        from sglang_server import running_server
        server = running_server(hf_dir)
        url = server.__enter__()
      try:
        for b, row in results.items():
          if url:
            row["sglang"] = time_sglang(url, tokenizer, make_reqs(b))
          row["b1_bound"] = bound if b == 1 else float("nan")
          rows.append(row)
          print(_fmt(row), flush=True)
      finally:
        if server is not None:
          server.__exit__(None, None, None)
      del engine, params
  print()
  others = [k for k in rows[0] if k not in ("model", "batch", "jax", "b1_bound")]
  print("| " + " | ".join(["model", "batch", "ours tok/s", *others, "batch-1 bound tok/s"]) + " |")
  for r in rows:
    print(_fmt(r, md=True))


def _fmt(r, md=False):
  others = [f"{r[k]:.1f} ({r[k] / r['jax']:.2f}x)" for k in r if k not in ("model", "batch", "jax", "b1_bound")]
  bound = "" if np.isnan(r["b1_bound"]) else f"{r['b1_bound']:.1f} (ours at {100 * r['jax'] / r['b1_bound']:.0f}%)"
  cells = [r["model"], str(r["batch"]), f"{r['jax']:.1f}", *others, bound]
  return "| " + " | ".join(cells) + " |" if md else "  ".join(cells)


if __name__ == "__main__":
  main()
