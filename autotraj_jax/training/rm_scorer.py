"""A trained reward model as a batch scorer (the RL reward) and its held-out pair evaluation."""

from __future__ import annotations

import collections
import logging
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from autotraj_jax import sharding as shd
from autotraj_jax.models.decoder import gather_last
from autotraj_jax.tir.trajectory import Trajectory
from autotraj_jax.training import data as data_lib
from autotraj_jax.training.reward_model import (
  collate_pairs,
  end_ids_of,
  pad_sequences,
  pair_forward,
  rm_input,
  sequence_values,
  text_trajectory,
)

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (256, 512, 1024, 2048)


def sequence_scores(graphdef: nnx.GraphDef, params: Any, tokens_NL: jax.Array, valid_NL: jax.Array,
                    last_N: jax.Array) -> jax.Array:
  """[N] scores: the scalar head at each sequence's last real token."""
  return gather_last(sequence_values(nnx.merge(graphdef, params), tokens_NL, valid_NL), last_N)


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
      c, r = shd.to_host(fwd(params, batch))
      rc.append(np.asarray(c)[:n])
      rr.append(np.asarray(r)[:n])
    return np.concatenate(rc), np.concatenate(rr)

  return scores


def pair_metrics(rc: np.ndarray, rr: np.ndarray) -> dict[str, float]:
  """Pair accuracy (ties count wrong, as in training) and mean margin r_c - r_r."""
  return {"pair_accuracy": float(np.mean(rc > rr)), "pair_margin": float(np.mean(rc - rr))}


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
