"""The training loop shared by every trainer: sharded state, one jitted step with donated
state, metrics, periodic checkpoints and exact resume (params, optimizer, RNG, step and the
data iterator's position all come back).

Multi-host: every process runs the same loop. Each loads only the rows of every global batch that
its own devices hold (`host_rows`) and the step sees the global arrays, so the run is the one a
single host with all the devices would make. Checkpoints are written by all processes (orbax);
metrics and the progress bar come from process 0 only."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from autotraj_jax import sharding as shd
from autotraj_jax.checkpoint import Checkpointer
from autotraj_jax.distributed import is_primary
from autotraj_jax.metrics import MetricWriter
from autotraj_jax.training import data as data_lib
from autotraj_jax.training import packing
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
  pack: bool = False  # several sequences per row (training/packing.py): fewer rows, same losses

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


def host_rows(sharding: jax.sharding.Sharding, batch_size: int, num_micro: int) -> list[int]:
  """Positions in each global batch [B] that this process's devices hold, in the order of its host
  batch: for each micro-batch m (`split_micro`), the process's slices of the [num_micro, B / num_micro]
  batch sharding, in order (one slice usually, several where the mesh lays devices out so)."""
  micro = batch_size // num_micro
  held: set[int] = set()
  for index in sharding.addressable_devices_indices_map((num_micro, micro)).values():
    held.update(range(*index[1].indices(micro)))
  return [m * micro + r for m in range(num_micro) for r in sorted(held)]


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
               optimizer_wrapper: Callable[[Any], Any] | None = None, desc: str = "train",
               packer: data_lib.Packer = data_lib.SEQUENCES, skip_empty: bool = False):
    self.cfg, self.mesh, self.workdir, self.desc = cfg, mesh, str(workdir), desc
    self.collate_fn, self.packer = collate_fn, packer
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
    step_fn = make_train_step(loss_fn, self.optimizer, self.schedule, skip_empty=skip_empty)

    def counted(state, batch):
      self.num_compiles += 1  # runs only while tracing
      return step_fn(state, batch)

    # Metrics replicated: every process can read them (only process 0 writes them).
    self._step = jax.jit(counted, donate_argnums=(0,),
                         in_shardings=(self.state_shardings, self._batch_sharding),
                         out_shardings=(self.state_shardings, rep))
    self.ckpt = Checkpointer(os.path.join(self.workdir, "checkpoints"),
                             max_to_keep=cfg.keep_checkpoints)

  def train_step(self, state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step (jitted once per bucket, state donated). Traced under the mesh, so the
    model's batch-axis constraints (`decoder.shard_batch`) keep activations split over the data axes."""
    with jax.set_mesh(self.mesh):
      return self._step(state, batch)

  # -- state -------------------------------------------------------------------------------

  def init_state(self) -> TrainState:
    """A fresh state: the initial params on their shards, a new optimizer state, step 0."""
    params = jax.device_put(self._init_params, self.state_shardings.params)
    init = jax.jit(lambda p: init_state(p, self.optimizer, self.cfg.seed),
                   out_shardings=self.state_shardings)
    return init(params)

  def saved_steps(self) -> list[int]:
    """Steps with a checkpoint under this trainer's workdir, oldest first."""
    return sorted(self.ckpt.all_steps())

  def restore_state(self, step: int | None = None, *, data_iter: Any = None) -> tuple[TrainState, dict[str, Any]]:
    """(state, meta) of checkpoint `step` (default: the newest), on this trainer's shardings; a
    given data iterator is restored in place. The state's step is the optimizer-step count the
    checkpoint was saved at, whatever number it was saved under."""
    abstract = jax.eval_shape(lambda p: init_state(p, self.optimizer, self.cfg.seed), self._init_params)
    r = self.ckpt.restore(step, params_like=abstract.params, param_shardings=self.state_shardings.params,
                          opt_state_like=abstract.opt_state, opt_shardings=self.state_shardings.opt_state,
                          rng=True, rng_sharding=self.state_shardings.rng, data_iter=data_iter)
    rep = self.state_shardings.step
    count = int(r.meta.get("train_step", r.step))
    state = TrainState(jax.device_put(np.int32(count), rep), r.params, r.opt_state, jax.device_put(r.rng, rep))
    return state, r.meta

  def save(self, state: TrainState, data_iter: Any = None, *, step: int | None = None,
           meta: dict[str, Any] | None = None, force: bool = False) -> None:
    """Checkpoint `state` under `step` (default: its optimizer-step count) with this trainer's
    meta plus `meta`; callers that count steps differently (RL: one step = several optimizer
    steps) save under their own number."""
    count = int(state.step)
    step = count if step is None else step
    self.ckpt.save(step, params=state.params, opt_state=state.opt_state, rng=state.rng, data_iter=data_iter,
                   meta={**self.meta, **(meta or {}), "step": step, "train_step": count}, force=force)

  # -- loop --------------------------------------------------------------------------------

  def device_batch(self, batch: dict[str, np.ndarray], *, global_batch: int | None = None,
                   num_micro: int | None = None) -> dict[str, jax.Array]:
    """This process's rows [b, ...] -> the step's input: global [num_micro, B / num_micro, ...] arrays
    on the batch sharding (`num_micro` default `cfg.num_micro`). `global_batch` (B) is needed only
    where processes share rows (a model axis across hosts); by default each process holds its own
    rows and B is inferred."""
    micro = data_lib.split_micro(batch, num_micro or self.cfg.num_micro)

    def one(v: np.ndarray) -> jax.Array:
      shape = None if global_batch is None else (v.shape[0], global_batch // v.shape[0], *v.shape[2:])
      return jax.make_array_from_process_local_data(self._batch_sharding, v, shape)
    return {k: one(v) for k, v in micro.items()}

  def host_rows(self, rows: int | None = None) -> list[int]:
    """The rows of each global batch of `rows` (default `cfg.batch_size`) that this process loads."""
    return host_rows(self._batch_sharding, rows or self.cfg.batch_size, self.cfg.num_micro)

  @property
  def row_granularity(self) -> int:
    """Rows of a step's batch come in multiples of this: micro-batches x data shards."""
    shards = 1
    for a in shd.BATCH_AXES:
      if a in self.mesh.axis_names:
        shards *= self.mesh.shape[a]
    return self.cfg.num_micro * shards

  def packed_rows(self, items: int) -> int:
    """The row-count step of a packed batch of `items` sequences (`packing.row_multiple`)."""
    return packing.row_multiple(items, self.row_granularity)

  def run(self, source: Any) -> TrainState:
    cfg = self.cfg
    primary = is_primary()
    pack = dict(packer=self.packer, row_multiple=self.packed_rows(cfg.batch_size), rows_of=self.host_rows) \
        if cfg.pack else dict(rows=self.host_rows())
    ds = data_lib.batch_dataset(source, batch_size=cfg.batch_size, buckets=cfg.buckets,
                                seed=cfg.seed, pad_id=cfg.pad_id, group_by_length=cfg.group_by_length,
                                collate_fn=self.collate_fn, **pack)
    data_iter = iter(ds)
    if self.ckpt.latest_step() is not None:
      state, _ = self.restore_state(data_iter=data_iter)
    else:
      state = self.init_state()
    start = int(state.step)
    writer = MetricWriter(os.path.join(self.workdir, "logs"), start_step=start, enabled=primary)
    bar = tqdm(total=cfg.steps, initial=start, desc=self.desc, unit="step", dynamic_ncols=True,
               disable=not self.progress or not primary)
    pending = None
    try:
      for step in range(start, cfg.steps):
        batch = next(data_iter)
        rows = int(batch.pop(data_lib.GLOBAL_ROWS, cfg.batch_size))
        state, metrics = self.train_step(state, self.device_batch(batch, global_batch=rows))
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
    """Waits for pending checkpoint writes, then releases the checkpointer."""
    self.ckpt.wait()
    self.ckpt.close()
