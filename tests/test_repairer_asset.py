"""The demo repairer's path: a config trains it under its own name with the policy's tokenizer and
exports it, and a pipeline imports it as the repairer, refusing one with another tokenizer."""

import filecmp
import json
import os
import subprocess
import sys

import pytest

from autotraj_jax.pipeline.config import DEMO_POLICY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = [sys.executable, os.path.join(ROOT, "experiments", "main.py")]
CONFIGS = os.path.join(ROOT, "experiments", "configs")
TINY_WORLD = ["--config.world.train=120", "--config.world.validation=4", "--config.world.test=4",
              "--config.world.num_entities=200", "--config.generate.num_queries=8"]


def main(*args, timeout=300):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)  # the run sees this machine's one CPU device, as a user's does
  return subprocess.run(MAIN + list(args), capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_repairer_config_trains_the_repairer_on_the_policy_tokenizer_and_exports_it(tmp_path):
  wd, out = tmp_path / "wd", tmp_path / "export"
  proc = main("--config", os.path.join(CONFIGS, "demo_repairer.py"), f"--config.workdir={wd}",
              f"--config.export_dir={out}", *TINY_WORLD, "--config.warmstart.num_tasks=16",
              "--config.warmstart.steps=2", "--config.warmstart.warmup_steps=1", "--config.warmstart.log_every=1",
              "--config.warmstart.buckets=(1024,)", "--config.eval.max_questions=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not (wd / "policy").exists()  # trained under its own name
  first = json.loads((wd / "repairer" / "logs" / "metrics.jsonl").read_text().splitlines()[0])
  assert first["loss"] < 3.0  # fine-tuned from the policy's weights (from random ones: ~ln 4096 = 8.3)
  counts = json.loads((wd / "repairer" / "warmstart_data.json").read_text())
  assert counts["repair"] > 0 and counts["clean"] > 0 and sum(counts[f] for f in ("guess", "hedge", "copy_error")) == 0
  assert (wd / "eval" / "repairer.json").exists()
  assert filecmp.cmp(out / "tokenizer.json", os.path.join(DEMO_POLICY, "tokenizer.json"), shallow=False)
  assert json.loads((out / "provenance.json").read_text())["warmstart"]["name"] == "repairer"


def test_repairer_hf_dir_is_imported_next_to_the_policy(tmp_path):
  wd = tmp_path / "wd"
  proc = main("--config", os.path.join(CONFIGS, "smoke.py"), f"--config.workdir={wd}",
              "--config.stages=world,tokenizer,warmstart", f"--config.repairer.hf_dir={DEMO_POLICY}", *TINY_WORLD)
  assert proc.returncode == 0, proc.stderr[-3000:]
  from autotraj_jax.checkpoint import load_model
  cfgs = {name: load_model(wd / name / "checkpoints")[0] for name in ("policy", "repairer")}
  assert cfgs["repairer"].hidden_size == cfgs["policy"].hidden_size  # both the shipped demo policy here


@pytest.mark.parametrize("field", ["repairer.hf_dir", "warmstart.init_from"])
def test_a_checkpoint_with_another_tokenizer_is_refused_before_training(tmp_path, field):
  wd = tmp_path / "wd"
  proc = main("--config", os.path.join(CONFIGS, "smoke.py"), f"--config.workdir={wd}",
              "--config.stages=world,tokenizer,warmstart", "--config.model.hf_dir=",
              "--config.tokenizer.vocab_size=600", f"--config.{field}={DEMO_POLICY}", *TINY_WORLD)
  assert proc.returncode != 0
  assert "tokenizer.json differs from the policy's" in proc.stderr
  assert not (wd / "policy" / "checkpoints").exists()  # refused before any training
