"""Config -> objects: the one place a config node becomes a library object.

Every stage builds its backend, engine, tools, tokenizer, mesh and trainer settings here, so a
config field means the same thing in every stage. `from_node` is the single mapping from an
ml_collections node to a frozen library dataclass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Any, TypeVar

import ml_collections

from autotraj_jax.engine.backend import SamplingParams
from autotraj_jax.pipeline.workdir import Workdir
from autotraj_jax.tir.rollout import Query, RolloutConfig

T = TypeVar("T")


def from_node(cls: type[T], node: Any, **overrides: Any) -> T:
  """`cls(**fields)` with each dataclass field read from `node` when present (overrides win).

  Nested ConfigDicts become plain dicts, lists become tuples, so frozen dataclasses stay hashable.
  """
  d = node.to_dict() if isinstance(node, ml_collections.ConfigDict) else dict(node)
  kw = {}
  for f in dataclasses.fields(cls):
    if f.name in overrides:
      kw[f.name] = overrides[f.name]
    elif f.name in d:
      v = d[f.name]
      kw[f.name] = tuple(v) if isinstance(v, list) else v
  return cls(**kw)


def variant_node(config: ml_collections.ConfigDict, section: str, variant: str) -> ml_collections.ConfigDict:
  """`config[section]` with `config[section + '_variants'][variant]` applied on top (nested
  dicts merge key by key)."""
  variants = config.get(f"{section}_variants", {})
  if variant not in variants:
    raise ValueError(f"unknown {section} variant {variant!r}; config.{section}_variants has {sorted(variants)}")
  node = ml_collections.ConfigDict(config[section].to_dict())
  _merge(node, variants[variant].to_dict() if hasattr(variants[variant], "to_dict") else dict(variants[variant]))
  return node


def _merge(node: ml_collections.ConfigDict, patch: dict[str, Any]) -> None:
  for k, v in patch.items():
    if isinstance(v, dict) and isinstance(node.get(k), ml_collections.ConfigDict):
      _merge(node[k], v)
    else:
      node[k] = v


def config_hash(config: ml_collections.ConfigDict) -> str:
  """Identifies the settings that shaped a record (the work directory excluded)."""
  d = json.loads(config.to_json_best_effort(sort_keys=True))
  d.pop("workdir", None)
  return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def rollout_config(node: ml_collections.ConfigDict, seed: int) -> RolloutConfig:
  """The tool loop's limits and sampling of a stage's node (generate, repair, eval, rl)."""
  return RolloutConfig(
      max_tool_calls=node.max_tool_calls, max_response_tokens=node.max_response_tokens,
      max_tokens_per_turn=node.max_tokens_per_turn, max_tool_output_chars=node.max_tool_output_chars,
      sampling=SamplingParams(temperature=node.temperature, top_p=node.top_p, top_k=node.top_k,
                              max_new_tokens=node.max_tokens_per_turn, seed=seed))


def split_path(config: ml_collections.ConfigDict, wd: Workdir, split: str) -> str:
  """A question file: the path given in `config.data.<split>_file`, else the generated world's split."""
  explicit = config.data.get(f"{split}_file")
  return explicit if explicit else os.path.join(wd.root, "world", f"{split}.jsonl")


def load_split(config: ml_collections.ConfigDict, wd: Workdir, split: str, limit: int | None) -> list[Query]:
  from autotraj_jax.questions import load_questions
  return load_questions(split_path(config, wd, split), limit or None)


def tokenizer_dir(config: ml_collections.ConfigDict, wd: Workdir) -> str:
  return config.model.tokenizer_dir or wd.path("tokenizer")


def load_tokenizer(config: ml_collections.ConfigDict, wd: Workdir):
  from autotraj_jax.tokenizer import load_tokenizer as load
  return load(tokenizer_dir(config, wd))


def make_mesh(config: ml_collections.ConfigDict):
  """The device mesh of `config.mesh` (data, fsdp, tp), used by every trainer and the engine."""
  from autotraj_jax import sharding
  return sharding.make_mesh(from_node(sharding.MeshConfig, config.mesh))


def engine_config(config: ml_collections.ConfigDict):
  from autotraj_jax.engine import EngineConfig
  return from_node(EngineConfig, config.engine, seed=config.seed)


def make_engine(config: ml_collections.ConfigDict, checkpoint_dir: str, tokenizer, mesh=None):
  """The in-process JAX engine on a model checkpoint, with the config's buckets and mesh."""
  from autotraj_jax import checkpoint
  from autotraj_jax.engine import JaxEngine
  from autotraj_jax.models import abstract_model
  mesh = make_mesh(config) if mesh is None else mesh
  cfg, kind, params = checkpoint.load_model(checkpoint_dir, mesh=mesh)
  graphdef, _ = abstract_model(cfg, kind)
  return JaxEngine(graphdef, params, cfg, tokenizer, mesh=mesh, config=engine_config(config))


def make_backend(config: ml_collections.ConfigDict, wd: Workdir, role: str = "policy", model: str | None = None):
  """(tokenizer, LLMBackend) for `role` ('policy' or 'repairer'): an SGLang server (backend='sglang')
  or the in-process engine on the role's checkpoint. A model trained in this workdir (`model`, by
  name) always runs in-process: a server serves only the model it was launched with."""
  tokenizer = load_tokenizer(config, wd)
  node = config[role]
  if model is not None:
    return tokenizer, make_engine(config, wd.model_dir(model), tokenizer)
  if config.backend == "sglang":
    from autotraj_jax.engine.sglang_backend import SGLangBackend
    urls = tuple(node.sglang_urls or config.sglang.urls)
    return tokenizer, SGLangBackend(urls, tokenizer, max_concurrency=config.sglang.max_concurrency)
  ckpt = node.checkpoint or wd.model_dir(role)
  if not os.path.isdir(ckpt):  # the demo policy doubles as the repairer
    ckpt = wd.model_dir("policy")
  return tokenizer, make_engine(config, ckpt, tokenizer)


def make_tools(config: ml_collections.ConfigDict, wd: Workdir) -> dict[str, Any]:
  """The tools of `config.tools.names`; search reads `tools.search_url`, else a local BM25 index
  over `tools.corpus` (default: the generated world's corpus)."""
  from autotraj_jax.tir.tools import make_tool
  tools = {}
  node = config.tools
  for name in node.names:
    if name == "search":
      corpus = node.corpus or os.path.join(wd.root, "world", "corpus.jsonl")
      if not node.search_url and not os.path.isfile(corpus):
        raise FileNotFoundError(f"the search tool has no corpus ({corpus} does not exist): set tools.search_url "
                                "to a retrieval server or tools.corpus to a JSONL corpus, or drop 'search' from "
                                "tools.names")
      tools[name] = make_tool("search", url=node.search_url) if node.search_url else make_tool(
          "search", corpus=corpus, cache_dir=wd.path("cache", "bm25"), top_k=node.search_top_k)
    elif name == "code":
      tools[name] = make_tool("code", timeout_s=node.code_timeout_s, workers=node.code_workers)
    else:
      tools[name] = make_tool(name)
  return tools


def close_tools(tools: dict[str, Any]) -> None:
  for t in tools.values():
    close = getattr(t, "close", None)
    if close is not None:
      close()


def train_config(node: ml_collections.ConfigDict, *, seed: int, pad_id: int, batch_size: int | None = None,
                 steps: int | None = None, end_lr_ratio: float = 0.1, keep_checkpoints: int = 1,
                 group_by_length: bool = True):
  """A TrainConfig (+ its OptimizerConfig) from a trainer node (warmstart, sft, rm, rl)."""
  from autotraj_jax.training.optimizer import OptimizerConfig
  from autotraj_jax.training.trainer import TrainConfig
  steps = node.steps if steps is None else steps
  batch = node.batch_size if batch_size is None else batch_size
  micro = node.micro_batch_size if node.micro_batch_size and batch % node.micro_batch_size == 0 else 0
  ratio = node.get("warmup_ratio", 0.0)
  warmup = min(int(round(ratio * steps)), steps) if ratio > 0 else node.warmup_steps
  opt = OptimizerConfig(learning_rate=node.learning_rate, warmup_steps=warmup, total_steps=steps,
                        end_lr_ratio=end_lr_ratio, weight_decay=node.get("weight_decay", 0.0),
                        grad_clip=node.get("grad_clip", 1.0))
  return TrainConfig(steps=steps, batch_size=batch, micro_batch_size=micro, buckets=tuple(node.buckets),
                     seed=seed, log_every=node.get("log_every", 10),
                     checkpoint_every=node.get("checkpoint_every", 100), keep_checkpoints=keep_checkpoints,
                     pad_id=pad_id, group_by_length=group_by_length, pack=bool(node.get("pack", False)),
                     optimizer=opt)


def scoring_config(config: ml_collections.ConfigDict):
  """The quality scorers of `config.scoring` (a preset plus field overrides)."""
  from autotraj_jax import scoring
  return scoring.get_scoring_config(config.scoring.preset, **dict(config.scoring.overrides))


def train_steps(node: ml_collections.ConfigDict, num_examples: int) -> int:
  """`node.steps`, or enough steps for `node.epochs` passes over `num_examples` when epochs > 0."""
  if node.get("epochs", 0) > 0:
    return max(1, math.ceil(node.epochs * num_examples / node.batch_size))
  return node.steps


def is_held_out(question_id: str, fraction: float, seed: int) -> bool:
  """Whether a stage-1 question is held out of SFT and RM training (their eval loss / pair
  accuracy). A hash of (seed, id), so every stage holds out the same questions whatever list
  it draws from."""
  if fraction <= 0:
    return False
  h = hashlib.sha256(f"{seed}/{question_id}".encode()).digest()
  return int.from_bytes(h[:8], "little") / 2**64 < fraction
