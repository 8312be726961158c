"""The RL learner end to end on a tiny random model: an update from fake grouped trajectories,
exact resume from a checkpoint saved under the RL step, the critic of `gae`, and the sampling
settings RL refuses."""

import jax
import ml_collections
import numpy as np
import pytest

from autotraj_jax import sharding as shd
from autotraj_jax.models import get_preset, init_model
from autotraj_jax.pipeline import rl as rl_stage_lib
from autotraj_jax.pipeline.workdir import Workdir
from autotraj_jax.tir.trajectory import Segment, Trajectory
from autotraj_jax.training.optimizer import OptimizerConfig
from autotraj_jax.training.rl import Learner, LearnerConfig, RLConfig
from autotraj_jax.training.trainer import TrainConfig

CFG = get_preset("tiny", vocab_size=64)


def _traj(i: int, n_model: int = 4) -> Trajectory:
  """Prompt, model turn (with sampler logprobs), tool result, model turn: distinct ids per sample."""
  segs = [Segment("model", [(10 + i + k) % 60 + 1 for k in range(n_model)], "m", [-1.0] * n_model),
          Segment("tool", [40, 41, 42], "t"),
          Segment("model", [(20 + 3 * i) % 60 + 1, 7], "m2", [-0.5, -0.25])]
  return Trajectory(id=f"t{i}", question_id=f"q{i // 2}", question="q", prompt_ids=[1, 2, 3], segments=segs,
                    gold="1", finish_reason="answer")


TRAJS = [_traj(i, n_model=3 + i) for i in range(4)]  # 2 prompts x 2 samples, each prompt's adjacent
REWARDS = [1.0, 0.0, 0.0, 1.0]
WITH_KL = RLConfig(kl_coef=0.1)


def _learner(workdir, objective=WITH_KL, minibatches=2, critic_warmup=0, pack=False, buckets=(8, 16, 32)
             ) -> Learner:
  _, params = init_model(CFG, seed=0)
  mesh = shd.make_mesh(shd.MeshConfig(fsdp=2), jax.devices()[:2])
  train = TrainConfig(steps=4 * minibatches, batch_size=4 // minibatches, buckets=(16, 32), seed=3, pack=pack,
                      optimizer=OptimizerConfig(learning_rate=1e-2, total_steps=4 * minibatches))
  cfg = LearnerConfig(objective=objective, minibatches=minibatches, buckets=buckets, critic_warmup=critic_warmup)
  return Learner(cfg, model_config=CFG, params=params, mesh=mesh, workdir=workdir, train=train,
                 critic_train=train, pad_id=0, meta={"init": "test"})


def _host(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_one_update_changes_params_with_finite_metrics(tmp_path):
  learner = _learner(tmp_path)
  try:
    learner.start()
    before = _host(learner.params)
    m = learner.update(TRAJS, REWARDS, group_size=2, step=0)
    for key in ("loss", "grad_norm", "kl", "entropy", "clip_frac", "logprob_gap", "groups_kept"):
      assert np.isfinite(m[key]), key
    assert m["groups_kept"] == 1.0 and m["bucket"] == 16 and m["grad_norm"] > 0
    # k3 >= 0; the first minibatch is at the reference, the second after one optimizer step
    assert m["kl"] > 0
    assert m["entropy"] > 0 and m["logprob_gap"] > 0  # the fake sampler logprobs are not the model's
    after = _host(learner.params)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))
    with pytest.raises(ValueError, match="expected 4 trajectories"):
      learner.update(TRAJS[:2], REWARDS[:2], group_size=2, step=1)
  finally:
    learner.close()


@pytest.mark.parametrize("objective", [WITH_KL, RLConfig(advantage="gae", agg="seq-mean-token-mean")],
                         ids=["dr_grpo_kl", "gae"])
def test_packed_updates_match_unpacked(tmp_path, objective):
  """rl.pack: log-probs, values and updates on packed rows give the unpacked run's metrics and params."""
  runs = {}
  for pack in (False, True):
    learner = _learner(tmp_path / str(pack), objective=objective, minibatches=1, pack=pack, buckets=(32,))
    try:
      learner.start()
      metrics = [learner.update(TRAJS, REWARDS, group_size=2, step=k) for k in range(2)]
      runs[pack] = metrics, _host(learner.params)
    finally:
      learner.close()
  (m_un, p_un), (m_pk, p_pk) = runs[False], runs[True]
  assert m_pk[0]["update_padding"] < m_un[0]["update_padding"]
  for a, b in zip(m_pk, m_un):
    for key in ("loss", "kl", "entropy", "clip_frac", "logprob_gap", "grad_norm"):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=key)
  # Adam at lr 1e-2 moves a weight whose gradient is ~0 by +-lr on float noise alone: compare norms.
  for a, b in zip(p_pk, p_un):
    assert np.linalg.norm(a - b) <= 1e-3 * np.linalg.norm(b) + 1e-6


def test_packed_updates_compile_once_whatever_rows_they_need(tmp_path):
  """Short trajectories pack into 2 rows, long ones need 4: the same compiled policy step runs
  both (empty micro-batches skipped), and both updates train."""
  learner = _learner(tmp_path, minibatches=1, pack=True, buckets=(32,))
  long = [_traj(i, n_model=20) for i in range(4)]
  try:
    learner.start()
    pads = []
    for k, trajs in enumerate((TRAJS, long, TRAJS)):
      before = _host(learner.params)
      m = learner.update(trajs, REWARDS, group_size=2, step=k)
      assert np.isfinite(m["loss"]) and any(not np.array_equal(a, b) for a, b in zip(before, _host(learner.params)))
      pads.append(m["update_padding"])
    assert learner.policy.trainer.num_compiles == 1
    assert pads[1] < pads[0]  # the padding figure counts the rows the step computes, not the empty ones
  finally:
    learner.close()


def test_resume_at_a_saved_step_is_exact(tmp_path):
  a = _learner(tmp_path)
  try:
    assert a.resume_step() is None and a.start(a.resume_step()) == {}
    a.update(TRAJS, REWARDS, group_size=2, step=0)
    a.save(1, {"reward_state": {"rm_count": 3}})
    saved = _host(a.params)
    m_a = a.update(TRAJS, REWARDS, group_size=2, step=1)
    params_a = _host(a.params)
  finally:
    a.close()
  b = _learner(tmp_path)  # a new process-like learner on the same workdir
  try:
    assert b.resume_step() == 1
    meta = b.start(1)
    assert meta["reward_state"] == {"rm_count": 3} and meta["step"] == 1 and meta["init"] == "test"
    for x, y in zip(saved, _host(b.params)):
      np.testing.assert_array_equal(x, y)
    assert int(b.policy.state.step) == 2  # the optimizer-step count (2 minibatches), not the RL step
    m_b = b.update(TRAJS, REWARDS, group_size=2, step=1)
    assert m_b == pytest.approx(m_a, rel=1e-6, abs=1e-7)
    for x, y in zip(params_a, _host(b.params)):
      np.testing.assert_array_equal(x, y)
  finally:
    b.close()


def test_gae_trains_the_critic_first_and_checkpoints_it(tmp_path):
  learner = _learner(tmp_path, objective=RLConfig(advantage="gae"), minibatches=1, critic_warmup=1)
  try:
    learner.start()
    before = _host(learner.params)
    m = learner.update(TRAJS, REWARDS, group_size=2, step=0)
    assert np.isfinite(m["critic/loss"]) and "loss" not in m  # warm-up: the critic only
    for x, y in zip(before, _host(learner.params)):
      np.testing.assert_array_equal(x, y)
    m = learner.update(TRAJS, REWARDS, group_size=2, step=1)
    assert np.isfinite(m["loss"]) and np.isfinite(m["critic/loss"])
    learner.save(2)
  finally:
    learner.close()
  assert (tmp_path / "critic" / "checkpoints" / "2").is_dir() and (tmp_path / "checkpoints" / "2").is_dir()


def test_a_learner_without_critic_config_is_refused_for_gae(tmp_path):
  _, params = init_model(CFG, seed=0)
  mesh = shd.make_mesh(shd.MeshConfig(fsdp=1), jax.devices()[:1])
  with pytest.raises(ValueError, match="critic"):
    Learner(LearnerConfig(objective=RLConfig(advantage="gae")), model_config=CFG, params=params, mesh=mesh,
            workdir=tmp_path, train=TrainConfig(steps=1, batch_size=4))


@pytest.mark.parametrize("field,value", [("temperature", 0.7), ("top_p", 0.9), ("top_k", 20)])
def test_sampling_that_breaks_the_importance_ratio_is_refused(field, value):
  with pytest.raises(ValueError, match=rf"^rl\.{field} must be"):
    LearnerConfig(**{field: value})
  LearnerConfig(temperature=1.0, top_p=1.0, top_k=-1)  # untempered, unfiltered: fine


def _rl_config(**rl) -> ml_collections.ConfigDict:
  node = dict(init="sft", rm="rm", split="train", max_questions=0, steps=2, prompts_per_step=2,
              samples_per_prompt=2, minibatches=1, micro_batch_size=0, buckets=(64,), learning_rate=1e-3,
              warmup_steps=0, grad_clip=1.0, critic_learning_rate=1e-3, critic_warmup=0, checkpoint_every=1,
              advantage="dr_grpo", clip_low=0.2, clip_high=0.28, agg="token-mean", filter_uniform_groups=False,
              kl_coef=0.0, kl_kind="k3", kl_in_reward=False, entropy_coef=0.0, gamma=1.0, lam=0.95,
              value_clip=0.2, whiten_advantages=True,
              rewards=dict(combination="weighted", weights={"outcome": 1.0, "format": 0.5, "rm": 0.0},
                           rm_norm="none", rm_clip=None, outcome_metric="equiv", format_penalty=-1.0,
                           format_penalty_per_violation=None, reference_rm_coef=0.2, reference_cap=3.0,
                           rm_timeout_s=120.0, max_rm_failures=None),
              temperature=1.0, top_p=1.0, top_k=-1, max_tool_calls=2, max_tokens_per_turn=16,
              max_response_tokens=48, max_tool_output_chars=100)
  node.update(rl)
  return ml_collections.ConfigDict({"seed": 0, "rl": node, "rl_variants": {"x": {}}})


def test_the_stage_refuses_tempered_sampling_before_any_work(tmp_path):
  wd = Workdir(tmp_path)
  with pytest.raises(ValueError, match=r"rl\.temperature"):
    rl_stage_lib.rl_stage(_rl_config(temperature=0.7), wd, "x")
  assert not (tmp_path / "rl_x").exists()
  with pytest.raises(ValueError, match=r"rl\.top_p"):
    rl_stage_lib.rl_stage(_rl_config(top_p=0.95), wd, "x")


def test_stage_configs_from_the_rl_node():
  node = _rl_config(advantage="rloo", agg="seq-mean-token-sum-norm", minibatches=2).rl
  lcfg = rl_stage_lib.learner_config(node)
  assert lcfg.objective.advantage == "rloo" and lcfg.objective.agg == "seq-mean-token-sum-norm"
  assert lcfg.minibatches == 2 and lcfg.buckets == (64,)
  assert set(rl_stage_lib.reward_config(node).components) == {"outcome", "format"}  # rm weighs 0
  policy, critic = rl_stage_lib.learner_train_configs(node, seed=5, pad_id=0)
  assert (policy.batch_size, policy.steps, policy.optimizer.end_lr_ratio) == (2, 4, 1.0)
  assert critic.optimizer.learning_rate == node.critic_learning_rate
  with pytest.raises(ValueError, match="rl.minibatches=3"):
    rl_stage_lib.learner_train_configs(_rl_config(minibatches=3).rl, seed=0, pad_id=0)
