"""Per-device training memory for a model preset on a mesh, computed without allocating.

  python tpu/plan_memory.py --preset qwen2.5-7b --mesh fsdp=16 --batch 16 --seq 2048 \\
      --param-dtype bfloat16 --remat

Params come from `jax.eval_shape` of the model (`abstract_model`) and the AdamW state from
`jax.eval_shape(optax.adamw(...).init, params)`; each leaf's per-device shard shape is its
global shape divided by the sizes of the mesh axes its PartitionSpec names (the rules in
`autotraj_jax.sharding`, evaluated on a `jax.sharding.AbstractMesh`, so no real devices are
needed). Gradients are sharded like the params.

Activations are an estimate of what the backward pass keeps, per device. With
b = ceil(batch / (data*fsdp)) sequences per device, L = seq, D hidden, F MLP width, H head dim,
n = heads, k = KV heads, v = vocab (each of n, k, F, v divided by tp when it divides),
s = bytes per activation element:

  full layer  A = s*b*L*(4D + 2nH + 2kH + 4F) + (4 + s)*b*n*L^2
                  (layer input, two norm outputs, residual; q and attention output; k, v;
                   gate, up, silu(gate), gate*up; fp32 softmax plus its cast copy, since
                   attention is not fused)
  remat none: layers * A
  remat full: layers * s*b*L*D + A   (each layer keeps its input; one layer is recomputed
                                      at a time in the backward pass)
  remat dots: layers * s*b*L*(3D + nH + 2kH + 2F) + A   (also the projection outputs)
  head:       2*s*b*L*D + 8*b*C*v + 4*b*L   (embedding output, final norm; fp32 logits and
                                      their gradient for C positions at a time: C = L, or
                                      the model's logits_chunk; log p per position; no
                                      logits for --kind scalar)

Stages (`plan_stage`): 'policy' (SFT / GRPO update), 'rm' and 'critic' (scalar-head updates)
add step.py's fp32 gradient sums (with more than one micro-batch) to params, gradients and
AdamW; 'reference' (old / reference logprobs) is params plus one forward layer and the head;
'engine' is params, the KV cache (2 * layers * b * k * S * H * s for S cache slots) and one
prefill layer whose scores span the cache. `python -m autotraj_jax.aot` compiles the same
stages and prints XLA's figures next to these.

XLA fusion, temporaries and fragmentation are not modelled: leave headroom.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from typing import Any, Mapping, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AbstractMesh, PartitionSpec  # noqa: E402

from autotraj_jax import sharding as shd  # noqa: E402
from autotraj_jax.models.build import abstract_model  # noqa: E402
from autotraj_jax.models.config import PRESETS, REMAT_POLICIES, ModelConfig, get_preset, remat_name  # noqa: E402

GIB = 1024 ** 3


def abstract_mesh(sizes: Sequence[int]) -> AbstractMesh:
  """A mesh with axes (data, fsdp, tp) of these sizes and no devices behind it."""
  if len(sizes) != len(shd.AXES) or any(s <= 0 for s in sizes):
    raise ValueError(f"need {len(shd.AXES)} positive mesh axis sizes, got {tuple(sizes)}")
  return AbstractMesh(tuple(int(s) for s in sizes), shd.AXES)


def shard_shape(shape: Sequence[int], spec: PartitionSpec, mesh_shape: Mapping[str, int]) -> tuple[int, ...]:
  """Global shape divided, dimension by dimension, by the mesh axes the spec names."""
  spec = tuple(spec) + (None,) * (len(shape) - len(spec))
  out = []
  for dim, axes in zip(shape, spec):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    parts = math.prod(mesh_shape[a] for a in axes)
    if dim % parts:
      raise ValueError(f"dimension {dim} of {tuple(shape)} does not split over {axes} ({parts})")
    out.append(dim // parts)
  return tuple(out)


def per_device_bytes(tree: Any, shardings: Any, mesh_shape: Mapping[str, int]) -> int:
  """Sum over leaves of shard elements times item size."""
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    shard = shard_shape(leaf.shape, sharding.spec, mesh_shape)
    total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
  return total


def global_bytes(tree: Any) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _split(n: int, tp: int) -> int:
  # The partition rules drop tp where it does not divide, so activations follow suit.
  return n // tp if n % tp == 0 else n


def activation_bytes(cfg: ModelConfig, mesh_shape: Mapping[str, int], batch: int, seq: int,
                     remat: bool | str, kind: str = "causal_lm", *, forward_only: bool = False,
                     keys: int | None = None) -> dict[str, int]:
  """The estimate in the module docstring, per device; keys: local_batch, layer, head, total.

  `forward_only`: no backward pass (one layer live at a time); `keys`: attention key length
  (default `seq`; the cache length for a prefill).
  """
  dp = mesh_shape["data"] * mesh_shape["fsdp"]
  tp = mesh_shape["tp"]
  b, L, D, H = -(-batch // dp), seq, cfg.hidden_size, cfg.head_dim
  n, k = _split(cfg.num_heads, tp), _split(cfg.num_kv_heads, tp)
  f, v = _split(cfg.intermediate_size, tp), _split(cfg.vocab_size, tp)
  s = np.dtype(cfg.jnp_dtype).itemsize
  S = L if keys is None else keys
  layer = s * b * L * (4 * D + 2 * n * H + 2 * k * H + 4 * f) + (4 + s) * b * n * L * S
  policy = remat_name(remat)
  if forward_only:
    layers = s * b * L * D + layer
  elif policy == "full":
    layers = cfg.num_layers * s * b * L * D + layer
  elif policy == "dots":
    layers = cfg.num_layers * s * b * L * (3 * D + n * H + 2 * k * H + 2 * f) + layer
  else:
    layers = cfg.num_layers * layer
  C = min(cfg.logits_chunk, L) if cfg.logits_chunk else L
  head = 2 * s * b * L * D + ((8 * b * C * v + 4 * b * L) if kind == "causal_lm" else 0)
  return {"local_batch": b, "layer": layer, "head": head, "total": layers + head}


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Per-device bytes of each part of a training step's state."""

  params: int
  grads: int
  mu: int
  nu: int
  count: int
  activations: int
  local_batch: int
  num_params: int
  params_global: int
  grad_accum: int = 0  # step.py's fp32 gradient sums (0 where not modelled)
  cache: int = 0       # the engine's KV cache
  stage: str = "policy"

  @property
  def optimizer(self) -> int:
    return self.mu + self.nu + self.count

  @property
  def total(self) -> int:
    return self.params + self.grads + self.grad_accum + self.optimizer + self.activations + self.cache


def _state_part(path: tuple[Any, ...]) -> str:
  names = shd.path_str(path).split("/")
  for part in ("mu", "nu", "count"):
    if part in names:
      return part
  return "other"


def plan_memory(cfg: ModelConfig, mesh_sizes: Sequence[int], batch: int, seq: int,
                remat: bool | str | None = None, kind: str = "causal_lm") -> MemoryPlan:
  """Exact sharded params / grads / AdamW state plus the activation estimate."""
  remat = cfg.remat if remat is None else remat
  mesh = abstract_mesh(mesh_sizes)
  mesh_shape = dict(mesh.shape)
  _, params = abstract_model(cfg, kind)
  param_bytes = per_device_bytes(params, shd.param_shardings(params, mesh), mesh_shape)
  state = jax.eval_shape(optax.adamw(1e-5).init, params)
  state_sh = shd.state_shardings(state, params, mesh)
  parts = {"mu": 0, "nu": 0, "count": 0, "other": 0}
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  for (path, leaf), sharding in zip(flat, jax.tree.leaves(state_sh)):
    size = math.prod(shard_shape(leaf.shape, sharding.spec, mesh_shape))
    parts[_state_part(path)] += size * np.dtype(leaf.dtype).itemsize
  parts["count"] += parts.pop("other")
  acts = activation_bytes(cfg, mesh_shape, batch, seq, remat, kind)
  return MemoryPlan(params=param_bytes, grads=param_bytes, mu=parts["mu"], nu=parts["nu"],
                    count=parts["count"], activations=acts["total"], local_batch=acts["local_batch"],
                    num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
                    params_global=global_bytes(params))


STAGES = ("policy", "reference", "rm", "critic", "engine")


def plan_stage(stage: str, cfg: ModelConfig, mesh_sizes: Sequence[int], batch: int, seq: int, *,
               kind: str | None = None, num_micro: int = 1, cache_len: int = 0) -> MemoryPlan:
  """Per-device plan of one pipeline stage; `batch` is the global rows of one micro-batch.

  Updates ('policy', 'rm', 'critic') carry the fp32 gradient sums of the accumulation loop
  (with one micro-batch XLA folds them into the gradient, so they are not counted then).
  """
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
  kind = kind or ("scalar" if stage in ("rm", "critic") else "causal_lm")
  plan = plan_memory(cfg, mesh_sizes, batch, seq, kind=kind)
  if stage in ("policy", "rm", "critic"):
    accum = 0
    if num_micro > 1:
      accum = plan.params * 4 // np.dtype(cfg.jnp_param_dtype).itemsize
    return dataclasses.replace(plan, grad_accum=accum, stage=stage)
  mesh_shape = dict(zip(shd.AXES, mesh_sizes))
  if stage == "reference":
    acts = activation_bytes(cfg, mesh_shape, batch, seq, cfg.remat, kind, forward_only=True)
    return dataclasses.replace(plan, grads=0, mu=0, nu=0, count=0, activations=acts["total"], stage=stage)
  S = cache_len or seq
  acts = activation_bytes(cfg, mesh_shape, batch, seq, cfg.remat, kind, forward_only=True, keys=S)
  b = acts["local_batch"]
  k = _split(cfg.num_kv_heads, mesh_shape["tp"])
  cache = 2 * cfg.num_layers * b * k * S * cfg.head_dim * np.dtype(cfg.jnp_dtype).itemsize
  return dataclasses.replace(plan, grads=0, mu=0, nu=0, count=0, activations=acts["total"], cache=cache,
                             stage=stage)


def format_plan(plan: MemoryPlan, title: str) -> str:
  rows = [("params", plan.params), ("gradients", plan.grads), ("fp32 grad sums", plan.grad_accum),
          ("adamw mu", plan.mu), ("adamw nu", plan.nu), ("adamw count", plan.count),
          ("kv cache", plan.cache), ("activations (estimate)", plan.activations)]
  lines = [title, f"{'component':<24}{'GiB/device':>12}{'bytes/device':>18}"]
  lines += [f"{name:<24}{value / GIB:>12.3f}{value:>18,d}" for name, value in rows]
  lines.append(f"{'total':<24}{plan.total / GIB:>12.3f}{plan.total:>18,d}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> MemoryPlan:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
  parser.add_argument("--mesh", default="fsdp=1", help="e.g. 'fsdp=16' or 'data=2,fsdp=4,tp=2'")
  parser.add_argument("--devices", type=int, default=None,
                      help="device count, needed only when an axis of --mesh is -1")
  parser.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--param-dtype", default=None, help="default: the preset's")
  parser.add_argument("--dtype", default=None, help="activation dtype; default: --param-dtype")
  parser.add_argument("--remat", nargs="?", const="full", default="none", choices=REMAT_POLICIES,
                      help="remat policy; the bare flag means 'full'")
  parser.add_argument("--logits-chunk", type=int, default=0, help="positions per logits chunk (0: all)")
  parser.add_argument("--kind", default=None, choices=("causal_lm", "scalar"), help="default: the stage's")
  parser.add_argument("--stage", default="policy", choices=STAGES)
  parser.add_argument("--micro", type=int, default=1, help="micro-batches per step (fp32 gradient sums)")
  parser.add_argument("--cache-len", type=int, default=0, help="engine: KV cache slots (default: --seq)")
  args = parser.parse_args(argv)

  mesh_cfg = shd.MeshConfig.parse(args.mesh)
  if args.devices is not None:
    sizes = mesh_cfg.shape(args.devices)
  else:
    sizes = (mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tp)
    if -1 in sizes:
      parser.error("a mesh axis of -1 needs --devices")
  if args.batch <= 0 or args.seq <= 0:
    parser.error("--batch and --seq must be positive")
  overrides = {"remat": args.remat, "logits_chunk": args.logits_chunk}
  if args.param_dtype:
    overrides["param_dtype"] = args.param_dtype
  if args.dtype or args.param_dtype:
    overrides["dtype"] = args.dtype or args.param_dtype
  cfg = get_preset(args.preset, **overrides)
  plan = plan_stage(args.stage, cfg, sizes, args.batch, args.seq, kind=args.kind, num_micro=args.micro,
                    cache_len=args.cache_len)

  dp, devices = sizes[0] * sizes[1], math.prod(sizes)
  mesh_text = ", ".join(f"{a}={n}" for a, n in zip(shd.AXES, sizes))
  title = (f"{args.preset} ({plan.num_params:,} params, {plan.params_global / GIB:.2f} GiB "
           f"unsharded) on mesh {mesh_text} ({devices} devices)\n"
           f"batch {args.batch} ({plan.local_batch}/device) x seq {args.seq}; params {cfg.param_dtype}, "
           f"activations {cfg.dtype}, remat {cfg.remat_policy}; stage {plan.stage}")
  if args.batch % dp:
    title += (f"\nnote: batch {args.batch} does not split over {dp} data-parallel shards; a real "
              f"step needs a multiple of {dp}, estimated with {plan.local_batch}/device")
  print(format_plan(plan, title))
  return plan


if __name__ == "__main__":
  main()
