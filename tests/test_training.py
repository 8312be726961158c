import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from autotraj_jax import sharding as shd
from autotraj_jax.checkpoint import Checkpointer, CheckpointError, load_model, save_model
from autotraj_jax.metrics import read_metrics
from autotraj_jax.models import get_preset, init_model
from autotraj_jax.training import data as data_lib
from autotraj_jax.training.losses import sft_loss, token_logprobs
from autotraj_jax.training.optimizer import OptimizerConfig
from autotraj_jax.training.sft import make_sft_loss
from autotraj_jax.training.step import init_state, make_train_step
from autotraj_jax.training.trainer import TrainConfig, Trainer

CFG = get_preset("tiny")


def make_examples(n, seed=0, min_len=6, max_len=30):
  """Chat-like sequences: prompt (mask 0), model text (1), a tool result (0), model text (1)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    parts = [(rng.integers(3, 8), 0), (rng.integers(2, 8), 1), (rng.integers(0, 6), 0), (rng.integers(1, 8), 1)]
    tokens, mask = [], []
    for length, m in parts:
      tokens += rng.integers(1, CFG.vocab_size, length).tolist()
      mask += [m] * int(length)
    out.append({"tokens": tokens[:max_len], "loss_mask": mask[:max_len]})
  return out


def test_sft_loss_counts_only_masked_tokens():
  logits = jax.random.normal(jax.random.key(0), (2, 5, 11))
  targets = jnp.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
  mask = jnp.array([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]])
  s, c = sft_loss(logits, targets, mask)
  lp = jax.nn.log_softmax(logits)
  expected = -sum(float(lp[b, l, targets[b, l]]) for b in range(2) for l in range(5) if mask[b, l])
  assert float(c) == 4
  np.testing.assert_allclose(float(s), expected, rtol=1e-6)
  # Changing logits at masked-out positions leaves the loss unchanged.
  logits2 = logits.at[0, 1].set(100.0).at[1, 0].set(-50.0)
  np.testing.assert_allclose(float(sft_loss(logits2, targets, mask)[0]), float(s), rtol=1e-6)
  assert token_logprobs(logits, targets).shape == (2, 5)


def test_grad_accumulation_is_exact():
  graphdef, params = init_model(CFG, seed=0)
  opt = optax.sgd(1.0)  # linear in the gradient: params compare the gradients themselves
  step = jax.jit(make_train_step(make_sft_loss(graphdef), opt))
  batch = data_lib.collate(make_examples(8, seed=1), (32,), 0)
  outs = []
  for accum in (1, 2, 4):
    state = init_state(params, opt, seed=0)
    new, metrics = step(state, data_lib.split_micro(batch, accum))
    outs.append((new.params, float(metrics["loss"]), float(metrics["count"])))
  for p, loss, count in outs[1:]:
    assert count == outs[0][2]
    np.testing.assert_allclose(loss, outs[0][1], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(outs[0][0])):
      np.testing.assert_allclose(a, b, atol=1e-7)


def test_empty_micro_batches_are_skipped_and_change_nothing():
  """skip_empty: all-padding micro-batches appended to a batch leave the update exactly as it was."""
  graphdef, params = init_model(CFG, seed=0)
  opt = optax.sgd(1.0)
  step = jax.jit(make_train_step(make_sft_loss(graphdef), opt, skip_empty=True))
  batch = data_lib.split_micro(data_lib.collate(make_examples(8, seed=1), (32,), 0), 2)
  padded = {k: np.concatenate([v, np.zeros((2, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}
  outs = [step(init_state(params, opt, seed=0), b) for b in (batch, padded)]
  (a, ma), (b, mb) = outs
  assert float(ma["count"]) == float(mb["count"]) > 0
  np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-6)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(x, y, atol=1e-7)
  # The padding micro-batches are not computed: a loss that is NaN on them leaves the step finite.
  sft = make_sft_loss(graphdef)

  def nan_on_empty(p, micro, rng):
    total, count, aux = sft(p, micro, rng)
    return total + jnp.where(jnp.any(micro["valid"] != 0), 0.0, jnp.nan), count, aux
  for skip, finite in ((True, True), (False, False)):
    _, m = jax.jit(make_train_step(nan_on_empty, opt, skip_empty=skip))(init_state(params, opt, seed=0), padded)
    assert np.isfinite(float(m["loss"])) == finite


def _trainer(tmp_path, steps, mesh=None, **kw):
  graphdef, params = init_model(CFG, seed=0)
  cfg = TrainConfig(steps=steps, batch_size=8, micro_batch_size=4, buckets=(16, 32), log_every=1,
                    checkpoint_every=3, seed=7,
                    optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=2, total_steps=8))
  mesh = mesh or shd.make_mesh(shd.MeshConfig(fsdp=1), jax.devices()[:1])
  return Trainer(cfg, loss_fn=make_sft_loss(graphdef), params=params, mesh=mesh, workdir=tmp_path,
                 meta={"model_config": CFG.to_dict()}, progress=False, **kw)


def test_train_compiles_once_and_loss_falls(tmp_path):
  data = make_examples(64, min_len=20)
  data = [d for d in data if len(d["tokens"]) > 16]  # all in the 32 bucket -> one shape
  trainer = _trainer(tmp_path, steps=8)
  state = trainer.run(data)
  assert trainer.num_compiles == 1
  assert int(state.step) == 8
  logs = read_metrics(tmp_path / "logs")
  assert [r["step"] for r in logs] == list(range(1, 9))
  assert logs[-1]["loss"] < logs[0]["loss"]
  assert logs[1]["lr"] > logs[0]["lr"]  # warmup
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "logs"))


def test_resume_after_stop_is_exact(tmp_path):
  data = make_examples(40, seed=3)
  full = _trainer(tmp_path / "full", steps=8).run(data)
  # Interrupted run: 5 steps (checkpoints at 3 and 5), then a new process-like trainer to 8.
  _trainer(tmp_path / "cut", steps=5).run(data)
  steps = Checkpointer(tmp_path / "cut" / "checkpoints").all_steps()
  assert steps == [3, 5]
  resumed = _trainer(tmp_path / "cut", steps=8).run(data)
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  a = read_metrics(tmp_path / "full" / "logs")
  b = read_metrics(tmp_path / "cut" / "logs")
  assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_checkpoint_restores_onto_another_mesh(tmp_path):
  mesh8 = shd.make_mesh(shd.MeshConfig(fsdp=4, tp=2))
  graphdef, params = init_model(CFG, seed=5)
  sharded = shd.shard_params(params, mesh8)
  q = sharded["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"]
  assert len(q.sharding.device_set) == 8
  save_model(tmp_path / "m", sharded, CFG)
  cfg, kind, restored = load_model(tmp_path / "m")  # onto one device
  assert cfg == CFG and kind == "causal_lm"
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
    assert len(b.sharding.device_set) == 1
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  mesh2 = shd.make_mesh(shd.MeshConfig(data=2, fsdp=1, tp=1), jax.devices()[:2])
  _, _, again = load_model(tmp_path / "m", mesh=mesh2)
  np.testing.assert_array_equal(np.asarray(jax.tree.leaves(again)[0]), np.asarray(jax.tree.leaves(params)[0]))


def test_missing_checkpoint_errors(tmp_path):
  with pytest.raises(CheckpointError, match="does not exist"):
    load_model(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="no checkpoint found"):
    load_model(tmp_path / "empty")


def test_dataset_smaller_than_batch_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="fewer than one batch"):
    _trainer(tmp_path, steps=1).run(make_examples(3))


def test_length_grouped_batches_and_host_shards():
  data = make_examples(200, seed=4, max_len=64)
  lengths = [len(d["tokens"]) for d in data]
  batches = data_lib.length_grouped_batches(lengths, 8, seed=0, window=4)
  flat = [i for b in batches for i in b]
  assert len(flat) == len(set(flat)) and all(len(b) == 8 for b in batches)
  spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches])
  rand = np.mean([np.ptp([lengths[i] for i in b]) for b in np.array_split(np.arange(192), 24)])
  assert spread < rand / 2  # grouped batches pad far less than random ones
  it = iter(data_lib.batch_dataset(data, batch_size=8, buckets=(16, 32, 64), seed=0, group_by_length=True))
  assert next(it)["tokens"].shape[0] == 8
  # Hosts load disjoint rows of the same global batches: together, the batch one host would load.
  whole = next(iter(data_lib.batch_dataset(data, batch_size=4, buckets=(64,), seed=0, shuffle=False)))
  a = next(iter(data_lib.batch_dataset(data, batch_size=4, buckets=(64,), seed=0, shuffle=False, rows=[0, 1])))
  b = next(iter(data_lib.batch_dataset(data, batch_size=4, buckets=(64,), seed=0, shuffle=False, rows=[2, 3])))
  np.testing.assert_array_equal(np.concatenate([a["tokens"], b["tokens"]]), whole["tokens"])
  np.testing.assert_array_equal(b["tokens"][0, :len(data[2]["tokens"])], data[2]["tokens"])


def test_public_state_api_saves_under_a_callers_step(tmp_path):
  """What the RL learner uses: fresh state, batches onto the mesh, save under its own step number
  with extra meta, restore with the optimizer-step count intact."""
  trainer = _trainer(tmp_path, steps=8)
  try:
    state = trainer.init_state()
    assert int(state.step) == 0 and trainer.saved_steps() == []
    batch = data_lib.collate(make_examples(8, seed=2), (32,), 0)
    dev = trainer.device_batch(batch)
    assert dev["tokens"].shape == (2, 4, 32)  # [num_micro, micro_B, L]
    for _ in range(3):
      state, _ = trainer.train_step(state, trainer.device_batch(batch))
    trainer.save(state, step=1, meta={"extra": {"a": 1}}, force=True)
    restored, meta = trainer.restore_state(1)
    assert trainer.saved_steps() == [1]
    assert meta["extra"] == {"a": 1} and meta["step"] == 1 and meta["model_config"] == CFG.to_dict()
    assert int(restored.step) == 3  # optimizer steps, not the number it was saved under
    for a, b in zip(jax.tree.leaves((state.params, state.opt_state)), jax.tree.leaves((restored.params,
                                                                                         restored.opt_state))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(jax.random.key_data(state.rng), jax.random.key_data(restored.rng))
  finally:
    trainer.close()
