import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from autotraj_jax.models import ScalarModel, causal_mask, gather_last, get_preset, init_cache, init_model, merge


def _inputs(B=2, L=7, V=512, seed=0):
  tokens = jax.random.randint(jax.random.key(seed), (B, L), 0, V)
  pos = jnp.broadcast_to(jnp.arange(L), (B, L))
  return tokens, pos, causal_mask(jnp.ones((B, L), bool))


def test_config_validation():
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    get_preset("tiny", num_heads=3)
  with pytest.raises(ValueError, match="architecture"):
    get_preset("tiny", architecture="gpt2")
  with pytest.raises(KeyError, match="unknown model preset"):
    get_preset("nope")


def test_param_count_matches_config():
  for name in ("tiny", "demo"):
    cfg = get_preset(name)
    _, params = init_model(cfg)
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params()
  cfg = get_preset("tiny", tie_embeddings=False, qkv_bias=False)
  _, params = init_model(cfg)
  assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params()
  assert "lm_head" in params


def test_qwen25_preset_sizes():
  # Published sizes: 0.49B and 7.6B parameters.
  assert abs(get_preset("qwen2.5-0.5b").num_params() / 1e9 - 0.494) < 0.01
  assert abs(get_preset("qwen2.5-7b").num_params() / 1e9 - 7.62) < 0.05


def test_kv_cache_prefill_then_decode_matches_full_forward():
  cfg = get_preset("tiny")
  graphdef, params = init_model(cfg, seed=1)
  model = merge(graphdef, params)
  tokens, pos, mask = _inputs(L=9)
  full, _ = model(tokens, pos, mask)
  S, P = 12, 5
  cache = init_cache(cfg, 2, S)
  slots = jnp.arange(S)
  m = (slots[None, :] <= jnp.arange(P)[:, None])[None].repeat(2, 0)
  logits, cache = model(tokens[:, :P], pos[:, :P], m, cache, 0)
  np.testing.assert_allclose(logits, full[:, :P], atol=1e-5)
  for t in range(P, 9):
    m = (slots <= t)[None, None, :].repeat(2, 0)
    logits, cache = model(tokens[:, t:t + 1], pos[:, t:t + 1], m, cache, t)
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5)


def test_padding_does_not_change_real_positions():
  cfg = get_preset("tiny")
  model = merge(*init_model(cfg, seed=2))
  tokens, pos, _ = _inputs(B=1, L=6)
  ref, _ = model(tokens, pos, causal_mask(jnp.ones((1, 6), bool)))
  padded = jnp.concatenate([tokens, jnp.zeros((1, 3), tokens.dtype)], 1)
  valid = jnp.arange(9)[None] < 6
  out, _ = model(padded, jnp.arange(9)[None], causal_mask(valid))
  np.testing.assert_allclose(out[:, :6], ref, atol=1e-5)


def test_remat_and_bf16():
  cfg = get_preset("tiny")
  graphdef, params = init_model(cfg)
  tokens, pos, mask = _inputs()
  ref, _ = merge(graphdef, params)(tokens, pos, mask)
  gd_r, _ = init_model(cfg.replace(remat=True))

  def loss(gd, p):
    return jnp.mean(merge(gd, p)(tokens, pos, mask)[0] ** 2)
  g1 = jax.grad(lambda p: loss(graphdef, p))(params)
  g2 = jax.grad(lambda p: loss(gd_r, p))(params)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  gd_b, p_b = init_model(cfg.replace(dtype="bfloat16", param_dtype="bfloat16"))
  out, _ = merge(gd_b, p_b)(tokens, pos, mask)
  assert out.dtype == jnp.float32  # logits stay fp32
  assert jax.tree.leaves(p_b)[0].dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(out)).all()


def test_scalar_head_reads_given_position():
  cfg = get_preset("tiny")
  model = ScalarModel(cfg, rngs=nnx.Rngs(0))
  model.score[...] = jax.random.normal(jax.random.key(3), (cfg.hidden_size,))
  tokens, pos, mask = _inputs(B=3)
  values = model(tokens, pos, mask)
  assert values.shape == (3, 7) and values.dtype == jnp.float32
  idx = jnp.array([0, 3, 6])
  np.testing.assert_allclose(gather_last(values, idx), values[jnp.arange(3), idx])


@pytest.mark.parametrize("policy", ["none", "full", "dots"])
def test_remat_policies_same_gradients(policy):
  cfg = get_preset("tiny")
  graphdef, params = init_model(cfg)
  tokens, pos, mask = _inputs()
  gd_p, _ = init_model(cfg.replace(remat=policy))

  def loss(gd, p):
    return jnp.mean(merge(gd, p)(tokens, pos, mask)[0] ** 2)
  for a, b in zip(jax.tree.leaves(jax.grad(lambda p: loss(graphdef, p))(params)),
                  jax.tree.leaves(jax.grad(lambda p: loss(gd_p, p))(params))):
    np.testing.assert_allclose(a, b, atol=1e-6)
  assert gd_p is not None and cfg.replace(remat=policy).remat_policy == policy
  assert cfg.replace(remat=True).remat_policy == "full" and cfg.remat_policy == "none"
  with pytest.raises(ValueError, match="ModelConfig.remat='some'"):
    cfg.replace(remat="some")
  with pytest.raises(ValueError, match="logits_chunk"):
    cfg.replace(logits_chunk=-1)


def test_batch_sharding_hint_is_a_noop_without_mesh_and_pins_batch_with_one():
  from autotraj_jax import sharding as shd
  from autotraj_jax.models.decoder import shard_batch
  x = jnp.arange(24.0).reshape(4, 3, 2)
  assert shard_batch(x) is x  # no mesh in context: untouched (existing callers are unchanged)
  mesh = jax.sharding.AbstractMesh((1, 1, 1), shd.AXES)
  with jax.sharding.use_abstract_mesh(mesh):
    assert shard_batch(x) is x  # a 1-way batch split has nothing to pin
  if len(jax.devices()) >= 2:
    real = shd.make_mesh(shd.MeshConfig(data=1, fsdp=2, tp=1), jax.devices()[:2])
    with jax.set_mesh(real):
      text = jax.jit(shard_batch).lower(x).as_text()
    assert 'sharding_constraint %arg0 <@mesh, [{"data", "fsdp"}, {}, {}]>' in text


def test_chunked_cross_entropy_matches_full_logits():
  from autotraj_jax.training import losses
  from autotraj_jax.training.sft import make_sft_loss
  cfg = get_preset("tiny")
  graphdef, params = init_model(cfg)
  gd_chunk, _ = init_model(cfg.replace(logits_chunk=5))  # 16 positions: 3 full chunks and a padded one
  rng = np.random.default_rng(0)
  batch = {"tokens": jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 17)), jnp.int32),
           "valid": jnp.ones((2, 17), jnp.int32).at[1, 12:].set(0),
           "loss_mask": jnp.asarray(rng.integers(0, 2, (2, 17)), jnp.int32)}

  def run(gd):
    return jax.value_and_grad(lambda p: make_sft_loss(gd)(p, batch, None)[0])(params)
  (full, g_full), (chunked, g_chunk) = run(graphdef), run(gd_chunk)
  np.testing.assert_allclose(chunked, full, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_chunk)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  model = merge(graphdef, params)
  tokens, pos, mask = _inputs(L=9)
  hidden, _ = model.model(tokens, pos, mask)
  logits = model.logits(hidden)
  lp, ent = losses.chunked_token_stats(hidden, tokens, model.logits, 4, entropy=True)
  np.testing.assert_allclose(lp, losses.token_logprobs(logits, tokens), atol=1e-5)
  logp = jax.nn.log_softmax(logits, axis=-1)
  np.testing.assert_allclose(ent, -jnp.sum(jnp.exp(logp) * logp, axis=-1), atol=1e-5)
  s, c = losses.chunked_sft_loss(hidden, tokens, jnp.ones((2, 9)), model.logits, 4)
  assert float(c) == 18 and np.isclose(float(s), -float(jnp.sum(losses.token_logprobs(logits, tokens))), rtol=1e-6)
  with pytest.raises(ValueError, match="chunk must be positive"):
    losses.chunked_token_stats(hidden, tokens, model.logits, 0)
