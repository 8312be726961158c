"""The RL stage: GRPO or PPO from the SFT policy, with rollouts through the multi-turn tool loop.

`rl:VARIANT` runs `config.rl` updated by `config.rl_variants[VARIANT]` into `<workdir>/rl_VARIANT`.
One step: take the next `prompts_per_step` training questions (a seeded order, so the data
position is the step number), sample `samples_per_prompt` trajectories each on the in-process
engine (which holds the current weights), score them (outcome + format [+ RM]), compute
advantages (group-normalised for GRPO; GAE over model tokens with a value-head critic for PPO)
and take `minibatches` optimizer steps; then hand the new weights to the engine.

Every `checkpoint_every` steps the policy (and critic) params, optimizer states, RNG and the
reward normaliser's running statistics are saved under the step number; rollouts are seeded by
(seed, step), so a killed run, rerun, reproduces the uninterrupted run's metrics.

Fields of `config.rl`: `algo` ('grpo' | 'ppo'), `init` (model name in the workdir), `split`,
`steps`, `prompts_per_step`, `samples_per_prompt`, `minibatches`, `micro_batch_size`,
`buckets` (sequence lengths: a step pads to the smallest that fits it), `learning_rate`, `warmup_steps`, `critic_learning_rate`,
`critic_warmup` (PPO: steps that train only the critic), the objective's knobs (see
`RLConfig`), `rewards` (see `rewards.RewardConfig`), `rm` (model name of the reward model, used
when the rewards weight 'rm'), sampling (`temperature`, `top_p`) and rollout limits.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from autotraj_jax.stages import Workdir, register_stage
from autotraj_jax.training import rl

log = logging.getLogger(__name__)


def question_order(n: int, seed: int, step: int, per_step: int) -> list[int]:
  """Indices of the questions of `step`: epochs of seeded permutations, so any step's questions
  are known without replaying the run."""
  out = []
  for k in range(step * per_step, (step + 1) * per_step):
    epoch, pos = divmod(k, n)
    out.append(int(np.random.default_rng([seed, epoch]).permutation(n)[pos]))
  return out


def reward_config(node) -> "Any":
  from autotraj_jax.rewards import RewardConfig
  d = dict(node.rewards)
  d["weights"] = dict(d.get("weights", {}))
  return RewardConfig(**d)


def rl_config(node) -> rl.RLConfig:
  names = {f.name for f in dataclasses.fields(rl.RLConfig)}
  return rl.RLConfig(**{k: v for k, v in node.items() if k in names})


def trajectory_metrics(trajs, rewards, components) -> dict[str, float]:
  from autotraj_jax.tir.answers import is_equivalent
  n = max(len(trajs), 1)
  calls = [c for t in trajs for c in t.tool_calls]
  out = {"reward": float(np.mean(rewards)),
         "accuracy": sum(is_equivalent(t.gold, t.answer, t.domain) for t in trajs) / n,
         "response_tokens": sum(t.num_model_tokens for t in trajs) / n,
         "tool_calls": len(calls) / n,
         "tool_errors": sum(not c.ok for c in calls) / n}
  for name, values in components.items():
    out[f"reward/{name}"] = float(np.mean(values))
  return out


class _Model:
  """A trainer plus how to save/restore it at an RL step (not its optimizer-step count)."""

  def __init__(self, trainer):
    self.trainer = trainer
    self.state = None

  def start(self, step: int | None):
    tr = self.trainer
    if step is None:
      self.state = tr._fresh_state()
      return
    from autotraj_jax.training.step import TrainState, init_state
    abstract = jax.eval_shape(lambda p: init_state(p, tr.optimizer, tr.cfg.seed), tr._init_params)
    r = tr.ckpt.restore(step, params_like=abstract.params, param_shardings=tr.state_shardings.params,
                        opt_state_like=abstract.opt_state, opt_shardings=tr.state_shardings.opt_state, rng=True)
    rep = tr.state_shardings.step
    self.state = TrainState(jax.device_put(np.int32(r.step), rep), r.params, r.opt_state, jax.device_put(r.rng, rep))
    self.meta = r.meta

  def update(self, batch: dict[str, np.ndarray], minibatches: int) -> dict[str, float]:
    """`minibatches` optimizer steps over `batch` in order; mean of their metrics."""
    B = batch["tokens"].shape[0]
    size = B // minibatches
    out: dict[str, float] = {}
    for i in range(minibatches):
      part = {k: v[i * size:(i + 1) * size] for k, v in batch.items()}
      self.state, m = self.trainer.train_step(self.state, self.trainer._device_batch(part))
      for k, v in jax.device_get(m).items():
        out[k] = out.get(k, 0.0) + float(v) / minibatches
    return out

  def save(self, step: int, meta: dict[str, Any]) -> None:
    tr, st = self.trainer, self.state
    tr.ckpt.save(step, params=st.params, opt_state=st.opt_state, rng=st.rng,
                 meta={**tr.meta, **meta, "step": step}, force=True)

  def close(self):
    self.trainer.ckpt.wait()
    self.trainer.close()


def _train_cfg(node, *, batch: int, lr: float, seed: int, steps: int):
  from autotraj_jax.training.optimizer import OptimizerConfig
  from autotraj_jax.training.trainer import TrainConfig
  micro = node.micro_batch_size if node.micro_batch_size and batch % node.micro_batch_size == 0 else 0
  return TrainConfig(steps=steps, batch_size=batch, micro_batch_size=micro, buckets=tuple(node.buckets),
                     seed=seed, keep_checkpoints=2, optimizer=OptimizerConfig(
                         learning_rate=lr, warmup_steps=node.warmup_steps, total_steps=steps,
                         end_lr_ratio=1.0, weight_decay=0.0, grad_clip=node.get("grad_clip", 1.0)))


@register_stage("rl")
def rl_stage(config, wd: Workdir, variant: str) -> None:
  from tqdm.auto import tqdm

  from autotraj_jax import checkpoint
  from autotraj_jax import sharding as shd
  from autotraj_jax.metrics import MetricWriter
  from autotraj_jax.models import abstract_model
  from autotraj_jax.rewards import RewardState, compute_rewards
  from autotraj_jax.tir.rollout import run_rollouts
  from autotraj_jax.training.sft_stage import variant_node
  from autotraj_jax.training.trainer import Trainer
  from data_gen.stages import (close_tools, load_split, load_tokenizer_for, make_engine, make_tools,
                               model_checkpoints, rollout_config)

  node = variant_node(config, "rl", variant)
  cfg = rl_config(node)
  rcfg = reward_config(node)
  for needed, role in ((node.init, "starting policy"), (node.rm if rcfg.uses_rm else None, "reward model")):
    if needed and (reason := wd.skipped(needed)):
      wd.skip(f"rl_{variant}", f"its {role} '{needed}' was not trained ({reason})")
      return
  out_dir = wd.path(f"rl_{variant}")
  tokenizer = load_tokenizer_for(config, wd)
  pad_id = tokenizer.pad_token_id or 0
  queries = load_split(config, wd, node.split, node.get("max_questions", 0) or None)
  P, n = node.prompts_per_step, node.samples_per_prompt
  B = P * n
  if B % node.minibatches:
    raise ValueError(f"rl: {P} prompts x {n} samples does not split into {node.minibatches} minibatches")

  init_dir = model_checkpoints(wd, node.init)
  model_cfg, kind, params = checkpoint.load_model(init_dir)
  graphdef, _ = abstract_model(model_cfg, kind)
  mesh = shd.make_mesh(shd.MeshConfig(fsdp=-1))
  meta = {"model_config": model_cfg.to_dict(), "model_kind": kind, "algo": cfg.algo, "init": node.init}
  policy = _Model(Trainer(_train_cfg(node, batch=B // node.minibatches, lr=node.learning_rate, seed=config.seed,
                                     steps=node.steps * node.minibatches),
                          loss_fn=rl.make_policy_loss(graphdef, cfg), params=params, mesh=mesh,
                          workdir=out_dir, meta=meta, progress=False))
  critic = None
  if cfg.algo == "ppo":
    critic_graphdef, critic_like = abstract_model(model_cfg, "scalar")
    critic_params = {**critic_like, "model": params["model"],
                     "score": jnp.zeros(critic_like["score"].shape, critic_like["score"].dtype)}
    critic = _Model(Trainer(_train_cfg(node, batch=B // node.minibatches, lr=node.critic_learning_rate,
                                       seed=config.seed, steps=node.steps * node.minibatches),
                            loss_fn=rl.make_value_loss(critic_graphdef, cfg), params=critic_params, mesh=mesh,
                            workdir=os.path.join(out_dir, "critic"),
                            meta={"model_config": model_cfg.to_dict(), "model_kind": "scalar"}, progress=False))
    value_fn = jax.jit(rl.make_value_fn(critic_graphdef))

  # Resume at the newest step both models have.
  steps = [m.trainer.ckpt.latest_step() for m in (policy, critic) if m is not None]
  start = None if any(s is None for s in steps) else min(steps)
  if start is not None and critic is not None and start not in critic.trainer.ckpt.all_steps():
    start = None
  for m in (policy, critic):
    if m is not None:
      m.start(start)
  reward_state = RewardState()
  if start is not None:
    reward_state = RewardState.from_dict(policy.meta.get("reward_state", {}))
  begin = 0 if start is None else start

  logprob_fn = jax.jit(rl.make_logprob_fn(graphdef))
  ref_params = jax.device_put(params, policy.trainer.state_shardings.params)
  engine = make_engine(config, init_dir, tokenizer)
  engine_shardings = jax.tree.map(lambda x: x.sharding, engine.params)
  engine.update_params(jax.device_put(policy.state.params, engine_shardings))
  tools = make_tools(config, wd)
  rm_fn = None
  if rcfg.uses_rm:
    from autotraj_jax.training.rm_stage import RewardModelScorer
    rm_dir = model_checkpoints(wd, node.rm)
    if not os.path.isdir(rm_dir):
      raise FileNotFoundError(f"rl:{variant} rewards use the reward model but {rm_dir} holds no checkpoint "
                              f"(was the '{node.rm}' stage run? see {node.rm}/eval.json)")
    rm_fn = RewardModelScorer(rm_dir, tokenizer)
  rollout_cfg = rollout_config(node, config.seed)
  writer = MetricWriter(os.path.join(out_dir, "logs"))
  bar = tqdm(total=node.steps, initial=begin, desc=f"rl:{variant}", dynamic_ncols=True)
  try:
    for step in range(begin, node.steps):
      t0 = time.time()
      batch_q = [queries[i] for i in question_order(len(queries), config.seed, step, P)]
      sampling = dataclasses.replace(rollout_cfg.sampling, seed=config.seed * 1_000_003 + step)
      trajs = run_rollouts(engine, tokenizer, batch_q, tools, dataclasses.replace(rollout_cfg, sampling=sampling),
                           samples_per_query=n, id_prefix=f"rl{step}/")
      t1 = time.time()
      rewards, components, info = compute_rewards(trajs, rcfg, rm_fn, reward_state)
      t2 = time.time()
      longest = max(len(t.prompt_ids) + sum(len(s.token_ids) for s in t.segments) for t in trajs)
      L = min((b for b in node.buckets if b >= longest), default=max(node.buckets))  # one compile per bucket
      batch = rl.rollout_batch(trajs, length=L, pad_id=pad_id)
      dev = {k: jnp.asarray(v) for k, v in batch.items()}
      old_logp = logprob_fn(policy.state.params, dev)
      ref_logp = logprob_fn(ref_params, dev) if cfg.kl_coef else old_logp
      mask = rl.shifted_mask(dev)
      kl_bt = rl.rl_losses.kl_penalty(old_logp, ref_logp, cfg.kl_kind)
      seq_r = jnp.asarray(rewards, jnp.float32)
      if cfg.kl_in_reward and cfg.kl_coef and cfg.algo == "grpo":
        seq_r = seq_r - cfg.kl_coef * jnp.sum(kl_bt * mask, axis=-1)
      metrics = trajectory_metrics(trajs, rewards, components)
      if cfg.algo == "grpo":
        adv, keep = rl.grpo_advantages(seq_r.reshape(P, n), cfg)
        adv_bt = adv[:, None] * mask
        train_mask = keep.astype(jnp.int32)[:, None]
        metrics["groups_kept"] = float(jnp.mean(keep))
      else:
        old_values = value_fn(critic.state.params, dev)
        adv_bt, returns = rl.ppo_advantages(seq_r, old_values, mask, kl_bt, cfg)
        train_mask = 1
      has = jnp.asarray(batch["sampler_has"][:, 1:]) * mask  # sampler vs trainer logprob gap
      metrics["logprob_gap"] = float(jnp.sum(jnp.abs(dev["sampler_logp"][:, 1:] - old_logp) * has)
                                     / jnp.maximum(jnp.sum(has), 1.0))
      host = {"tokens": batch["tokens"], "valid": batch["valid"],
              "loss_mask": np.asarray(batch["loss_mask"] * train_mask), "adv": np.asarray(adv_bt),
              "old_logp": np.asarray(old_logp), "ref_logp": np.asarray(ref_logp)}
      if critic is not None:
        cm = critic.update({"tokens": batch["tokens"], "valid": batch["valid"], "loss_mask": batch["loss_mask"],
                            "old_values": np.asarray(old_values), "returns": np.asarray(returns)},
                           node.minibatches)
        metrics["critic/loss"] = cm["loss"]
      if critic is None or step >= node.critic_warmup:
        pm = policy.update(host, node.minibatches)
        tokens = max(pm.get("tokens", 0.0), 1.0)
        metrics.update({"loss": pm["loss"], "grad_norm": pm.get("grad_norm", 0.0),
                        "kl": pm.get("kl_sum", 0.0) / tokens, "entropy": pm.get("entropy_sum", 0.0) / tokens,
                        "clip_frac": pm.get("clipfrac_sum", 0.0) / tokens})
        engine.update_params(jax.device_put(policy.state.params, engine_shardings))
      t3 = time.time()
      metrics.update({"time/rollout_s": t1 - t0, "time/reward_s": t2 - t1, "time/update_s": t3 - t2,
                      "rm_failures": float(reward_state.rm_failures)})
      writer.write(step + 1, metrics)
      bar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['accuracy']:.2f}")
      bar.update(1)
      if (step + 1) % node.checkpoint_every == 0 or step + 1 == node.steps:
        extra = {"reward_state": reward_state.to_dict()}
        for m in (policy, critic):
          if m is not None:
            m.save(step + 1, extra)
  finally:
    bar.close()
    writer.close()
    close_tools(tools)
    for m in (policy, critic):
      if m is not None:
        m.close()
