"""Stage-1 stages: candidate generation, scoring, repair, datasets, evaluation.

Each reads and writes files in the work directory; generation and repair append one finished
unit (a query's K candidates, one original's repair record) per JSONL line group and resume by id,
so a killed run loses at most the unit in flight and never duplicates a record.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
from typing import Any

import ml_collections

from autotraj_jax.engine.backend import SamplingParams
from autotraj_jax.stages import Workdir, register_stage
from autotraj_jax.tir.rollout import Query, RolloutConfig, run_rollouts
from autotraj_jax.tir.trajectory import JsonlAppender, Trajectory, iter_trajectories
from autotraj_jax import scoring
from data_gen import build
from data_gen.repair import RepairConfig, repair, repair_queue

log = logging.getLogger(__name__)

# ---- shared builders -----------------------------------------------------------------------------


def config_hash(config: ml_collections.ConfigDict) -> str:
  """Identifies the settings that shaped a record (the work directory excluded)."""
  d = json.loads(config.to_json_best_effort(sort_keys=True))
  d.pop("workdir", None)
  return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def rollout_config(node: ml_collections.ConfigDict, seed: int) -> RolloutConfig:
  return RolloutConfig(
      max_tool_calls=node.max_tool_calls, max_response_tokens=node.max_response_tokens,
      max_tokens_per_turn=node.max_tokens_per_turn, max_tool_output_chars=node.max_tool_output_chars,
      sampling=SamplingParams(temperature=node.temperature, top_p=node.top_p, top_k=node.get("top_k", -1),
                              max_new_tokens=node.max_tokens_per_turn, seed=seed))


def split_path(config, wd: Workdir, split: str) -> str:
  """A question file: the generated world's split, or a path given in config.data."""
  explicit = config.data.get(f"{split}_file")
  return explicit if explicit else wd.path("world", f"{split}.jsonl")


def load_tokenizer_for(config, wd: Workdir):
  from autotraj_jax.tokenizer import load_tokenizer
  path = config.model.get("tokenizer_dir") or wd.path("tokenizer")
  return load_tokenizer(path)


def model_checkpoints(wd: Workdir, name: str) -> str:
  """Checkpoint directory of a model trained in this workdir ('policy', 'sft_autotraj', 'rl_...')."""
  return os.path.join(wd.root, name, "checkpoints")


def make_engine(config, checkpoint_dir: str, tokenizer, mesh=None):
  """The in-process JAX engine on a model checkpoint, with the config's buckets."""
  from autotraj_jax import checkpoint
  from autotraj_jax.engine import EngineConfig, JaxEngine
  from autotraj_jax.models import abstract_model
  cfg, kind, params = checkpoint.load_model(checkpoint_dir, mesh=mesh)
  graphdef, _ = abstract_model(cfg, kind)
  eng = config.engine
  return JaxEngine(graphdef, params, cfg, tokenizer, mesh=mesh, config=EngineConfig(
      batch_buckets=tuple(eng.batch_buckets), prompt_buckets=tuple(eng.prompt_buckets),
      new_token_buckets=tuple(eng.new_token_buckets), chunk_steps=eng.chunk_steps, seed=config.seed))


def make_backend(config, wd: Workdir, role: str = "policy", model: str | None = None):
  """The LLMBackend for `role` ('policy' or 'repairer'): the in-process engine on a local
  checkpoint (`model`: a model trained in this workdir, by name), or an SGLang server."""
  tokenizer = load_tokenizer_for(config, wd)
  node = config.get(role, config.policy)
  if config.backend == "sglang":
    from autotraj_jax.engine.sglang_backend import SGLangBackend
    url = node.get("sglang_url") or config.sglang.url
    return tokenizer, SGLangBackend(url, tokenizer, max_concurrency=config.sglang.max_concurrency)
  if config.backend != "jax":
    raise ValueError(f"config.backend must be 'jax' or 'sglang', got {config.backend!r}")
  if model is not None:
    ckpt = model_checkpoints(wd, model)
  else:
    ckpt = node.get("checkpoint") or model_checkpoints(wd, role)
    if not os.path.isdir(ckpt):  # the demo policy doubles as the repairer
      ckpt = model_checkpoints(wd, "policy")
  return tokenizer, make_engine(config, ckpt, tokenizer)


def make_tools(config, wd: Workdir) -> dict[str, Any]:
  from autotraj_jax.tir.tools import make_tool
  tools = {}
  for name in config.tools.names:
    if name == "search":
      url = config.tools.get("search_url")
      corpus = config.tools.get("corpus") or wd.path("world", "corpus.jsonl")
      tools[name] = make_tool("search", url=url) if url else make_tool(
          "search", corpus=corpus, cache_dir=wd.path("cache", "bm25"), top_k=config.tools.search_top_k)
    elif name == "code":
      tools[name] = make_tool("code", timeout_s=config.tools.code_timeout_s, workers=config.tools.code_workers)
    else:
      tools[name] = make_tool(name)
  return tools


def close_tools(tools: dict[str, Any]) -> None:
  for t in tools.values():
    close = getattr(t, "close", None)
    if close is not None:
      close()


def load_split(config, wd: Workdir, split: str, limit: int | None) -> list[Query]:
  from autotraj_jax.eval import load_queries
  return load_queries(split_path(config, wd, split), limit)


def _complete_groups(path: str, group_size: int) -> set[str]:
  """Question ids with all `group_size` candidates in `path`; rewrites the file without partial
  groups (a kill mid-group), so resuming never duplicates a candidate."""
  if not os.path.exists(path):
    return set()
  trajs = list(iter_trajectories(path))
  counts = collections.Counter(t.question_id for t in trajs)
  done = {q for q, c in counts.items() if c >= group_size}
  if len(done) != len(counts) or os.path.getsize(path) and not open(path, "rb").read().endswith(b"\n"):
    build.write_jsonl(path, [t for t in trajs if t.question_id in done])
  return done


# ---- stages --------------------------------------------------------------------------------------


@register_stage("generate")
def generate_stage(config, wd: Workdir) -> None:
  """K candidate trajectories per training query, appended a chunk of queries at a time."""
  node = config.generate
  queries = load_split(config, wd, node.split, node.num_queries)
  out = wd.path("candidates.jsonl")
  done = _complete_groups(out, node.samples_per_query)
  todo = [q for q in queries if q.id not in done]
  log.info("generate: %d queries done, %d to go", len(done), len(todo))
  if not todo:
    return
  tokenizer, backend = make_backend(config, wd, "policy")
  tools = make_tools(config, wd)
  rcfg = rollout_config(node, config.seed)
  prov = {"model": config.policy.get("name", "policy"), "config_hash": config_hash(config),
          "temperature": node.temperature, "top_p": node.top_p}
  from tqdm.auto import tqdm
  try:
    with JsonlAppender(out) as w, tqdm(total=len(queries), initial=len(done), desc="generate") as bar:
      for i in range(0, len(todo), node.chunk_queries):
        chunk = todo[i:i + node.chunk_queries]
        trajs = run_rollouts(backend, tokenizer, chunk, tools, rcfg,
                             samples_per_query=node.samples_per_query, provenance=prov)
        w.write_all(trajs)
        bar.update(len(chunk))
  finally:
    close_tools(tools)


def _scoring_cfg(config) -> scoring.ScoringConfig:
  return scoring.get_scoring_config(config.scoring.preset, **dict(config.scoring.get("overrides", {})))


@register_stage("score")
def score_stage(config, wd: Workdir) -> None:
  cfg = _scoring_cfg(config)
  groups: dict[str, list[Trajectory]] = collections.defaultdict(list)
  for t in iter_trajectories(wd.path("candidates.jsonl")):
    groups[t.question_id].append(t)
  scored = []
  for g in groups.values():
    scoring.score_group(g, cfg)
    scored += g
  build.write_jsonl(wd.path("scored.jsonl"), scored)


@register_stage("repair")
def repair_stage(config, wd: Workdir) -> None:
  """One JSONL line per repaired original (accepted repair or hard case with reasons)."""
  node = config.repair
  scored = list(iter_trajectories(wd.path("scored.jsonl")))
  todo_all = repair_queue(scored, node.get("max_originals", 0))
  out = wd.path("repairs.jsonl")
  done = set()
  if os.path.exists(out):
    with open(out) as f:
      lines = f.readlines()
    good = [l for l in lines if l.endswith("\n")]
    done = {json.loads(l)["original_id"] for l in good}
    if len(good) != len(lines):
      with open(out, "w") as f:
        f.writelines(good)
  todo = [t for t in todo_all if t.id not in done]
  log.info("repair: %d done, %d to go", len(done), len(todo))
  if not todo:
    return
  tokenizer, backend = make_backend(config, wd, "repairer")
  tools = make_tools(config, wd)
  rcfg = RepairConfig(attempts=node.attempts, show_gold=node.show_gold,
                      accept_threshold=node.accept_threshold, accept_threshold_wrong=node.accept_threshold_wrong,
                      rollout=rollout_config(node, config.seed), retry_temperature=node.retry_temperature)
  from tqdm.auto import tqdm
  try:
    with JsonlAppender(out) as w, tqdm(total=len(todo_all), initial=len(done), desc="repair") as bar:
      for i in range(0, len(todo), node.chunk):
        chunk = todo[i:i + node.chunk]
        for outcome in repair(backend, tokenizer, tools, chunk, _scoring_cfg(config), rcfg,
                              model_name=config.get("repairer", config.policy).get("name", "repairer")):
          w.write(outcome.to_dict())
        bar.update(len(chunk))
  finally:
    close_tools(tools)


@register_stage("datasets")
def datasets_stage(config, wd: Workdir) -> None:
  scored = list(iter_trajectories(wd.path("scored.jsonl")))
  repairs = []
  if os.path.exists(wd.path("repairs.jsonl")):
    with open(wd.path("repairs.jsonl")) as f:
      repairs = [json.loads(l) for l in f if l.endswith("\n")]
  sft, pairs = build.build_sft_and_pairs(scored, repairs)
  build.write_jsonl(wd.path("sft.jsonl"), sft)
  build.write_jsonl(wd.path("pairs.jsonl"), pairs)
  build.write_jsonl(wd.path("hard_cases.jsonl"), [r for r in repairs if not r["accepted"]])
  summary = build.stats(scored, repairs, sft, pairs)
  build.write_report(wd.path("report"), scored, summary)
  log.info("datasets: %s", json.dumps(summary))


@register_stage("eval")
def eval_stage(config, wd: Workdir, variant: str = "") -> None:
  """Greedy evaluation of the policy; `eval:NAME` evaluates the model trained as NAME in this
  workdir (`eval:base` is the starting policy) and writes `eval/NAME.json`."""
  from autotraj_jax.eval import EvalConfig, evaluate, write_report
  node = config.eval
  queries = load_split(config, wd, node.split, node.max_questions)
  name = variant or node.name
  model = None if not variant or variant == "base" or config.backend == "sglang" else variant
  if model and (reason := wd.skipped(model)):
    log.warning("eval %s: skipped, the model was not trained (%s)", name, reason)
    return
  tokenizer, backend = make_backend(config, wd, "policy", model=model)
  tools = make_tools(config, wd)
  try:
    metrics, trajs = evaluate(backend, tokenizer, tools, queries,
                              EvalConfig(rollout=rollout_config(node, config.seed), maj_k=node.maj_k,
                                         seed=config.seed), progress=True)
  finally:
    close_tools(tools)
  write_report(wd.path("eval"), name, metrics, trajs)
  log.info("eval %s: %s", name, json.dumps(metrics))
