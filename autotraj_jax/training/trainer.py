"""The training loop shared by every trainer: sharded state, one jitted step with donated
state, metrics, periodic checkpoints and exact resume (params, optimizer, RNG, step and the
data iterator's position all come back)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from autotraj_jax import sharding as shd
from autotraj_jax.checkpoint import Checkpointer
from autotraj_jax.metrics import MetricWriter
from autotraj_jax.training import data as data_lib
from autotraj_jax.training.optimizer import OptimizerConfig, make_optimizer, make_schedule
from autotraj_jax.training.step import LossFn, TrainState, init_state, make_train_step


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 100
  batch_size: int = 8           # sequences per optimizer step, all hosts together
  micro_batch_size: int = 0     # 0: no accumulation
  buckets: tuple[int, ...] = (256,)
  seed: int = 0
  log_every: int = 10
  checkpoint_every: int = 100
  keep_checkpoints: int = 2
  optimizer: OptimizerConfig = OptimizerConfig()
  pad_id: int = 0
  group_by_length: bool = False  # batches of similar lengths (smaller buckets, less padding)

  def __post_init__(self):
    micro = self.micro_batch_size or self.batch_size
    if self.batch_size % micro:
      raise ValueError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size {micro}")
    if self.steps <= 0:
      raise ValueError(f"steps must be positive, got {self.steps}")
    if not self.buckets or sorted(self.buckets) != list(self.buckets):
      raise ValueError(f"buckets must be a non-empty ascending tuple, got {self.buckets}")

  @property
  def num_micro(self) -> int:
    return self.batch_size // (self.micro_batch_size or self.batch_size)


class Trainer:
  """Runs `loss_fn` over a data source for `cfg.steps` optimizer steps under `workdir`.

  Rerunning with the same workdir resumes from the newest checkpoint. `collate_fn` builds the
  batch arrays from examples (default: [B, L] token sequences); every array is batch-major, split
  over the data axes on its first axis and replicated along the others.
  """

  def __init__(self, cfg: TrainConfig, *, loss_fn: LossFn, params: Any, mesh: Mesh,
               workdir: str | os.PathLike, meta: dict[str, Any] | None = None,
               eval_fn: Callable[[Any, int], dict[str, float]] | None = None, eval_every: int = 0,
               progress: bool = True, collate_fn: data_lib.CollateFn = data_lib.collate,
               optimizer_wrapper: Callable[[Any], Any] | None = None):
    self.cfg, self.mesh, self.workdir = cfg, mesh, str(workdir)
    self.collate_fn = collate_fn
    self.meta = dict(meta or {})
    self.eval_fn, self.eval_every, self.progress = eval_fn, eval_every, progress
    self.optimizer = make_optimizer(cfg.optimizer)
    if optimizer_wrapper is not None:  # e.g. LoRA: update only the adapters, no state for the base
      self.optimizer = optimizer_wrapper(self.optimizer)
    self.schedule = make_schedule(cfg.optimizer)
    self.num_compiles = 0

    param_sh = shd.param_shardings(params, mesh)
    opt_like = jax.eval_shape(self.optimizer.init, params)
    rep = shd.replicated(mesh)
    self.state_shardings = TrainState(rep, param_sh, shd.state_shardings(opt_like, params, mesh), rep)
    self._init_params = params
    # [accum, B, ...]: the batch axis split over the data axes, trailing axes (any number) replicated.
    self._batch_sharding = NamedSharding(mesh, P(None, shd.BATCH_AXES))
    step_fn = make_train_step(loss_fn, self.optimizer, self.schedule)

    def counted(state, batch):
      self.num_compiles += 1  # runs only while tracing
      return step_fn(state, batch)

    self.train_step = jax.jit(counted, donate_argnums=(0,),
                              in_shardings=(self.state_shardings, self._batch_sharding),
                              out_shardings=(self.state_shardings, None))
    self.ckpt = Checkpointer(os.path.join(self.workdir, "checkpoints"),
                             max_to_keep=cfg.keep_checkpoints)

  # -- state -------------------------------------------------------------------------------

  def _fresh_state(self) -> TrainState:
    params = jax.device_put(self._init_params, self.state_shardings.params)
    init = jax.jit(lambda p: init_state(p, self.optimizer, self.cfg.seed),
                   out_shardings=self.state_shardings)
    return init(params)

  def _restore(self, data_iter) -> TrainState:
    abstract = jax.eval_shape(lambda p: init_state(p, self.optimizer, self.cfg.seed), self._init_params)
    r = self.ckpt.restore(params_like=abstract.params, param_shardings=self.state_shardings.params,
                          opt_state_like=abstract.opt_state, opt_shardings=self.state_shardings.opt_state,
                          rng=True, data_iter=data_iter)
    rep = self.state_shardings.step
    return TrainState(jax.device_put(np.int32(r.step), rep), r.params, r.opt_state,
                      jax.device_put(r.rng, rep))

  def save(self, state: TrainState, data_iter, *, force: bool = False) -> None:
    step = int(state.step)
    self.ckpt.save(step, params=state.params, opt_state=state.opt_state, rng=state.rng,
                   data_iter=data_iter, meta={**self.meta, "step": step}, force=force)

  # -- loop --------------------------------------------------------------------------------

  def _device_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    micro = data_lib.split_micro(batch, self.cfg.num_micro)
    return {k: jax.make_array_from_process_local_data(self._batch_sharding, v) for k, v in micro.items()}

  def run(self, source: Any) -> TrainState:
    cfg = self.cfg
    local_batch = cfg.batch_size // jax.process_count()
    ds = data_lib.batch_dataset(source, batch_size=local_batch, buckets=cfg.buckets,
                                seed=cfg.seed, pad_id=cfg.pad_id, group_by_length=cfg.group_by_length,
                                shard=(jax.process_index(), jax.process_count()),
                                collate_fn=self.collate_fn)
    data_iter = iter(ds)
    if self.ckpt.latest_step() is not None:
      state = self._restore(data_iter)
    else:
      state = self._fresh_state()
    start = int(state.step)
    writer = MetricWriter(os.path.join(self.workdir, "logs"))
    bar = tqdm(total=cfg.steps, initial=start, desc="train", disable=not self.progress,
               dynamic_ncols=True)
    pending = None
    try:
      for step in range(start, cfg.steps):
        state, metrics = self.train_step(state, self._device_batch(next(data_iter)))
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
          pending = jax.device_get(metrics)
          writer.write(done, pending)
          bar.set_postfix(loss=f"{float(pending['loss']):.4f}")
        if self.eval_fn is not None and self.eval_every and (done % self.eval_every == 0 or done == cfg.steps):
          writer.write(done, {f"eval/{k}": v for k, v in self.eval_fn(state.params, done).items()})
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
          self.save(state, data_iter, force=True)
        bar.update(1)
    finally:
      bar.close()
      writer.close()
      self.ckpt.wait()
    return state

  def close(self) -> None:
    self.ckpt.close()
