"""Where the time of one GRPO step goes, and SFT / reward-model train-step throughput.

    python benchmarks/rl_step.py [--policy assets/demo_policy | --preset demo] [--prompts 8] [--samples 4]
                                 [--steps 3] [--seq 1024] [--max-tokens-per-turn 256]
                                 [--max-response-tokens 640] [--batch 8] [--train-seq 512]
                                 [--engine batch_buckets=8,16,32 --engine cache_multiple=256]

The policy is `--policy` (an HF directory with its tokenizer; default `assets/demo_policy` when it
exists, since random weights write random tokens and so make unrealistic rollouts), or else a
random-init `--preset` model with the demo tokenizer. A GRPO step is done as the RL stage's learner
does it (autotraj_jax/training/rl/learner.py), on task-world training questions with the real code sandbox
and BM25 search over the world's corpus. One warm-up step runs first; its time (compiles
included) is printed apart from the mean over the `--steps` timed steps. Figures:

- rollout: the multi-turn tool loop (`run_rollouts` on the in-process JaxEngine with the
  pipeline's `engine` config, each field settable by --engine as by --config.engine.FIELD of
  experiments/main.py): sampling plus tool calls,
  `--prompts` x `--samples` trajectories. gen tok/s = model-written tokens / this time.
- reward: `compute_rewards` (outcome + format, the RL stage's weights 1.0 / 0.5).
- logprob: laying the batch out at the bucket length `--seq` (packed rows, `rl.RowLayout`, unless
  --no-pack), the jitted logprob recompute under the current params, and group advantages by
  the registered estimator `--advantage`.
- update: the batch's trajectories in the same packed rows (one per row with --no-pack), one
  jitted policy-loss train step (`make_train_step`, donated state, one micro-batch), then
  handing the weights to the engine. train tok/s = positions of the update batch / this time
  (padding included: that is the compute spent).
- sft / rm: one jitted train step with donated state on random tokens, `--batch` x `--train-seq`
  (rm: `--batch` pairs, both sequences counted), mean over `--train-steps` after `--warmup`.

A step whose rollout meets a new engine shape (batch, prompt length) compiles inside the timed
steps; the count is printed so such a figure can be read with care.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from autotraj_jax.engine import EngineConfig, JaxEngine, SamplingParams
from autotraj_jax.models import abstract_model, get_preset, init_model
from autotraj_jax.pipeline.builders import from_node
from autotraj_jax.pipeline.config import ConfigError, apply_override, base_config, validate
from autotraj_jax.rewards import RewardConfig, compute_rewards
from autotraj_jax.taskworld import read_split, write_world
from autotraj_jax.tir.rollout import Query, RolloutConfig, run_rollouts
from autotraj_jax.tir.tools import make_tool
from autotraj_jax.tokenizer import build_demo_tokenizer, load_tokenizer
from autotraj_jax.training import packing, rl
from autotraj_jax.training.optimizer import OptimizerConfig, make_optimizer
from autotraj_jax.training.reward_model import collate_pairs, make_rm_loss
from autotraj_jax.training.sft import make_sft_loss
from autotraj_jax.training.step import init_state, make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_POLICY = os.path.join(ROOT, "assets", "demo_policy")
PHASES = ("rollout", "reward", "logprob", "update")


def secs(x: float) -> str:
  """Seconds, or milliseconds when short (the reward phase takes a few)."""
  return f"{x:.2f} s" if x >= 1.0 else f"{x * 1e3:.1f} ms"


def load_policy(args, tmp: str) -> tuple[Any, Any, Any, Any, str]:
  """(model config, graphdef, params, tokenizer, description) of the policy to benchmark."""
  if args.policy:
    from autotraj_jax.models.hf import load_hf
    cfg, kind, params = load_hf(args.policy, dtype=args.dtype)
    if kind != "causal_lm":
      raise ValueError(f"--policy {args.policy} is a {kind!r} model, expected a causal LM")
    graphdef, _ = abstract_model(cfg, kind)
    return cfg, graphdef, params, load_tokenizer(args.policy), f"checkpoint {args.policy}"
  tokenizer = build_demo_tokenizer(os.path.join(tmp, "tokenizer"))
  cfg = get_preset(args.preset, vocab_size=len(tokenizer), dtype=args.dtype, param_dtype=args.dtype)
  graphdef, params = init_model(cfg, seed=args.seed)
  return cfg, graphdef, params, tokenizer, f"random-init preset {args.preset}"


class GRPOBench:
  """One GRPO step as the RL stage does it, with each phase timed on its own."""

  def __init__(self, args, cfg, graphdef, params, tokenizer, tmp: str):
    self.args, self.tokenizer = args, tokenizer
    self.P, self.n = args.prompts, args.samples
    self.pad_id = tokenizer.pad_token_id or 0
    paths = write_world(os.path.join(tmp, "world"), args.seed, {"train": self.P * (args.steps + 1)},
                        num_entities=args.num_entities, difficulty=(1, 2))
    self.queries = [Query(t.id, t.question, t.answer, t.domain) for t in read_split(paths["train"])]
    self.tools = {"code": make_tool("code", timeout_s=5.0, workers=2),
                  "search": make_tool("search", corpus=str(paths["corpus"]),
                                      cache_dir=os.path.join(tmp, "bm25"), top_k=1)}
    self.rollout_cfg = RolloutConfig(
        max_tool_calls=args.max_tool_calls, max_response_tokens=args.max_response_tokens,
        max_tokens_per_turn=args.max_tokens_per_turn, max_tool_output_chars=600,
        sampling=SamplingParams(temperature=args.temperature, top_p=1.0, max_new_tokens=args.max_tokens_per_turn,
                                seed=args.seed))
    self.reward_cfg = RewardConfig(weights={"outcome": 1.0, "format": 0.5})
    self.rl_cfg = rl.RLConfig(advantage=args.advantage)
    # The pipeline's engine (`engine.*` of the base config, as the RL stage builds it), with
    # --engine overrides; one new-token bucket that fits every turn.
    engine = args.config.engine
    engine.update(new_token_buckets=(args.max_tokens_per_turn,))
    self.engine = JaxEngine(graphdef, params, cfg, tokenizer,
                            config=from_node(EngineConfig, engine, seed=args.seed))
    opt = make_optimizer(OptimizerConfig(learning_rate=args.learning_rate, total_steps=1000, grad_clip=1.0))
    # The state may share arrays with the engine; a donated step frees them, but the engine is
    # handed the new params right after each step, before it samples again.
    self.state = init_state(params, opt, args.seed)
    self.update_shapes: set[tuple[int, ...]] = set()
    self.train_step = jax.jit(make_train_step(rl.make_policy_loss(graphdef, self.rl_cfg), opt, skip_empty=True),
                              donate_argnums=(0,))
    self.logprob_fn = jax.jit(rl.make_logprob_fn(graphdef))

  def step(self, k: int) -> dict[str, float]:
    """Seconds per phase and counts of step `k` (its questions are the k-th block of P)."""
    a, out = self.args, {}
    qs = self.queries[k * self.P:(k + 1) * self.P]
    sampling = dataclasses.replace(self.rollout_cfg.sampling, seed=a.seed * 1_000_003 + k)
    compiles = self.engine.num_compiles
    self.engine.reset_stats()
    t0 = time.perf_counter()
    trajs = run_rollouts(self.engine, self.tokenizer, qs, self.tools,
                         dataclasses.replace(self.rollout_cfg, sampling=sampling),
                         samples_per_query=self.n, id_prefix=f"bench{k}/")
    t1 = time.perf_counter()
    rewards, components, _ = compute_rewards(trajs, self.reward_cfg)
    t2 = time.perf_counter()
    batch = rl.rollout_batch(trajs, length=a.seq, pad_id=self.pad_id)
    dev = {k_: jnp.asarray(v) for k_, v in batch.items()}
    # As the learner does with rl.pack=True: the forward and the update on packed rows, laid out
    # in micro-batches of `step` rows up to one row per trajectory (empty ones skipped).
    step = packing.row_multiple(len(trajs))
    layout = rl.RowLayout.of(batch["valid"], step) if a.pack else None
    if layout is None:
      old_logp = self.logprob_fn(self.state.params, dev)
    else:
      old_logp = layout.forward_BT(self.logprob_fn, self.state.params, batch, chunk=step)
    mask = rl.shifted_mask(dev)
    adv = rl.estimate_advantages(self.rl_cfg.advantage, rl.AdvantageInputs(
        rewards_B=jnp.asarray(rewards, jnp.float32), group_size=self.n, mask_BT=mask,
        kl_BT=jnp.zeros_like(old_logp)), self.rl_cfg)
    host = {"tokens": batch["tokens"], "valid": batch["valid"],
            "loss_mask": np.asarray(batch["loss_mask"] * np.asarray(adv.keep_B, np.int32)[:, None]),
            "adv": np.asarray(adv.adv_BT), "old_logp": np.asarray(old_logp), "ref_logp": np.asarray(old_logp)}
    num_micro = 1
    if layout is not None:
      host = layout.pack(host)
      padding, positions = packing.padding_fraction(host), host["valid"].size  # of the rows the step computes
      host, num_micro = packing.pad_rows(host, layout.capacity(step)), layout.capacity(step) // step
    else:
      padding, positions = packing.padding_fraction(host), host["valid"].size
    t3 = time.perf_counter()
    shape = host["tokens"].shape
    out["update_compiles"] = float(shape not in self.update_shapes)  # a new update shape compiles
    self.update_shapes.add(shape)
    self.state, m = self.train_step(self.state, {k_: jnp.asarray(v.reshape(num_micro, -1, *v.shape[1:]))
                                                 for k_, v in host.items()})
    self.engine.update_params(self.state.params)
    jax.block_until_ready((self.state, m))
    t4 = time.perf_counter()
    out.update(rollout=t1 - t0, reward=t2 - t1, logprob=t3 - t2, update=t4 - t3)
    out["gen_tokens"] = float(sum(t.num_model_tokens for t in trajs))
    out["valid_tokens"] = float(batch["valid"].sum())
    out["update_positions"] = float(positions)
    out["padding"] = padding
    out["prefill_ratio"] = float(self.engine.prefill_ratio)
    out["truncated"] = float(sum(len(t.prompt_ids) + len(t.response_ids) > a.seq for t in trajs))
    out["tool_calls"] = float(sum(len(t.tool_calls) for t in trajs))
    out["reward_mean"] = float(np.mean(rewards))
    out["outcome"] = float(np.mean(components.get("outcome", [0.0])))
    out["engine_compiles"] = float(self.engine.num_compiles - compiles)
    out["loss"] = float(m["loss"])
    return out

  def close(self) -> None:
    for t in self.tools.values():
      close = getattr(t, "close", None)
      if close is not None:
        close()


def time_train_step(loss_fn, params, batch: dict[str, np.ndarray], steps: int, warmup: int) -> tuple[float, float]:
  """(compile + first step seconds, mean seconds of a later step) of one jitted, donated step."""
  opt = make_optimizer(OptimizerConfig(learning_rate=1e-5, total_steps=1000))
  state = jax.jit(lambda p: init_state(p, opt, 0))(params)
  step = jax.jit(make_train_step(loss_fn, opt), donate_argnums=(0,))
  dev = {k: jnp.asarray(v)[None] for k, v in batch.items()}  # one micro-batch
  t = time.perf_counter()
  state, m = step(state, dev)
  jax.block_until_ready(m)
  first = time.perf_counter() - t
  for _ in range(max(warmup - 1, 0)):
    state, m = step(state, dev)
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, dev)
  jax.block_until_ready((state, m))
  return first, (time.perf_counter() - t) / steps


def sft_batch(vocab: int, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {"tokens": rng.integers(0, vocab, (batch, seq), dtype=np.int32),
          "loss_mask": (rng.random((batch, seq)) < 0.7).astype(np.int32),
          "valid": np.ones((batch, seq), np.int32)}


def rm_batch(vocab: int, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  examples = [{"tokens": [rng.integers(0, vocab, seq).tolist(), rng.integers(0, vocab, seq).tolist()],
               "margin": 0.0} for _ in range(batch)]
  return collate_pairs(examples, (seq,), pad_id=0)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--policy", default=DEMO_POLICY if os.path.isdir(DEMO_POLICY) else "",
                 help="HF policy dir with its tokenizer ('' : random-init --preset)")
  p.add_argument("--preset", default="demo", help="model preset when no --policy")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--prompts", type=int, default=8, help="questions per GRPO step")
  p.add_argument("--samples", type=int, default=4, help="trajectories per question (the group)")
  p.add_argument("--steps", type=int, default=3, help="timed GRPO steps after one warm-up step")
  p.add_argument("--seq", type=int, default=1024, help="bucket length of the RL batch")
  p.add_argument("--max-tokens-per-turn", type=int, default=256)
  p.add_argument("--max-response-tokens", type=int, default=640, help="model + tool tokens per trajectory")
  p.add_argument("--max-tool-calls", type=int, default=3)
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--advantage", default="dr_grpo", help="a critic-free registered advantage estimator")
  p.add_argument("--learning-rate", type=float, default=1e-5)
  p.add_argument("--num-entities", type=int, default=1200, help="task-world size (1200: the README figures' world)")
  p.add_argument("--batch", type=int, default=8, help="SFT sequences / RM pairs per step")
  p.add_argument("--train-seq", type=int, default=512, help="SFT / RM sequence length")
  p.add_argument("--train-steps", type=int, default=5, help="timed SFT / RM steps")
  p.add_argument("--warmup", type=int, default=2, help="SFT / RM steps before timing (the first compiles)")
  p.add_argument("--parts", default="rl,sft,rm", help="comma list of rl, sft, rm")
  p.add_argument("--engine", action="append", default=[], metavar="FIELD=VALUE",
                 help="set a field of the pipeline config's engine, read and checked as --config.engine.FIELD "
                      "(repeatable), e.g. --engine batch_buckets=8,16,32")
  p.add_argument("--no-pack", dest="pack", action="store_false",
                 help="one trajectory per row in the update (default: packed rows, as rl.pack=True)")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  args.config = base_config()
  try:
    for item in args.engine:
      field, _, raw = item.partition("=")
      apply_override(args.config, f"engine.{field}", raw)
    validate(args.config, require_workdir=False, check_paths=False)
  except ConfigError as e:
    p.error(f"--engine: {e}")
  # bm25s sets its own logger to DEBUG when imported; a filter outlives that.
  logging.getLogger("bm25s").addFilter(lambda r: r.levelno >= logging.WARNING)
  parts = set(args.parts.split(","))
  if parts - {"rl", "sft", "rm"}:
    p.error(f"--parts: unknown {sorted(parts - {'rl', 'sft', 'rm'})}")
  rows: list[tuple[str, str, str]] = []
  with tempfile.TemporaryDirectory() as tmp:
    cfg, graphdef, params, tokenizer, what = load_policy(args, tmp)
    print(f"policy: {what} ({cfg.num_params() / 1e6:.1f}M params, dtype {args.dtype}); "
          f"device: {jax.devices()[0]} (backend {jax.default_backend()}, {jax.device_count()} devices)", flush=True)
    if "rl" in parts:
      rows += bench_rl(args, cfg, graphdef, params, tokenizer, tmp)
    del params
  if "sft" in parts or "rm" in parts:
    rows += bench_train(args, cfg, parts)
  print()
  print(f"device: {jax.devices()[0]}; policy: {what}")
  print("| figure | value | notes |")
  print("|---|---|---|")
  for r in rows:
    print("| " + " | ".join(r) + " |")


def bench_rl(args, cfg, graphdef, params, tokenizer, tmp: str) -> list[tuple[str, str, str]]:
  bench = GRPOBench(args, cfg, graphdef, params, tokenizer, tmp)
  try:
    runs = []
    for k in range(args.steps + 1):
      r = bench.step(k)
      runs.append(r)
      tag = "warm-up" if k == 0 else f"step {k}"
      print(f"{tag}: " + " ".join(f"{ph}={r[ph]:.2f}s" for ph in PHASES)
            + f" gen_tokens={r['gen_tokens']:.0f} tool_calls={r['tool_calls']:.0f}"
            f" reward={r['reward_mean']:.3f} outcome={r['outcome']:.2f} truncated={r['truncated']:.0f}"
            f" engine_compiles={r['engine_compiles']:.0f} loss={r['loss']:.4f}", flush=True)
  finally:
    bench.close()
  warm, timed = runs[0], runs[1:]
  mean = {k: float(np.mean([r[k] for r in timed])) for k in timed[0]}
  total = sum(mean[ph] for ph in PHASES)
  rows = [("GRPO step", f"{total:.2f} s", f"mean of {len(timed)} after warm-up; {args.prompts} prompts x "
           f"{args.samples} samples, bucket {args.seq}")]
  for ph in PHASES:
    rows.append((f"  {ph}", f"{secs(mean[ph])} ({100 * mean[ph] / total:.0f}%)",
                 f"warm-up step: {secs(warm[ph])}"))
  steady = [r for r in timed if not r["engine_compiles"] and not r["update_compiles"]]
  if steady:
    rows.append(("GRPO step without compiles", f"{np.mean([sum(r[ph] for ph in PHASES) for r in steady]):.2f} s",
                 f"mean of the {len(steady)} timed steps that compiled nothing (engine or update); rollout "
                 f"{np.mean([r['rollout'] for r in steady]):.2f}, update {np.mean([r['update'] for r in steady]):.2f}"))
  rows.append(("warm-up step (compiles)", f"{sum(warm[ph] for ph in PHASES):.2f} s",
               f"{sum(warm[ph] for ph in PHASES) - total:+.2f} s over a timed step; "
               f"engine compiles {warm['engine_compiles']:.0f} then {sum(r['engine_compiles'] for r in timed):.0f} "
               "in timed steps"))
  rows.append(("rollout gen tok/s", f"{mean['gen_tokens'] / mean['rollout']:.1f}",
               f"{mean['gen_tokens']:.0f} model tokens/step, {mean['tool_calls']:.1f} tool calls/step, "
               f"mean reward {mean['reward_mean']:.3f}"))
  rows.append(("update train tok/s", f"{mean['update_positions'] / mean['update']:.1f}",
               f"{mean['update_positions']:.0f} positions/step ({mean['valid_tokens']:.0f} real tokens, "
               f"{'packed' if args.pack else 'one trajectory per row'})"))
  # Exactly these two lines: padding tokens / all tokens of the update batch, and prefill tokens
  # computed / context tokens seen by the engine over the step's rollout (the prefix cache's saving).
  print(f"padding fraction: {mean['padding']:.2f}")
  print(f"prefill/context: {mean['prefill_ratio']:.2f}")
  return rows


def bench_train(args, cfg, parts: set[str]) -> list[tuple[str, str, str]]:
  rows = []
  vocab, B, L = cfg.vocab_size, args.batch, args.train_seq
  if "sft" in parts:
    graphdef, params = init_model(cfg, seed=args.seed)
    first, dt = time_train_step(make_sft_loss(graphdef), params, sft_batch(vocab, B, L, args.seed),
                                args.train_steps, args.warmup)
    rows.append(("SFT train tok/s", f"{B * L / dt:.1f}",
                 f"{B} x {L}, {dt * 1e3:.1f} ms/step; first step (compile) {first:.2f} s"))
    print(f"sft: {B * L / dt:.1f} tok/s ({dt * 1e3:.1f} ms/step)", flush=True)
  if "rm" in parts:
    graphdef, params = init_model(cfg, "scalar", seed=args.seed)
    first, dt = time_train_step(make_rm_loss(graphdef, center_coef=0.01), params,
                                rm_batch(vocab, B, L, args.seed), args.train_steps, args.warmup)
    rows.append(("RM pair train tok/s", f"{2 * B * L / dt:.1f}",
                 f"{B} pairs x 2 x {L}, {dt * 1e3:.1f} ms/step; first step (compile) {first:.2f} s"))
    print(f"rm: {2 * B * L / dt:.1f} tok/s ({dt * 1e3:.1f} ms/step)", flush=True)
  return rows


if __name__ == "__main__":
  main()
