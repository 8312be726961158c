"""Ahead-of-time compile of every stage of a recipe on fake CPU devices: XLA's per-device memory
next to `tpu/plan_memory.py`'s estimate, and whether it fits a chip's HBM.

  python -m autotraj_jax.aot --config experiments/configs/qwen2_5_7b.py --devices 8 --chip v5p

Nothing is allocated: params, optimizer state and batches are `jax.ShapeDtypeStruct`s with the
config's shardings, and each step is lowered and compiled for the config's mesh on
`--devices` host devices. Stages: `sft` (the sharded SFT train step), `rm` (the Bradley-Terry
reward-model step), `grpo` (one GRPO policy-update minibatch), `ref` (the forward pass that
computes old / reference logprobs) and `engine` (a prefill of the largest bucket and one decode
step over its KV cache).

Two CPU artefacts make the raw figures untrustworthy and are switched off here: XLA's CPU
scheduler, which by default optimises for concurrency and so runs every remat recomputation
right after the forward pass (remat then saves nothing: `--concurrency-scheduler` shows the old
figures), and the CPU backend computing bf16 matmuls in fp32 (bf16 activations take fp32 room).
The second remains; TPU/GPU compilers keep bf16, so a bf16 figure here is an upper bound.

Config fields read: model.preset, model.param_dtype, model.remat, mesh.{data,fsdp,tp},
sft.{batch_size,micro_batch_size,buckets}, rm.{batch_size,micro_batch_size,buckets},
rl.{prompts_per_step,samples_per_prompt,minibatches,micro_batch_size,buckets},
engine.{batch_buckets,prompt_buckets,new_token_buckets}.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import os
import sys
import time
from typing import Any, Callable, Sequence

GIB = 1024 ** 3
HBM_GIB = {"v5e": 16, "v5p": 95, "v6e": 32, "h100": 80}
STAGES = ("sft", "rm", "grpo", "ref", "engine")
# The CPU scheduler that ignores remat (see the module docstring) and the fake device count.
MEMORY_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


# ---- config --------------------------------------------------------------------------------------


def load_config(path: str, overrides: Sequence[str] = ()) -> Any:
  """`get_config()` of a config file, with `key.sub=value` overrides (values as Python literals)."""
  spec = importlib.util.spec_from_file_location("aot_config", path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"--config {path}: not a Python file")
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
  try:
    spec.loader.exec_module(module)
  finally:
    sys.path.pop(0)
  cfg = module.get_config()
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"--set {item!r}: expected key=value")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


def field(cfg: Any, key: str, default: Any = None) -> Any:
  """cfg['a']['b'] for 'a.b', or `default` when a part is missing (None: required)."""
  node = cfg
  for part in key.split("."):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      if default is None:
        raise KeyError(f"config field {key!r} is missing") from None
      return default
  return node


@dataclasses.dataclass(frozen=True)
class StageShape:
  """What one compiled step sees: global micro-batch rows, micro-batches per step, length."""

  name: str
  micro_batch: int
  num_micro: int
  seq: int
  cache_len: int = 0


def stage_shapes(cfg: Any) -> dict[str, StageShape]:
  def micro(batch: int, m: int, what: str) -> tuple[int, int]:
    m = m or batch
    if batch % m:
      raise ValueError(f"{what}.batch_size {batch} is not a multiple of micro_batch_size {m}")
    return m, batch // m

  sft_m, sft_n = micro(int(field(cfg, "sft.batch_size")), int(field(cfg, "sft.micro_batch_size", 0)), "sft")
  rm_m, rm_n = micro(int(field(cfg, "rm.batch_size")), int(field(cfg, "rm.micro_batch_size", 0)), "rm")
  rollouts = int(field(cfg, "rl.prompts_per_step")) * int(field(cfg, "rl.samples_per_prompt"))
  minibatches = int(field(cfg, "rl.minibatches", 1))
  if rollouts % minibatches:
    raise ValueError(f"rl: {rollouts} rollouts do not split into {minibatches} minibatches")
  rl_m, rl_n = micro(rollouts // minibatches, int(field(cfg, "rl.micro_batch_size", 0)), "rl")
  rl_len = max(field(cfg, "rl.buckets"))
  prompt, new = max(field(cfg, "engine.prompt_buckets")), max(field(cfg, "engine.new_token_buckets"))
  multiple = int(field(cfg, "engine.cache_multiple", 1))
  slots = -(-(prompt + new) // multiple) * multiple  # the decode loop's KV slots
  return {
      "sft": StageShape("sft", sft_m, sft_n, max(field(cfg, "sft.buckets"))),
      "rm": StageShape("rm", rm_m, rm_n, max(field(cfg, "rm.buckets"))),
      "grpo": StageShape("grpo", rl_m, rl_n, rl_len),
      "ref": StageShape("ref", rl_m, 1, rl_len),
      "engine": StageShape("engine", max(field(cfg, "engine.batch_buckets")), 1, prompt, slots),
  }


# ---- steps ---------------------------------------------------------------------------------------


def _rm_loss(graphdef):
  """The RM stage's loss: one forward of the [2B, L] stack, Bradley-Terry on the last tokens."""
  import jax.numpy as jnp
  from flax import nnx

  from autotraj_jax.models.decoder import causal_mask
  from autotraj_jax.training.reward_model import bradley_terry_loss, pair_scores
  from autotraj_jax.training.sft import positions_from_valid

  def loss_fn(params, batch, rng):
    del rng
    model = nnx.merge(graphdef, params)
    B, _, L = batch["tokens"].shape
    tokens, valid = batch["tokens"].reshape(2 * B, L), batch["valid"].reshape(2 * B, L)
    values = model(tokens, positions_from_valid(valid), causal_mask(valid))
    rc, rr = pair_scores(jnp.swapaxes(values.reshape(B, 2, L), 0, 1), jnp.swapaxes(batch["last"], 0, 1))
    return bradley_terry_loss(rc, rr, margin=batch["margin"], center_coef=0.01)

  return loss_fn


def _rl_losses():
  """The pure RL loss module (moving from training/rl_losses.py into the training/rl package)."""
  try:
    from autotraj_jax.training.rl import losses
  except ImportError:
    from autotraj_jax.training import rl_losses as losses
  return losses


def _forward_stats(model, batch, entropy: bool):
  """(log p(next token) [B, T], entropy [B, T] or None), chunked when the config says so."""
  from autotraj_jax.models.decoder import causal_mask
  from autotraj_jax.training import losses
  from autotraj_jax.training.sft import positions_from_valid
  rl_losses = _rl_losses()
  tokens, valid = batch["tokens"], batch["valid"]
  args = (tokens[:, :-1], positions_from_valid(valid)[:, :-1], causal_mask(valid[:, :-1]))
  if model.cfg.logits_chunk:
    hidden, _ = model.model(*args)
    return losses.chunked_token_stats(hidden, tokens[:, 1:], model.logits, model.cfg.logits_chunk, entropy=entropy)
  logits, _ = model(*args)
  return (losses.token_logprobs(logits, tokens[:, 1:]),
          rl_losses.entropy_from_logits(logits) if entropy else None)


def _grpo_loss(graphdef, chunked: bool):
  """The GRPO policy loss: the RL package's own (`make_policy_loss`, default RLConfig) when the
  logits are not chunked, else the same objective over `chunked_token_stats`."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  if not chunked:
    try:
      from autotraj_jax.training.rl import RLConfig, make_policy_loss
      return make_policy_loss(graphdef, RLConfig())
    except ImportError:
      pass
  rl_losses = _rl_losses()

  def loss_fn(params, batch, rng):
    del rng
    logp, ent = _forward_stats(nnx.merge(graphdef, params), batch, entropy=True)
    mask = (batch["loss_mask"][:, 1:] * batch["valid"][:, 1:]).astype(jnp.float32)
    s, c, aux = rl_losses.policy_loss(logp, batch["old_logp"], batch["adv"], mask, clip_low=0.2, clip_high=0.28)
    kl = rl_losses.kl_penalty(logp, batch["ref_logp"], "k3")
    aux["kl_sum"] = jax.lax.stop_gradient(jnp.sum(jnp.where(mask > 0, kl, 0.0)))
    aux["entropy_sum"] = jax.lax.stop_gradient(jnp.sum(ent * mask))
    return s, c, aux

  return loss_fn


def _sds(shape, dtype, sharding):
  import jax
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def build_stage(name: str, shape: StageShape, model_cfg, mesh) -> tuple[Callable, tuple, dict]:
  """(jitted fn, abstract args, lower kwargs) of one stage on `mesh`."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from autotraj_jax import sharding as shd
  from autotraj_jax.models.build import abstract_model

  graphdef, params = abstract_model(model_cfg, "scalar" if name == "rm" else "causal_lm")
  param_sh = shd.param_shardings(params, mesh)
  if name in ("sft", "rm", "grpo"):
    return _train_stage(name, shape, model_cfg, mesh, graphdef, params, param_sh)
  abstract_params = jax.tree.map(lambda x, s: _sds(x.shape, x.dtype, s), params, param_sh)
  data_sh = NamedSharding(mesh, P(shd.BATCH_AXES))
  if name == "ref":
    def ref_fn(p, batch):
      logp, _ = _forward_stats(nnx.merge(graphdef, p), batch, entropy=False)
      return logp
    batch = {k: _sds((shape.micro_batch, shape.seq), jnp.int32, data_sh) for k in ("tokens", "valid")}
    return jax.jit(ref_fn, in_shardings=(param_sh, data_sh)), (abstract_params, batch), {}
  if name == "engine":
    return _engine_stage(shape, model_cfg, mesh, graphdef, abstract_params, param_sh)
  raise ValueError(f"unknown stage {name!r}; expected one of {STAGES}")


def _train_stage(name: str, shape: StageShape, model_cfg, mesh, graphdef, params, param_sh):
  """The sharded train step of SFT, the RM or the GRPO update, on abstract state and batch."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from autotraj_jax import sharding as shd
  from autotraj_jax.training.optimizer import OptimizerConfig, make_optimizer, make_schedule
  from autotraj_jax.training.sft import make_sft_loss
  from autotraj_jax.training.step import TrainState, make_train_step

  rep = NamedSharding(mesh, P())
  m, n, L = shape.micro_batch, shape.num_micro, shape.seq
  opt_cfg = OptimizerConfig()
  optimizer = make_optimizer(opt_cfg)
  opt_like = jax.eval_shape(optimizer.init, params)
  state_sh = TrainState(rep, param_sh, shd.state_shardings(opt_like, params, mesh), rep)
  state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, opt_like,
                     jax.eval_shape(lambda: jax.random.key(0)))
  state = jax.tree.map(lambda x, s: _sds(x.shape, x.dtype, s), state, state_sh)
  batch_sh = NamedSharding(mesh, P(None, shd.BATCH_AXES))
  if name == "sft":
    loss_fn = make_sft_loss(graphdef)
    batch = {k: (n, m, L) for k in ("tokens", "valid", "loss_mask")}
  elif name == "rm":
    loss_fn = _rm_loss(graphdef)
    batch = {"tokens": (n, m, 2, L), "valid": (n, m, 2, L), "last": (n, m, 2), "margin": (n, m)}
  else:
    loss_fn = _grpo_loss(graphdef, bool(model_cfg.logits_chunk))
    batch = {**{k: (n, m, L) for k in ("tokens", "valid", "loss_mask")},
             **{k: (n, m, L - 1) for k in ("adv", "old_logp", "ref_logp")}}
  batch = {k: _sds(s, jnp.float32 if k in ("margin", "adv", "old_logp", "ref_logp") else jnp.int32, batch_sh)
           for k, s in batch.items()}
  step = make_train_step(loss_fn, optimizer, make_schedule(opt_cfg))
  fn = jax.jit(step, donate_argnums=(0,), in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None))
  return fn, (state, batch), {}


def _engine_stage(shape: StageShape, model_cfg, mesh, graphdef, abstract_params, param_sh):
  """The engine's two jitted pieces: prefill into a fresh cache, one decode step over it."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from autotraj_jax import sharding as shd
  from autotraj_jax.models.decoder import init_cache

  m, L = shape.micro_batch, shape.seq
  data_sh = NamedSharding(mesh, P(shd.BATCH_AXES))
  S, cache_sh = shape.cache_len, NamedSharding(mesh, P(shd.BATCH_AXES, None, None, None))

  def prefill_fn(p, tokens, valid):
    model = nnx.merge(graphdef, p)
    cache = init_cache(model_cfg, tokens.shape[0], S)
    cache = [type(c)(*(jax.lax.with_sharding_constraint(a, cache_sh) for a in c)) for c in cache]
    positions = jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0)
    slot_valid = jnp.zeros((tokens.shape[0], S), bool).at[:, :L].set(valid.astype(bool))
    mask = slot_valid[:, None, :] & (jnp.arange(S)[None, :] <= jnp.arange(L)[:, None])[None]
    logits, cache = model(tokens, positions, mask, cache, 0)
    return logits[:, -1], cache

  def decode_fn(p, cache, tok, pos, slot_valid, slot):
    model = nnx.merge(graphdef, p)
    logits, cache = model(tok[:, None], pos[:, None], slot_valid[:, None, :], cache, slot)
    return logits[:, 0], cache

  kv = (m, model_cfg.num_kv_heads, S, model_cfg.head_dim)
  cache = [type(c)(*(_sds(kv, model_cfg.jnp_dtype, cache_sh) for _ in c))
           for c in jax.eval_shape(lambda: init_cache(model_cfg, 1, 1))]
  prefill = jax.jit(prefill_fn, in_shardings=(param_sh, data_sh, data_sh))
  decode = jax.jit(decode_fn, donate_argnums=(1,))
  prefill_args = (abstract_params, _sds((m, L), jnp.int32, data_sh), _sds((m, L), jnp.int32, data_sh))
  decode_args = (abstract_params, cache, _sds((m,), jnp.int32, data_sh), _sds((m,), jnp.int32, data_sh),
                 _sds((m, S), jnp.bool_, data_sh), jax.ShapeDtypeStruct((), jnp.int32))
  return (prefill, decode), (prefill_args, decode_args), {}


@dataclasses.dataclass(frozen=True)
class StageMemory:
  """XLA's per-device bytes of one compiled stage, next to the estimate."""

  stage: str
  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  code: int
  estimate: int
  estimate_activations: int
  compile_s: float

  @property
  def total(self) -> int:
    """Peak per device: live arguments, outputs not aliased to (donated) arguments, temporaries."""
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.code


def compile_memory(fn, args) -> dict[str, int]:
  """XLA's memory analysis of `fn` lowered and compiled on `args` (abstract, sharded)."""
  m = fn.lower(*args).compile().memory_analysis()
  return {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
          "aliased": int(m.alias_size_in_bytes), "temporaries": int(m.temp_size_in_bytes),
          "code": int(m.generated_code_size_in_bytes)}


def estimate(name: str, shape: StageShape, model_cfg, sizes: Sequence[int]):
  """plan_memory.py's plan of the same stage."""
  pm = _plan_memory()
  kind = "scalar" if name == "rm" else "causal_lm"
  batch = shape.micro_batch * (2 if name == "rm" else 1)
  stage = {"sft": "policy", "grpo": "policy", "rm": "rm", "ref": "reference", "engine": "engine"}[name]
  return pm.plan_stage(stage, model_cfg, sizes, batch, shape.seq, kind=kind, num_micro=shape.num_micro,
                       cache_len=shape.cache_len)


def _plan_memory():
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tpu", "plan_memory.py")
  if "plan_memory" not in sys.modules:
    spec = importlib.util.spec_from_file_location("plan_memory", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["plan_memory"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
  return sys.modules["plan_memory"]


def run_stage(name: str, shape: StageShape, model_cfg, mesh, sizes: Sequence[int]) -> StageMemory:
  import jax
  fn, args, _ = build_stage(name, shape, model_cfg, mesh)
  start = time.time()
  with jax.set_mesh(mesh):
    if name == "engine":
      pre, dec = compile_memory(fn[0], args[0]), compile_memory(fn[1], args[1])
      # Prefill and decode run one after the other: the peak is the larger, the cache counted once.
      mem = max(pre, dec, key=lambda d: d["arguments"] + d["outputs"] - d["aliased"] + d["temporaries"])
    else:
      mem = compile_memory(fn, args)
  plan = estimate(name, shape, model_cfg, sizes)
  return StageMemory(stage=name, **mem, estimate=plan.total, estimate_activations=plan.activations,
                     compile_s=time.time() - start)


# ---- report --------------------------------------------------------------------------------------


def fits(total_bytes: int, chip: str | None) -> bool | None:
  """Whether a per-device figure fits the chip's HBM (None: no chip named)."""
  if chip is None:
    return None
  if chip not in HBM_GIB:
    raise ValueError(f"unknown chip {chip!r}; expected one of {sorted(HBM_GIB)}")
  return total_bytes <= HBM_GIB[chip] * GIB


def gap(xla: int, est: int) -> str:
  """How far XLA's figure is from the estimate, as a ratio and a signed GiB difference."""
  ratio = xla / est if est else float("inf")
  return f"x{ratio:.2f} ({(xla - est) / GIB:+.2f} GiB)"


UNITS = {"GiB": GIB, "MiB": 1024 ** 2}


def format_report(rows: Sequence[StageMemory], shapes: dict[str, StageShape], chip: str | None,
                  unit: str = "GiB") -> str:
  g = lambda b: f"{b / UNITS[unit]:9.2f}"
  head = (f"{'stage':<8}{'micro x n x len':>18}{'args':>9}{'out':>9}{'alias':>9}{'temp':>9}{'code':>9}"
          f"{'XLA tot':>9}{'est tot':>9}{'est act':>9}  {'gap (XLA / est)':<22}{'fit':<5}")
  lines = [f"per-device {unit} (XLA memory_analysis vs tpu/plan_memory.py)", head]
  for r in rows:
    s = shapes[r.stage]
    ok = fits(r.total, chip)
    flag = "-" if ok is None else ("ok" if ok else "NO")
    lines.append(f"{r.stage:<8}{f'{s.micro_batch}x{s.num_micro}x{s.seq}':>18}{g(r.arguments)}{g(r.outputs)}"
                 f"{g(r.aliased)}{g(r.temporaries)}{g(r.code)}{g(r.total)}{g(r.estimate)}"
                 f"{g(r.estimate_activations)}  {gap(r.total, r.estimate):<22}{flag:<5}")
  if chip:
    lines.append(f"fit: XLA total <= {HBM_GIB[chip]} GiB ({chip} HBM); NO marks a stage that does not fit")
  return "\n".join(lines)


def _set_xla_flags(devices: int, concurrency_scheduler: bool) -> None:
  flags = os.environ.get("XLA_FLAGS", "")
  flags += f" --xla_force_host_platform_device_count={devices}"
  if not concurrency_scheduler:
    flags += " " + MEMORY_SCHEDULER_FLAG
  os.environ["XLA_FLAGS"] = flags.strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv: Sequence[str] | None = None) -> list[StageMemory]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True, help="a recipe config file with get_config()")
  parser.add_argument("--devices", type=int, default=8, help="fake CPU devices (the mesh must use them all)")
  parser.add_argument("--chip", choices=sorted(HBM_GIB), default=None, help="flag stages over this HBM")
  parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {STAGES}")
  parser.add_argument("--unit", choices=sorted(UNITS), default="GiB", help="of the printed figures")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
  parser.add_argument("--logits-chunk", type=int, default=None,
                      help="positions per logits chunk in the losses (0: whole sequence; default: the model's)")
  parser.add_argument("--concurrency-scheduler", action="store_true",
                      help="keep XLA CPU's default scheduler (ignores remat: the old, inflated figures)")
  args = parser.parse_args(argv)
  stages = [s for s in args.stages.split(",") if s]
  for s in stages:
    if s not in STAGES:
      parser.error(f"--stages: unknown stage {s!r}; expected some of {STAGES}")
  _set_xla_flags(args.devices, args.concurrency_scheduler)

  import jax

  from autotraj_jax import sharding as shd
  from autotraj_jax.models.config import get_preset

  if len(jax.devices()) != args.devices:
    raise SystemExit(f"have {len(jax.devices())} devices, wanted {args.devices}: jax started before "
                     f"XLA_FLAGS were set (run this as its own process)")
  cfg = load_config(args.config, args.set)
  dtype = str(field(cfg, "model.param_dtype", "float32"))
  overrides = {"param_dtype": dtype, "dtype": dtype, "remat": field(cfg, "model.remat", False)}
  if args.logits_chunk is not None:
    overrides["logits_chunk"] = args.logits_chunk
  model_cfg = get_preset(str(field(cfg, "model.preset")), **overrides)
  mesh_cfg = shd.MeshConfig(data=int(field(cfg, "mesh.data", 1)), fsdp=int(field(cfg, "mesh.fsdp", -1)),
                            tp=int(field(cfg, "mesh.tp", 1)))
  mesh = shd.make_mesh(mesh_cfg)
  sizes = tuple(mesh.shape[a] for a in shd.AXES)
  shapes = stage_shapes(cfg)
  print(f"{field(cfg, 'model.preset')} ({dtype}, remat {model_cfg.remat_policy}, logits_chunk "
        f"{model_cfg.logits_chunk}) on mesh {dict(zip(shd.AXES, sizes))}, {args.devices} fake CPU devices; "
        f"scheduler {'concurrency (CPU default)' if args.concurrency_scheduler else 'memory'}", flush=True)
  dp = sizes[0] * sizes[1]
  for name in stages:
    if shapes[name].micro_batch % dp:
      raise SystemExit(f"{name}: micro-batch of {shapes[name].micro_batch} rows does not split over "
                       f"data*fsdp = {dp} devices")
  rows = []
  for name in stages:
    row = run_stage(name, shapes[name], model_cfg, mesh, sizes)
    print(f"  {name}: compiled in {row.compile_s:.1f} s", flush=True)
    rows.append(row)
  print(format_report(rows, shapes, args.chip, args.unit))
  return rows


if __name__ == "__main__":
  main()
