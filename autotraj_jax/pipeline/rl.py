"""The RL stage: GRPO-family or PPO updates of the SFT policy, with rollouts through the
multi-turn tool loop.

`rl:VARIANT` runs `config.rl` updated by `config.rl_variants[VARIANT]` into `<workdir>/rl_VARIANT`.
One step: take the next `prompts_per_step` training questions (a seeded order, so the data
position is the step number), sample `samples_per_prompt` trajectories each on the in-process
engine (which holds the current weights), score them (`rewards`), let the `Learner` update the
policy (advantages by the registered estimator `advantage`; `gae` also trains a value-head
critic), then hand the new weights to the engine.

Every `checkpoint_every` steps the learner's models, optimizer states, RNG and the reward
normaliser's running statistics are saved under the step number; rollouts are seeded by
(seed, step), so a killed run, rerun, reproduces the uninterrupted run's metrics.

Fields of `config.rl`: `init` (model name in the workdir), `rm` (the reward model's, used when
the rewards need it), `split`, `max_questions`, `steps`, `prompts_per_step`,
`samples_per_prompt`, `minibatches`, `micro_batch_size`, `buckets`, `learning_rate`,
`warmup_steps`, `grad_clip`, `critic_learning_rate`, `critic_warmup`, `checkpoint_every`; the
objective (`training.rl.RLConfig`: `advantage`, `clip_low`, `clip_high`, `agg`,
`filter_uniform_groups`, `kl_coef`, `kl_kind`, `kl_in_reward`, `entropy_coef`, `gamma`, `lam`,
`value_clip`, `whiten_advantages`); `rewards` (`rewards.RewardConfig`); sampling (`temperature`
1, `top_p` 1, `top_k` -1: anything else is refused) and rollout limits.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from autotraj_jax.distributed import is_primary
from autotraj_jax.pipeline.builders import (
  close_tools,
  from_node,
  load_split,
  load_tokenizer,
  make_engine,
  make_mesh,
  make_tools,
  rollout_config,
  train_config,
  variant_node,
)
from autotraj_jax.pipeline.workdir import Workdir
from autotraj_jax.rewards import RewardConfig, RewardState, compute_rewards
from autotraj_jax.training.rl import Learner, LearnerConfig, RLConfig

log = logging.getLogger(__name__)


def question_order(n: int, seed: int, step: int, per_step: int) -> list[int]:
  """Indices of the questions of `step`: epochs of seeded permutations, so any step's questions
  are known without replaying the run."""
  out = []
  for k in range(step * per_step, (step + 1) * per_step):
    epoch, pos = divmod(k, n)
    out.append(int(np.random.default_rng([seed, epoch]).permutation(n)[pos]))
  return out


def learner_config(node: ml_collections.ConfigDict) -> LearnerConfig:
  """The learner's settings of an rl node; refuses sampling that breaks the importance ratio."""
  return from_node(LearnerConfig, node, objective=from_node(RLConfig, node))


def reward_config(node: ml_collections.ConfigDict) -> RewardConfig:
  return from_node(RewardConfig, node.rewards)


def learner_train_configs(node: ml_collections.ConfigDict, *, seed: int, pad_id: int):
  """(policy, critic) TrainConfigs: one optimizer step per minibatch, a constant learning rate
  after warmup, the critic at `critic_learning_rate`."""
  batch = node.prompts_per_step * node.samples_per_prompt
  if batch % node.minibatches:
    raise ValueError(f"rl: {node.prompts_per_step} prompts x {node.samples_per_prompt} samples does not split "
                     f"into rl.minibatches={node.minibatches}")
  kw = dict(seed=seed, pad_id=pad_id, batch_size=batch // node.minibatches, steps=node.steps * node.minibatches,
            end_lr_ratio=1.0, keep_checkpoints=2, group_by_length=False)
  critic_node = ml_collections.ConfigDict({**node.to_dict(), "learning_rate": node.critic_learning_rate})
  return train_config(node, **kw), train_config(critic_node, **kw)


def trajectory_metrics(trajs, rewards, components) -> dict[str, float]:
  from autotraj_jax.tir.answers import is_equivalent
  n = max(len(trajs), 1)
  calls = [c for t in trajs for c in t.tool_calls]
  out = {"reward": float(np.mean(rewards)),
         "accuracy": sum(is_equivalent(t.gold, t.answer, t.domain) for t in trajs) / n,
         "response_tokens": sum(t.num_model_tokens for t in trajs) / n,
         "tool_calls": len(calls) / n,
         "tool_errors": sum(not c.ok for c in calls) / n}
  for name, values in components.items():  # each component as computed, before normalisation and weights
    out[f"reward/{name}"] = float(np.mean(values))
  return out


def missing_input(wd: Workdir, node: ml_collections.ConfigDict, rewards: RewardConfig) -> str | None:
  """Why this run cannot train, when a model it starts from or scores with was skipped."""
  for needed, role in ((node.init, "starting policy"), (node.rm if rewards.uses_rm else None, "reward model")):
    if needed and (reason := wd.skipped(needed)):
      return f"its {role} '{needed}' was not trained ({reason})"
  return None


@dataclasses.dataclass
class RLRun:
  """What one RL run holds between steps."""

  config: ml_collections.ConfigDict
  node: ml_collections.ConfigDict
  learner: Learner
  engine: Any
  tokenizer: Any
  tools: dict[str, Any]
  queries: list[Any]
  rewards: RewardConfig
  reward_state: RewardState
  rm_fn: Any = None

  def hand_weights(self) -> None:
    """The engine samples the next step with the learner's current params."""
    shardings = jax.tree.map(lambda x: x.sharding, self.engine.params)
    self.engine.update_params(jax.device_put(self.learner.params, shardings))


def build_run(config, wd: Workdir, variant: str, node, lcfg: LearnerConfig, rcfg: RewardConfig) -> RLRun:
  """Tokenizer, questions, learner (from `node.init`), engine, tools and the RM scorer."""
  from autotraj_jax import checkpoint
  tokenizer = load_tokenizer(config, wd)
  pad_id = tokenizer.pad_token_id or 0
  queries = load_split(config, wd, node.split, node.max_questions or None)
  train, critic_train = learner_train_configs(node, seed=config.seed, pad_id=pad_id)
  init_dir = wd.model_dir(node.init)
  mesh = make_mesh(config)
  model_cfg, kind, params = checkpoint.load_model(init_dir, mesh=mesh)
  if kind != "causal_lm":
    raise ValueError(f"rl.init={node.init!r} is a {kind!r} model, expected a causal LM")
  learner = Learner(lcfg, model_config=model_cfg, params=params, mesh=mesh, workdir=wd.path(f"rl_{variant}"),
                    train=train, critic_train=critic_train, pad_id=pad_id, meta={"init": node.init})
  rm_fn = None
  if rcfg.uses_rm:
    from autotraj_jax.training.rm_scorer import RewardModelScorer
    rm_dir = wd.model_dir(node.rm)
    if not os.path.isdir(rm_dir):
      raise FileNotFoundError(f"rl:{variant} rewards use the reward model but {rm_dir} holds no checkpoint "
                              f"(was the '{node.rm}' stage run? see {node.rm}/eval.json)")
    rm_fn = RewardModelScorer(rm_dir, tokenizer)
  engine = make_engine(config, init_dir, tokenizer, mesh=mesh)
  return RLRun(config, node, learner, engine, tokenizer, make_tools(config, wd), queries, rcfg, RewardState(),
               rm_fn)


def rl_step(run: RLRun, step: int) -> dict[str, float]:
  """Questions of `step` -> rollouts -> rewards -> learner update -> new weights to the engine."""
  from autotraj_jax.tir.rollout import run_rollouts
  node, seed = run.node, run.config.seed
  t0 = time.time()
  questions = [run.queries[i] for i in question_order(len(run.queries), seed, step, node.prompts_per_step)]
  rollout_cfg = rollout_config(node, seed)
  rollout_cfg = dataclasses.replace(rollout_cfg, sampling=dataclasses.replace(rollout_cfg.sampling,
                                                                              seed=seed * 1_000_003 + step))
  trajs = run_rollouts(run.engine, run.tokenizer, questions, run.tools, rollout_cfg,
                       samples_per_query=node.samples_per_prompt, id_prefix=f"rl{step}/")
  t1 = time.time()
  rewards, components, info = compute_rewards(trajs, run.rewards, run.rm_fn, run.reward_state)
  t2 = time.time()
  raw = dict(components)
  if info.get("rm_raw") is not None:  # plot what the RM said, not its batch-normalised (mean 0) form
    raw["rm"] = info["rm_raw"]
  metrics = trajectory_metrics(trajs, rewards, raw)
  metrics.update(run.learner.update(trajs, rewards, group_size=node.samples_per_prompt, step=step))
  run.hand_weights()
  metrics.update({"time/rollout_s": t1 - t0, "time/reward_s": t2 - t1, "time/update_s": time.time() - t2,
                  "rm_failures": float(run.reward_state.rm_failures)})
  return metrics


def rl_stage(config, wd: Workdir, variant: str) -> None:
  """GRPO / Dr. GRPO / RLOO / PPO from the SFT policy with real tool calls (rl:VARIANT), into rl_VARIANT/."""
  from tqdm.auto import tqdm

  from autotraj_jax.metrics import MetricWriter
  node = variant_node(config, "rl", variant)
  lcfg, rcfg = learner_config(node), reward_config(node)  # bad settings fail here, before any work
  name = f"rl_{variant}"
  if reason := missing_input(wd, node, rcfg):
    wd.skip(name, reason)
    return
  run = build_run(config, wd, variant, node, lcfg, rcfg)
  writer = bar = None
  try:
    start = run.learner.resume_step()
    meta = run.learner.start(start)
    run.reward_state = RewardState.from_dict(meta.get("reward_state", {}))
    run.hand_weights()
    begin = start or 0
    writer = MetricWriter(wd.path(name, "logs"), start_step=begin)
    bar = tqdm(total=node.steps, initial=begin, desc=f"rl:{variant}", unit="step", dynamic_ncols=True,
               disable=not is_primary())
    for step in range(begin, node.steps):
      metrics = rl_step(run, step)
      writer.write(step + 1, metrics)
      bar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['accuracy']:.2f}")
      bar.update(1)
      if (step + 1) % node.checkpoint_every == 0 or step + 1 == node.steps:
        run.learner.save(step + 1, {"reward_state": run.reward_state.to_dict()})
  finally:
    for closeable in (bar, writer):
      if closeable is not None:
        closeable.close()
    close_tools(run.tools)
    run.learner.close()
