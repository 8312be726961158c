"""Packed batches (training/packing.py): the same per-token losses, (sum, count) and gradients as
the unpacked batch, for SFT, the reward model and the RL policy loss; and the data pipeline and
trainer that produce and consume them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from autotraj_jax import sharding as shd
from autotraj_jax.metrics import read_metrics
from autotraj_jax.models import get_preset, init_model
from autotraj_jax.training import data as data_lib
from autotraj_jax.training import packing, rl
from autotraj_jax.training.losses import token_logprobs
from autotraj_jax.training.optimizer import OptimizerConfig
from autotraj_jax.training.reward_model import PAIRS, collate_pairs, make_rm_loss
from autotraj_jax.training.sft import make_sft_loss
from autotraj_jax.training.trainer import TrainConfig, Trainer

CFG = get_preset("tiny")


def assert_grads_close(g_a, g_b):
  """Equal up to float reassociation: each leaf within 1e-3 of its own largest entry."""
  for a, b in zip(jax.tree.leaves(g_a), jax.tree.leaves(g_b)):
    a, b = np.asarray(a), np.asarray(b)
    assert np.max(np.abs(a - b)) <= 1e-3 * np.max(np.abs(b)) + 1e-7


def loss_and_grads(loss_fn, params, batch):
  """(sum, count, aux, grads of the sum) of a `make_train_step` loss on one host batch."""
  def f(p):
    s, c, aux = loss_fn(p, {k: jnp.asarray(v) for k, v in batch.items()}, None)
    return s, (c, aux)
  (s, (c, aux)), g = jax.value_and_grad(f, has_aux=True)(params)
  return s, c, aux, g


def sequences(n, seed=0, lo=3, hi=40):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    L = int(rng.integers(lo, hi))
    out.append({"tokens": rng.integers(1, CFG.vocab_size, L).tolist(),
                "loss_mask": (rng.random(L) < 0.7).astype(int).tolist()})
  return out


def test_plan_rows_places_every_item_once_within_capacity():
  rng = np.random.default_rng(0)
  for trial in range(20):
    lengths = rng.integers(1, 64, int(rng.integers(1, 30))).tolist()
    rows = packing.plan_rows(lengths, 64, multiple=4)
    assert len(rows) % 4 == 0
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert len(rows) < len(lengths) + 4  # never worse than one item per row (plus the rounding)
  assert packing.plan_rows([100, 3], 64) == [[0], [1]]  # an over-long item is cut, alone in its row
  with pytest.raises(ValueError, match="length > 0"):
    packing.plan_rows([1], 0)


def test_pack_numbers_segments_and_positions_restart():
  items = [{"tokens": np.array([5, 6, 7])}, {"tokens": np.array([8, 9]), "segment_ids": np.array([1, 2])},
           {"tokens": np.array([4])}]
  out = packing.pack(items, [[0, 1], [2], []], 6, pad={"tokens": -1})
  np.testing.assert_array_equal(out["tokens"], [[5, 6, 7, 8, 9, -1], [4, -1, -1, -1, -1, -1], [-1] * 6])
  np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 2, 3, 0], [1, 0, 0, 0, 0, 0], [0] * 6])
  np.testing.assert_array_equal(out["valid"], out["segment_ids"] > 0)
  pos = packing.segment_positions(jnp.asarray(out["segment_ids"]))
  np.testing.assert_array_equal(pos[0], [0, 1, 2, 0, 0, 0])
  mask = np.asarray(packing.segment_mask(jnp.asarray(out["segment_ids"])))
  assert mask[0, 2, 0] and not mask[0, 3, 2] and not mask[0, 1, 2]  # causal, never across segments
  assert mask.any(axis=-1).all()  # no empty query row, padding included
  with pytest.raises(ValueError, match="overflows"):
    packing.pack(items, [[0, 1, 2]], 5)
  with pytest.raises(ValueError, match="no items and no template"):
    packing.pack([], [[]], 4)


def unpacked_batch(seqs, L, pad_id=0):
  return data_lib.collate(seqs, (L,), pad_id)


def packed_batch(seqs, L, multiple=1):
  items = [data_lib.sequence_item(s, L) for s in seqs]
  plan = packing.plan_rows([len(i["tokens"]) for i in items], L, multiple)
  return packing.pack(items, plan, L), plan


def per_token_nll(graphdef, params, batch):
  model = nnx.merge(graphdef, params)
  logits, _ = model(*packing.model_inputs(batch))
  return -token_logprobs(logits, jnp.asarray(batch["tokens"])[:, 1:])


def test_sft_packed_equals_unpacked_per_token_and_gradients():
  graphdef, params = init_model(CFG, seed=1)
  seqs = sequences(9)
  L = 48
  un = unpacked_batch(seqs, L)
  pk, plan = packed_batch(seqs, L)
  assert pk["tokens"].shape[0] < un["tokens"].shape[0]
  nll_un = per_token_nll(graphdef, params, un)
  nll_pk = per_token_nll(graphdef, params, pk)
  for r, members in enumerate(plan):  # each sequence's next-token losses, wherever it sits
    at = 0
    for i in members:
      n = len(seqs[i]["tokens"])
      np.testing.assert_allclose(nll_pk[r, at:at + n - 1], nll_un[i, :n - 1], rtol=2e-5, atol=2e-5)
      at += n
  loss_fn = make_sft_loss(graphdef)
  s_un, c_un, _, g_un = loss_and_grads(loss_fn, params, un)
  s_pk, c_pk, _, g_pk = loss_and_grads(loss_fn, params, pk)
  assert float(c_un) == float(c_pk) > 0
  np.testing.assert_allclose(s_pk, s_un, rtol=1e-5)
  assert_grads_close(g_pk, g_un)


def test_rm_packed_equals_unpacked_loss_and_gradients():
  _, params = init_model(CFG, "scalar", seed=2)
  graphdef, _ = init_model(CFG, "scalar", seed=2)
  params = dict(params)
  params["score"] = jax.random.normal(jax.random.key(3), params["score"].shape) * 0.5
  seqs = sequences(14, seed=3, lo=4, hi=30)
  pairs = [{"tokens": [seqs[2 * k]["tokens"], seqs[2 * k + 1]["tokens"]], "margin": 0.25 * k} for k in range(7)]
  un = collate_pairs(pairs, (32,), 0)
  items = [PAIRS.item(p, 32) for p in pairs]
  pk = packing.pack(items, packing.plan_rows([len(i["tokens"]) for i in items], 64), 64, template=PAIRS.template)
  assert pk["tokens"].size < un["tokens"].size
  loss_fn = make_rm_loss(graphdef, center_coef=0.01)

  s_un, c_un, aux_un, g_un = loss_and_grads(loss_fn, params, un)
  s_pk, c_pk, aux_pk, g_pk = loss_and_grads(loss_fn, params, pk)
  assert float(c_un) == float(c_pk) == 7
  np.testing.assert_allclose(s_pk, s_un, rtol=1e-5)
  for k in ("correct", "margin", "chosen", "rejected"):
    np.testing.assert_allclose(aux_pk[k], aux_un[k], rtol=1e-4, atol=1e-6)
  assert_grads_close(g_pk, g_un)


@pytest.mark.parametrize("agg", sorted(rl.AGGREGATIONS))
def test_rl_policy_loss_packed_equals_unpacked(agg):
  graphdef, params = init_model(CFG, seed=4)
  seqs = sequences(8, seed=4, lo=5, hi=18)
  L = 32
  un = unpacked_batch(seqs, L)
  rng = np.random.default_rng(5)
  T = L - 1
  un.update(adv=rng.normal(size=(8, T)).astype(np.float32),
            old_logp=(np.asarray(per_token_nll(graphdef, params, un)) * -1 + rng.normal(0, 0.1, (8, T))
                      ).astype(np.float32),
            ref_logp=rng.normal(-3, 0.5, (8, T)).astype(np.float32))
  pk = rl.pack_update_batch(un, multiple=2)
  assert pk["tokens"].shape[0] % 2 == 0 and pk["tokens"].shape[0] < 8
  assert pk["adv"].shape == (pk["tokens"].shape[0], T)
  loss_fn = rl.make_policy_loss(graphdef, rl.RLConfig(agg=agg, kl_coef=0.05, entropy_coef=0.01))

  s_un, c_un, aux_un, g_un = loss_and_grads(loss_fn, params, un)
  s_pk, c_pk, aux_pk, g_pk = loss_and_grads(loss_fn, params, pk)
  np.testing.assert_allclose(c_pk, c_un)
  np.testing.assert_allclose(s_pk, s_un, rtol=1e-5, atol=1e-6)
  for k in ("tokens", "seqs", "clipfrac_sum", "kl_sum", "entropy_sum"):
    np.testing.assert_allclose(aux_pk[k], aux_un[k], rtol=1e-4, atol=1e-5)
  assert_grads_close(g_pk, g_un)


def test_packed_dataset_sees_every_example_and_hosts_split_rows():
  seqs = sequences(23, seed=6)
  source = [dict(s, uid=i) for i, s in enumerate(seqs)]
  kw = dict(batch_size=8, buckets=(16, 32, 48), seed=0, num_epochs=1, group_by_length=True,
            packer=data_lib.SEQUENCES, row_multiple=2)
  batches = list(data_lib.batch_dataset(source, **kw))
  firsts = []
  for b in batches:
    R = int(b[data_lib.GLOBAL_ROWS])
    assert b["tokens"].shape[0] == R and R % 2 == 0 and b["tokens"].shape[1] in (16, 32, 48)
    seg = b["segment_ids"]
    for r in range(R):
      for s in range(1, seg[r].max() + 1):
        firsts.append(tuple(b["tokens"][r][seg[r] == s][:3]))
  # every example once per epoch (the last batch is filled with repeats of similar examples)
  assert {tuple(s["tokens"][:3]) for s in seqs} == set(firsts)
  # two hosts with alternate rows load together what one host loads
  halves = [list(data_lib.batch_dataset(source, **kw, rows_of=lambda R, h=h: list(range(h, R, 2))))
            for h in (0, 1)]
  for whole, a, b in zip(batches, *halves):
    np.testing.assert_array_equal(whole["tokens"][0::2], a["tokens"])
    np.testing.assert_array_equal(whole["tokens"][1::2], b["tokens"])


@pytest.mark.parametrize("kind", ["sft", "rm"])
def test_trainer_packed_run_matches_unpacked(tmp_path, kind):
  """Same examples per step, same losses: only the layout of the batches differs."""
  graphdef, params = init_model(CFG, "causal_lm" if kind == "sft" else "scalar", seed=0)
  if kind == "sft":
    source, loss_fn, extra = sequences(24, seed=7), make_sft_loss(graphdef), {}
  else:
    seqs = sequences(32, seed=8, lo=4, hi=24)
    source = [{"tokens": [seqs[2 * k]["tokens"], seqs[2 * k + 1]["tokens"]], "margin": 0.0} for k in range(16)]
    loss_fn, extra = make_rm_loss(graphdef), dict(collate_fn=collate_pairs, packer=PAIRS)
  mesh = shd.make_mesh(shd.MeshConfig(fsdp=-1))
  losses = {}
  for pack in (False, True):
    cfg = TrainConfig(steps=6, batch_size=8, buckets=(16, 32, 48), log_every=1, checkpoint_every=100,
                      group_by_length=True, pack=pack, optimizer=OptimizerConfig(learning_rate=1e-3, total_steps=6))
    wd = tmp_path / f"{kind}_{pack}"
    trainer = Trainer(cfg, loss_fn=loss_fn, params=jax.tree.map(jnp.copy, params), mesh=mesh, workdir=wd,
                      progress=False, **extra)
    trainer.run(source)
    trainer.close()
    losses[pack] = [m["loss"] for m in read_metrics(str(wd / "logs"))]
  assert len(losses[True]) == 6
  np.testing.assert_allclose(losses[True], losses[False], rtol=2e-4)
