import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from test_training import make_examples

from autotraj_jax import sharding as shd
from autotraj_jax.checkpoint import load_model
from autotraj_jax.models import causal_mask, get_preset, init_model, merge
from autotraj_jax.models.decoder import CausalLM, Projection
from autotraj_jax.models.hf import load_hf
from autotraj_jax.training import data as data_lib
from autotraj_jax.training import lora as lora_lib
from autotraj_jax.training.lora import LoraConfig
from autotraj_jax.training.optimizer import OptimizerConfig, make_optimizer
from autotraj_jax.training.sft import make_sft_loss
from autotraj_jax.training.step import init_state, make_train_step

CFG = get_preset("tiny")
LCFG = LoraConfig(rank=4, alpha=8.0)
Q = ("model", "layers", 0, "self_attn", "q_proj", "kernel")
O = ("model", "layers", 1, "self_attn", "o_proj", "kernel")


@pytest.fixture(scope="module")
def tiny():
  return init_model(CFG, seed=0)


def _get(tree, keys):
  for k in keys:
    tree = tree[k]
  return tree


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, params, tokens):
  B, L = tokens.shape
  pos = jnp.broadcast_to(jnp.arange(L), (B, L))
  return merge(graphdef, params)(tokens, pos, causal_mask(jnp.ones((B, L), bool)))[0]


def _randomize_b(lora, seed=1):
  """Adapters as after training: B no longer zero."""
  def one(path, x):
    if shd.path_str(path).endswith("lora_b"):
      return 0.05 * jax.random.normal(jax.random.fold_in(jax.random.key(seed), hash(shd.path_str(path)) % 2**31),
                                      x.shape)
    return x
  return jax.tree_util.tree_map_with_path(one, lora)


def test_adapter_shapes_follow_the_projection_contraction(tiny):
  graphdef, params = tiny
  lora = lora_lib.init_lora(params, LCFG, seed=0)
  attn, mlp = lora["model"]["layers"][0]["self_attn"], lora["model"]["layers"][0]["mlp"]
  D, N, K, H, F = CFG.hidden_size, CFG.num_heads, CFG.num_kv_heads, CFG.head_dim, CFG.intermediate_size
  assert attn["q_proj"]["kernel"]["lora_a"].shape == (D, 4) and attn["q_proj"]["kernel"]["lora_b"].shape == (4, N * H)
  assert attn["k_proj"]["kernel"]["lora_b"].shape == (4, K * H)
  assert attn["o_proj"]["kernel"]["lora_a"].shape == (N * H, 4) and attn["o_proj"]["kernel"]["lora_b"].shape == (4, D)
  assert mlp["down_proj"]["kernel"]["lora_a"].shape == (F, 4) and mlp["down_proj"]["kernel"]["lora_b"].shape == (4, D)
  assert len(jax.tree.leaves(lora)) == 2 * 7 * CFG.num_layers
  # The in/out split agrees with how every Projection of the model contracts its input.
  model = CausalLM(CFG, rngs=nnx.Rngs(0))
  for path, module in nnx.iter_graph(model):
    if isinstance(module, Projection):
      shape = module.kernel[...].shape
      name = "/".join(map(str, path)) + "/kernel"
      assert lora_lib.kernel_split(name, shape)[0] == int(np.prod(shape[:module._n_in])), name
  # Targets are regexes on the path; a typo is an error; rank 0 is off.
  only_q0 = lora_lib.init_lora(params, LoraConfig(rank=2, targets=(r"layers/0/.*q_proj",)), seed=0)
  assert [shd.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(only_q0)[0]] == [
      "model/layers/0/self_attn/q_proj/kernel/lora_a", "model/layers/0/self_attn/q_proj/kernel/lora_b"]
  with pytest.raises(ValueError, match="matches no parameter"):
    lora_lib.init_lora(params, LoraConfig(rank=2, targets=("qproj",)), seed=0)
  assert lora_lib.init_lora(params, LoraConfig(), seed=0) == {}
  assert lora_lib.merge_lora(params, {}, LoraConfig()) is params


def test_init_leaves_the_model_unchanged(tiny):
  graphdef, params = tiny
  lora = lora_lib.init_lora(params, LCFG, seed=0)
  merged = jax.jit(lambda b, l: lora_lib.merge_lora(b, l, LCFG))(params, lora)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, CFG.vocab_size)
  np.testing.assert_array_equal(_logits(graphdef, merged, tokens), _logits(graphdef, params, tokens))


def test_merge_is_the_low_rank_update_of_each_projection(tiny):
  _, params = tiny
  lora = _randomize_b(lora_lib.init_lora(params, LCFG, seed=0))
  merged = lora_lib.merge_lora(params, lora, LCFG)
  for keys, n_in in ((Q, 1), (O, 2)):
    w = np.asarray(_get(params, keys), np.float64)
    a, b = (np.asarray(_get(lora, keys)[k], np.float64) for k in ("lora_a", "lora_b"))
    m = np.asarray(_get(merged, keys))
    assert m.shape == w.shape and m.dtype == _get(params, keys).dtype
    np.testing.assert_allclose(m, w + LCFG.scale * (a @ b).reshape(w.shape), atol=1e-6)
    # x through the merged kernel = x through W + scale * (x flattened over the input axes) A B.
    x = np.random.default_rng(0).normal(size=(3,) + w.shape[:n_in])
    low_rank = (x.reshape(3, -1) @ a @ b).reshape((3,) + w.shape[n_in:])
    np.testing.assert_allclose(np.tensordot(x, m, n_in), np.tensordot(x, w, n_in) + LCFG.scale * low_rank,
                               atol=1e-5)
  # Untargeted params pass through untouched.
  assert merged["model"]["embed_tokens"] is params["model"]["embed_tokens"]


def test_sharded_lora_training_updates_only_adapters(tiny):
  mesh = shd.make_mesh(shd.MeshConfig(fsdp=-1))
  graphdef, params = tiny
  trainable = {"base": params, "lora": lora_lib.init_lora(params, LCFG, seed=0)}
  opt = lora_lib.lora_optimizer(make_optimizer(OptimizerConfig(learning_rate=1e-2, total_steps=10)))
  loss_fn = lora_lib.make_lora_loss(make_sft_loss(graphdef), LCFG)

  # The trainable tree shards by name: base like the model, adapters by the lora_a/lora_b rules.
  param_sh = shd.param_shardings(trainable, mesh)
  assert _get(param_sh["base"], Q).spec == P("fsdp", "tp", None)
  assert _get(param_sh["lora"], Q)["lora_a"].spec == P("fsdp", None)
  assert _get(param_sh["lora"], Q)["lora_b"].spec == P(None, "tp")
  opt_like = jax.eval_shape(opt.init, trainable)
  state_sh = init_state(trainable, opt, 0)._replace(
      step=shd.replicated(mesh), params=param_sh, opt_state=shd.state_shardings(opt_like, trainable, mesh),
      rng=shd.replicated(mesh))
  batch_sh = jax.sharding.NamedSharding(mesh, P(None, shd.BATCH_AXES, None))
  step = jax.jit(make_train_step(loss_fn, opt), in_shardings=(state_sh, batch_sh),
                 out_shardings=(state_sh, None))

  # No optimizer state for the base: nothing shaped like a base matrix, far fewer numbers.
  opt_leaves = jax.tree.leaves(opt_like)
  base_shapes = {x.shape for x in jax.tree.leaves(params) if x.ndim >= 2}
  assert not base_shapes & {x.shape for x in opt_leaves}
  n_lora = sum(x.size for x in jax.tree.leaves(trainable["lora"]))
  assert sum(x.size for x in opt_leaves) <= 2 * n_lora + 8

  batch = data_lib.split_micro(data_lib.collate(make_examples(16, seed=1), (32,), 0), 2)
  batch = jax.device_put(batch, batch_sh)
  state = jax.jit(lambda p: init_state(p, opt, 0), out_shardings=state_sh)(jax.device_put(trainable, param_sh))
  losses = []
  for _ in range(8):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 0.1, losses
  for a, b in zip(jax.tree.leaves(state.params["base"]), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  b_q = _get(state.params["lora"], Q)["lora_b"]
  assert float(jnp.abs(b_q).max()) > 0 and b_q.sharding.spec == P(None, "tp")
  assert len(_get(state.params["base"], Q).sharding.device_set) == 8


def test_exported_merged_checkpoint_is_a_plain_model(tiny, tmp_path):
  graphdef, params = tiny
  lora = _randomize_b(lora_lib.init_lora(params, LCFG, seed=0))
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, CFG.vocab_size)
  want = jax.jit(lambda p, t: _logits(graphdef, lora_lib.merge_lora(p["base"], p["lora"], LCFG), t))(
      {"base": params, "lora": lora}, tokens)
  assert float(jnp.abs(want - _logits(graphdef, params, tokens)).max()) > 1e-3  # adapters matter
  lora_lib.export_merged(tmp_path / "ckpt", params, lora, LCFG, CFG, hf_dir=tmp_path / "hf", step=5,
                         extra_meta={"stage": "sft"})
  cfg, kind, loaded = load_model(tmp_path / "ckpt")
  assert (cfg, kind) == (CFG, "causal_lm")
  np.testing.assert_allclose(_logits(graphdef, loaded, tokens), want, atol=1e-5)
  _, _, from_hf = load_hf(tmp_path / "hf")
  for a, b in zip(jax.tree.leaves(from_hf), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_reward_model_trains_its_head_in_full():
  graphdef, params = init_model(CFG, kind="scalar", seed=0)
  cfg = LoraConfig(rank=2, targets=("q_proj", "v_proj"), full=("score",))
  lora = lora_lib.init_lora(params, cfg, seed=0)
  assert lora["score"].shape == (CFG.hidden_size,)
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, CFG.vocab_size)

  def score_loss(p, batch, rng):
    del rng
    B, L = batch.shape
    values = merge(graphdef, p)(batch, jnp.broadcast_to(jnp.arange(L), (B, L)), causal_mask(jnp.ones((B, L), bool)))
    return jnp.sum(values[:, -1]), jnp.float32(B), {}

  loss = lora_lib.make_lora_loss(score_loss, cfg)
  grads = jax.jit(jax.grad(lambda t: loss(t, tokens, jax.random.key(0))[0]))({"base": params, "lora": lora})
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["base"]))
  # The zero-initialised head is what gets a gradient first (LoRA alone would be stuck at 0).
  assert float(jnp.abs(grads["lora"]["score"]).max()) > 0
  moved = {**lora, "score": lora["score"] + 1.0}
  merged = lora_lib.merge_lora(params, moved, cfg)
  np.testing.assert_array_equal(merged["score"], np.ones(CFG.hidden_size, np.float32))
  with pytest.raises(ValueError, match="both a LoRA target"):
    lora_lib.init_lora(params, LoraConfig(rank=2, targets=("q_proj",), full=("q_proj/kernel",)), seed=0)
