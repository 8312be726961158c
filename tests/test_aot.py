"""autotraj_jax.aot: compiles every stage on fake CPU devices and reports per-device memory."""

import os
import pathlib
import subprocess
import sys

import pytest

from autotraj_jax import aot

ROOT = pathlib.Path(__file__).resolve().parents[1]

CONFIG = '''
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.model = dict(preset="tiny", param_dtype="float32", remat="full")
  c.mesh = dict(data=2, fsdp=2, tp=2)
  c.sft = dict(batch_size=8, micro_batch_size=4, buckets=(32, 64))
  c.rm = dict(batch_size=4, micro_batch_size=0, buckets=(64,))
  c.rl = dict(prompts_per_step=2, samples_per_prompt=4, minibatches=2, micro_batch_size=0, buckets=(64,))
  c.engine = dict(batch_buckets=(4, 8), prompt_buckets=(32,), new_token_buckets=(16,))
  return c
'''


def _write_config(tmp_path) -> str:
  path = tmp_path / "cfg.py"
  path.write_text(CONFIG)
  return str(path)


def _run(args, tmp_path) -> str:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-m", "autotraj_jax.aot", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def _rows(stdout: str) -> dict[str, list[str]]:
  lines = stdout.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("stage"))
  return {line.split()[0]: line.split() for line in lines[start + 1:] if line.split()[0] in aot.STAGES}


def test_all_stages_compile_and_report_positive_figures(tmp_path):
  out = _run(["--config", _write_config(tmp_path), "--devices", "8", "--chip", "v5e", "--unit", "MiB"],
             tmp_path)
  rows = _rows(out)
  assert sorted(rows) == sorted(aot.STAGES)
  assert rows["sft"][1] == "4x2x64"  # micro-batch x micro-batches x largest bucket
  for name, cols in rows.items():
    args_gib, temp, xla_total, est_total = float(cols[2]), float(cols[5]), float(cols[7]), float(cols[8])
    assert xla_total > 0 and est_total > 0, name
    assert xla_total >= temp and xla_total >= args_gib, name
    assert cols[-1] == "ok", name  # a tiny model fits any chip
  assert "{'data': 2, 'fsdp': 2, 'tp': 2}" in out


def test_set_overrides_and_stage_subset(tmp_path):
  out = _run(["--config", _write_config(tmp_path), "--stages", "sft", "--set", "mesh.data=1",
              "--set", "mesh.fsdp=8", "--set", "mesh.tp=1", "--set", "sft.buckets=(16,)",
              "--set", "sft.micro_batch_size=0"], tmp_path)
  rows = _rows(out)
  assert list(rows) == ["sft"]
  assert rows["sft"][1] == "8x1x16"
  assert rows["sft"][-1] == "-"  # no chip named: no fit verdict


def test_fit_flag_and_gap():
  assert aot.fits(16 * aot.GIB, "v5e") is True
  assert aot.fits(16 * aot.GIB + 1, "v5e") is False
  assert aot.fits(90 * aot.GIB, "v5p") is True and aot.fits(90 * aot.GIB, "h100") is False
  assert aot.fits(1, None) is None
  with pytest.raises(ValueError, match="unknown chip"):
    aot.fits(1, "v4")
  assert aot.gap(3 * aot.GIB, 2 * aot.GIB) == "x1.50 (+1.00 GiB)"
  row = aot.StageMemory("sft", arguments=10, outputs=10, aliased=8, temporaries=5, code=1, estimate=1,
                        estimate_activations=1, compile_s=0.0)
  assert row.total == 18  # donated outputs reuse their arguments' buffers


def test_stage_shapes_and_config_errors(tmp_path):
  cfg = aot.load_config(_write_config(tmp_path), ["rl.minibatches=4", "model.preset=demo"])
  assert cfg.model.preset == "demo"
  shapes = aot.stage_shapes(cfg)
  assert (shapes["grpo"].micro_batch, shapes["grpo"].num_micro, shapes["grpo"].seq) == (2, 1, 64)
  assert shapes["engine"].cache_len == 32 + 16
  assert shapes["rm"].micro_batch == 4
  bad = aot.load_config(_write_config(tmp_path), ["sft.micro_batch_size=3"])
  with pytest.raises(ValueError, match="sft.batch_size 8 is not a multiple of micro_batch_size 3"):
    aot.stage_shapes(bad)
  with pytest.raises(KeyError, match="'model.nope'"):
    aot.field(cfg, "model.nope")
  with pytest.raises(ValueError, match="expected key=value"):
    aot.load_config(_write_config(tmp_path), ["model.preset"])
