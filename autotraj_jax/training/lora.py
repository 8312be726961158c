"""LoRA adapters for any trainer, merged into full weights on export.

A targeted kernel W is read as a matrix [in, out]: its leading input axes and trailing output
axes flattened, as `Projection` contracts them (`tensordot(x, W, axes=n_in)` in decoder.py):

  q_proj, k_proj, v_proj  [D, heads, H]  in D         out heads*H
  o_proj                  [N, H, D]      in N*H       out D
  gate_proj, up_proj      [D, F]         in D         out F
  down_proj               [F, D]         in F         out D

The adapter is A [in, r] (small random) and B [r, out] (zero), and the model runs on
W + (alpha / r) * A @ B reshaped to W's shape: at init it is the base model exactly. Merging
inside the loss keeps every model and loss function unchanged; the merged weights are also
what export writes, so later stages load a plain model.

The trainable tree is `{"base": params, "lora": adapters}`. The adapter tree mirrors the
param paths: `.../q_proj/kernel` becomes `.../q_proj/kernel/{lora_a, lora_b}` (the `lora_a$` /
`lora_b$` partition rules in sharding.py), and params named in `LoraConfig.full` (e.g. a
reward model's zero-initialised `score` head, which LoRA alone could never move) are copied
in under their own path and trained in full.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from autotraj_jax import sharding as shd
from autotraj_jax.models.config import ModelConfig
from autotraj_jax.training.step import LossFn

# Every projection of the decoder (attention and MLP); regexes searched in the param path.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Projections whose input side has two axes ([N, H] -> D); all others have one.
_N_IN = {"o_proj": 2}
_FACTORS = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """`rank` 0 turns LoRA off. `targets` and `full` are regexes searched in '/'-joined param
  paths such as 'model/layers/3/self_attn/q_proj/kernel'; only kernels can be targets."""

  rank: int = 0
  alpha: float = 16.0
  targets: tuple[str, ...] = DEFAULT_TARGETS
  full: tuple[str, ...] = ()

  def __post_init__(self):
    if self.rank < 0:
      raise ValueError(f"LoraConfig.rank must be >= 0 (0: off), got {self.rank}")
    if self.enabled and not self.targets:
      raise ValueError("LoraConfig.targets is empty: no kernel would get an adapter")
    object.__setattr__(self, "targets", tuple(self.targets))
    object.__setattr__(self, "full", tuple(self.full))

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def kernel_split(path: str, shape: tuple[int, ...]) -> tuple[int, int]:
  """(in, out) sizes of a projection kernel read as a matrix."""
  module = path.split("/")[-2]
  n_in = _N_IN.get(module, 1)
  if len(shape) <= n_in:
    raise ValueError(f"{path} of shape {shape} is not a projection kernel with {n_in} input axes")
  return math.prod(shape[:n_in]), math.prod(shape[n_in:])


def _matches(patterns: tuple[str, ...], path: str) -> bool:
  return any(re.search(p, path) for p in patterns)


def _check_used(patterns: tuple[str, ...], paths: list[str], what: str) -> None:
  """A pattern that selects nothing is a typo, not a no-op."""
  for p in patterns:
    if not any(re.search(p, path) for path in paths):
      raise ValueError(f"LoRA {what} {p!r} matches no parameter; e.g. {paths[:3]}")


def _nested(flat: dict[tuple[Any, ...], Any]) -> dict:
  """{(k1, k2, ...): leaf} -> nested dicts (keys kept as they are, ints included)."""
  out: dict = {}
  for keys, leaf in flat.items():
    node = out
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = leaf
  return out


def _key(k: Any) -> Any:
  return getattr(k, "key", getattr(k, "idx", k))


def init_lora(params: Any, cfg: LoraConfig, seed: int) -> dict:
  """Adapter tree for `params`: A uniform in ±1/sqrt(in) (PEFT's default), B zero, both fp32;
  `full` params copied (ShapeDtypeStructs suffice without `full`). Empty when LoRA is off."""
  if not cfg.enabled:
    return {}
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  kernels = [(p, l) for p, l in leaves if shd.path_str(p).endswith("/kernel")]
  _check_used(cfg.targets, [shd.path_str(p) for p, _ in kernels], "target")
  if cfg.full:
    _check_used(cfg.full, [shd.path_str(p) for p, _ in leaves], "full param")
  targets = [(p, l) for p, l in kernels if _matches(cfg.targets, shd.path_str(p))]
  flat: dict[tuple[Any, ...], Any] = {}
  keys = jax.random.split(jax.random.key(seed), max(len(targets), 1))
  for key, (path, leaf) in zip(keys, targets):
    n_in, n_out = kernel_split(shd.path_str(path), tuple(leaf.shape))
    bound = 1.0 / math.sqrt(n_in)
    keys_path = tuple(_key(k) for k in path)
    flat[keys_path + ("lora_a",)] = jax.random.uniform(key, (n_in, cfg.rank), jnp.float32, -bound, bound)
    flat[keys_path + ("lora_b",)] = jnp.zeros((cfg.rank, n_out), jnp.float32)
  target_names = {shd.path_str(p) for p, _ in targets}
  for path, leaf in leaves:
    name = shd.path_str(path)
    if cfg.full and _matches(cfg.full, name):
      if name in target_names:
        raise ValueError(f"{name} is both a LoRA target and a fully trained param")
      flat[tuple(_key(k) for k in path)] = jnp.array(leaf)
  return _nested(flat)


def merge_lora(base_params: Any, lora_params: Any, cfg: LoraConfig) -> Any:
  """Base params with every adapter folded in (W + scale * A @ B, in W's dtype) and `full`
  params replaced. Pure and jit-able; the result has the base tree's structure."""
  if not cfg.enabled or not lora_params:
    return base_params
  factors: dict[str, dict[str, jax.Array]] = {}
  full: dict[str, jax.Array] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(lora_params)[0]:
    name = shd.path_str(path)
    head, _, last = name.rpartition("/")
    if last in _FACTORS:
      factors.setdefault(head, {})[last] = leaf
    else:
      full[name] = leaf

  def one(path, w):
    name = shd.path_str(path)
    if name in full:
      return full.pop(name).astype(w.dtype)
    if name not in factors:
      return w
    f = factors.pop(name)
    delta = jnp.matmul(f["lora_a"].astype(jnp.float32), f["lora_b"].astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    return (w.astype(jnp.float32) + cfg.scale * delta.reshape(w.shape)).astype(w.dtype)

  merged = jax.tree_util.tree_map_with_path(one, base_params)
  if factors or full:
    raise ValueError(f"adapters without a base param: {sorted([*factors, *full])[:4]}")
  return merged


def make_lora_loss(base_loss_fn: LossFn, cfg: LoraConfig) -> LossFn:
  """loss_fn({"base", "lora"}, batch, rng): the base loss on the merged params; no gradient
  reaches the base (it is frozen by stop_gradient, whatever the optimizer does)."""

  def loss_fn(trainable: dict[str, Any], batch: dict[str, jax.Array], rng: jax.Array):
    base = jax.lax.stop_gradient(trainable["base"])
    return base_loss_fn(merge_lora(base, trainable["lora"], cfg), batch, rng)

  return loss_fn


def _labels(trainable: dict[str, Any]) -> dict[str, Any]:
  return {"base": jax.tree.map(lambda _: "base", trainable["base"]),
          "lora": jax.tree.map(lambda _: "lora", trainable["lora"])}


def lora_optimizer(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
  """`optimizer` on the `lora` subtree only; the base gets zero updates and keeps no optimizer
  state (no Adam moments the size of the model), and gradient clipping sees adapters only."""
  return optax.multi_transform({"base": optax.set_to_zero(), "lora": optimizer}, _labels)


def export_merged(out_dir: str | os.PathLike, base_params: Any, lora_params: Any, cfg: LoraConfig,
                  model_cfg: ModelConfig, kind: str = "causal_lm", *, step: int = 0,
                  tokenizer_dir: str | os.PathLike | None = None, hf_dir: str | os.PathLike | None = None,
                  extra_meta: dict[str, Any] | None = None) -> Any:
  """Write the merged weights as a plain model checkpoint (`checkpoint.load_model` reads it)
  and, with `hf_dir`, as an HF directory too. Returns the merged params (sharded like base)."""
  from autotraj_jax import checkpoint
  from autotraj_jax.models.hf import save_hf
  merged = jax.jit(lambda b, l: merge_lora(b, l, cfg))(base_params, lora_params)
  meta = {"lora": cfg.to_dict(), **(extra_meta or {})}
  checkpoint.save_model(out_dir, merged, model_cfg, kind=kind, tokenizer_dir=tokenizer_dir, step=step,
                        extra_meta=meta)
  if hf_dir is not None:
    save_hf(hf_dir, merged, model_cfg, kind=kind, tokenizer_dir=tokenizer_dir)
  return merged


@dataclasses.dataclass
class LoraSetup:
  """What a stage hands its Trainer when LoRA is on (or the plain setup when it is off)."""

  params: Any                      # {"base", "lora"} when on, else the model params
  loss_fn: LossFn
  optimizer_wrapper: Callable[[optax.GradientTransformation], optax.GradientTransformation] | None
  cfg: LoraConfig

  def merged(self, params: Any) -> Any:
    """The plain model params of a trained state (adapters merged into the weights)."""
    return merge_lora(params["base"], params["lora"], self.cfg) if self.cfg.enabled else params


def setup(params: Any, loss_fn: LossFn, cfg: LoraConfig, seed: int) -> LoraSetup:
  """Wraps a stage's params and loss for LoRA training when `cfg.rank > 0`; identity otherwise."""
  if not cfg.enabled:
    return LoraSetup(params, loss_fn, None, cfg)
  return LoraSetup({"base": params, "lora": init_lora(params, cfg, seed)}, make_lora_loss(loss_fn, cfg),
                   lora_optimizer, cfg)
