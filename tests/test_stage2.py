"""Stage-2 building blocks: SFT data selection and masking, rollout batches, the RL losses on a
real model, PPO's sparse rewards, and the seeded question order that makes RL resumable."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from autotraj_jax.models import get_preset, init_model
from autotraj_jax.pipeline.builders import is_held_out, variant_node
from autotraj_jax.pipeline.rl import question_order
from autotraj_jax.pipeline.sft import select_sft, sft_examples
from autotraj_jax.tir.trajectory import Segment, Trajectory
from autotraj_jax.training import rl


def _traj(qid, source="generated", n_model=3, n_tool=2, logprobs=True):
  segs = [Segment("model", list(range(20, 20 + n_model)), "m", [-0.5] * n_model if logprobs else None),
          Segment("tool", list(range(40, 40 + n_tool)), "t"),
          Segment("model", [50, 51], "m2", [-0.25, -0.75] if logprobs else None)]
  return Trajectory(id=f"{qid}/{source}", question_id=qid, question="q", prompt_ids=[1, 2, 3], segments=segs,
                    gold="1", finish_reason="answer", provenance={"source": source})


def test_select_sft_high_only_drops_repairs():
  trajs = [_traj("a"), _traj("b", "repaired"), _traj("c")]
  assert [t.id for t in select_sft(trajs, "high_only")] == ["a/generated", "c/generated"]
  assert len(select_sft(trajs, "autotraj")) == 3
  with pytest.raises(ValueError, match="sft.data"):
    select_sft(trajs, "everything")


def test_held_out_questions_are_the_same_whatever_list_they_are_drawn_from():
  qids = [f"q{i}" for i in range(2000)]
  held = {q for q in qids if is_held_out(q, 0.2, seed=0)}
  assert 0.17 < len(held) / len(qids) < 0.23
  subset = qids[::7]  # e.g. the questions that have preference pairs
  assert {q for q in subset if is_held_out(q, 0.2, seed=0)} == held & set(subset)
  assert held != {q for q in qids if is_held_out(q, 0.2, seed=1)}
  assert not any(is_held_out(q, 0.0, seed=0) for q in qids)


def test_sft_examples_mask_switch_and_eos():
  t = _traj("a")
  masked = sft_examples([t], eos_id=0, mask_tool_results=True)[0]
  unmasked = sft_examples([t], eos_id=0, mask_tool_results=False)[0]
  assert masked["tokens"] == [1, 2, 3, 20, 21, 22, 40, 41, 50, 51, 0] == unmasked["tokens"]
  assert masked["loss_mask"] == [0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1]
  assert unmasked["loss_mask"] == [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]


def test_variant_node_overrides_nested_fields():
  c = ml_collections.ConfigDict({"rl": {"steps": 3, "rewards": {"weights": {"outcome": 1.0}}},
                                 "rl_variants": {"rm": {"rewards": {"weights": {"outcome": 1.0, "rm": 0.5}}}}})
  node = variant_node(c, "rl", "rm")
  assert node.steps == 3 and dict(node.rewards.weights) == {"outcome": 1.0, "rm": 0.5}
  assert dict(c.rl.rewards.weights) == {"outcome": 1.0}  # the base section is untouched
  with pytest.raises(ValueError, match="unknown rl variant"):
    variant_node(c, "rl", "nope")


def test_question_order_is_a_function_of_the_step():
  full = [i for s in range(5) for i in question_order(10, seed=3, step=s, per_step=4)]
  assert sorted(full[:10]) == list(range(10))  # the first epoch is a permutation
  assert question_order(10, 3, 2, 4) == full[8:12]  # any step, without replaying earlier ones
  assert question_order(10, 4, 0, 4) != question_order(10, 3, 0, 4)


def test_rollout_batch_layout():
  b = rl.rollout_batch([_traj("a"), _traj("b", logprobs=False)], length=12, pad_id=0)
  assert b["tokens"].shape == (2, 12)
  assert b["tokens"][0, :10].tolist() == [1, 2, 3, 20, 21, 22, 40, 41, 50, 51]
  assert b["valid"][0].tolist() == [1] * 10 + [0] * 2
  assert b["loss_mask"][0].tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0]
  assert b["sampler_logp"][0, 8:10].tolist() == [-0.25, -0.75]
  assert b["sampler_has"][0].tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0]
  assert b["sampler_has"][1].sum() == 0
  short = rl.rollout_batch([_traj("a")], length=6, pad_id=0)  # truncated: the tail gets no gradient
  assert short["loss_mask"][0].tolist() == [0, 0, 0, 1, 1, 1]


@pytest.fixture(scope="module")
def tiny():
  cfg = get_preset("tiny", vocab_size=64)
  graphdef, params = init_model(cfg, seed=0)
  return graphdef, params


def _rl_batch(adv_tool=0.0, old_tool=0.0):
  b = rl.rollout_batch([_traj("a"), _traj("b")], length=12, pad_id=0)
  mask = np.asarray(rl.shifted_mask(b))
  adv = np.where(mask > 0, np.array([[1.0], [-1.0]]), adv_tool).astype(np.float32)
  old = np.where(mask > 0, -4.0, old_tool).astype(np.float32)
  return {**{k: jnp.asarray(v) for k, v in b.items()}, "adv": jnp.asarray(adv), "old_logp": jnp.asarray(old),
          "ref_logp": jnp.asarray(old)}


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_tool_tokens_get_no_gradient(tiny, agg):
  graphdef, params = tiny
  cfg = rl.RLConfig(agg=agg, kl_coef=0.1, entropy_coef=0.01)
  loss_fn = rl.make_policy_loss(graphdef, cfg)

  def value_and_grad(batch):
    f = lambda p: (lambda s, c, _: s / c)(*loss_fn(p, batch, None))
    return jax.value_and_grad(f)(params)

  v0, g0 = value_and_grad(_rl_batch())
  v1, g1 = value_and_grad(_rl_batch(adv_tool=123.0, old_tool=55.0))  # garbage on tool/prompt positions
  assert float(v0) == float(v1)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(float(jnp.abs(x).sum()) > 0 for x in jax.tree.leaves(g0))


def test_logprob_fn_matches_the_policy_loss_ratio(tiny):
  graphdef, params = tiny
  b = _rl_batch()
  logp = rl.make_logprob_fn(graphdef)(params, b)
  b = {**b, "old_logp": logp, "ref_logp": logp}
  _, _, aux = rl.make_policy_loss(graphdef, rl.RLConfig())(params, b, None)
  assert float(aux["ratio_sum"]) == pytest.approx(float(aux["tokens"]), rel=1e-6)  # on-policy: ratio 1
  assert float(aux["kl_sum"]) == pytest.approx(0.0, abs=1e-6)


def _advantages(name, rewards, mask, values=None, **cfg):
  mask = jnp.asarray(mask, jnp.float32)
  inputs = rl.AdvantageInputs(rewards_B=jnp.asarray(rewards, jnp.float32), group_size=2, mask_BT=mask,
                              kl_BT=jnp.zeros_like(mask), values_BT=values)
  return rl.estimate_advantages(name, inputs, rl.RLConfig(advantage=name, **cfg))


def test_ppo_rewards_sit_on_the_last_model_token_and_ignore_tool_values():
  mask = jnp.array([[0, 1, 1, 0, 0, 1, 0], [0, 1, 0, 0, 0, 0, 0]], jnp.float32)
  r = rl.token_rewards(jnp.array([2.0, -1.0]), mask)
  assert r.tolist() == [[0, 0, 0, 0, 0, 2, 0], [0, -1, 0, 0, 0, 0, 0]]
  values = jnp.array([[0.0, 0.5, 0.2, 0.0, 0.0, 0.1, 0.0], [0.0, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0]])
  garbage = values.at[:, 3:5].set(99.0).at[:, 0].set(-7.0)
  a0 = _advantages("gae", [2.0, -1.0], mask, values, whiten_advantages=False, lam=0.9)
  a1 = _advantages("gae", [2.0, -1.0], mask, garbage, whiten_advantages=False, lam=0.9)
  np.testing.assert_allclose(a0.adv_BT, a1.adv_BT)
  np.testing.assert_allclose(a0.returns_BT, a1.returns_BT)
  assert float(a0.adv_BT[0, 5]) == pytest.approx(2.0 - 0.1)  # last model token: r - V


def test_group_advantages_and_group_filter():
  mask = jnp.ones((4, 3))
  out = _advantages("grpo", [1.0, 0.0, 1.0, 1.0], mask, filter_uniform_groups=True)
  assert out.keep_B.tolist() == [True, True, False, False]
  assert float(out.adv_BT[0, 0]) > 0 > float(out.adv_BT[1, 0]) and float(out.adv_BT[2, 0]) == 0.0
  out = _advantages("dr_grpo", [1.0, 0.0, 1.0, 1.0], mask)
  assert out.adv_BT[:, 0].tolist() == [0.5, -0.5, 0.0, 0.0]


def test_rl_config_rejects_unknown_settings():
  with pytest.raises(ValueError, match="rl.advantage"):
    rl.RLConfig(advantage="dpo")
  with pytest.raises(ValueError, match="rl.agg"):
    rl.RLConfig(agg="sum")
