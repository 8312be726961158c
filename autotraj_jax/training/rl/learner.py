"""The RL learner: one policy update per step from a batch of grouped trajectories and their
rewards.

It owns the policy trainer (and the critic's, when the advantage estimator needs one), the
reference params for the KL term and the jitted log-prob / value functions, and talks to the
trainers through their public API only. A step is: lay the trajectories out in the smallest
bucket that fits, compute old (and reference) log-probs, advantages by the registered estimator,
then `minibatches` optimizer steps (the critic first, the policy after `critic_warmup` steps).
Checkpoints are saved under the RL step number with caller meta (e.g. the reward normaliser's
state), so a rerun resumes exactly.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from autotraj_jax.models import abstract_model
from autotraj_jax.models.config import ModelConfig
from autotraj_jax.tir.trajectory import Trajectory
from autotraj_jax.training import packing
from autotraj_jax.training.rl.advantages import AdvantageInputs, Advantages, estimate_advantages
from autotraj_jax.training.rl.batch import (
  RowLayout,
  logprob_gap,
  pick_bucket,
  rollout_batch,
  shifted_mask,
)
from autotraj_jax.training.rl.config import RLConfig
from autotraj_jax.training.rl.losses import kl_penalty
from autotraj_jax.training.rl.objective import make_logprob_fn, make_policy_loss, make_value_fn, make_value_loss
from autotraj_jax.training.step import TrainState
from autotraj_jax.training.trainer import TrainConfig, Trainer


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
  """The objective, how one step's batch is split, and the rollout sampling it can learn from.

  The importance ratio divides the trainer's log-probs of the *untempered, unfiltered* policy by
  the sampler's; rollouts drawn at another temperature or through a top-p / top-k filter come
  from a different distribution, so the ratio (and the logprob gap) would be wrong. Such
  settings are refused here, before any work.
  """

  objective: RLConfig = RLConfig()
  minibatches: int = 1              # optimizer steps per RL step (the batch split in order)
  buckets: tuple[int, ...] = (512,)  # sequence lengths: a step pads to the smallest that fits
  critic_warmup: int = 0            # steps that train only the critic (estimators with a critic)
  temperature: float = 1.0          # the training rollouts' sampling, checked here
  top_p: float = 1.0
  top_k: int = -1                   # -1: no top-k filter

  def __post_init__(self):
    if self.temperature != 1.0:
      raise ValueError(f"rl.temperature must be 1.0 (the importance ratio assumes untempered sampling), "
                       f"got {self.temperature}")
    if self.top_p < 1.0:
      raise ValueError(f"rl.top_p must be 1.0 (a nucleus filter breaks the importance ratio), got {self.top_p}")
    if self.top_k > 0:
      raise ValueError(f"rl.top_k must be -1 or 0 (a top-k filter breaks the importance ratio), got {self.top_k}")
    if self.minibatches < 1:
      raise ValueError(f"rl.minibatches must be >= 1, got {self.minibatches}")
    if not self.buckets or sorted(self.buckets) != list(self.buckets):
      raise ValueError(f"rl.buckets must be a non-empty ascending tuple, got {self.buckets}")
    if self.critic_warmup < 0:
      raise ValueError(f"rl.critic_warmup must be >= 0, got {self.critic_warmup}")


class _Part:
  """A trainer plus its current state, saved and restored under RL step numbers."""

  def __init__(self, trainer: Trainer):
    self.trainer = trainer
    self.state: TrainState | None = None

  def start(self, step: int | None) -> dict[str, Any]:
    if step is None:
      self.state = self.trainer.init_state()
      return {}
    self.state, meta = self.trainer.restore_state(step)
    return meta

  def update(self, batch: dict[str, np.ndarray], minibatches: int) -> dict[str, float]:
    """`minibatches` optimizer steps over `batch` in order; the mean of their metrics, with the
    update's padding fraction. When the trainer packs, a minibatch's packed rows are laid out in
    micro-batches of `packed_rows` rows, with empty ones (skipped by the step) up to one row per
    trajectory: one shape, so one compile, whatever the packing needs."""
    size = batch["tokens"].shape[0] // minibatches
    out: dict[str, float] = {}
    for i in range(minibatches):
      part = {k: v[i * size:(i + 1) * size] for k, v in batch.items()}
      layout, step, num_micro = None, self.trainer.packed_rows(size), None
      if self.trainer.cfg.pack:
        layout = RowLayout.of(part["valid"], step)
        part = layout.pack(part)
      out["padding"] = out.get("padding", 0.0) + packing.padding_fraction(part) / minibatches  # rows computed
      if layout is not None:
        part, num_micro = packing.pad_rows(part, layout.capacity(step)), layout.capacity(step) // step
      self.state, m = self.trainer.train_step(self.state, self.trainer.device_batch(part, num_micro=num_micro))
      for k, v in jax.device_get(m).items():
        out[k] = out.get(k, 0.0) + float(v) / minibatches
    return out

  def save(self, step: int, meta: dict[str, Any]) -> None:
    self.trainer.save(self.state, step=step, meta=meta, force=True)


def _copy(tree: Any) -> Any:
  """Fresh buffers: a donated train step must not free arrays someone else still holds."""
  return jax.tree.map(jnp.copy, tree)


class Learner:
  """Policy (and critic) updates from grouped trajectories; see the module docstring.

  `params` (the initial policy, also the KL reference) become the policy trainer's: the first
  update may donate their buffers. `train` configures the policy's optimizer steps
  (batch_size = one minibatch), `critic_train` the critic's (needed when the estimator has a
  critic). Policy checkpoints go to `workdir/checkpoints`, the critic's to `workdir/critic/`.
  """

  def __init__(self, cfg: LearnerConfig, *, model_config: ModelConfig, params: Any, mesh: Mesh,
               workdir: str | os.PathLike, train: TrainConfig, critic_train: TrainConfig | None = None,
               pad_id: int = 0, meta: dict[str, Any] | None = None):
    obj = cfg.objective
    if obj.needs_critic and critic_train is None:
      raise ValueError(f"rl.advantage={obj.advantage!r} trains a critic, but no critic_train config was given")
    self.cfg, self.pad_id, self.workdir = cfg, pad_id, os.fspath(workdir)
    graphdef, _ = abstract_model(model_config, "causal_lm")
    ref = _copy(params) if obj.kl_coef else None
    critic_params = self._critic_init(model_config, params) if obj.needs_critic else None
    policy_meta = {"model_config": model_config.to_dict(), "model_kind": "causal_lm",
                   "advantage": obj.advantage, **(meta or {})}
    self.policy = _Part(Trainer(train, loss_fn=make_policy_loss(graphdef, obj), params=params, mesh=mesh,
                                workdir=self.workdir, meta=policy_meta, progress=False, skip_empty=True))
    self._ref = None if ref is None else jax.device_put(ref, self.policy.trainer.state_shardings.params)
    self._logprob_fn = jax.jit(make_logprob_fn(graphdef))
    self.critic: _Part | None = None
    if critic_params is not None:
      critic_graphdef, _ = abstract_model(model_config, "scalar")
      critic_meta = {"model_config": model_config.to_dict(), "model_kind": "scalar"}
      self.critic = _Part(Trainer(critic_train, loss_fn=make_value_loss(critic_graphdef, obj), params=critic_params,
                                  mesh=mesh, workdir=os.path.join(self.workdir, "critic"), meta=critic_meta,
                                  progress=False, skip_empty=True))
      self._value_fn = jax.jit(make_value_fn(critic_graphdef))

  @staticmethod
  def _critic_init(model_config: ModelConfig, params: Any) -> Any:
    """The critic: the policy's trunk (a copy) under a zero value head."""
    _, like = abstract_model(model_config, "scalar")
    return {**like, "model": _copy(params["model"]), "score": jnp.zeros(like["score"].shape, like["score"].dtype)}

  @property
  def parts(self) -> list[_Part]:
    return [p for p in (self.policy, self.critic) if p is not None]

  @property
  def params(self) -> Any:
    """The current policy params (on the trainer's shardings), for the sampling engine. An
    update donates the previous params' buffers: hand the engine the new ones after each update."""
    return self.policy.state.params

  # -- start, save, close ------------------------------------------------------------------

  def resume_step(self) -> int | None:
    """The newest RL step that every model (policy, critic) has a checkpoint of, if any."""
    common = set.intersection(*(set(p.trainer.saved_steps()) for p in self.parts))
    return max(common) if common else None

  def start(self, step: int | None = None) -> dict[str, Any]:
    """Fresh states (`step` None) or those saved at RL step `step`; returns the policy
    checkpoint's meta ({} when fresh), where `save` put the caller's extra meta."""
    metas = [p.start(step) for p in self.parts]
    return metas[0]

  def save(self, step: int, meta: dict[str, Any] | None = None) -> None:
    """Checkpoints every model under RL step `step`, with `meta` added to each one's meta."""
    for p in self.parts:
      p.save(step, dict(meta or {}))

  def close(self) -> None:
    for p in self.parts:
      p.trainer.close()

  # -- the update --------------------------------------------------------------------------

  def update(self, trajs: Sequence[Trajectory], rewards: Sequence[float], *, group_size: int,
             step: int) -> dict[str, float]:
    """One RL step on `trajs` (prompts x `group_size` samples, each prompt's samples adjacent)
    with one reward each; returns the step's metrics."""
    minibatch = self.policy.trainer.cfg.batch_size
    if len(trajs) != minibatch * self.cfg.minibatches or len(rewards) != len(trajs):
      raise ValueError(f"rl: expected {minibatch * self.cfg.minibatches} trajectories and rewards "
                       f"({self.cfg.minibatches} minibatches of {minibatch}), got {len(trajs)} and {len(rewards)}")
    host = rollout_batch(trajs, length=pick_bucket(trajs, self.cfg.buckets), pad_id=self.pad_id)
    dev = {k: jnp.asarray(v) for k, v in host.items()}
    rollout = self._score(host, dev, rewards, group_size)
    metrics = {"groups_kept": float(jnp.mean(rollout.adv.keep_B)), "logprob_gap": logprob_gap(dev, rollout.old_logp),
               "bucket": float(host["tokens"].shape[1])}
    if self.critic is not None:
      cm = self.critic.update({"tokens": host["tokens"], "valid": host["valid"], "loss_mask": host["loss_mask"],
                               "old_values": np.asarray(rollout.old_values),
                               "returns": np.asarray(rollout.adv.returns_BT)}, self.cfg.minibatches)
      metrics["critic/loss"] = cm["loss"]
    if self.critic is None or step >= self.cfg.critic_warmup:
      metrics.update(self._policy_update(host, rollout))
    return metrics

  def _score(self, host: dict[str, np.ndarray], dev: dict[str, jax.Array], rewards: Sequence[float],
             group_size: int) -> "_Scored":
    """Log-probs, values and advantages of the batch under the current params. When the policy
    trainer packs, the forwards run on packed rows and come back as [B, T]."""
    obj = self.cfg.objective
    layout, step = None, self.policy.trainer.packed_rows(len(host["valid"]))
    if self.policy.trainer.cfg.pack:
      layout = RowLayout.of(host["valid"], step)

    def forward(fn, params):
      return fn(params, dev) if layout is None else layout.forward_BT(fn, params, host, chunk=step)
    old_logp = forward(self._logprob_fn, self.policy.state.params)
    ref_logp = forward(self._logprob_fn, self._ref) if self._ref is not None else old_logp
    mask = shifted_mask(dev)
    old_values = forward(self._value_fn, self.critic.state.params) if self.critic is not None else None
    inputs = AdvantageInputs(rewards_B=jnp.asarray(rewards, jnp.float32), group_size=group_size, mask_BT=mask,
                             kl_BT=kl_penalty(old_logp, ref_logp, obj.kl_kind), values_BT=old_values)
    return _Scored(old_logp, ref_logp, old_values, estimate_advantages(obj.advantage, inputs, obj))

  def _policy_update(self, host: dict[str, np.ndarray], rollout: "_Scored") -> dict[str, float]:
    keep = np.asarray(rollout.adv.keep_B, np.int32)[:, None]
    pm = self.policy.update({"tokens": host["tokens"], "valid": host["valid"], "loss_mask": host["loss_mask"] * keep,
                             "adv": np.asarray(rollout.adv.adv_BT), "old_logp": np.asarray(rollout.old_logp),
                             "ref_logp": np.asarray(rollout.ref_logp)}, self.cfg.minibatches)
    tokens = max(pm.get("tokens", 0.0), 1.0)
    return {"loss": pm["loss"], "grad_norm": pm.get("grad_norm", 0.0), "update_padding": pm["padding"],
            "kl": pm.get("kl_sum", 0.0) / tokens,
            "entropy": pm.get("entropy_sum", 0.0) / tokens, "clip_frac": pm.get("clipfrac_sum", 0.0) / tokens}


class _Scored(NamedTuple):
  old_logp: jax.Array            # [B, T] under the params that sampled (the engine holds the same)
  ref_logp: jax.Array            # [B, T] under the reference (old_logp when there is no KL term)
  old_values: jax.Array | None   # [B, T] the critic's, when there is one
  adv: Advantages
