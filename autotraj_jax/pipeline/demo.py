"""Where the policy comes from: the synthetic world, the tokenizer, the starting policy.

With `config.model.hf_dir` set (an HF directory: a real checkpoint such as Qwen2.5-7B-Instruct, or
the shipped demo policy `assets/demo_policy`, the default), the tokenizer stage copies its
tokenizer and chat template and the warmstart stage imports its weights. With it empty, they
stand in for a download on the embedded default: a BPE tokenizer is trained on the synthetic world
and a small policy is warm-started from scratch (`experiments/configs/demo_policy.py` does this and
exports the result, which is how `assets/demo_policy` is made), so the whole pipeline runs on a CPU
with no server and no download.
"""

from __future__ import annotations

import filecmp
import logging
import os

import jax

from autotraj_jax.pipeline import builders
from autotraj_jax.pipeline.workdir import Workdir
from autotraj_jax.tir import records

log = logging.getLogger(__name__)


def world_stage(config, wd: Workdir) -> None:
  """The synthetic task world: train/validation/test question splits and the search corpus."""
  from autotraj_jax.taskworld import write_world
  w = config.world
  write_world(wd.path("world"), seed=w.seed, sizes={"train": w.train, "validation": w.validation, "test": w.test},
              families=tuple(w.families), difficulty=tuple(w.difficulty), num_entities=w.num_entities)


def _hf_dir(config) -> str | None:
  path = config.model.hf_dir
  if not path:
    return None
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"model.hf_dir {path} holds no HF checkpoint (config.json); "
                            "pass --config.model.hf_dir='' to warm-start the demo policy from scratch")
  return path


def tokenizer_stage(config, wd: Workdir) -> None:
  """The policy's tokenizer and chat template (from tokenizer.copy_from or model.hf_dir), or a BPE
  trained on the world. A demo repairer copies the demo policy's: repairs become the policy's SFT
  data token for token."""
  hf_dir = config.tokenizer.copy_from or _hf_dir(config)
  if hf_dir:
    from autotraj_jax.models.hf import copy_sidecar_files
    from autotraj_jax.tokenizer import load_tokenizer
    if not copy_sidecar_files(hf_dir, wd.path("tokenizer")):
      raise FileNotFoundError(f"{hf_dir} has no tokenizer files (tokenizer.json)")
    load_tokenizer(wd.path("tokenizer"))  # a corrupt tokenizer fails here, not in a later stage
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


def warmstart_stage(config, wd: Workdir) -> None:
  """The starting policy: model.hf_dir's weights, or a model (`warmstart.name`) warm-started on the
  synthetic world from random weights or from `warmstart.init_from`'s."""
  from autotraj_jax.models import abstract_model, get_preset, init_model
  from autotraj_jax.taskworld import read_corpus, read_split
  from autotraj_jax.taskworld.demo_policy import FlawRates, warmstart_examples
  from autotraj_jax.tir.tools import make_tool
  from autotraj_jax.tokenizer import load_tokenizer
  from autotraj_jax.training.sft import make_sft_loss
  from autotraj_jax.training.trainer import Trainer

  node = config.warmstart
  if config.repairer.hf_dir:
    _import_hf(config, wd, config.repairer.hf_dir, "repairer", same_tokenizer_as=builders.tokenizer_dir(config, wd))
  hf_dir = _hf_dir(config)
  if hf_dir:
    _import_hf(config, wd, hf_dir, "policy")
    return
  tokenizer = load_tokenizer(builders.tokenizer_dir(config, wd))
  corpus = read_corpus(wd.path("world", "corpus.jsonl"))
  train = read_split(wd.path("world", "train.jsonl"))
  tasks = train[config.generate.num_queries:][:node.num_tasks]  # disjoint from stage-1 queries
  code = make_tool("code", timeout_s=config.tools.code_timeout_s)
  try:
    examples, counts = warmstart_examples(
        tokenizer, tasks, corpus, rates=FlawRates(**dict(node.flaws)), seed=config.seed,
        repair_fraction=node.repair_fraction, run_code=lambda src: code(src).output,
        repair_flaws=tuple(node.repair_flaws))
  finally:
    getattr(code, "close", lambda: None)()
  records.write_json(wd.path(node.name, "warmstart_data.json"), counts)
  log.info("warmstart examples: %s", counts)
  if node.init_from:
    model_cfg, params = _load_hf_checked(config, wd, node.init_from, node.name)
    graphdef, _ = abstract_model(model_cfg, "causal_lm")
  else:
    model_cfg = get_preset(config.model.preset, vocab_size=len(tokenizer), remat=config.model.remat,
                           logits_chunk=config.model.logits_chunk)
    graphdef, params = init_model(model_cfg, seed=config.seed)
  cfg = builders.train_config(node, seed=config.seed, pad_id=tokenizer.pad_token_id or 0)
  trainer = Trainer(cfg, loss_fn=make_sft_loss(graphdef), params=params, mesh=builders.make_mesh(config),
                    workdir=wd.path(node.name), meta={"model_config": model_cfg.to_dict(), "model_kind": "causal_lm"},
                    desc="warmstart")
  try:
    trainer.run(examples)
  finally:
    trainer.close()


def _import_hf(config, wd: Workdir, hf_dir: str, name: str, same_tokenizer_as: str | None = None) -> None:
  """An HF checkpoint's weights as workdir model `name` (what later stages load by name)."""
  from autotraj_jax.checkpoint import save_model
  if same_tokenizer_as is not None:
    _check_same_tokenizer(hf_dir, same_tokenizer_as, name)
  cfg, kind, params = _load_hf(config, hf_dir, config.model.param_dtype)
  save_model(wd.model_dir(name), params, cfg, kind=kind, extra_meta={"source": hf_dir})


def _load_hf_checked(config, wd: Workdir, hf_dir: str, name: str):
  """(config, params) of a causal LM at hf_dir that shares the workdir's tokenizer, in fp32 for training."""
  _check_same_tokenizer(hf_dir, builders.tokenizer_dir(config, wd), name)
  cfg, kind, params = _load_hf(config, hf_dir, "float32")
  if kind != "causal_lm":
    raise ValueError(f"warmstart.init_from={hf_dir} is a {kind} checkpoint, not a causal LM")
  return cfg, params


def _load_hf(config, hf_dir: str, dtype: str):
  """(config, kind, params) of an HF checkpoint on the run's mesh, with the run's remat and logits
  chunking (which later stages keep)."""
  from autotraj_jax.models.hf import load_hf
  cfg, kind, params = load_hf(hf_dir, mesh=builders.make_mesh(config), dtype=dtype)
  return cfg.replace(remat=config.model.remat, logits_chunk=config.model.logits_chunk), kind, params


def _check_same_tokenizer(hf_dir: str, tokenizer_dir: str, name: str) -> None:
  ours, theirs = os.path.join(hf_dir, "tokenizer.json"), os.path.join(tokenizer_dir, "tokenizer.json")
  if not (os.path.isfile(ours) and os.path.isfile(theirs) and filecmp.cmp(ours, theirs, shallow=False)):
    raise ValueError(f"{hf_dir}/tokenizer.json differs from the policy's ({tokenizer_dir}): the {name} must "
                     "share the policy's tokenizer, since its outputs become the policy's training data")


def export_policy_stage(config, wd: Workdir) -> None:
  """The warm-started model (`warmstart.name`) as an HF directory (bf16 safetensors + tokenizer) at
  export_dir. This is how `assets/demo_policy` and `assets/demo_repairer` are made."""
  from autotraj_jax.checkpoint import load_model
  from autotraj_jax.models.hf import save_hf
  cfg, kind, params = load_model(wd.path(config.warmstart.name, "checkpoints"))
  params = jax.tree.map(lambda x: x.astype("bfloat16"), params)
  save_hf(config.export_dir, params, cfg.replace(param_dtype="bfloat16", dtype="float32"), kind=kind,
          tokenizer_dir=wd.path("tokenizer"))
  records.write_json(os.path.join(config.export_dir, "provenance.json"),
                     {"world": config.world.to_dict(), "warmstart": config.warmstart.to_dict(),
                      "model": config.model.to_dict(), "seed": config.seed})
