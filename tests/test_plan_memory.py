"""tpu/plan_memory.py: exact sharded byte counts on abstract meshes, and the 7B sanity figure."""

import importlib.util
import math
import pathlib
import sys

import jax
import numpy as np
import pytest

from autotraj_jax import sharding as shd
from autotraj_jax.models.build import abstract_model
from autotraj_jax.models.config import get_preset

_PATH = pathlib.Path(__file__).resolve().parents[1] / "tpu" / "plan_memory.py"
_spec = importlib.util.spec_from_file_location("plan_memory", _PATH)
pm = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = pm  # dataclasses look their module up
_spec.loader.exec_module(pm)


def _expected_param_bytes(cfg, sizes, kind="causal_lm"):
  """Independent count: jax's own NamedSharding.shard_shape on an abstract mesh."""
  mesh = jax.sharding.AbstractMesh(tuple(sizes), shd.AXES)
  _, params = abstract_model(cfg, kind)
  shardings = shd.param_shardings(params, mesh)
  return sum(math.prod(s.shard_shape(p.shape)) * np.dtype(p.dtype).itemsize
             for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)))


@pytest.mark.parametrize("preset,sizes,kind", [
    ("tiny", (1, 1, 1), "causal_lm"),
    ("tiny", (1, 2, 2), "causal_lm"),
    ("tiny", (2, 4, 1), "scalar"),
    ("demo", (1, 2, 4), "causal_lm"),
    ("tiny", (1, 1, 8), "causal_lm"),  # tp=8 does not divide the 2 KV heads: replicated there
])
def test_param_bytes_are_exact_shard_sums(preset, sizes, kind):
  cfg = get_preset(preset)
  plan = pm.plan_memory(cfg, sizes, batch=8, seq=32, kind=kind)
  assert plan.params == _expected_param_bytes(cfg, sizes, kind)
  assert plan.grads == plan.params
  # Adam's moments mirror the params (same dtype, same sharding); count is one int32.
  assert plan.mu == plan.nu == plan.params
  assert plan.count == 4
  if sizes == (1, 1, 1):
    assert plan.params == plan.params_global == 4 * cfg.num_params()


def test_shard_shape():
  mesh = {"data": 2, "fsdp": 4, "tp": 2}
  P = jax.sharding.PartitionSpec
  assert pm.shard_shape((16, 8, 3), P("fsdp", "tp"), mesh) == (4, 4, 3)
  assert pm.shard_shape((16, 8), P(("data", "fsdp"), None), mesh) == (2, 8)
  with pytest.raises(ValueError, match="does not split"):
    pm.shard_shape((6,), P("fsdp"), mesh)


def test_activations_remat_and_batch_split():
  cfg = get_preset("tiny")
  mesh = {"data": 1, "fsdp": 2, "tp": 1}
  full = pm.activation_bytes(cfg, mesh, batch=8, seq=64, remat=False)
  remat = pm.activation_bytes(cfg, mesh, batch=8, seq=64, remat=True)
  assert full["local_batch"] == remat["local_batch"] == 4
  assert remat["total"] < full["total"]
  assert full["total"] == cfg.num_layers * full["layer"] + full["head"]
  b, L, s = 4, 64, 4
  D, F, N, K, H, V = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                      cfg.head_dim, cfg.vocab_size)
  assert full["layer"] == s * b * L * (4 * D + 2 * N * H + 2 * K * H + 4 * F) + (4 + s) * b * N * L * L
  assert full["head"] == 2 * s * b * L * D + 8 * b * L * V + 4 * b * L
  twice = pm.activation_bytes(cfg, {"data": 1, "fsdp": 1, "tp": 1}, batch=8, seq=64, remat=False)
  assert twice["total"] == 2 * full["total"]


def test_7b_on_fsdp16_cli(capsys):
  plan = pm.main(["--preset", "qwen2.5-7b", "--mesh", "fsdp=16", "--batch", "16", "--seq", "2048",
                  "--param-dtype", "bfloat16", "--remat"])
  out = capsys.readouterr().out
  assert abs(plan.params - 7.6e9 * 2 / 16) / (7.6e9 * 2 / 16) < 0.05
  assert plan.mu == plan.params  # bf16 moments with bf16 params (optax default)
  for word in ("params", "adamw mu", "adamw nu", "activations", "total", "GiB"):
    assert word in out
  assert f"{plan.total / pm.GIB:.3f}" in out


def test_stages_and_remat_policies():
  cfg = get_preset("tiny", remat="full")
  sizes = (1, 2, 1)
  policy = pm.plan_stage("policy", cfg, sizes, batch=8, seq=64, num_micro=2)
  assert policy.grad_accum == policy.params  # fp32 params: the fp32 sums are the same size
  assert pm.plan_stage("policy", cfg, sizes, batch=8, seq=64).grad_accum == 0
  ref = pm.plan_stage("reference", cfg, sizes, batch=8, seq=64)
  assert ref.grads == ref.mu == ref.nu == 0 and ref.params == policy.params
  assert 0 < ref.activations < policy.activations
  rm = pm.plan_stage("rm", cfg, sizes, batch=8, seq=64)
  critic = pm.plan_stage("critic", cfg, sizes, batch=8, seq=64)
  assert rm.activations == critic.activations < policy.activations  # no [B, L, V] logits
  engine = pm.plan_stage("engine", cfg, sizes, batch=8, seq=32, cache_len=48)
  b, K, H = 4, cfg.num_kv_heads, cfg.head_dim
  assert engine.cache == 2 * cfg.num_layers * b * K * 48 * H * 4
  assert engine.total == engine.params + engine.cache + engine.activations
  mesh = {"data": 1, "fsdp": 2, "tp": 1}
  acts = {p: pm.activation_bytes(cfg, mesh, 8, 64, p)["total"] for p in ("none", "full", "dots")}
  assert acts["full"] < acts["dots"] < acts["none"]
  chunked = pm.activation_bytes(cfg.replace(logits_chunk=16), mesh, 8, 64, "full")
  assert acts["full"] - chunked["total"] == 8 * 4 * (64 - 16) * cfg.vocab_size
  with pytest.raises(ValueError, match="unknown stage"):
    pm.plan_stage("actor", cfg, sizes, batch=8, seq=64)
