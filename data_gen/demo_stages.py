"""Stages of the embedded default: the synthetic world, a local tokenizer, the warm-started policy.

They stand in for what a real run downloads (a benchmark, a tokenizer, an instruct model), so the
whole pipeline runs on a CPU with no server and no download.
"""

from __future__ import annotations

import json
import logging


from autotraj_jax.stages import Workdir, register_stage

log = logging.getLogger(__name__)


@register_stage("world")
def world_stage(config, wd: Workdir) -> None:
  from autotraj_jax.taskworld import write_world
  w = config.world
  write_world(wd.path("world"), seed=w.seed, sizes={"train": w.train, "validation": w.validation, "test": w.test},
              families=tuple(w.families), difficulty=tuple(w.difficulty), num_entities=w.num_entities)


@register_stage("tokenizer")
def tokenizer_stage(config, wd: Workdir) -> None:
  """A byte-level BPE trained on generic text plus rendered task-world trajectories."""
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
  from autotraj_jax.taskworld.demo_policy import FlawRates, copy_examples, warmstart_examples
  from autotraj_jax.tokenizer import CHAT_TOKENS, TIR_TAGS
  from autotraj_jax.tir.tools import make_tool
  from autotraj_jax.tokenizer import load_tokenizer
  from autotraj_jax.training.optimizer import OptimizerConfig
  from autotraj_jax.training.sft import make_sft_loss
  from autotraj_jax.training.trainer import TrainConfig, Trainer

  node = config.warmstart
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
  if node.copy_fraction > 0:
    n = round(len(examples) * node.copy_fraction / (1 - node.copy_fraction))
    examples += copy_examples(n, low=len(CHAT_TOKENS + TIR_TAGS), high=len(tokenizer), seed=config.seed,
                              lengths=tuple(node.copy_lengths), sep=tokenizer.encode("\n")[0])
    counts["copy"] = n
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
  trainer = Trainer(cfg, loss_fn=make_sft_loss(graphdef), params=params, mesh=mesh,
                    workdir=wd.path("policy"), meta={"model_config": model_cfg.to_dict(), "model_kind": "causal_lm"})
  trainer.run(examples)
  trainer.close()
