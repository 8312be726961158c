"""Build a model as (graphdef, params): the pure-function form every trainer and the engine use.

`params` is a plain nested dict of arrays (orbax-, optax- and sharding-friendly);
`nnx.merge(graphdef, params)` gives the module back inside a jitted function.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from autotraj_jax.models.config import ModelConfig
from autotraj_jax.models.decoder import CausalLM, ScalarModel

KINDS = {"causal_lm": CausalLM, "scalar": ScalarModel}


def _cls(kind: str):
  if kind not in KINDS:
    raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(KINDS)}")
  return KINDS[kind]


def init_model(cfg: ModelConfig, kind: str = "causal_lm", seed: int = 0) -> tuple[nnx.GraphDef, dict]:
  """Random-init params (host/default device)."""
  model = _cls(kind)(cfg, rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


def abstract_model(cfg: ModelConfig, kind: str = "causal_lm") -> tuple[nnx.GraphDef, dict]:
  """Graphdef and a ShapeDtypeStruct tree of the params, allocating nothing."""
  model = nnx.eval_shape(lambda: _cls(kind)(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


def init_sharded(cfg: ModelConfig, mesh: jax.sharding.Mesh, kind: str = "causal_lm",
                 seed: int = 0) -> tuple[nnx.GraphDef, dict]:
  """Random-init params directly on their shards (no full host copy)."""
  from autotraj_jax import sharding as shd
  graphdef, abstract = abstract_model(cfg, kind)
  shardings = shd.param_shardings(abstract, mesh)

  def make():
    return nnx.to_pure_dict(nnx.split(_cls(kind)(cfg, rngs=nnx.Rngs(seed)))[1])

  params = jax.jit(make, out_shardings=shardings)()
  return graphdef, params


def merge(graphdef: nnx.GraphDef, params: Any):
  return nnx.merge(graphdef, params)
