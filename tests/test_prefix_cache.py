"""The JAX engine's prefix cache: multi-turn rollouts give the same tokens and logprobs with and
without it, while the model computes only each turn's new tokens."""

import jax
import numpy as np
import pytest
from scripted_backend import ScriptedBackend
from test_rollout import EchoTool, _setup
from test_sglang_backend import _peaked

from autotraj_jax.engine import EngineConfig, GenerationRequest, JaxEngine, SamplingParams
from autotraj_jax.engine.prefix_cache import PrefixIndex
from autotraj_jax.models import get_preset, init_model
from autotraj_jax.sharding import path_str
from autotraj_jax.tir.rollout import Query, RolloutConfig, run_rollouts

QUESTIONS = ["What is 6*7?", "Name the capital of Norway.", "Sum the numbers 1 to 10."]


def _steered(params, close_id: int, lean: float):
  """A context-dependent test model that leans towards `</code>`: every embedding gets a constant
  feature, the closing tag's a little more, so the tag wins after some contexts and not others."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  out = []
  for path, x in leaves:
    x = np.array(x)
    if path_str(path) == "model/embed_tokens":
      x[:, 0] = 0.3
      x[close_id, 0] = 0.3 + lean
    out.append(x)
  return jax.tree_util.tree_unflatten(treedef, out)


@pytest.fixture(scope="module")
def model(demo_tokenizer):
  cfg = get_preset("tiny", vocab_size=len(demo_tokenizer))
  graphdef, params = init_model(cfg, seed=1)
  close_id = demo_tokenizer.encode("</code>", add_special_tokens=False)[0]
  return cfg, graphdef, _peaked(params), close_id


def _engine(model, tok, lean, **kw):
  cfg, graphdef, params, close_id = model
  config = EngineConfig(batch_buckets=(1, 4, 8), prompt_buckets=(128, 256), new_token_buckets=(16,),
                        chunk_steps=8, prefix_min_match=16, **kw)
  return JaxEngine(graphdef, _steered(params, close_id, lean), cfg, tok, config=config)


def _rollout(engine, tok, **cfg_kw):
  queries = [Query(f"q{i}", q) for i, q in enumerate(QUESTIONS)]
  cfg = RolloutConfig(sampling=SamplingParams(temperature=0.0), **cfg_kw)
  return run_rollouts(engine, tok, queries, {"code": EchoTool()}, cfg, samples_per_query=2)


def test_multi_turn_rollout_same_with_and_without_cache(model, demo_tokenizer):
  kw = dict(max_tool_calls=2, max_response_tokens=120, max_tokens_per_turn=12)
  cached = _engine(model, demo_tokenizer, 0.25)
  plain = _engine(model, demo_tokenizer, 0.25, prefix_cache_rows=0)
  with_cache, without = _rollout(cached, demo_tokenizer, **kw), _rollout(plain, demo_tokenizer, **kw)
  # The rollout is multi-turn with real tool results in it, and turns of several tokens.
  assert sum(len(t.tool_calls) for t in with_cache) >= 2
  assert max(len(t.segments) for t in with_cache) >= 4
  assert any(s.kind == "model" and len(s.token_ids) > 1 for t in with_cache for s in t.segments)
  for a, b in zip(with_cache, without):
    assert [s.token_ids for s in a.segments] == [s.token_ids for s in b.segments]
    assert a.finish_reason == b.finish_reason
    for sa, sb in zip(a.segments, b.segments):
      if sa.kind == "model":
        np.testing.assert_allclose(sa.logprobs, sb.logprobs, atol=2e-5)
  # Without the cache only identical requests share a prefill (a question's two greedy samples).
  assert 0.5 <= plain.prefill_ratio < 1.0
  assert cached.prefill_ratio < 0.4


def test_three_turn_loop_prefills_under_40_percent(model, demo_tokenizer):
  # Every turn is `</code>`: a tool result follows, and a 35-token budget ends the loop on turn 3.
  engine = _engine(model, demo_tokenizer, 1.0)
  calls = []
  generate = engine.generate
  engine.generate = lambda reqs: calls.append(len(reqs)) or generate(reqs)
  trajs = _rollout(engine, demo_tokenizer, max_tool_calls=5, max_response_tokens=35, max_tokens_per_turn=12)
  assert calls == [6, 6, 6]
  # The third turn's tool result is cut to nothing by the budget.
  assert all([s.kind for s in t.segments] == ["model", "tool"] * 3 and t.finish_reason == "budget" for t in trajs)
  # Turn k sees the prompt and every earlier segment, and computes the prompt, then only the
  # tool result that follows the cached context.
  seen = sum(3 * len(t.prompt_ids) + 2 * (len(t.segments[0].token_ids) + len(t.segments[1].token_ids))
             + len(t.segments[2].token_ids) + len(t.segments[3].token_ids) for t in trajs)
  assert engine.context_tokens == seen
  # A question's prompt once: its two greedy samples send it together. Each sample's tool results
  # on top of its cached context: identical rows there share no prefill.
  assert engine.prefill_tokens == (sum({t.question_id: len(t.prompt_ids) for t in trajs}.values())
                                   + sum(len(t.segments[1].token_ids) + len(t.segments[3].token_ids) for t in trajs))
  assert engine.prefill_ratio < 0.4
  # Finished trajectories handed their rows back.
  assert engine._index.lengths.sum() == 0


def test_lru_eviction_release_and_new_weights(model, demo_tokenizer):
  engine = _engine(model, demo_tokenizer, 0.25, prefix_cache_rows=2)
  plain = _engine(model, demo_tokenizer, 0.25, prefix_cache_rows=0)
  rng = np.random.default_rng(0)
  greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
  bases = [rng.integers(10, 2000, 40).tolist() for _ in range(3)]
  first = engine.generate([GenerationRequest(b, greedy) for b in bases])  # 3 sequences, 2 rows
  assert int((engine._index.lengths > 0).sum()) == 2
  turn2 = [GenerationRequest(b + o.token_ids + [11, 12, 13], greedy) for b, o in zip(bases, first)]
  engine.reset_stats()
  got = engine.generate(turn2)
  want = plain.generate(turn2)
  for a, b in zip(got, want):
    assert a.token_ids == b.token_ids
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-5)
  # Two of the three continued a kept row (3 new tokens each); the evicted one was recomputed.
  assert engine.prefill_tokens == 3 + 3 + len(turn2[2].prompt_ids)
  contexts = [list(r.prompt_ids) + o.token_ids for r, o in zip(turn2, got)]
  assert engine.release(contexts) == 2 and engine._index.lengths.sum() == 0
  engine.generate(turn2[:1])
  engine.update_params(engine.params)
  assert engine._index.lengths.sum() == 0  # the KV of old weights is never reused
  engine.reset_stats()
  engine.generate(turn2[:1])
  assert engine.prefill_ratio == 1.0


def test_prefix_index_matches_longest_prefix():
  index = PrefixIndex(rows=3, length=6)
  index.store(0, [1, 2, 3])
  index.store(1, [1, 2, 3, 4, 5, 6, 7])  # longer than a row: its first 6 tokens are kept
  assert index.lengths.tolist() == [3, 6, 0]
  assert index.match(np.array([1, 2, 3, 4, 9])) == (1, 4)
  assert index.match(np.array([1, 2, 9])) == (1, 2)  # a tie goes to the most recent row
  assert index.match(np.array([7]))[1] == 0
  assert index.least_recent({2}) == [0, 1]
  assert index.release([1, 2, 3, 4, 5, 6, 7, 8]) == 2 and index.lengths.sum() == 0


def test_rollout_releases_finished_contexts_and_backends_without_release_work(demo_tokenizer):
  scripts = {"a?": ["<code>1</code>", "<answer>\\boxed{42}</answer>"], "b?": ["<answer>\\boxed{7}</answer>"]}
  backend, cfg, queries = _setup(demo_tokenizer, scripts)
  released = []
  backend.release = released.extend
  trajs = run_rollouts(backend, demo_tokenizer, queries, {"code": EchoTool()}, cfg)
  assert sorted(map(tuple, released)) == sorted(tuple(t.prompt_ids + t.response_ids) for t in trajs)
  plain, cfg, queries = _setup(demo_tokenizer, scripts)
  assert isinstance(plain, ScriptedBackend) and not hasattr(plain, "release")
  assert [t.answer for t in run_rollouts(plain, demo_tokenizer, queries, {"code": EchoTool()}, cfg)] == ["42", "7"]
