"""Device mesh, partition rules by parameter name, and placement helpers.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with sharded params and
optimizer state) and `tp` (tensor parallel over heads / MLP width / vocab). Any axis may be 1.
A batch is split over (`data`, `fsdp`); params are split over `fsdp` and `tp` by the rules below.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tp")
BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the mesh axes; one of them may be -1 to take all remaining devices."""

  data: int = 1
  fsdp: int = -1
  tp: int = 1

  def shape(self, num_devices: int) -> tuple[int, int, int]:
    sizes = [self.data, self.fsdp, self.tp]
    if sizes.count(-1) > 1:
      raise ValueError(f"at most one mesh axis may be -1, got {self}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes):
      raise ValueError(f"mesh axis sizes must be positive or -1, got {self}")
    if -1 in sizes:
      if num_devices % known:
        raise ValueError(f"{num_devices} devices cannot be split by fixed axes {self}")
      sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
      raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, "
                       f"have {num_devices}")
    return tuple(sizes)

  @classmethod
  def parse(cls, text: str) -> "MeshConfig":
    """'fsdp=4,tp=2' -> MeshConfig(data=1, fsdp=4, tp=2)."""
    kw = {"data": 1, "fsdp": 1, "tp": 1}
    for part in filter(None, (p.strip() for p in text.split(","))):
      name, _, value = part.partition("=")
      if name not in AXES:
        raise ValueError(f"unknown mesh axis {name!r} in {text!r}; axes are {AXES}")
      kw[name] = int(value)
    return cls(**kw)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = cfg.shape(len(devices))
  return Mesh(np.asarray(devices).reshape(shape), AXES)


# (regex on the '/'-joined param path, spec). First match wins; shapes are in decoder.py.
PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"embed_tokens$", P("tp", "fsdp")),                    # [V, D]
    (r"lm_head$", P("fsdp", "tp")),                         # [D, V]
    (r"(q_proj|k_proj|v_proj)/kernel$", P("fsdp", "tp", None)),  # [D, N, H]
    (r"(q_proj|k_proj|v_proj)/bias$", P("tp", None)),       # [N, H]
    (r"o_proj/kernel$", P("tp", None, "fsdp")),             # [N, H, D]
    (r"(gate_proj|up_proj)/kernel$", P("fsdp", "tp")),      # [D, F]
    (r"down_proj/kernel$", P("tp", "fsdp")),                # [F, D]
    (r"(norm|layernorm)/weight$", P()),
    (r"score$", P()),
    (r"lora_a$", P("fsdp", None)),
    (r"lora_b$", P(None, "tp")),
)


def path_str(path: tuple[Any, ...]) -> str:
  """A jax key path (or tuple of keys) as 'model/layers/0/self_attn/q_proj/kernel'."""
  parts = []
  for k in path:
    k = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
    parts.append(str(k))
  return "/".join(parts)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drop mesh axes that do not divide their dimension (e.g. 2 kv heads on tp=4)."""
  spec = tuple(spec) + (None,) * (len(shape) - len(spec))
  out = []
  for dim, axis in zip(shape, spec):
    size = 1 if axis is None else math.prod(mesh.shape[a] for a in ((axis,) if isinstance(axis, str) else axis))
    out.append(axis if axis is not None and dim % size == 0 else None)
  return P(*out)


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
  for pattern, spec in PARTITION_RULES:
    if re.search(pattern, path):
      if len(spec) > len(shape):
        raise ValueError(f"rule {pattern!r} gives {spec} for {path} of rank {len(shape)}")
      return _fit(spec, shape, mesh)
  if len(shape) <= 1:
    return P()
  raise ValueError(f"no partition rule matches parameter {path!r} of shape {shape}")


def param_shardings(tree: Any, mesh: Mesh) -> Any:
  """NamedSharding for every array leaf (or ShapeDtypeStruct) of a param-like tree."""
  def one(path, leaf):
    return NamedSharding(mesh, spec_for(path_str(path), tuple(leaf.shape), mesh))
  return jax.tree_util.tree_map_with_path(one, tree)


def state_shardings(tree: Any, params_like: Any, mesh: Mesh) -> Any:
  """Shardings for an optimizer-state tree: leaves shaped like a param share its spec.

  optax states embed copies of the param tree (Adam's mu and nu); matching each leaf's key
  path suffix against the param paths finds the right rule, and scalars are replicated.
  """
  specs = {path_str(p): s for p, s in
           jax.tree_util.tree_flatten_with_path(param_shardings(params_like, mesh))[0]}

  def one(path, leaf):
    shape = tuple(getattr(leaf, "shape", ()))
    if not shape:
      return NamedSharding(mesh, P())
    p = path_str(path)
    for key, sharding in specs.items():
      if p.endswith(key):
        return sharding
    return NamedSharding(mesh, spec_for(p, shape, mesh))
  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, rank: int = 2) -> NamedSharding:
  """Leading (batch) axis split over data and fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (rank - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_params(params: Any, mesh: Mesh) -> Any:
  return jax.device_put(params, param_shardings(params, mesh))


def to_host(tree: Any) -> Any:
  """Every array leaf of `tree` as numpy, whole, on every process.

  On several hosts an array split over other processes' devices cannot be read locally; it is
  all-gathered first. That is a collective: every process must call this with the same tree.
  """
  def whole(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      from jax.experimental import multihost_utils
      return multihost_utils.process_allgather(x, tiled=True)
    return x
  return jax.device_get(jax.tree.map(whole, tree))
