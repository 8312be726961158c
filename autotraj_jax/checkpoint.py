"""Orbax checkpoints: params, optimizer state, step, RNG, data-iterator state and metadata.

Layout: `DIR/<step>/{params, opt_state, rng, data, meta}` managed by an orbax
CheckpointManager. Params are saved as a pure nested dict, so a checkpoint written on one
mesh restores onto any other (arrays are laid out by the target shardings on restore).
`meta` is a JSON blob: model config, model kind, training config, anything else.

Multi-host: every process calls `save` and `restore` (orbax writes each array once, from the
process that holds it, and the JSON items from process 0). The data iterator's position is saved
per process; as every host stands at the same global batch, a run restarted on another number of
hosts takes it from whichever process wrote it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from autotraj_jax import sharding as shd
from autotraj_jax.distributed import is_primary
from autotraj_jax.models.config import ModelConfig

TOKENIZER_SUBDIR = "tokenizer"


class CheckpointError(RuntimeError):
  pass


@dataclasses.dataclass
class Restored:
  step: int
  params: Any
  meta: dict[str, Any]
  opt_state: Any = None
  rng: Any = None


def _on_first_device(tree: Any) -> Any:
  """This process's first device (in a multi-host run, each process gets its own copy)."""
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda _: sharding, tree)


def _tree_to_abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with the items this project stores."""

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3,
               save_interval_steps: int = 1, async_save: bool = False):
    self.directory = epath.Path(directory).absolute()
    opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                        save_interval_steps=save_interval_steps,
                                        enable_async_checkpointing=async_save,
                                        create=True)
    self._mngr = ocp.CheckpointManager(self.directory, options=opts)

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, *, params: Any, meta: dict[str, Any], opt_state: Any = None,
           rng: jax.Array | None = None, data_iter: Any = None, force: bool = False) -> bool:
    items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta)}
    if opt_state is not None:
      items["opt_state"] = ocp.args.StandardSave(opt_state)
    if rng is not None:
      items["rng"] = ocp.args.StandardSave({"key": jax.random.key_data(rng)})
    if data_iter is not None:
      import grain
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return self._mngr.save(step, args=ocp.args.Composite(**items), force=force)

  def wait(self):
    self._mngr.wait_until_finished()

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    step = self._resolve(step)
    return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int | None = None, *, params_like: Any, param_shardings: Any = None,
              opt_state_like: Any = None, opt_shardings: Any = None, rng: bool = False,
              rng_sharding: Any = None, data_iter: Any = None) -> Restored:
    """Restore `step` (default latest). `*_like` trees give shapes/dtypes (arrays or
    ShapeDtypeStructs); shardings default to this process's first device. Every item is restored
    onto a given layout, so a checkpoint of one process count or mesh restores onto any other. The
    data iterator, if given, is restored in place."""
    step = self._resolve(step)
    present = set(self._items(step))
    items = {"meta": ocp.args.JsonRestore()}
    items["params"] = ocp.args.StandardRestore(
        _tree_to_abstract(params_like, param_shardings or _on_first_device(params_like)))
    if opt_state_like is not None:
      if "opt_state" not in present:
        raise CheckpointError(f"checkpoint {self.directory}/{step} holds no optimizer state")
      items["opt_state"] = ocp.args.StandardRestore(
          _tree_to_abstract(opt_state_like, opt_shardings or _on_first_device(opt_state_like)))
    if rng and "rng" in present:
      key_like = {"key": jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))}
      items["rng"] = ocp.args.StandardRestore(
          _tree_to_abstract(key_like, {"key": rng_sharding} if rng_sharding else _on_first_device(key_like)))
    foreign_state = None
    if data_iter is not None:
      if "data" not in present:
        raise CheckpointError(f"checkpoint {self.directory}/{step} holds no data-iterator state")
      foreign_state = self._foreign_data_state(step)
      if foreign_state is None:
        import grain
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many types; name the checkpoint in the message
      raise CheckpointError(f"could not restore {self.directory}/{step}: {e}") from e
    if foreign_state is not None:
      _set_iterator_state(data_iter, foreign_state)
    key = None
    if rng and "rng" in present:
      key = jax.random.wrap_key_data(out["rng"]["key"])
    return Restored(step=step, params=out["params"], meta=out["meta"],
                    opt_state=out.get("opt_state"), rng=key)

  def _foreign_data_state(self, step: int) -> str | None:
    """The data-iterator state of a checkpoint written by another number of processes (None when this
    process has its own file). Every process of a run holds the same position, so any file will do."""
    d = self.directory / str(step) / "data"
    if (d / f"process_{jax.process_index()}-of-{jax.process_count()}.json").exists():
      return None
    states = {p.read_text() for p in d.glob("process_*-of-*.json")}
    if len(states) != 1:
      raise CheckpointError(f"{d}: no data-iterator state for process {jax.process_index()} of "
                            f"{jax.process_count()}, and {len(states)} different ones of other processes")
    return states.pop()

  def _items(self, step: int) -> list[str]:
    d = self.directory / str(step)
    return [p.name for p in d.iterdir()] if d.exists() else []

  def _resolve(self, step: int | None) -> int:
    if step is None:
      step = self.latest_step()
      if step is None:
        raise CheckpointError(f"no checkpoint found in {self.directory}")
    elif step not in self.all_steps():
      raise CheckpointError(f"no checkpoint at step {step} in {self.directory}; have {self.all_steps()}")
    return step

  def close(self):
    self._mngr.close()


def _set_iterator_state(data_iter: Any, text: str) -> None:
  """What grain's checkpoint handler does on restore, from the text of a state file."""
  import grain
  data_iter.set_state(json.loads(text) if isinstance(data_iter, grain.DatasetIterator) else text.encode())
  if hasattr(data_iter, "start_prefetch"):
    data_iter.start_prefetch()


# ---- model-only checkpoints (the `convert` CLI, inference, initialising later stages) ----

def save_model(directory: str | os.PathLike, params: Any, cfg: ModelConfig, *, kind: str = "causal_lm",
               tokenizer_dir: str | os.PathLike | None = None, step: int = 0,
               extra_meta: dict[str, Any] | None = None) -> None:
  """Write params + model config (+ a copy of the tokenizer files) as a checkpoint."""
  ckpt = Checkpointer(directory, max_to_keep=None)
  meta = {"model_config": cfg.to_dict(), "model_kind": kind, **(extra_meta or {})}
  ckpt.save(step, params=params, meta=meta, force=True)
  ckpt.wait()
  ckpt.close()
  if tokenizer_dir is not None and is_primary():
    dst = epath.Path(directory) / TOKENIZER_SUBDIR
    shutil.copytree(tokenizer_dir, dst, dirs_exist_ok=True)


def load_model(directory: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None,
               step: int | None = None) -> tuple[ModelConfig, str, Any]:
  """(model config, kind, params) from a checkpoint, laid out on `mesh` if given."""
  from autotraj_jax.models import build
  if not epath.Path(directory).exists():
    raise CheckpointError(f"checkpoint directory {directory} does not exist")
  ckpt = Checkpointer(directory, max_to_keep=None)
  meta = ckpt.read_meta(step)
  if "model_config" not in meta:
    raise CheckpointError(f"{directory}: metadata has no model_config (not a model checkpoint?)")
  cfg = ModelConfig.from_dict(meta["model_config"])
  kind = meta.get("model_kind", "causal_lm")
  _, abstract = build.abstract_model(cfg, kind)
  shardings = shd.param_shardings(abstract, mesh) if mesh is not None else None
  restored = ckpt.restore(step, params_like=abstract, param_shardings=shardings)
  ckpt.close()
  return cfg, kind, restored.params


def tokenizer_dir_of(directory: str | os.PathLike) -> str | None:
  d = epath.Path(directory) / TOKENIZER_SUBDIR
  return str(d) if d.exists() else None
