"""The reward-model stage: a Bradley-Terry trajectory RM trained on the stage-1 preference pairs.

Outputs under `<workdir>/rm`: trainer checkpoints (`checkpoints/`, kind 'scalar'; a killed stage
resumes from them), `logs/` (`loss`, `loss_bt`; `correct`, `margin`, `chosen`, `rejected` are sums
over the step's `count` pairs; `eval/pair_accuracy`, `eval/pair_margin` on the held-out pairs),
`scores.png` (score densities of high / low / wrong candidates of held-out questions), `hf/` (an HF
sequence-classification checkpoint with the tokenizer files) and, written last, `eval.json`:
`trained`, `steps`, `pairs` (held-out pairs), `train_pairs`, `total_pairs`, `pair_accuracy`,
`pair_margin`, `pair_accuracy_by_failure`, `scores` ({quality: {mean, std, n}} over held-out
candidates) and `truncated_pairs`.

Held-out questions are the same for every stage (`builders.is_held_out`): the SFT policy the RM
starts from never trained on the chosen side of a held-out pair. With fewer training pairs than
one batch nothing is trained: `eval.json` says `"trained": false` with the reason and the model is
recorded as not trained, so later stages report it instead of failing.
"""

from __future__ import annotations

import json
import logging
import os
import random
from typing import Any, Mapping, Sequence

import numpy as np

from autotraj_jax.distributed import is_primary
from autotraj_jax.pipeline import builders
from autotraj_jax.pipeline.workdir import Workdir
from autotraj_jax.tir.records import write_json
from autotraj_jax.tir.trajectory import Trajectory, iter_trajectories
from autotraj_jax.training import data as data_lib

log = logging.getLogger(__name__)

QUALITIES = ("high", "low", "wrong")


def score_stats(scores: Sequence[float]) -> dict[str, Any]:
  if not scores:
    return {"mean": None, "std": None, "n": 0}
  return {"mean": float(np.mean(scores)), "std": float(np.std(scores)), "n": len(scores)}


def sample_by_quality(trajs: Sequence[Trajectory], cap: int, seed: int) -> dict[str, list[Trajectory]]:
  """Up to `cap` candidates of each quality, a seeded sample kept in file order."""
  rng = random.Random(seed)
  out = {}
  for q in QUALITIES:
    group = [t for t in trajs if t.quality == q]
    keep = sorted(rng.sample(range(len(group)), min(cap, len(group))))
    out[q] = [group[i] for i in keep]
  return out


def plot_scores(scores: Mapping[str, Sequence[float]], path: str) -> None:
  """Score densities per candidate quality (the stage-1 report's colours), on held-out questions."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  values = [v for vs in scores.values() for v in vs]
  fig, ax = plt.subplots(figsize=(5.6, 3.4))
  if values:
    edges = np.histogram_bin_edges(values, bins=30)
    for q, color in zip(QUALITIES, ("C2", "C1", "C3")):
      if scores.get(q):
        ax.hist(scores[q], bins=edges, density=True, alpha=0.55, color=color,
                label=f"{q} (n={len(scores[q])}, mean {np.mean(scores[q]):.2f})")
    ax.legend(fontsize=8)
  ax.set_title("reward-model score of held-out candidates, by quality", fontsize=10)
  ax.set_xlabel("RM score (logit)")
  ax.set_ylabel("density within the class")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def _not_trained_reason(wd: Workdir, node, train: Sequence[Any]) -> str | None:
  if init_reason := wd.skipped(node.init):
    return f"its starting policy '{node.init}' was not trained ({init_reason})"
  if len(train) < node.batch_size:
    return (f"{len(train)} training pairs, fewer than one batch of {node.batch_size}; generate more "
            "candidates or lower rm.batch_size")
  return None


def _train(config, wd: Workdir, node, tokenizer, train_ex: list[dict[str, Any]], held_ex: list[dict[str, Any]]):
  """Trains the RM; returns (graphdef, merged params, model config, steps, held-out scorer)."""
  from autotraj_jax.models import abstract_model
  from autotraj_jax.training import lora as lora_lib
  from autotraj_jax.training.reward_model import PAIRS, collate_pairs, init_rm_params, make_rm_loss
  from autotraj_jax.training.rm_scorer import make_pair_eval, pair_metrics
  from autotraj_jax.training.trainer import Trainer

  out_dir = os.path.join(wd.root, "rm")
  mesh = builders.make_mesh(config)
  model_cfg, params = init_rm_params(wd.model_dir(node.init), config.seed, mesh=mesh)
  graphdef, _ = abstract_model(model_cfg, "scalar")
  lora_cfg = builders.from_node(lora_lib.LoraConfig, node.lora, full=("score",))
  lora = lora_lib.setup(params, make_rm_loss(graphdef, center_coef=node.center_coef), lora_cfg, config.seed)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  held_scores = make_pair_eval(graphdef, held_ex, buckets=tuple(node.buckets), batch_size=node.batch_size,
                               pad_id=pad_id) if held_ex else None

  def eval_fn(p, step: int) -> dict[str, float]:
    out = pair_metrics(*held_scores(lora.merged(p)))
    log.info("rm step %d held-out: %s", step, out)
    return out

  meta = {"model_config": model_cfg.to_dict(), "model_kind": "scalar", "rm_init": node.init,
          "center_coef": float(node.center_coef), "margins": {"low": node.margin_low, "wrong": node.margin_wrong}}
  steps = builders.train_steps(node, len(train_ex))
  trainer = Trainer(builders.train_config(node, seed=config.seed, pad_id=pad_id, steps=steps), loss_fn=lora.loss_fn,
                    params=lora.params, mesh=mesh,
                    workdir=os.path.join(out_dir, "train") if lora.cfg.enabled else out_dir, meta=meta,
                    eval_fn=eval_fn if held_scores else None, eval_every=node.eval_every or steps,
                    collate_fn=collate_pairs, packer=PAIRS, optimizer_wrapper=lora.optimizer_wrapper, desc="rm")
  try:
    state = trainer.run(train_ex)
  finally:
    trainer.close()
  params = lora.merged(state.params)
  if lora.cfg.enabled:  # the scorer and later stages load a plain scalar model
    from autotraj_jax.checkpoint import save_model
    save_model(wd.model_dir("rm"), params, model_cfg, kind="scalar", step=int(state.step),
               extra_meta={k: v for k, v in meta.items() if k not in ("model_config", "model_kind")})
  return graphdef, params, model_cfg, int(state.step), held_scores


def rm_stage(config, wd: Workdir) -> None:
  """Bradley-Terry trajectory reward model on the preference pairs, into rm/ (+ an HF export)."""
  from autotraj_jax.models import hf
  from autotraj_jax.tir.trajectory import iter_pairs
  from autotraj_jax.training.reward_model import pair_example
  from autotraj_jax.training.rm_scorer import RewardModelScorer, pair_metrics

  node = config.rm
  out_dir = os.path.join(wd.root, "rm")
  os.makedirs(out_dir, exist_ok=True)
  buckets = tuple(node.buckets)
  tokenizer = builders.load_tokenizer(config, wd)
  records = list(iter_pairs(wd.path("pairs.jsonl")))
  held_out = lambda qid: builders.is_held_out(qid, config.heldout_fraction, config.seed)
  train = [r for r in records if not held_out(r.question_id)]
  held = [r for r in records if held_out(r.question_id)]
  # `pairs`: the held-out pairs behind `pair_accuracy` (what the results table cites).
  summary: dict[str, Any] = {"pairs": len(held), "train_pairs": len(train), "total_pairs": len(records),
                             "init": node.init}
  if reason := _not_trained_reason(wd, node, train):
    wd.skip("rm", reason)
    write_json(os.path.join(out_dir, "eval.json"), {"trained": False, "reason": reason, **summary})
    return
  margins = {"low": node.margin_low, "wrong": node.margin_wrong}
  train_ex = [pair_example(r, tokenizer, margins) for r in train]
  held_ex = [pair_example(r, tokenizer, margins) for r in held]
  truncated = sum(data_lib.example_length(e) > buckets[-1] for e in train_ex + held_ex)
  if truncated:
    log.warning("rm: %d pairs have a sequence longer than the largest bucket %d; capped", truncated, buckets[-1])
  log.info("rm: %d train / %d held-out pairs, init from %s", len(train), len(held), node.init)
  graphdef, params, model_cfg, steps, held_scores = _train(config, wd, node, tokenizer, train_ex, held_ex)

  result: dict[str, Any] = {"trained": True, "steps": steps, **summary, "truncated_pairs": truncated}
  if held_scores is not None:
    rc, rr = held_scores(params)
    result.update(pair_metrics(rc, rr))
    types = np.asarray([r.failure_type for r in held])
    result["pair_accuracy_by_failure"] = {t: float(np.mean(rc[types == t] > rr[types == t]))
                                          for t in sorted(set(types.tolist()))}
  else:
    result.update(pair_accuracy=None, pair_margin=None)

  scorer = RewardModelScorer.from_params(graphdef, params, tokenizer, buckets=buckets, batch_size=node.batch_size)
  scored_path = wd.path("scored.jsonl")
  candidates = [t for t in iter_trajectories(scored_path) if held_out(t.question_id)] \
      if os.path.exists(scored_path) else []
  samples = sample_by_quality(candidates, node.max_score_samples, config.seed)
  scores = {q: scorer(ts) if ts else [] for q, ts in samples.items()}
  result["scores"] = {q: score_stats(s) for q, s in scores.items()}
  if is_primary():
    plot_scores(scores, os.path.join(out_dir, "scores.png"))

  token_ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
  hf.save_hf(os.path.join(out_dir, "hf"), params, model_cfg, kind="scalar",
             tokenizer_dir=builders.tokenizer_dir(config, wd), token_ids=token_ids)
  write_json(os.path.join(out_dir, "eval.json"), result)  # last: its presence means the outputs are complete
  log.info("rm: %s", json.dumps({k: v for k, v in result.items() if k != "scores"}))
