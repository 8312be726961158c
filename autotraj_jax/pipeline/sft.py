"""The SFT stage: fine-tune the policy on the stage-1 SFT set.

`sft:VARIANT` trains `config.sft` updated by `config.sft_variants[VARIANT]` into `<workdir>/sft_VARIANT`
(checkpoints, logs); downstream stages load it by that name. `data` picks the set: 'autotraj'
(high-quality + accepted repairs, all of sft.jsonl), 'high_only' (the ablation without repair) or
'autotraj_question' (all of sft_question.jsonl: the repairs of a repairer that saw only the question).
Questions held out by `builders.is_held_out` give the eval loss and are never trained on; LoRA
adapters (`lora.rank` > 0) are merged into full weights on export so later stages load a plain model.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from autotraj_jax.pipeline import builders
from autotraj_jax.pipeline.workdir import Workdir
from autotraj_jax.tir.trajectory import Trajectory, iter_trajectories
from autotraj_jax.training import data as data_lib

log = logging.getLogger(__name__)

# sft.data -> the stage-1 file it is drawn from (written by `datasets` / `datasets:question`).
SFT_DATA = {"autotraj": "sft.jsonl", "high_only": "sft.jsonl", "autotraj_question": "sft_question.jsonl"}


def sft_file(data: str) -> str:
  """The stage-1 file that `sft.data` draws from; a bad value is named."""
  if data not in SFT_DATA:
    raise ValueError(f"sft.data must be one of {tuple(SFT_DATA)}, got {data!r}")
  return SFT_DATA[data]


def select_sft(trajs: Sequence[Trajectory], data: str) -> list[Trajectory]:
  """The examples of `data` among the trajectories of its file, `sft_file(data)`."""
  sft_file(data)
  if data == "high_only":
    return [t for t in trajs if t.provenance.get("source") != "repaired"]
  return list(trajs)


def sft_examples(trajs: Sequence[Trajectory], eos_id: int | None, *, mask_tool_results: bool
                 ) -> list[dict[str, list[int]]]:
  """Training examples; a finished trajectory ends with one EOS target (added unless the
  sampler already emitted it)."""
  out = []
  for t in trajs:
    ex = t.training_example(mask_tool_results=mask_tool_results)
    ends = t.finish_reason in ("answer", "eos", "stop")
    if eos_id is not None and ends and (not ex["tokens"] or ex["tokens"][-1] != eos_id):
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


def _accuracy_eval(config, wd: Workdir, node, init_dir: str, tokenizer):
  """(engine, tools, queries) for greedy accuracy on validation questions during training."""
  if not node.eval_questions:
    return None, {}, []
  queries = builders.load_split(config, wd, "validation", node.eval_questions)
  return builders.make_engine(config, init_dir, tokenizer), builders.make_tools(config, wd), queries


def sft_stage(config, wd: Workdir, variant: str) -> None:
  """SFT of the policy on a stage-1 SFT set (sft:high_only, sft:autotraj, ...), into sft_VARIANT/."""
  from autotraj_jax import checkpoint
  from autotraj_jax.eval import EvalConfig, evaluate
  from autotraj_jax.models import abstract_model
  from autotraj_jax.training import lora as lora_lib
  from autotraj_jax.training.sft import make_sft_loss
  from autotraj_jax.training.trainer import Trainer

  node = builders.variant_node(config, "sft", variant)
  name = f"sft_{variant}"
  tokenizer = builders.load_tokenizer(config, wd)
  data_file = sft_file(node.data)
  trajs = select_sft(list(iter_trajectories(wd.path(data_file))), node.data)
  held_out = [builders.is_held_out(t.question_id, config.heldout_fraction, config.seed) for t in trajs]
  train = [t for t, h in zip(trajs, held_out) if not h]
  held = [t for t, h in zip(trajs, held_out) if h]
  if not train:
    wd.skip(name, f"no training trajectories ({node.data}) in {data_file}: the policy solved "
            "nothing and no repair was accepted (see report/stats.md)")
    return
  log.info("%s: %d train / %d held-out trajectories (%s)", name, len(train), len(held), node.data)
  examples = sft_examples(train, tokenizer.eos_token_id, mask_tool_results=node.mask_tool_results)
  if len(examples) < node.batch_size:  # a tiny set: repeat it to fill one batch
    examples = (examples * node.batch_size)[:max(node.batch_size, len(examples))]
  held_examples = sft_examples(held, tokenizer.eos_token_id, mask_tool_results=True)

  init_dir = wd.model_dir(node.init)
  mesh = builders.make_mesh(config)
  model_cfg, kind, params = checkpoint.load_model(init_dir, mesh=mesh)
  graphdef, _ = abstract_model(model_cfg, kind)
  pad_id = tokenizer.pad_token_id or 0
  lora = lora_lib.setup(params, make_sft_loss(graphdef), builders.from_node(lora_lib.LoraConfig, node.lora),
                        config.seed)
  if lora.cfg.enabled:
    log.info("%s: LoRA rank %d on %s", name, lora.cfg.rank, lora.cfg.targets)
  eval_loss = make_eval_loss(lora.loss_fn, held_examples, buckets=tuple(node.buckets), batch_size=node.batch_size,
                             pad_id=pad_id) if held_examples else None
  engine, tools, queries = _accuracy_eval(config, wd, node, init_dir, tokenizer)

  steps = builders.train_steps(node, len(examples))

  def eval_fn(p, step: int) -> dict[str, float]:
    out = {}
    if eval_loss is not None:
      out["loss"] = eval_loss(p)
    if engine is not None and step == steps:  # greedy accuracy (slow) once, at the end
      engine.update_params(jax.device_put(lora.merged(p), jax.tree.map(lambda x: x.sharding, engine.params)))
      metrics, _ = evaluate(engine, tokenizer, tools, queries,
                            EvalConfig(rollout=builders.rollout_config(config.eval, config.seed), seed=config.seed))
      out.update(accuracy=metrics["pass@1"], format_error_rate=metrics["format_error_rate"])
    log.info("%s step %d eval: %s", name, step, out)
    return out

  meta = {"model_config": model_cfg.to_dict(), "model_kind": kind, "sft_data": node.data,
          "mask_tool_results": bool(node.mask_tool_results), "lora": lora.cfg.to_dict()}
  out_dir = wd.path(name)
  trainer = Trainer(builders.train_config(node, seed=config.seed, pad_id=pad_id, steps=steps), loss_fn=lora.loss_fn,
                    params=lora.params, mesh=mesh,
                    workdir=os.path.join(out_dir, "train") if lora.cfg.enabled else out_dir, meta=meta,
                    eval_fn=eval_fn, eval_every=node.eval_every or steps,
                    optimizer_wrapper=lora.optimizer_wrapper, desc=f"sft:{variant}")
  try:
    state = trainer.run(examples)
  finally:
    trainer.close()
    builders.close_tools(tools)
  if lora.cfg.enabled:  # later stages load a plain model: merge the adapters into the weights
    extra = {k: v for k, v in meta.items() if k not in ("model_config", "model_kind")}
    checkpoint.save_model(wd.model_dir(name), lora.merged(state.params),
                          model_cfg, kind=kind, step=int(state.step), extra_meta=extra)
