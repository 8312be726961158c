"""The SFT stage: fine-tune the policy on the stage-1 SFT set.

`sft:VARIANT` trains `config.sft` updated by `config.sft_variants[VARIANT]` into `<workdir>/sft_VARIANT`
(checkpoints, logs); downstream stages load it by that name. Fields of `config.sft`:

- `init`: the model it starts from, by name in the workdir ('policy' = the base policy).
- `data`: 'autotraj' (high-quality + accepted repairs, all of sft.jsonl) or 'high_only' (the
  high-quality candidates alone, the ablation without repair).
- `mask_tool_results`: loss on model-written tokens only (default); False trains on tool
  output too (ablation).
- `steps`, `batch_size`, `micro_batch_size`, `buckets`, `learning_rate`, `warmup_steps`,
  `log_every`, `checkpoint_every`: the trainer's. Batches group similar lengths into buckets.
- `eval_fraction`: share of SFT questions held out for the eval loss; `eval_every` (0: only at
  the end) and `eval_questions`: greedy accuracy on that many validation questions.
- `lora.rank` (0: full fine-tuning), `lora.alpha`, `lora.targets`: LoRA adapters, exported
  merged into full weights so later stages load a plain model.
"""

from __future__ import annotations

import logging
import os
import random
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from autotraj_jax.stages import Workdir, register_stage
from autotraj_jax.tir.trajectory import Trajectory, iter_trajectories
from autotraj_jax.training import data as data_lib

log = logging.getLogger(__name__)

SFT_DATA = ("autotraj", "high_only")


def variant_node(config: ml_collections.ConfigDict, section: str, variant: str) -> ml_collections.ConfigDict:
  """`config[section]` with `config[section + '_variants'][variant]` applied on top."""
  variants = config.get(f"{section}_variants", {})
  if variant not in variants:
    raise ValueError(f"unknown {section} variant {variant!r}; config.{section}_variants has {sorted(variants)}")
  node = ml_collections.ConfigDict(config[section].to_dict())
  node.update(dict(variants[variant]))
  return node


def select_sft(trajs: Sequence[Trajectory], data: str) -> list[Trajectory]:
  if data not in SFT_DATA:
    raise ValueError(f"sft.data must be one of {SFT_DATA}, got {data!r}")
  if data == "high_only":
    return [t for t in trajs if t.provenance.get("source") != "repaired"]
  return list(trajs)


def split_by_question(trajs: Sequence[Trajectory], fraction: float, seed: int
                      ) -> tuple[list[Trajectory], list[Trajectory]]:
  """(train, held_out): whole questions held out, so the eval loss is on unseen questions."""
  qids = sorted({t.question_id for t in trajs})
  random.Random(seed).shuffle(qids)
  n_eval = int(round(len(qids) * fraction)) if len(qids) > 1 else 0
  held = set(qids[:n_eval])
  return [t for t in trajs if t.question_id not in held], [t for t in trajs if t.question_id in held]


def sft_examples(trajs: Sequence[Trajectory], eos_id: int | None, *, mask_tool_results: bool
                 ) -> list[dict[str, list[int]]]:
  out = []
  for t in trajs:
    ex = t.training_example(mask_tool_results=mask_tool_results)
    if eos_id is not None and t.finish_reason in ("answer", "eos", "stop"):
      ex["tokens"].append(eos_id)
      ex["loss_mask"].append(1)
    out.append(ex)
  return out


def make_eval_loss(loss_fn, examples: Sequence[dict[str, Any]], *, buckets: Sequence[int],
                   batch_size: int, pad_id: int):
  """params -> mean loss over `examples` (fixed batch size and buckets: one compile per bucket)."""
  batches = []
  for i in range(0, len(examples), batch_size):
    chunk = list(examples[i:i + batch_size])
    pad = batch_size - len(chunk)
    batch = data_lib.collate(chunk + [{"tokens": [pad_id], "loss_mask": [0]}] * pad, buckets, pad_id)
    batches.append(batch)
  step = jax.jit(lambda p, b: loss_fn(p, b, jax.random.key(0))[:2])

  def eval_loss(params) -> float:
    total, count = jnp.zeros(()), jnp.zeros(())
    for b in batches:
      s, c = step(params, b)
      total, count = total + s, count + c
    return float(total / jnp.maximum(count, 1.0))

  return eval_loss


@register_stage("sft")
def sft_stage(config, wd: Workdir, variant: str) -> None:
  from autotraj_jax import sharding as shd
  from autotraj_jax import checkpoint
  from autotraj_jax.eval import EvalConfig, evaluate
  from autotraj_jax.models import abstract_model
  from autotraj_jax.training import lora as lora_lib
  from autotraj_jax.training.optimizer import OptimizerConfig
  from autotraj_jax.training.sft import make_sft_loss
  from autotraj_jax.training.trainer import TrainConfig, Trainer
  from data_gen.stages import (close_tools, load_split, load_tokenizer_for, make_engine, make_tools,
                               model_checkpoints, rollout_config)

  node = variant_node(config, "sft", variant)
  out_dir = wd.path(f"sft_{variant}")
  tokenizer = load_tokenizer_for(config, wd)
  trajs = select_sft(list(iter_trajectories(wd.path("sft.jsonl"))), node.data)
  train, held = split_by_question(trajs, node.eval_fraction, config.seed)
  if not train:
    wd.skip(f"sft_{variant}", f"no training trajectories ({node.data}) in sft.jsonl: the policy solved "
            "nothing and no repair was accepted (see report/stats.md)")
    return
  log.info("sft:%s: %d train / %d held-out trajectories (%s)", variant, len(train), len(held), node.data)
  examples = sft_examples(train, tokenizer.eos_token_id, mask_tool_results=node.mask_tool_results)
  if len(examples) < node.batch_size:  # a tiny set: repeat it to fill one batch
    examples = (examples * node.batch_size)[:max(node.batch_size, len(examples))]
  held_examples = sft_examples(held, tokenizer.eos_token_id, mask_tool_results=True)

  init_dir = model_checkpoints(wd, node.init)
  model_cfg, kind, params = checkpoint.load_model(init_dir)
  graphdef, _ = abstract_model(model_cfg, kind)
  mesh = shd.make_mesh(shd.MeshConfig(fsdp=-1))
  pad_id = tokenizer.pad_token_id or 0
  lora = lora_lib.setup(params, make_sft_loss(graphdef), lora_lib.LoraConfig(**node.lora.to_dict()), config.seed)
  if lora.cfg.enabled:
    log.info("sft:%s: LoRA rank %d on %s", variant, lora.cfg.rank, lora.cfg.targets)
  loss_fn, params, full_params = lora.loss_fn, lora.params, lora.merged

  eval_loss = make_eval_loss(loss_fn, held_examples, buckets=tuple(node.buckets), batch_size=node.batch_size,
                             pad_id=pad_id) if held_examples else None
  queries = load_split(config, wd, "validation", node.eval_questions) if node.eval_questions else []
  engine = make_engine(config, init_dir, tokenizer) if queries else None
  tools = make_tools(config, wd) if queries else {}

  def eval_fn(p, step: int) -> dict[str, float]:
    out = {}
    if eval_loss is not None:
      out["loss"] = eval_loss(p)
    if engine is not None:
      engine.update_params(jax.device_put(full_params(p), jax.tree.map(lambda x: x.sharding, engine.params)))
      metrics, _ = evaluate(engine, tokenizer, tools, queries,
                            EvalConfig(rollout=rollout_config(config.eval, config.seed), seed=config.seed))
      out.update(accuracy=metrics["pass@1"], format_error_rate=metrics["format_error_rate"])
    log.info("sft:%s step %d eval: %s", variant, step, out)
    return out

  cfg = TrainConfig(steps=node.steps, batch_size=node.batch_size, micro_batch_size=node.micro_batch_size,
                    buckets=tuple(node.buckets), seed=config.seed, log_every=node.log_every,
                    checkpoint_every=node.checkpoint_every, keep_checkpoints=1, pad_id=pad_id,
                    group_by_length=True,
                    optimizer=OptimizerConfig(learning_rate=node.learning_rate, warmup_steps=node.warmup_steps,
                                              total_steps=node.steps, end_lr_ratio=0.1, weight_decay=0.0))
  meta = {"model_config": model_cfg.to_dict(), "model_kind": kind, "sft_data": node.data,
          "mask_tool_results": bool(node.mask_tool_results), "lora": lora.cfg.to_dict()}
  trainer_dir = os.path.join(out_dir, "train") if lora.cfg.enabled else out_dir
  trainer = Trainer(cfg, loss_fn=loss_fn, params=params, mesh=mesh, workdir=trainer_dir, meta=meta,
                    eval_fn=eval_fn, eval_every=node.eval_every or node.steps,
                    optimizer_wrapper=lora.optimizer_wrapper)
  try:
    state = trainer.run(examples)
  finally:
    trainer.close()
    close_tools(tools)
  if lora.cfg.enabled:  # later stages load a plain model: merge the adapters into the weights
    extra = {k: v for k, v in meta.items() if k not in ("model_config", "model_kind")}
    checkpoint.save_model(model_checkpoints(wd, f"sft_{variant}"), jax.device_get(full_params(state.params)),
                          model_cfg, kind=kind, step=int(state.step), extra_meta=extra)
