import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from test_training import make_examples

from autotraj_jax import sharding as shd
from autotraj_jax.models import causal_mask, get_preset, init_model, init_sharded, merge
from autotraj_jax.training.optimizer import OptimizerConfig
from autotraj_jax.training.sft import make_sft_loss
from autotraj_jax.training.trainer import TrainConfig, Trainer

CFG = get_preset("tiny", tie_embeddings=False)


def test_eight_fake_devices():
  assert jax.device_count() == 8


def test_mesh_config():
  assert shd.MeshConfig(data=2, fsdp=-1, tp=2).shape(8) == (2, 2, 2)
  assert shd.MeshConfig.parse("fsdp=4,tp=2") == shd.MeshConfig(data=1, fsdp=4, tp=2)
  with pytest.raises(ValueError, match="needs 6 devices"):
    shd.MeshConfig(data=3, fsdp=2, tp=1).shape(8)
  with pytest.raises(ValueError, match="unknown mesh axis"):
    shd.MeshConfig.parse("model=2")
  mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tp=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tp": 2}


def test_partition_rules_and_divisibility():
  mesh = shd.make_mesh(shd.MeshConfig(fsdp=2, tp=4))
  _, abstract = init_model(CFG)
  specs = shd.param_shardings(abstract, mesh)
  layer = specs["model"]["layers"][0]
  assert layer["self_attn"]["q_proj"]["kernel"].spec == P("fsdp", "tp", None)
  # 2 kv heads cannot split over tp=4: that axis is replicated instead.
  assert layer["self_attn"]["k_proj"]["kernel"].spec == P("fsdp", None, None)
  assert layer["mlp"]["down_proj"]["kernel"].spec == P("tp", "fsdp")
  assert specs["lm_head"].spec == P("fsdp", "tp")
  with pytest.raises(ValueError, match="no partition rule"):
    shd.spec_for("model/mystery", (4, 4), mesh)


@pytest.mark.parametrize("mesh_cfg", [shd.MeshConfig(fsdp=8), shd.MeshConfig(data=2, fsdp=2, tp=2)])
def test_sharded_forward_matches_unsharded(mesh_cfg):
  mesh = shd.make_mesh(mesh_cfg)
  graphdef, params = init_model(CFG, seed=3)
  tokens = jax.random.randint(jax.random.key(0), (8, 12), 0, CFG.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(12), (8, 12))
  mask = causal_mask(jnp.ones((8, 12), bool))

  def fwd(p, t):
    return merge(graphdef, p)(t, pos, mask)[0]
  ref = jax.jit(fwd)(params, tokens)
  sharded = shd.shard_params(params, mesh)
  t = jax.device_put(tokens, shd.batch_sharding(mesh))
  out = jax.jit(fwd)(sharded, t)
  np.testing.assert_allclose(out, ref, atol=2e-5)


def test_init_sharded_places_each_leaf():
  mesh = shd.make_mesh(shd.MeshConfig(fsdp=4, tp=2))
  _, params = init_sharded(CFG, mesh, seed=1)
  _, ref = init_model(CFG, seed=1)
  emb = params["model"]["embed_tokens"]
  assert emb.sharding.spec == P("tp", "fsdp")
  assert emb.addressable_shards[0].data.shape == (CFG.vocab_size // 2, CFG.hidden_size // 4)
  np.testing.assert_allclose(np.asarray(emb), np.asarray(ref["model"]["embed_tokens"]), atol=1e-6)


def test_sharded_train_step_matches_unsharded(tmp_path):
  data = make_examples(32, seed=9)
  results = {}
  for name, mesh_cfg, devices in [("one", shd.MeshConfig(fsdp=1), jax.devices()[:1]),
                                  ("eight", shd.MeshConfig(data=2, fsdp=2, tp=2), jax.devices())]:
    graphdef, params = init_model(CFG, seed=0)
    cfg = TrainConfig(steps=3, batch_size=8, micro_batch_size=4, buckets=(32,), log_every=1,
                      checkpoint_every=100, optimizer=OptimizerConfig(learning_rate=1e-3, total_steps=3))
    trainer = Trainer(cfg, loss_fn=make_sft_loss(graphdef), params=params,
                      mesh=shd.make_mesh(mesh_cfg, devices), workdir=tmp_path / name, progress=False)
    state = trainer.run(data)
    results[name] = state.params
    if name == "eight":
      q = state.params["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"]
      assert q.sharding.spec == P("fsdp", "tp", None) and len(q.sharding.device_set) == 8
      mu = state.opt_state[1][0].mu["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"]
      assert mu.sharding.spec == P("fsdp", "tp", None)  # optimizer state sharded like params
  for a, b in zip(jax.tree.leaves(results["one"]), jax.tree.leaves(results["eight"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5)
