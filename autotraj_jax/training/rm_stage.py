"""The reward-model stage: a Bradley-Terry trajectory RM trained on the stage-1 preference pairs.

A pair is (accepted repair, original candidate) from `pairs.jsonl`; the RM is the policy's
transformer with a scalar head, read at the last token of prompt + response. `rm_input` is the
one definition of what the RM sees, shared by training, the held-out eval and
`RewardModelScorer` (the RL reward), so an RL score is on the same footing as a training one.

Outputs under `<workdir>/rm`: trainer checkpoints (`checkpoints/`, loadable with
`checkpoint.load_model`, kind 'scalar'; rerunning a killed stage resumes from them), `logs/`
(`loss`, `loss_bt`; `correct`, `margin`, `chosen`, `rejected` are sums over the step's `count`
pairs; `eval/pair_accuracy`, `eval/pair_margin` on the held-out pairs), `scores.png` (histograms
of high / low / wrong candidates), `hf/` (an HF sequence-classification checkpoint with the
tokenizer files) and, written last, `eval.json`: `trained`, `steps`, `pairs` (held-out pairs),
`train_pairs`, `total_pairs`, `pair_accuracy`, `pair_margin`, `pair_accuracy_by_failure`,
`scores` ({quality: {mean, std, n}} over `scored.jsonl`) and `truncated_pairs`.
With fewer training pairs than one batch (a small demo run can produce that), nothing is trained
and no checkpoint is written: `eval.json` says `"trained": false` with the reason, and the stage
still completes (a later stage that needs the RM then fails on the missing checkpoint).

Fields of `config.rm` (and `config.seed`: split, head init, data order):

- `init`: the model the RM starts from, by name in the workdir ('policy', 'sft_autotraj'); its
  checkpoints are in `<workdir>/<init>/checkpoints`. The head is freshly initialised.
- `lora.rank` (0: full fine-tuning), `lora.alpha`, `lora.targets`: LoRA adapters with the score head
  trained in full; the merged model is what gets saved, scored and exported.
- `steps`, `batch_size` (pairs per step), `micro_batch_size` (0: no accumulation),
  `learning_rate`, `warmup_steps`, `log_every`, `checkpoint_every`: the trainer's.
- `buckets`: padded lengths (ascending); a pair pads to the smallest bucket that fits its longer
  sequence; sequences over the largest are capped (`collate_pairs`) and counted in eval.json.
- `margin_low`, `margin_wrong`: how much the repair must outscore a low-quality / wrong original.
- `center_coef`: weight of the (r_c + r_r)^2 term that keeps scores centred at 0.
- `eval_fraction`: share of questions whose pairs are held out; `eval_every`: held-out pair
  accuracy and mean margin every that many steps (0: only at the end).
- `max_score_samples`: candidates per quality scored from `scored.jsonl` for the stats and plot.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import random
from typing import Any, Callable, Collection, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from autotraj_jax.models.decoder import causal_mask, gather_last
from autotraj_jax.stages import Workdir, register_stage
from autotraj_jax.tir import prompts
from autotraj_jax.tir.trajectory import Segment, Trajectory, iter_trajectories
from autotraj_jax.training import data as data_lib
from autotraj_jax.training.reward_model import bradley_terry_loss, pair_scores
from autotraj_jax.training.sft import positions_from_valid

log = logging.getLogger(__name__)

QUALITIES = ("high", "low", "wrong")
HEAD_INIT_STD = 0.02  # the scale of every other freshly initialised weight
DEFAULT_BUCKETS = (256, 512, 1024, 2048)


# ---- what the RM reads ---------------------------------------------------------------------------


def end_ids_of(tokenizer) -> frozenset[int]:
  """The eos and pad ids, which `rm_input` drops from the end of a response."""
  return frozenset(i for i in (tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None)


def rm_input(traj: Trajectory, end_ids: Collection[int] = ()) -> list[int]:
  """The token ids the RM scores: prompt + every response segment, tool results included.

  No eos is appended and trailing `end_ids` (`end_ids_of(tokenizer)`) are dropped, so the score
  sits on the last content token whether the policy stopped at `</answer>` or emitted eos after
  it, and the exported HF classifier, which pools at the last token that is not pad (pad is eos
  for Qwen and the demo tokenizer), reads the same position.
  """
  ids = list(traj.prompt_ids) + traj.response_ids
  n = len(ids)
  while n > len(traj.prompt_ids) and ids[n - 1] in end_ids:
    n -= 1
  return ids[:n]


def text_trajectory(tokenizer, question: str, response_text: str) -> Trajectory:
  """A trajectory from raw text: the chat prompt, then `response_text` tokenised as one segment."""
  ids = list(tokenizer.encode(response_text, add_special_tokens=False))
  return Trajectory(id="", question_id="", question=question,
                    prompt_ids=prompts.prompt_ids(tokenizer, question),
                    segments=[Segment("model", ids, response_text)])


def pad_sequences(seqs: Sequence[Sequence[int]], length: int, pad_id: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(tokens [N, length], valid [N, length], last [N]): right-padded to `length`.

  A longer sequence keeps its first `length` tokens and is read at position length - 1: its
  tail goes unseen, so the buckets should cover the data (the stage counts such sequences).
  """
  tokens = np.full((len(seqs), length), pad_id, np.int32)
  valid = np.zeros((len(seqs), length), np.int32)
  last = np.zeros((len(seqs),), np.int32)
  for i, s in enumerate(seqs):
    n = min(len(s), length)
    tokens[i, :n] = np.asarray(s[:n])
    valid[i, :n] = 1
    last[i] = max(n - 1, 0)
  return tokens, valid, last


# ---- pairs ---------------------------------------------------------------------------------------


def pair_example(record: Mapping[str, Any], tokenizer, margins: Mapping[str, float] | None = None
                 ) -> dict[str, Any]:
  """`{"tokens": [chosen_ids, rejected_ids], "margin"}` of a `pairs.jsonl` record.

  `margins` maps the failure type of the rejected original ('low' | 'wrong') to the margin the
  chosen score must win by (missing: 0).
  """
  end = end_ids_of(tokenizer)
  chosen = rm_input(Trajectory.from_dict(record["chosen"], where=f"pair {record.get('id')} chosen"), end)
  rejected = rm_input(Trajectory.from_dict(record["rejected"], where=f"pair {record.get('id')} rejected"), end)
  margin = float((margins or {}).get(record.get("failure_type", ""), 0.0))
  return {"tokens": [chosen, rejected], "margin": margin}


def collate_pairs(examples: Sequence[Mapping[str, Any]], buckets: Sequence[int], pad_id: int
                  ) -> dict[str, np.ndarray]:
  """tokens/valid [B, 2, L], last [B, 2] (index of the last real token), margin [B].

  Axis 1 is (chosen, rejected); L is the smallest bucket that fits the longest sequence, and
  longer sequences are capped as in `pad_sequences` (the last index stays inside the bucket).
  """
  for e in examples:
    if len(e["tokens"]) != 2:
      raise ValueError(f"a pair example has 2 sequences (chosen, rejected), got {len(e['tokens'])}")
  L = data_lib.pick_bucket(max(data_lib.example_length(e) for e in examples), sorted(buckets))
  B = len(examples)
  tokens, valid, last = pad_sequences([s for e in examples for s in e["tokens"]], L, pad_id)
  return {"tokens": tokens.reshape(B, 2, L), "valid": valid.reshape(B, 2, L), "last": last.reshape(B, 2),
          "margin": np.asarray([e.get("margin", 0.0) for e in examples], np.float32)}


def split_pairs(records: Sequence[Mapping[str, Any]], fraction: float, seed: int
                ) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
  """(train, held_out) with whole questions held out (the same draw as the SFT split)."""
  qids = sorted({r["question_id"] for r in records})
  random.Random(seed).shuffle(qids)
  held = set(qids[:int(round(len(qids) * fraction)) if len(qids) > 1 else 0])
  return [r for r in records if r["question_id"] not in held], [r for r in records if r["question_id"] in held]


def read_pairs(path: str) -> list[dict[str, Any]]:
  """Records of `pairs.jsonl`; a final line cut by a kill is skipped."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.endswith("\n") and line.strip()]


# ---- model ---------------------------------------------------------------------------------------


def sequence_values(model, tokens_NL: jax.Array, valid_NL: jax.Array) -> jax.Array:
  """[N, L] scalar-head values of right-padded sequences."""
  return model(tokens_NL, positions_from_valid(valid_NL), causal_mask(valid_NL))


def pair_forward(graphdef: nnx.GraphDef, params: Any, batch: Mapping[str, jax.Array]
                 ) -> tuple[jax.Array, jax.Array]:
  """(r_chosen [B], r_rejected [B]) from ONE forward over the [2B, L] stack of both sides.

  The rows interleave (chosen, rejected) per pair, so a batch sharded on its pair axis keeps
  each pair on its device.
  """
  model = nnx.merge(graphdef, params)
  tokens, valid = batch["tokens"], batch["valid"]
  B, _, L = tokens.shape
  values = sequence_values(model, tokens.reshape(2 * B, L), valid.reshape(2 * B, L))
  return pair_scores(jnp.swapaxes(values.reshape(B, 2, L), 0, 1), jnp.swapaxes(batch["last"], 0, 1))


def make_rm_loss(graphdef: nnx.GraphDef, *, center_coef: float = 0.0):
  """loss_fn(params, batch, rng) for `make_train_step` on `collate_pairs` batches."""

  def loss_fn(params: Any, batch: dict[str, jax.Array], rng: jax.Array):
    del rng
    rc, rr = pair_forward(graphdef, params, batch)
    return bradley_terry_loss(rc, rr, margin=batch["margin"], center_coef=center_coef)

  return loss_fn


def init_rm_params(policy_ckpt_dir: str | os.PathLike, seed: int) -> tuple[Any, dict]:
  """(model config, scalar-model params): the checkpoint's transformer and a fresh head.

  A causal LM keeps `model` (embeddings, blocks, final norm) and drops `lm_head`; the `score`
  head is N(0, 0.02^2), seeded. A scalar checkpoint (an earlier RM) is returned as it is.
  """
  from autotraj_jax import checkpoint
  from autotraj_jax.models import abstract_model
  cfg, kind, params = checkpoint.load_model(policy_ckpt_dir)
  if kind == "scalar":
    return cfg, params
  if kind != "causal_lm":
    raise ValueError(f"{policy_ckpt_dir}: cannot start a reward model from a {kind!r} checkpoint")
  _, abstract = abstract_model(cfg, "scalar")
  head = abstract["score"]
  score = (jax.random.normal(jax.random.key(seed), head.shape, jnp.float32) * HEAD_INIT_STD).astype(head.dtype)
  out = {"model": params["model"], "score": score}
  if jax.tree.structure(out) != jax.tree.structure(abstract):
    raise ValueError(f"{policy_ckpt_dir}: transformer params do not match the scalar model of its config")
  return cfg, out


# ---- scoring -------------------------------------------------------------------------------------


def sequence_scores(graphdef: nnx.GraphDef, params: Any, tokens_NL: jax.Array, valid_NL: jax.Array,
                    last_N: jax.Array) -> jax.Array:
  """[N] scores: the scalar head at each sequence's last real token."""
  return gather_last(sequence_values(nnx.merge(graphdef, params), tokens_NL, valid_NL), last_N)


class RewardModelScorer:
  """A trained RM as a `rewards.RMFn`: trajectories -> one float each.

  Sequences are grouped by bucket and scored in fixed [batch_size, bucket] batches (the last one
  padded), so the forward compiles once per bucket however many trajectories come in.
  """

  def __init__(self, checkpoint_dir: str | os.PathLike, tokenizer, *,
               buckets: Sequence[int] = DEFAULT_BUCKETS, batch_size: int = 8, mesh=None):
    from autotraj_jax import checkpoint
    from autotraj_jax.models import abstract_model
    cfg, kind, params = checkpoint.load_model(checkpoint_dir, mesh=mesh)
    if kind != "scalar":
      raise ValueError(f"{checkpoint_dir} holds a {kind!r} model, not a reward model ('scalar')")
    self._setup(abstract_model(cfg, kind)[0], params, tokenizer, buckets, batch_size)

  @classmethod
  def from_params(cls, graphdef: nnx.GraphDef, params: Any, tokenizer, *,
                  buckets: Sequence[int] = DEFAULT_BUCKETS, batch_size: int = 8) -> "RewardModelScorer":
    self = cls.__new__(cls)
    self._setup(graphdef, params, tokenizer, buckets, batch_size)
    return self

  def _setup(self, graphdef, params, tokenizer, buckets, batch_size) -> None:
    if batch_size <= 0 or not buckets:
      raise ValueError(f"need batch_size > 0 and buckets, got {batch_size} and {buckets}")
    self.params, self.tokenizer = params, tokenizer
    self.buckets, self.batch_size = tuple(sorted(buckets)), int(batch_size)
    self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    self.end_ids = end_ids_of(tokenizer)
    self.truncated = 0
    self.num_compiles = 0

    def score(p, tokens, valid, last):
      self.num_compiles += 1  # runs only while tracing: once per bucket
      return sequence_scores(graphdef, p, tokens, valid, last)

    self._score = jax.jit(score)

  def score_ids(self, seqs: Sequence[Sequence[int]]) -> list[float]:
    """Scores of token sequences (already `rm_input`s), in order."""
    out = [0.0] * len(seqs)
    by_bucket: dict[int, list[int]] = collections.defaultdict(list)
    for i, s in enumerate(seqs):
      by_bucket[data_lib.pick_bucket(len(s), self.buckets)].append(i)
    over = sum(len(s) > self.buckets[-1] for s in seqs)
    if over:
      self.truncated += over
      log.warning("rm scorer: %d sequences longer than the largest bucket %d are capped", over, self.buckets[-1])
    for L, idx in sorted(by_bucket.items()):
      for start in range(0, len(idx), self.batch_size):
        chunk = idx[start:start + self.batch_size]
        rows = [seqs[i] for i in chunk] + [[self.pad_id]] * (self.batch_size - len(chunk))
        scores = np.asarray(self._score(self.params, *pad_sequences(rows, L, self.pad_id)))
        for i, s in zip(chunk, scores):
          out[i] = float(s)
    return out

  def __call__(self, trajs: list[Trajectory]) -> list[float]:
    return self.score_ids([rm_input(t, self.end_ids) for t in trajs])

  def score_question(self, question: str, response_text: str) -> float:
    """The score of a raw-text response: equal to scoring a trajectory whose ids are the
    tokenizer's encoding of its text (`text_trajectory`). Sampled ids may tokenise the same
    text differently; the RM scores ids, so score the Trajectory itself when you have it."""
    return self([text_trajectory(self.tokenizer, question, response_text)])[0]


def make_pair_eval(graphdef: nnx.GraphDef, examples: Sequence[Mapping[str, Any]], *,
                   buckets: Sequence[int], batch_size: int, pad_id: int
                   ) -> Callable[[Any], tuple[np.ndarray, np.ndarray]]:
  """params -> (r_chosen, r_rejected) of every example, in fixed-size batches (the last one
  padded with copies, dropped again), so it compiles once per bucket."""
  batches = []
  for i in range(0, len(examples), batch_size):
    chunk = list(examples[i:i + batch_size])
    batches.append((collate_pairs(chunk + [chunk[0]] * (batch_size - len(chunk)), buckets, pad_id), len(chunk)))
  fwd = jax.jit(lambda p, b: pair_forward(graphdef, p, b))

  def scores(params) -> tuple[np.ndarray, np.ndarray]:
    rc, rr = [], []
    for batch, n in batches:
      c, r = jax.device_get(fwd(params, batch))
      rc.append(np.asarray(c)[:n])
      rr.append(np.asarray(r)[:n])
    return np.concatenate(rc), np.concatenate(rr)

  return scores


def pair_metrics(rc: np.ndarray, rr: np.ndarray) -> dict[str, float]:
  """Pair accuracy (ties count wrong, as in training) and mean margin r_c - r_r."""
  return {"pair_accuracy": float(np.mean(rc > rr)), "pair_margin": float(np.mean(rc - rr))}


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
  """Overlaid density histograms of the RM score per candidate quality."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  values = [v for vs in scores.values() for v in vs]
  fig, ax = plt.subplots(figsize=(5, 3.2))
  if values:
    edges = np.histogram_bin_edges(values, bins=30)
    for q in QUALITIES:
      if scores.get(q):
        ax.hist(scores[q], bins=edges, density=True, alpha=0.5, label=f"{q} (n={len(scores[q])})")
    ax.legend()
  ax.set_title("reward-model score by candidate quality")
  ax.set_xlabel("score")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def _write_json(path: str, obj: dict[str, Any]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


# ---- the stage -----------------------------------------------------------------------------------


@register_stage("rm")
def rm_stage(config, wd: Workdir) -> None:
  from autotraj_jax import sharding as shd
  from autotraj_jax.models import abstract_model, hf
  from autotraj_jax.training import lora as lora_lib
  from autotraj_jax.training.optimizer import OptimizerConfig
  from autotraj_jax.training.trainer import TrainConfig, Trainer
  from data_gen.stages import load_tokenizer_for, model_checkpoints

  node = config.rm
  out_dir = os.path.join(wd.root, "rm")
  os.makedirs(out_dir, exist_ok=True)
  buckets = tuple(node.buckets)
  tokenizer = load_tokenizer_for(config, wd)
  records = read_pairs(wd.path("pairs.jsonl"))
  train, held = split_pairs(records, node.eval_fraction, config.seed)
  # `pairs`: the held-out pairs behind `pair_accuracy` (what the results table cites).
  summary: dict[str, Any] = {"pairs": len(held), "train_pairs": len(train), "total_pairs": len(records),
                             "init": node.init}
  if init_reason := wd.skipped(node.init):
    reason = f"its starting policy '{node.init}' was not trained ({init_reason})"
  elif len(train) < node.batch_size:
    reason = (f"{len(train)} training pairs, fewer than one batch of {node.batch_size}; generate more "
              f"candidates or lower rm.batch_size")
  else:
    reason = None
  if reason:
    wd.skip("rm", reason)
    _write_json(os.path.join(out_dir, "eval.json"), {"trained": False, "reason": reason, **summary})
    return

  margins = {"low": node.margin_low, "wrong": node.margin_wrong}
  train_ex = [pair_example(r, tokenizer, margins) for r in train]
  held_ex = [pair_example(r, tokenizer, margins) for r in held]
  truncated = sum(data_lib.example_length(e) > buckets[-1] for e in train_ex + held_ex)
  if truncated:
    log.warning("rm: %d pairs have a sequence longer than the largest bucket %d; capped", truncated, buckets[-1])
  log.info("rm: %d train / %d held-out pairs, init from %s", len(train), len(held), node.init)

  model_cfg, params = init_rm_params(model_checkpoints(wd, node.init), config.seed)
  graphdef, _ = abstract_model(model_cfg, "scalar")
  lora_node = dict(node.get("lora", {}) or {})
  lora = lora_lib.setup(params, make_rm_loss(graphdef, center_coef=node.center_coef),
                        lora_lib.LoraConfig(**{"full": ("score",), **lora_node}), config.seed)
  mesh = shd.make_mesh(shd.MeshConfig(fsdp=-1))
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  held_scores = make_pair_eval(graphdef, held_ex, buckets=buckets, batch_size=node.batch_size,
                               pad_id=pad_id) if held_ex else None

  def eval_fn(p, step: int) -> dict[str, float]:
    out = pair_metrics(*held_scores(lora.merged(p)))
    log.info("rm step %d held-out: %s", step, out)
    return out

  cfg = TrainConfig(steps=node.steps, batch_size=node.batch_size, micro_batch_size=node.micro_batch_size,
                    buckets=buckets, seed=config.seed, log_every=node.log_every,
                    checkpoint_every=node.checkpoint_every, keep_checkpoints=1, pad_id=pad_id,
                    group_by_length=True,
                    optimizer=OptimizerConfig(learning_rate=node.learning_rate, warmup_steps=node.warmup_steps,
                                              total_steps=node.steps, end_lr_ratio=0.1, weight_decay=0.0))
  meta = {"model_config": model_cfg.to_dict(), "model_kind": "scalar", "rm_init": node.init,
          "center_coef": float(node.center_coef), "margins": margins}
  trainer = Trainer(cfg, loss_fn=lora.loss_fn, params=lora.params, mesh=mesh,
                    workdir=os.path.join(out_dir, "train") if lora.cfg.enabled else out_dir, meta=meta,
                    eval_fn=eval_fn if held_scores else None, eval_every=node.eval_every or node.steps,
                    collate_fn=collate_pairs, optimizer_wrapper=lora.optimizer_wrapper)
  try:
    state = trainer.run(train_ex)
  finally:
    trainer.close()
  params = lora.merged(state.params)
  if lora.cfg.enabled:  # the scorer and later stages load a plain scalar model
    from autotraj_jax.checkpoint import save_model
    save_model(os.path.join(out_dir, "checkpoints"), jax.device_get(params), model_cfg, kind="scalar",
               step=int(state.step), extra_meta={k: v for k, v in meta.items() if k not in ("model_config",
                                                                                            "model_kind")})

  result: dict[str, Any] = {"trained": True, "steps": int(state.step), **summary, "truncated_pairs": truncated}
  if held_scores is not None:
    rc, rr = held_scores(params)
    result.update(pair_metrics(rc, rr))
    types = np.asarray([r.get("failure_type", "") for r in held])
    result["pair_accuracy_by_failure"] = {t: float(np.mean(rc[types == t] > rr[types == t]))
                                          for t in sorted(set(types.tolist()))}
  else:
    result.update(pair_accuracy=None, pair_margin=None)

  scorer = RewardModelScorer.from_params(graphdef, params, tokenizer, buckets=buckets,
                                         batch_size=node.batch_size)
  scored_path = wd.path("scored.jsonl")
  candidates = list(iter_trajectories(scored_path)) if os.path.exists(scored_path) else []
  samples = sample_by_quality(candidates, node.max_score_samples, config.seed)
  scores = {q: scorer(ts) if ts else [] for q, ts in samples.items()}
  result["scores"] = {q: score_stats(s) for q, s in scores.items()}
  plot_scores(scores, os.path.join(out_dir, "scores.png"))

  tokenizer_dir = config.model.get("tokenizer_dir") or wd.path("tokenizer")
  token_ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
  hf.save_hf(os.path.join(out_dir, "hf"), params, model_cfg, kind="scalar", tokenizer_dir=tokenizer_dir,
             token_ids=token_ids)
  _write_json(os.path.join(out_dir, "eval.json"), result)  # last: its presence means the outputs are complete
  log.info("rm: %s", json.dumps({k: v for k, v in result.items() if k != "scores"}))
