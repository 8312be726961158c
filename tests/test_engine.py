import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from autotraj_jax import sharding as shd
from autotraj_jax.engine import EngineConfig, GenerationRequest, JaxEngine, SamplingParams
from autotraj_jax.engine.sampling import cutoff as _cutoff
from autotraj_jax.models import causal_mask, init_model, merge
from autotraj_jax.models.hf import load_hf

PROMPTS = ["<think> 12 + 7 =", "Question: who wrote", "<code>print(", "a"]


def greedy(n):
  return SamplingParams(temperature=0.0, max_new_tokens=n)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory, demo_tokenizer):
  torch.manual_seed(0)
  cfg = transformers.Qwen2Config(vocab_size=len(demo_tokenizer), hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=512, initializer_range=0.2,
                                 tie_word_embeddings=True)
  model = transformers.Qwen2ForCausalLM(cfg).eval()
  path = tmp_path_factory.mktemp("hf_qwen2")
  model.save_pretrained(path)
  return model, str(path)


@pytest.fixture(scope="module")
def engine(hf_model, demo_tokenizer):
  cfg, kind, params = load_hf(hf_model[1])
  graphdef, _ = init_model(cfg)
  return JaxEngine(graphdef, params, cfg, demo_tokenizer,
                   config=EngineConfig(batch_buckets=(1, 4, 8), prompt_buckets=(16, 32),
                                       new_token_buckets=(16, 32), chunk_steps=8))


def teacher_forced_logprobs(engine, prompt, completion):
  ids = jnp.asarray([list(prompt) + list(completion)])
  L = ids.shape[1]
  logits, _ = merge(engine.graphdef, engine.params)(ids, jnp.arange(L)[None], causal_mask(jnp.ones((1, L), bool)))
  logp = jax.nn.log_softmax(logits[0, len(prompt) - 1:-1])
  return np.asarray(jnp.take_along_axis(logp, jnp.asarray(completion)[:, None], axis=1)[:, 0])


def test_greedy_matches_transformers(engine, hf_model, demo_tokenizer):
  model, _ = hf_model
  prompts = [demo_tokenizer.encode(p) for p in PROMPTS]
  outs = engine.generate([GenerationRequest(p, greedy(24)) for p in prompts])
  for p, out in zip(prompts, outs):
    with torch.no_grad():
      ref = model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=24,
                           eos_token_id=demo_tokenizer.eos_token_id, pad_token_id=demo_tokenizer.pad_token_id)
    ref_new = ref[0, len(p):].tolist()
    assert out.token_ids == ref_new[:len(out.token_ids)]
    assert len(out.token_ids) == len(ref_new)
    assert out.finish_reason in ("length", "eos")
    assert out.text == demo_tokenizer.decode(out.token_ids)


def test_sampled_logprobs_equal_teacher_forced(engine, demo_tokenizer):
  prompts = [demo_tokenizer.encode(p) for p in PROMPTS]
  reqs = [GenerationRequest(p, SamplingParams(temperature=t, top_p=tp, top_k=k, max_new_tokens=20, seed=i))
          for i, (p, t, tp, k) in enumerate(zip(prompts, (1.0, 0.7, 1.3, 1.0), (1.0, 0.9, 1.0, 0.8), (-1, -1, 50, 5)))]
  for req, out in zip(reqs, engine.generate(reqs)):
    assert len(out.logprobs) == len(out.token_ids) > 0
    np.testing.assert_allclose(out.logprobs, teacher_forced_logprobs(engine, req.prompt_ids, out.token_ids),
                               atol=1e-4)


def test_seed_gives_same_sample_in_any_batch(engine, demo_tokenizer):
  p = demo_tokenizer.encode(PROMPTS[1])
  req = GenerationRequest(p, SamplingParams(temperature=1.0, max_new_tokens=16, seed=123))
  alone = engine.generate([req])[0]
  others = [GenerationRequest(demo_tokenizer.encode(x), SamplingParams(temperature=1.0, max_new_tokens=30, seed=i))
            for i, x in enumerate(PROMPTS)]
  mixed = engine.generate(others[:2] + [req] + others[2:])[2]
  assert alone.token_ids == mixed.token_ids
  other_seed = engine.generate([GenerationRequest(p, SamplingParams(temperature=1.0, max_new_tokens=16, seed=124))])[0]
  assert other_seed.token_ids != alone.token_ids


def test_samples_of_one_prompt_are_prefilled_once_and_sample_as_alone(hf_model, demo_tokenizer):
  """4 samples of each of 2 prompts: 2 prompts prefilled (batch bucket 4, not 8), and each sample
  is the one its seed draws alone; the next turn continues from each sample's own KV."""
  cfg, _, params = load_hf(hf_model[1])
  graphdef, _ = init_model(cfg)
  eng = JaxEngine(graphdef, params, cfg, demo_tokenizer, config=EngineConfig(
      batch_buckets=(1, 4, 8), prompt_buckets=(16, 32), new_token_buckets=(16,), extend_buckets=(32,),
      prefix_min_match=4))
  prompts = [demo_tokenizer.encode(p) for p in PROMPTS[:2]]
  reqs = [GenerationRequest(p, SamplingParams(temperature=1.0, max_new_tokens=16, seed=10 * i + k))
          for i, p in enumerate(prompts) for k in range(4)]
  outs = eng.generate(reqs)
  assert eng.prefill_tokens == sum(len(p) for p in prompts) and eng.context_tokens == 4 * eng.prefill_tokens
  assert len({tuple(o.token_ids) for o in outs}) > 2  # the samples differ
  for r, o in zip(reqs, outs):
    alone = eng.generate([r])[0]  # batch 1: nothing to share
    assert alone.token_ids == o.token_ids
    np.testing.assert_allclose(alone.logprobs, o.logprobs, atol=1e-5)
  # Next turn: each context + its completion + a tool result, against a fresh engine with no reuse.
  turn2 = [GenerationRequest(list(r.prompt_ids) + list(o.token_ids) + [5, 6, 7],
                             SamplingParams(temperature=0.0, max_new_tokens=8))
           for r, o in zip(reqs, outs)]
  plain = JaxEngine(graphdef, params, cfg, demo_tokenizer, config=EngineConfig(
      batch_buckets=(1, 4, 8), prompt_buckets=(16, 32, 64), new_token_buckets=(16,), prefix_cache_rows=0))
  for a, b in zip(eng.generate(turn2), plain.generate(turn2)):
    assert a.token_ids == b.token_ids


def test_identical_rows_on_a_cached_prefix_reuse_the_batch_shape(hf_model, demo_tokenizer):
  """Greedy samples of one question are identical, and so are their next turns. Those are
  prefilled row by row in the batch's own shape, so they compile nothing that distinct next
  turns (sampled ones) did not, and give the tokens of an engine with no reuse."""
  cfg, _, params = load_hf(hf_model[1])
  graphdef, _ = init_model(cfg)
  eng = JaxEngine(graphdef, params, cfg, demo_tokenizer, config=EngineConfig(
      batch_buckets=(4, 8), prompt_buckets=(32, 64), new_token_buckets=(16,), extend_buckets=(32,),
      prefix_min_match=4))
  prompts = [demo_tokenizer.encode(p) for p in PROMPTS[:2]]

  def two_turns(sampling):
    first = [GenerationRequest(p, sampling(4 * i + k)) for i, p in enumerate(prompts) for k in range(4)]
    outs = eng.generate(first)
    turn2 = [GenerationRequest(list(r.prompt_ids) + list(o.token_ids) + [5, 6, 7], greedy(8))
             for r, o in zip(first, outs)]
    eng.reset_stats()
    return turn2, eng.generate(turn2)

  sampled, _ = two_turns(lambda s: SamplingParams(temperature=1.0, max_new_tokens=16, seed=s))
  assert len({tuple(r.prompt_ids) for r in sampled}) == 8
  compiles = eng.num_compiles
  eng.clear_prefix_cache()
  same, outs = two_turns(lambda s: greedy(16))
  assert len({tuple(r.prompt_ids) for r in same}) == 2
  assert eng.num_compiles == compiles
  assert eng.prefill_tokens == 8 * 3  # each row's tool result, none shared
  plain = JaxEngine(graphdef, params, cfg, demo_tokenizer, config=EngineConfig(
      batch_buckets=(4, 8), prompt_buckets=(32, 64), new_token_buckets=(16,), prefix_cache_rows=0))
  for a, b in zip(outs, plain.generate(same)):
    assert a.token_ids == b.token_ids
def test_top_k_one_is_greedy(engine, demo_tokenizer):
  p = demo_tokenizer.encode(PROMPTS[0])
  a = engine.generate([GenerationRequest(p, greedy(16))])[0]
  b = engine.generate([GenerationRequest(p, SamplingParams(temperature=1.0, top_k=1, max_new_tokens=16, seed=5))])[0]
  assert a.token_ids == b.token_ids


def _sorted_cutoff(x, top_p, top_k):
  """Reference nucleus/top-k: keep the largest tokens while the mass above each is < top_p."""
  order = np.sort(x)[::-1]
  p = np.exp(order - order.max())
  p /= p.sum()
  above = np.cumsum(p) - p
  n = len(x) if top_p >= 1.0 else int(np.sum(above < top_p))
  if top_k > 0:
    n = min(n, top_k)
  return order[n - 1]


def test_top_p_top_k_cutoff_matches_sorting():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(48, 512)) * rng.uniform(0.3, 6.0, size=(48, 1))
  top_p = rng.choice([0.3, 0.9, 0.95, 1.0], 48)
  top_k = rng.choice([-1, -1, 1, 7, 100], 48)
  got = np.asarray(_cutoff(jnp.asarray(x, jnp.float32), jnp.asarray(top_p, jnp.float32),
                           jnp.asarray(top_k, jnp.int32)))[:, 0]
  want = np.array([_sorted_cutoff(r.astype(np.float32), tp, k) for r, tp, k in zip(x, top_p, top_k)])
  np.testing.assert_allclose(got, want, rtol=1e-6)
  kept = (x.astype(np.float32) >= got[:, None]).sum(-1)
  assert np.all(kept[top_k == 1] == 1) and np.all(kept[(top_p == 1.0) & (top_k < 0)] == 512)


def test_stop_string_split_across_tokens(engine, demo_tokenizer):
  p = demo_tokenizer.encode(PROMPTS[0])
  ref = engine.generate([GenerationRequest(p, greedy(24))])[0]
  ids = ref.token_ids
  pieces = [demo_tokenizer.decode([t]) for t in ids]
  # A stop string made of the end of token 3 and the start of token 4: no single token holds it.
  j = next(j for j in range(3, len(ids) - 1) if pieces[j] and pieces[j + 1]
           and demo_tokenizer.decode(ids[:j]).find(pieces[j][-1] + pieces[j + 1][0]) < 0)
  stop = pieces[j][-1] + pieces[j + 1][0]
  out = engine.generate([GenerationRequest(p, greedy(24), stop=(stop,))])[0]
  assert out.finish_reason == "stop" and out.matched_stop == stop
  assert out.token_ids == ids[:j + 2]
  assert out.text.endswith(stop) or stop in out.text[-len(pieces[j + 1]) - 1:]
  # A whole-token stop string and a stop token id.
  whole = pieces[5]
  out = engine.generate([GenerationRequest(p, greedy(24), stop=(whole,))])[0]
  assert out.finish_reason == "stop" and whole in out.text and len(out.token_ids) <= 6
  out = engine.generate([GenerationRequest(p, greedy(24), stop_token_ids=(ids[4],))])[0]
  assert out.finish_reason == "eos" and out.token_ids[-1] == ids[4] and len(out.token_ids) <= 5


def test_compiles_once_per_bucket(hf_model, demo_tokenizer):
  cfg, _, params = load_hf(hf_model[1])
  graphdef, _ = init_model(cfg)
  eng = JaxEngine(graphdef, params, cfg, demo_tokenizer,
                  config=EngineConfig(batch_buckets=(4,), prompt_buckets=(32,), new_token_buckets=(32,),
                                      chunk_steps=8))
  rng = np.random.default_rng(0)
  for i in range(6):
    n = int(rng.integers(1, 5))
    reqs = [GenerationRequest(rng.integers(3, 2000, int(rng.integers(1, 30))).tolist(),
                              SamplingParams(temperature=float(rng.choice([0.0, 1.0])),
                                             max_new_tokens=int(rng.integers(1, 32)), seed=i),
                              stop=("</code>",) if i % 2 else ())
            for _ in range(n)]
    outs = eng.generate(reqs)
    assert all(len(o.token_ids) <= r.sampling.max_new_tokens for o, r in zip(outs, reqs))
  assert eng.num_compiles == 3  # one prefill, one decode chunk, one prefix-cache store
  # New weights: same shapes, no recompilation, different output.
  new = jax.tree.map(lambda x: x * 1.5, params)
  before = eng.generate([GenerationRequest([5, 6, 7], greedy(16))])[0].token_ids
  eng.update_params(new)
  after = eng.generate([GenerationRequest([5, 6, 7], greedy(16))])[0].token_ids
  assert eng.num_compiles == 3 and before != after


def test_prompt_buckets_share_one_decode_loop_and_change_no_token(hf_model, demo_tokenizer):
  """KV slots rounded up to `cache_multiple`: two prompt buckets, one compiled decode loop,
  and the same tokens and log-probs as exact sizing."""
  cfg, _, params = load_hf(hf_model[1])
  graphdef, _ = init_model(cfg)
  rng = np.random.default_rng(1)
  batches = [[GenerationRequest(rng.integers(3, 2000, n).tolist(), SamplingParams(temperature=t, max_new_tokens=16,
                                                                                   seed=3))
              for t in (0.0, 1.0)] for n in (10, 25)]  # prompt buckets 16 and 32

  def run(multiple):
    eng = JaxEngine(graphdef, params, cfg, demo_tokenizer, config=EngineConfig(
        batch_buckets=(2,), prompt_buckets=(16, 32), new_token_buckets=(16,), cache_multiple=multiple,
        prefix_cache_rows=0))
    outs, compiles = [], []
    for reqs in batches:
      outs.append(eng.generate(reqs))
      compiles.append(eng.num_compiles)
    return outs, compiles

  exact, exact_compiles = run(1)
  shared, shared_compiles = run(64)  # 16 + 16 and 32 + 16 slots both round to 64
  assert exact_compiles == [2, 4]    # a prefill and a decode loop per prompt bucket
  assert shared_compiles == [2, 3]   # the second bucket compiles its prefill only
  for a_batch, b_batch in zip(exact, shared):
    for a, b in zip(a_batch, b_batch):
      assert a.token_ids == b.token_ids
      np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_sharded_engine_matches_single_device(hf_model, demo_tokenizer, engine):
  cfg, _, params = load_hf(hf_model[1])
  graphdef, _ = init_model(cfg)
  mesh = shd.make_mesh(shd.MeshConfig(data=4, fsdp=1, tp=2))
  eng = JaxEngine(graphdef, shd.shard_params(params, mesh), cfg, demo_tokenizer, mesh=mesh,
                  config=EngineConfig(batch_buckets=(4, 8), prompt_buckets=(16, 32), new_token_buckets=(16,),
                                      chunk_steps=8, prefix_min_match=2))
  reqs = [GenerationRequest(demo_tokenizer.encode(p), greedy(12)) for p in PROMPTS]
  for a, b in zip(eng.generate(reqs), engine.generate(reqs)):
    assert a.token_ids == b.token_ids
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
  # The prefix cache's pool is split over the 4 data shards, not copied to all 8 devices (on a
  # pod slice a copy per chip; on fake CPU devices, 8x the host memory).
  k = eng._pool[0].k
  assert {s.data.shape[0] for s in k.addressable_shards} == {k.shape[0] // 4}
  eng.reset_stats()
  again = eng.generate(reqs)  # the next call reads its prefixes from the sharded pool
  assert eng.prefill_ratio < 0.5
  for a, b in zip(again, engine.generate(reqs)):
    assert a.token_ids == b.token_ids


def test_bad_requests(engine):
  with pytest.raises(ValueError, match="at least one prompt token"):
    GenerationRequest([])
  with pytest.raises(ValueError, match="top_p"):
    SamplingParams(top_p=0)
  with pytest.raises(ValueError, match=r"max_new_tokens 40 exceeds the largest bucket 32; "
                                       r"raise engine.new_token_buckets"):
    engine.generate([GenerationRequest([5, 6, 7], greedy(40))])


def test_prompt_too_long_comes_back_empty_and_the_batch_runs(engine, demo_tokenizer):
  fit = [GenerationRequest(demo_tokenizer.encode(p), greedy(12)) for p in PROMPTS[:2]]
  too_long = GenerationRequest(list(range(3, 36)), greedy(12))  # 33 tokens: the largest bucket is 32
  no_lps = GenerationRequest(list(range(3, 100)), greedy(12), return_logprobs=False)
  alone = engine.generate(fit)
  out = engine.generate([fit[0], too_long, fit[1], no_lps])
  assert [o.finish_reason for o in (out[1], out[3])] == ["prompt_too_long"] * 2
  assert out[1].token_ids == [] and out[1].logprobs == [] and out[1].text == "" and out[3].logprobs is None
  for a, b in zip(alone, (out[0], out[2])):
    assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
  assert engine.generate([too_long])[0].finish_reason == "prompt_too_long"
