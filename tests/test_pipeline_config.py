"""The typed pipeline config and the command line: declared fields, overrides, one-line errors."""

import os
import subprocess
import sys

import pytest

from autotraj_jax.pipeline import config as C
from autotraj_jax.pipeline.sft import sft_examples
from autotraj_jax.tir.trajectory import Segment, Trajectory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = [sys.executable, os.path.join(ROOT, "experiments", "main.py")]
SMOKE = os.path.join(ROOT, "experiments", "configs", "smoke.py")


def main(*args, timeout=120):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run(MAIN + list(args), capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_overrides_are_read_as_the_declared_type():
  c = C.base_config()
  for key, raw in [("mesh.fsdp", "2"), ("mesh.data", "4"), ("distributed", "True"), ("rl.learning_rate", "1"),
                   ("generate.samples_per_query", "8"), ("rl.rewards.weights.rm", "0.3"),
                   ("sft_variants.high_only.steps", "7"), ("stages", "('world','tokenizer')"), ("policy.name", "x y"),
                   ("rl.rewards.format_penalty_per_violation", "-0.25"), ("engine.prompt_buckets", "512")]:
    C.apply_override(c, key, raw)
  assert (c.mesh.data, c.mesh.fsdp, c.distributed) == (4, 2, True)
  assert c.rl.learning_rate == 1.0 and isinstance(c.rl.learning_rate, float)
  assert c.sft_variants.high_only.to_dict() == {"data": "high_only", "steps": 7}
  assert c.stages == ("world", "tokenizer") and c.policy.name == "x y" and c.engine.prompt_buckets == (512,)
  assert c.rl.rewards.format_penalty_per_violation == -0.25


@pytest.mark.parametrize("key,raw,message", [
    ("sft_variants.high_only.dat", "x", r"'dat'.*did you mean 'data'"),
    ("generate.samples_per_querry", "3", r"did you mean 'samples_per_query'"),
    ("mesh.fsdp", "two", r"config.mesh.fsdp: cannot read 'two' as int"),
    ("generate", "3", "is a section"),
    ("distributed", "maybe", "expected True or False"),
])
def test_bad_overrides_name_the_field(key, raw, message):
  with pytest.raises(C.ConfigError, match=message):
    C.apply_override(C.base_config(), key, raw)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.generate.update(samples_per_query=0), r"generate.samples_per_query = 0: must be > 0"),
    (lambda c: c.eval.update(max_questions=-1), r"eval.max_questions = -1: must be >= 0"),
    (lambda c: c.generate.update(chunk_queries=0), r"generate.chunk_queries = 0"),
    (lambda c: c.data.update(test_file="/no/such.jsonl"), r"data.test_file.*does not exist"),
    (lambda c: c.rl_variants.autotraj.update(stepz=3), r"'stepz'.*rl_variants.*did you mean 'steps'"),
    (lambda c: c.engine.update(prompt_buckets=(512, 256)), r"engine.prompt_buckets.*ascending"),
    (lambda c: c.engine.update(cache_multiple=0), r"engine.cache_multiple = 0: must be > 0"),
    (lambda c: c.update(stages=("sft:nope",)), r"sft:nope.*sft_variants"),
    (lambda c: c.update(workdir=""), r"workdir is not set"),
    (lambda c: c.warmstart.update(steps=3), r"warmstart.warmup_steps = 50 exceeds config.warmstart.steps = 3"),
    (lambda c: c.warmstart.update(name="repairer"), r"repairer.hf_dir is set while"),
    (lambda c: c.warmstart.update(repair_flaws=("guess", "typo")), r"warmstart.repair_flaws.*must be a tuple of"),
    (lambda c: c.tokenizer.update(copy_from="/tmp"), r"tokenizer.copy_from = '/tmp': .*no tokenizer"),
    (lambda c: c.warmstart.update(init_from=C.DEMO_POLICY), r"warmstart.init_from is set while config.model.hf_dir"),
    (lambda c: c.warmstart.update(init_from="/tmp"), r"warmstart.init_from = '/tmp': .*no HF checkpoint"),
])
def test_validate_refuses_bad_values_before_work_starts(edit, message):
  c = C.base_config()
  c.repairer.hf_dir = C.DEMO_POLICY  # any HF directory (for the conflict case)
  c.workdir = "/tmp/w"
  edit(c)
  with pytest.raises(C.ConfigError, match=message):
    C.validate(c)


def test_every_shipped_config_validates():
  import importlib.util
  for name in sorted(os.listdir(os.path.join(ROOT, "experiments", "configs"))):
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, "experiments", "configs", name))
    if not name.endswith(".py"):
      continue
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):  # shared pieces (common.py, qwen2_5_common.py)
      continue
    c = module.get_config()
    c.workdir = "/tmp/w"
    if c.model.hf_dir.startswith("<"):  # a recipe for a real checkpoint: its path is the user's to give
      with pytest.raises(C.ConfigError, match="model.hf_dir"):
        C.validate(c)
      c.model.hf_dir = C.DEMO_POLICY
    C.validate(c)


def test_describe_prints_every_field_with_its_comment():
  text = C.describe(C.base_config())
  assert "generate.samples_per_query = 4  # candidate trajectories per question" in text
  assert "mesh.tp = 1  #" in text and "distributed = False  #" in text


def test_sft_targets_end_with_one_eos():
  seg = Segment("model", [5, 6, 0], "x<eos>")
  t = Trajectory(id="a", question_id="a", question="q", prompt_ids=[1], segments=[seg], finish_reason="eos")
  assert sft_examples([t], eos_id=0, mask_tool_results=True)[0]["tokens"] == [1, 5, 6, 0]
  t.segments = [Segment("model", [5, 6], "x")]
  t.finish_reason = "answer"
  assert sft_examples([t], eos_id=0, mask_tool_results=True)[0]["tokens"] == [1, 5, 6, 0]


def test_help_lists_configs_stages_and_exits_0():
  proc = main("--help")
  assert proc.returncode == 0, proc.stderr
  for name in ("demo.py", "smoke.py", "generate", "repair", "sft", "rm", "rl", "eval", "results", "--show"):
    assert name in proc.stdout


def test_show_prints_fields_with_comments():
  proc = main("--config", SMOKE, "--show")
  assert proc.returncode == 0, proc.stderr
  assert "generate.samples_per_query = 3  # candidate trajectories per question" in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["--config", "experiments/configs/nope.py"], "does not exist"),
    (["--config", SMOKE, "--config.generate.samples_per_querry=3"], "did you mean 'samples_per_query'"),
    (["--config", SMOKE, "--config.sft_variants.high_only.dat=x"], "did you mean 'data'"),
    (["--config", SMOKE], "workdir is not set"),
    (["--config", SMOKE, "--config.generate.samples_per_query=0"], "must be > 0"),
    (["--config", SMOKE, f"--config.workdir={__file__}"], "not a directory"),
    (["--config", SMOKE, "--config.workdir=/tmp/x", "--config.data.test_file=/no/such.jsonl"], "does not exist"),
    ([], "missing --config"),
])
def test_user_mistakes_give_one_line_and_exit_2(args, message):
  proc = main(*args)
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], proc.stderr


def test_distributed_flag_is_accepted():
  c = C.base_config()
  C.apply_override(c, "distributed", "True")
  c.workdir = "/tmp/w"
  C.validate(c)
  assert c.distributed is True


def test_the_demo_runs_the_question_only_repairer_and_trains_on_it_after_autotraj_sft():
  import importlib.util
  for name in ("demo.py", "smoke.py"):
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, "experiments", "configs", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stages = list(module.get_config().stages)
    assert stages.index("datasets") < stages.index("repair:question") < stages.index("datasets:question")
    at = stages.index("eval:sft_autotraj")
    assert stages[at + 1:at + 3] == ["sft:autotraj_question", "eval:sft_autotraj_question"], name


def test_a_field_added_since_a_stage_ran_is_unchanged_at_its_default():
  """Old workdirs keep working when the schema grows: a field the done-marker's fingerprint lacks
  counts as changed only when it is set away from its default, and the message names the field."""
  from autotraj_jax.pipeline import runner
  new = {"values": {"sft": {"learning_rate": 3e-4, "pack": True}}, "files": {}}
  old = {"values": {"sft": {"learning_rate": 3e-4}}, "files": {}}
  assert runner._changes(old, new) == []
  off = {"values": {"sft": {"learning_rate": 3e-4, "pack": False}}, "files": {}}
  assert runner._changes(old, off) == ["config field sft.pack changed ('<unset>' -> False)"]
  lr = {"values": {"sft": {"learning_rate": 1e-3, "pack": True}}, "files": {}}
  assert runner._changes(old, lr) == ["config field sft.learning_rate changed (0.0003 -> 0.001)"]
