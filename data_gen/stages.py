"""Stage-1 stages: candidate generation, scoring, repair, datasets.

Each reads and writes files in the work directory; generation and repair append one finished
unit (a query's K candidates, one original's repair record) per JSONL line group and resume by id,
so a killed run loses at most the unit in flight and never duplicates a record. `repair:NAME`
repairs the same originals with `config.repair_variants[NAME]` on top into `repairs_NAME.jsonl`, and
`datasets:NAME` builds `sft_NAME.jsonl`, `pairs_NAME.jsonl` from it; the plain stages' files are untouched.
"""

from __future__ import annotations

import collections
import json
import logging
import os

from tqdm.auto import tqdm

from autotraj_jax import scoring
from autotraj_jax.distributed import is_primary
from autotraj_jax.pipeline import builders
from autotraj_jax.pipeline.config import ConfigError
from autotraj_jax.pipeline.runner import Stage
from autotraj_jax.pipeline.workdir import Workdir
from autotraj_jax.tir import records
from autotraj_jax.tir.rollout import run_rollouts
from autotraj_jax.tir.trajectory import RepairRecord, Trajectory, iter_repairs, iter_trajectories
from data_gen import build
from data_gen.repair import RepairConfig, repair, repair_queue

log = logging.getLogger(__name__)


def generate_stage(config, wd: Workdir) -> None:
  """K candidate trajectories per training query, appended a chunk of queries at a time."""
  node = config.generate
  queries = builders.load_split(config, wd, node.split, node.num_queries)
  out = wd.path("candidates.jsonl")
  _, done = records.resume(out, lambda d, where: Trajectory.from_dict(d, where), key=lambda t: t.question_id,
                           complete=lambda group: len(group) >= node.samples_per_query)
  todo = [q for q in queries if q.id not in done]
  log.info("generate: %d queries done, %d to go", len(done), len(todo))
  if not todo:
    return
  tokenizer, backend = builders.make_backend(config, wd, "policy")
  tools = builders.make_tools(config, wd)
  rcfg = builders.rollout_config(node, config.seed)
  prov = {"model": config.policy.name, "config_hash": builders.config_hash(config),
          "temperature": node.temperature, "top_p": node.top_p}
  try:
    with records.JsonlAppender(out) as w, \
        tqdm(total=len(queries) * node.samples_per_query, initial=len(done) * node.samples_per_query,
             desc="generate", unit="traj", dynamic_ncols=True, disable=not is_primary()) as bar:
      for i in range(0, len(todo), node.chunk_queries):
        chunk = todo[i:i + node.chunk_queries]
        trajs = run_rollouts(backend, tokenizer, chunk, tools, rcfg, samples_per_query=node.samples_per_query,
                             provenance=prov, on_finish=bar.update)
        w.write_all(trajs)
  finally:
    builders.close_tools(tools)


def score_stage(config, wd: Workdir) -> None:
  """Scores every candidate and partitions it into high / low / wrong."""
  cfg = builders.scoring_config(config)
  groups: dict[str, list[Trajectory]] = collections.defaultdict(list)
  for t in iter_trajectories(wd.path("candidates.jsonl")):
    groups[t.question_id].append(t)
  scored = []
  for g in groups.values():
    scoring.score_group(g, cfg)
    scored += g
  records.write_jsonl(wd.path("scored.jsonl"), scored)


def named(stem: str, variant: str, ext: str = ".jsonl") -> str:
  """A stage-1 file of a variant: `repairs.jsonl` for the plain stage, `repairs_NAME.jsonl` for NAME."""
  return f"{stem}_{variant}{ext}" if variant else f"{stem}{ext}"


def repair_stage(config, wd: Workdir, variant: str = "") -> None:
  """One JSONL line per repaired original (accepted repair or hard case with reasons)."""
  node = builders.variant_node(config, "repair", variant) if variant else config.repair
  stage = f"repair:{variant}" if variant else "repair"
  scored = list(iter_trajectories(wd.path("scored.jsonl")))
  todo_all = repair_queue(scored, node.max_originals)
  out = wd.path(named("repairs", variant))
  _, done = records.resume(out, lambda d, where: RepairRecord.from_dict(d, where), key=lambda r: r.original_id)
  todo = [t for t in todo_all if t.id not in done]
  log.info("%s: %d done, %d to go", stage, len(done), len(todo))
  if not todo:
    return
  tokenizer, backend = builders.make_backend(config, wd, "repairer")
  tools = builders.make_tools(config, wd)
  rcfg = builders.from_node(RepairConfig, node, rollout=builders.rollout_config(node, config.seed))
  score_cfg = builders.scoring_config(config)
  try:
    with records.JsonlAppender(out) as w, \
        tqdm(total=len(todo_all), initial=len(done), desc=stage, unit="orig", dynamic_ncols=True,
             disable=not is_primary()) as bar:
      for i in range(0, len(todo), node.chunk):
        for outcome in repair(backend, tokenizer, tools, todo[i:i + node.chunk], score_cfg, rcfg,
                              model_name=config.repairer.name):
          w.write(outcome)
          bar.update(1)
  finally:
    builders.close_tools(tools)


def datasets_stage(config, wd: Workdir, variant: str = "") -> None:
  """The SFT set, the preference pairs, the hard cases and the stage-1 report."""
  if variant and variant not in config.repair_variants:
    raise ConfigError(f"config.stages: 'datasets:{variant}' names no entry of config.repair_variants "
                      f"({', '.join(sorted(config.repair_variants))})")
  scored = list(iter_trajectories(wd.path("scored.jsonl")))
  path = wd.path(named("repairs", variant))
  repairs = list(iter_repairs(path)) if os.path.exists(path) else []
  sft, pairs = build.build_sft_and_pairs(scored, repairs)
  records.write_jsonl(wd.path(named("sft", variant)), sft)
  records.write_jsonl(wd.path(named("pairs", variant)), pairs)
  records.write_jsonl(wd.path(named("hard_cases", variant)), [r for r in repairs if not r.accepted])
  summary = build.stats(scored, repairs, sft, pairs)
  build.write_report(wd.path(named("report", variant, "")), scored, summary)
  log.info("%s: %s", f"datasets:{variant}" if variant else "datasets", json.dumps(summary))


_SERVING = ("backend", "sglang.urls", "engine", "mesh", "tools", "model.tokenizer_dir", "seed")

# The stage-1 stages, by name (experiments/main.py joins them with the library's stage table).
STAGES: dict[str, Stage] = {
    "generate": Stage(
        generate_stage,
        reads=lambda c, v: ("generate", "policy", *_SERVING, f"data.{c.generate.split}_file"),
        inputs=lambda c, v: ("policy/checkpoints", f"world/{c.generate.split}.jsonl"),
        outputs=lambda c, v: ("candidates.jsonl",)),
    "score": Stage(score_stage, reads=lambda c, v: ("scoring",), inputs=lambda c, v: ("candidates.jsonl",),
                   outputs=lambda c, v: ("scored.jsonl",), host_only=True),
    "repair": Stage(
        repair_stage, reads=lambda c, v: ("repair", *((f"repair_variants.{v}",) if v else ()), "repairer", "scoring",
                                          *_SERVING),
        inputs=lambda c, v: ("scored.jsonl",), outputs=lambda c, v: (named("repairs", v),)),
    "datasets": Stage(
        datasets_stage, inputs=lambda c, v: ("scored.jsonl", named("repairs", v)),
        outputs=lambda c, v: (named("sft", v), named("pairs", v), named("hard_cases", v), named("report", v, "")),
        host_only=True),
}
