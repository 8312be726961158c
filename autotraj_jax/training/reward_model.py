"""Bradley-Terry trajectory reward model: what it reads, how pairs are batched, the loss.

A pair is (accepted repair, original candidate); the RM is the policy's transformer with a
scalar head, read at the last token of prompt + response. `rm_input` is the one definition of
what the RM sees, shared by training, the held-out eval and `rm_scorer.RewardModelScorer` (the
RL reward), so an RL score is on the same footing as a training one. Chosen and rejected
sequences are stacked so one forward of the scalar-head model scores both.
"""

from __future__ import annotations

import os
from typing import Any, Collection, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from autotraj_jax.models.decoder import causal_mask, gather_last
from autotraj_jax.tir import prompts
from autotraj_jax.tir.trajectory import PreferencePair, Segment, Trajectory
from autotraj_jax.training import data as data_lib
from autotraj_jax.training import packing
from autotraj_jax.training.sft import positions_from_valid

HEAD_INIT_STD = 0.02  # the scale of every other freshly initialised weight


def pair_scores(values_2BL: jax.Array, last_index_2B: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(r_chosen_B, r_rejected_B): the scalar head at each sequence's last token, in fp32."""
  values = jnp.asarray(values_2BL)
  index = jnp.asarray(last_index_2B)
  if values.ndim != 3 or values.shape[0] != 2 or index.shape != values.shape[:2]:
    raise ValueError(f"expected values [2, B, L] and last_index [2, B], got {values.shape} and {index.shape}")
  chosen = gather_last(values[0], index[0]).astype(jnp.float32)
  rejected = gather_last(values[1], index[1]).astype(jnp.float32)
  return chosen, rejected


def bradley_terry_loss(r_chosen_B: jax.Array, r_rejected_B: jax.Array, *,
                       margin: float | jax.Array = 0.0, center_coef: float = 0.0,
                       valid_B: jax.Array | None = None) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """(sum, count, aux) of -log sigmoid(r_c - r_r - margin) + center_coef * (r_c + r_r)^2.

  `margin` (scalar or per pair) asks the chosen score to win by at least that much, e.g. more
  for a repair of a wrong answer than of a merely long one. The centering term pins the
  otherwise free offset of the scores near 0, so an RM score can be used as a reward without
  normalisation. `valid_B` drops padding pairs. aux sums, to divide by count: `correct` (pairs
  with r_c > r_r, ties wrong), `loss_bt` (the pairwise term alone), `margin` (r_c - r_r),
  `chosen`, `rejected`.
  """
  rc = jnp.asarray(r_chosen_B).astype(jnp.float32)
  rr = jnp.asarray(r_rejected_B).astype(jnp.float32)
  valid = jnp.ones_like(rc, bool) if valid_B is None else jnp.asarray(valid_B).astype(bool)
  rc = jnp.where(valid, rc, 0.0)
  rr = jnp.where(valid, rr, 0.0)
  diff = rc - rr
  bt = -jax.nn.log_sigmoid(diff - jnp.asarray(margin, jnp.float32))
  loss = bt + center_coef * (rc + rr) ** 2
  v = valid.astype(jnp.float32)
  sg = jax.lax.stop_gradient
  aux = {
    "correct": jnp.sum((diff > 0) * v),
    "loss_bt": sg(jnp.sum(bt * v)),
    "margin": sg(jnp.sum(diff * v)),
    "chosen": sg(jnp.sum(rc * v)),
    "rejected": sg(jnp.sum(rr * v)),
  }
  return jnp.sum(loss * v), jnp.sum(v), aux


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


def pair_example(pair: PreferencePair, tokenizer, margins: Mapping[str, float] | None = None) -> dict[str, Any]:
  """`{"tokens": [chosen_ids, rejected_ids], "margin"}` of a preference pair.

  `margins` maps the failure type of the rejected original ('low' | 'wrong') to the margin the
  chosen score must win by (missing: 0).
  """
  end = end_ids_of(tokenizer)
  margin = float((margins or {}).get(pair.failure_type, 0.0))
  return {"tokens": [rm_input(pair.chosen, end), rm_input(pair.rejected, end)], "margin": margin}


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


def pair_item(example: Mapping[str, Any], cap: int) -> dict[str, np.ndarray]:
  """A pair as one packed-row item: chosen then rejected (segments 1 and 2, each cut to `cap`
  tokens), `end` +1 / -1 at the last token of each side, the pair's margin at the chosen end."""
  chosen, rejected = (np.asarray(list(t)[:cap] or [0], np.int32) for t in example["tokens"])
  nc, n = len(chosen), len(chosen) + len(rejected)
  end = np.zeros(n, np.int32)
  end[nc - 1], end[n - 1] = 1, -1
  margin = np.zeros(n, np.float32)
  margin[nc - 1] = example.get("margin", 0.0)
  seg = np.concatenate([np.ones(nc, np.int32), np.full(n - nc, 2, np.int32)])
  return {"tokens": np.concatenate([chosen, rejected]), "end": end, "margin": margin, "segment_ids": seg}


PAIRS = data_lib.Packer(pair_item, {"tokens": np.zeros(0, np.int32), "end": np.zeros(0, np.int32),
                                    "margin": np.zeros(0, np.float32)}, scale=2)


def packed_pair_scores(values_RL: jax.Array, batch: Mapping[str, jax.Array]
                       ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(r_chosen, r_rejected, margin, valid) per pair slot of packed rows: row r's pair k is its
  segments 2k + 1 (chosen) and 2k + 2 (rejected); slots with no pair have valid 0."""
  R, L = values_RL.shape
  seg, end = packing.segments(batch), jnp.asarray(batch["end"])
  slots = max(L // 2, 1)
  ids = jnp.where(end != 0, jnp.arange(R)[:, None] * slots + (seg - 1) // 2, R * slots)

  def per_pair(x):
    return jax.ops.segment_sum(x.reshape(-1), ids.reshape(-1), num_segments=R * slots + 1)[:-1]
  values = values_RL.astype(jnp.float32)
  chosen = per_pair(jnp.where(end > 0, values, 0.0))
  rejected = per_pair(jnp.where(end < 0, values, 0.0))
  margin = per_pair(jnp.where(end > 0, jnp.asarray(batch["margin"], jnp.float32), 0.0))
  return chosen, rejected, margin, per_pair((end > 0).astype(jnp.float32)) > 0


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
  """loss_fn(params, batch, rng) for `make_train_step` on `collate_pairs` or packed `PAIRS` batches."""

  def loss_fn(params: Any, batch: dict[str, jax.Array], rng: jax.Array):
    del rng
    if "segment_ids" in batch:  # packed rows (`PAIRS`): the same pairs, fewer padded tokens
      values = nnx.merge(graphdef, params)(*packing.model_inputs(batch, shift=False))
      rc, rr, margin, valid = packed_pair_scores(values, batch)
      return bradley_terry_loss(rc, rr, margin=margin, center_coef=center_coef, valid_B=valid)
    rc, rr = pair_forward(graphdef, params, batch)
    return bradley_terry_loss(rc, rr, margin=batch["margin"], center_coef=center_coef)

  return loss_fn


def init_rm_params(policy_ckpt_dir: str | os.PathLike, seed: int, mesh: Mesh | None = None) -> tuple[Any, dict]:
  """(model config, scalar-model params): the checkpoint's transformer (on `mesh`'s shards when
  given) and a fresh head.

  A causal LM keeps `model` (embeddings, blocks, final norm) and drops `lm_head`; the `score`
  head is N(0, 0.02^2), seeded. A scalar checkpoint (an earlier RM) is returned as it is.
  """
  from autotraj_jax import checkpoint
  from autotraj_jax.models import abstract_model
  cfg, kind, params = checkpoint.load_model(policy_ckpt_dir, mesh=mesh)
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
