"""Stages of the embedded default: the synthetic world, a local tokenizer, the warm-started policy.

They stand in for what a real run downloads (a benchmark, a tokenizer, an instruct model), so the
whole pipeline runs on a CPU with no server and no download.

Warm-starting a policy that solves a fair share of tasks takes longer than the whole demo is
allowed, so the project ships one (`assets/demo_policy`: HF safetensors + tokenizer, made by
`experiments/configs/demo_policy.py` with these same stages). With `config.warmstart.asset`
set, the tokenizer and warmstart stages import it instead of training; with it empty they train.
"""

from __future__ import annotations

import json
import logging
import os

import jax


from autotraj_jax.stages import Workdir, register_stage

log = logging.getLogger(__name__)


@register_stage("world")
def world_stage(config, wd: Workdir) -> None:
  from autotraj_jax.taskworld import write_world
  w = config.world
  write_world(wd.path("world"), seed=w.seed, sizes={"train": w.train, "validation": w.validation, "test": w.test},
              families=tuple(w.families), difficulty=tuple(w.difficulty), num_entities=w.num_entities)


def _asset(config) -> str | None:
  path = config.warmstart.get("asset", "")
  if not path:
    return None
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"warmstart.asset {path} holds no HF checkpoint (config.json); "
                            "pass --config.warmstart.asset='' to warm-start from scratch")
  return path


@register_stage("tokenizer")
def tokenizer_stage(config, wd: Workdir) -> None:
  """A byte-level BPE trained on generic text plus rendered task-world trajectories (or the
  shipped policy's tokenizer, which that policy needs)."""
  asset = _asset(config)
  if asset:
    from autotraj_jax.models.hf import copy_sidecar_files
    if not copy_sidecar_files(asset, wd.path("tokenizer")):
      raise FileNotFoundError(f"no tokenizer files in {asset}")
    return
  from autotraj_jax.taskworld import read_corpus, read_split, render_reference_trajectory
  from autotraj_jax.tokenizer import demo_tokenizer_corpus, train_tokenizer
  corpus = read_corpus(wd.path("world", "corpus.jsonl"))
  tasks = read_split(wd.path("world", "train.jsonl"))[:config.tokenizer.num_tasks]
  texts = list(demo_tokenizer_corpus())
  for t in tasks:
    texts.append(t.question)
    texts.append(render_reference_trajectory(t, {i: "0" for i, _ in enumerate(t.solution.steps)}, corpus=corpus))
  texts += list(corpus.values())
  train_tokenizer(texts, wd.path("tokenizer"), vocab_size=config.tokenizer.vocab_size)


@register_stage("warmstart")
def warmstart_stage(config, wd: Workdir) -> None:
  """SFT of a randomly initialised demo policy (also the demo repairer) on flawed references."""
  from autotraj_jax import sharding as shd
  from autotraj_jax.models import get_preset, init_model
  from autotraj_jax.taskworld import read_corpus, read_split
  from autotraj_jax.taskworld.demo_policy import FlawRates, warmstart_examples
  from autotraj_jax.tir.tools import make_tool
  from autotraj_jax.tokenizer import load_tokenizer
  from autotraj_jax.training.optimizer import OptimizerConfig
  from autotraj_jax.training.sft import make_sft_loss
  from autotraj_jax.training.trainer import TrainConfig, Trainer

  node = config.warmstart
  asset = _asset(config)
  if asset:  # the shipped warm-started policy
    from autotraj_jax.checkpoint import save_model
    from autotraj_jax.models.hf import load_hf
    cfg, kind, params = load_hf(asset, dtype="float32")
    save_model(wd.path("policy", "checkpoints"), params, cfg, kind=kind, extra_meta={"source": asset})
    return
  tokenizer = load_tokenizer(wd.path("tokenizer"))
  corpus = read_corpus(wd.path("world", "corpus.jsonl"))
  train = read_split(wd.path("world", "train.jsonl"))
  tasks = train[config.generate.num_queries:][:node.num_tasks]  # disjoint from stage-1 queries
  code = make_tool("code", timeout_s=config.tools.code_timeout_s)
  try:
    examples, counts = warmstart_examples(
        tokenizer, tasks, corpus, rates=FlawRates(**dict(node.flaws)), seed=config.seed,
        repair_fraction=node.repair_fraction, run_code=lambda src: code(src).output)
  finally:
    getattr(code, "close", lambda: None)()
  with open(wd.path("policy", "warmstart_data.json"), "w") as f:
    json.dump(counts, f, indent=2)
  log.info("warmstart examples: %s", counts)
  model_cfg = get_preset(config.model.preset, vocab_size=len(tokenizer))
  graphdef, params = init_model(model_cfg, seed=config.seed)
  mesh = shd.make_mesh(shd.MeshConfig(fsdp=-1))
  cfg = TrainConfig(steps=node.steps, batch_size=node.batch_size, micro_batch_size=node.micro_batch_size,
                    buckets=tuple(node.buckets), seed=config.seed, log_every=node.log_every,
                    checkpoint_every=node.checkpoint_every, keep_checkpoints=1,
                    pad_id=tokenizer.pad_token_id or 0, group_by_length=True,
                    optimizer=OptimizerConfig(learning_rate=node.learning_rate, warmup_steps=node.warmup_steps,
                                              total_steps=node.steps, end_lr_ratio=0.1, weight_decay=0.01))
  trainer = Trainer(cfg, loss_fn=make_sft_loss(graphdef), params=params, mesh=mesh, workdir=wd.path("policy"),
                    meta={"model_config": model_cfg.to_dict(), "model_kind": "causal_lm"})
  try:
    trainer.run(examples)
  finally:
    trainer.close()


@register_stage("export_policy")
def export_policy_stage(config, wd: Workdir) -> None:
  """The warm-started policy as an HF directory (bf16 safetensors + tokenizer) at `config.export_dir`:
  how `assets/demo_policy` is made."""
  from autotraj_jax.checkpoint import load_model
  from autotraj_jax.models.hf import save_hf
  cfg, kind, params = load_model(wd.path("policy", "checkpoints"))
  params = jax.tree.map(lambda x: x.astype("bfloat16"), params)
  save_hf(config.export_dir, params, cfg.replace(param_dtype="bfloat16", dtype="float32"), kind=kind,
          tokenizer_dir=wd.path("tokenizer"))
  with open(os.path.join(config.export_dir, "provenance.json"), "w") as f:
    json.dump({"world": config.world.to_dict(), "warmstart": config.warmstart.to_dict(),
               "model": config.model.to_dict(), "seed": config.seed}, f, indent=2)
