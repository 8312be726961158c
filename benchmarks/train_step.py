"""SFT train-step throughput: our jitted JAX step vs a plain PyTorch loop, same model and data.

    python benchmarks/train_step.py [--preset demo] [--batch 8] [--seq 256] [--steps 10]

Both sides: the same decoder config (transformers' Qwen2 in PyTorch), fp32, AdamW, masked
next-token loss, one optimizer step per batch. Their steps are interleaved and each side's median
step time is reported, so a busy shared machine slows both alike. Prints tokens/s of each, the
ratio, and our step's forward / backward / optimizer split (each part jitted alone). On a GPU it
also prints model FLOPs utilisation of our step (--peak-tflops to set the device peak).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
import optax

from autotraj_jax import sharding as shd
from autotraj_jax.models import get_preset, init_model
from autotraj_jax.training.optimizer import OptimizerConfig, make_optimizer
from autotraj_jax.training.sft import make_sft_loss
from autotraj_jax.training.step import init_state, make_train_step


def flops_per_token(cfg, seq: int) -> float:
  """6 * params (matmuls, fwd+bwd) + attention scores and values (12 * layers * seq * heads * hd / 2 causal)."""
  dense = 6 * (cfg.num_params(include_embeddings=False) + cfg.hidden_size * cfg.vocab_size)
  attn = 6 * cfg.num_layers * seq * cfg.num_heads * cfg.head_dim
  return dense + attn


def make_batch(cfg, batch: int, seq: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (batch, seq), dtype=np.int32)
  loss_mask = (rng.random((batch, seq)) < 0.7).astype(np.int32)
  return {"tokens": tokens, "loss_mask": loss_mask, "valid": np.ones((batch, seq), np.int32)}


def jax_stepper(cfg, batch):
  """One jitted SFT train step as a no-argument callable that blocks until it is done."""
  graphdef, params = init_model(cfg)
  opt = make_optimizer(OptimizerConfig(learning_rate=1e-4, total_steps=1000))
  mesh = shd.make_mesh(shd.MeshConfig(fsdp=-1))
  state = jax.device_put(init_state(params, opt, 0))
  step = jax.jit(make_train_step(make_sft_loss(graphdef), opt), donate_argnums=(0,))
  dev_batch = jax.device_put({k: v[None] for k, v in batch.items()}, shd.replicated(mesh))
  box = [state]

  def one():
    box[0], m = step(box[0], dev_batch)
    jax.block_until_ready(m)
  return one


def jax_phases(cfg, batch, reps: int) -> dict[str, float]:
  """Seconds of the step's parts, each jitted alone: forward (loss only), forward+backward
  (value_and_grad) and the optimizer update (clip + AdamW + apply). Backward = the difference."""
  graphdef, params = init_model(cfg)
  opt = make_optimizer(OptimizerConfig(learning_rate=1e-4, total_steps=1000))
  opt_state = opt.init(params)
  loss_fn = make_sft_loss(graphdef)
  micro = jax.device_put(dict(batch))
  rng = jax.random.key(0)
  fwd = jax.jit(lambda p: loss_fn(p, micro, rng)[0])
  fwd_bwd = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, micro, rng)[0]))
  _, grads = fwd_bwd(params)

  @jax.jit
  def update(g, s, p):
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  def best(f, *a):
    jax.block_until_ready(f(*a))
    return min(_timed(lambda: jax.block_until_ready(f(*a))) for _ in range(reps))
  t_fwd, t_fb, t_opt = best(fwd, params), best(fwd_bwd, params), best(update, grads, opt_state, params)
  return {"forward": t_fwd, "backward": max(t_fb - t_fwd, 0.0), "optimizer": t_opt}


def torch_stepper(cfg, batch, threads: int):
  """The same model, data and update in PyTorch eager, as a no-argument callable."""
  import torch
  import transformers
  torch.set_num_threads(threads)
  hf_cfg = transformers.Qwen2Config(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
      tie_word_embeddings=cfg.tie_embeddings, attn_implementation="sdpa")
  model = transformers.Qwen2ForCausalLM(hf_cfg).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
  tokens = torch.from_numpy(batch["tokens"]).long()
  mask = torch.from_numpy(batch["loss_mask"]).float()

  def one():
    logits = model(input_ids=tokens[:, :-1]).logits.float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    loss = (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
  return one


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def bench(steppers: dict, steps: int, warmup: int) -> dict[str, float]:
  """Median seconds per step of each stepper, their steps interleaved (a, b, a, b, ...) so that
  load from other processes on a shared machine falls on both sides alike."""
  for one in steppers.values():
    for _ in range(warmup):
      one()
  times = {name: [] for name in steppers}
  for _ in range(steps):
    for name, one in steppers.items():
      times[name].append(_timed(one))
  return {name: float(np.median(ts)) for name, ts in times.items()}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="demo")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--no-split", action="store_true", help="skip timing forward / backward / optimizer alone")
  p.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (e.g. 989 for H100 bf16)")
  args = p.parse_args()
  cfg = get_preset(args.preset, dtype=args.dtype, param_dtype=args.dtype)
  batch = make_batch(cfg, args.batch, args.seq + 1)
  tokens = args.batch * args.seq
  print(f"preset={args.preset} params={cfg.num_params() / 1e6:.1f}M batch={args.batch} seq={args.seq} "
        f"dtype={args.dtype} backend={jax.default_backend()} devices={jax.device_count()}")
  steppers = {"jax": jax_stepper(cfg, batch)}
  if not args.no_torch:
    steppers["torch"] = torch_stepper(cfg, batch, threads=os.cpu_count())
  t = bench(steppers, args.steps, args.warmup)
  line = f"jax   : {tokens / t['jax']:10.1f} tok/s  ({t['jax'] * 1e3:.1f} ms/step)"
  if args.peak_tflops:
    mfu = flops_per_token(cfg, args.seq) * tokens / t["jax"] / (args.peak_tflops * 1e12 * jax.device_count())
    line += f"  MFU {100 * mfu:.1f}%"
  print(line)
  if not args.no_split:
    parts = jax_phases(cfg, batch, reps=max(args.steps // 2, 2))
    print("jax split: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in parts.items()))
  if not args.no_torch:
    print(f"torch : {tokens / t['torch']:10.1f} tok/s  ({t['torch'] * 1e3:.1f} ms/step)")
    print(f"ratio jax/torch: {t['torch'] / t['jax']:.2f}x")


if __name__ == "__main__":
  main()
