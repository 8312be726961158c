"""Multi-host training on one machine: SFT in 2 processes on localhost (jax.distributed on the CPU
backend, 2 fake devices each) must make the run 1 process on 4 fake devices makes: the same losses,
the same final params, with plain, length-grouped and packed batches, gradient accumulation and a resume
from a checkpoint both processes wrote (by 2 new processes, and by 1). Metrics and the progress
bar come from process 0 only.

The file is also the worker: `python tests/test_multiprocess.py SPEC_JSON` runs the jobs of SPEC in
one process (joining a multi-process run when JAX_NUM_PROCESSES is set).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUP_TIMEOUT_S = 240  # per group of processes; a hang fails the test instead of blocking the suite
STEPS = 4
CUT = 2  # the grouped 2-process run stops here and resumes in new processes


# ---- the worker --------------------------------------------------------------------------------

def make_examples(n: int, vocab: int, seed: int = 0) -> list[dict[str, list[int]]]:
  """Mostly short sequences (4..16 tokens) and a few long ones (17..30): batches of both buckets
  (16, 32), and batches where one host's rows are all short and the other's are not."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    length = int(rng.integers(17, 31) if rng.random() < 0.2 else rng.integers(4, 17))
    out.append({"tokens": rng.integers(1, vocab, length).tolist(),
                "loss_mask": [0] * 2 + rng.integers(0, 2, length - 2).tolist()})
  return out


def worker(spec: dict[str, Any]) -> None:
  """Runs each job's SFT to its step count; process 0 saves the final params (gathered) as .npz,
  every process its host rows as JSON."""
  from autotraj_jax import distributed
  if os.environ.get("JAX_NUM_PROCESSES"):
    distributed.initialize()
  import jax
  # Jobs and resumed processes reuse the compiled steps (the same shapes): most of the test's time.
  jax.config.update("jax_compilation_cache_dir", spec["cache"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

  from autotraj_jax import sharding as shd
  from autotraj_jax.models import get_preset, init_model
  from autotraj_jax.training.optimizer import OptimizerConfig
  from autotraj_jax.training.sft import make_sft_loss
  from autotraj_jax.training.trainer import TrainConfig, Trainer

  assert jax.device_count() == 4, jax.devices()
  cfg = get_preset("tiny", num_layers=1)
  data = make_examples(40, cfg.vocab_size)
  mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=4, tp=1))
  pid = jax.process_index()
  for job in spec["jobs"]:
    graphdef, params = init_model(cfg, seed=0)
    tcfg = TrainConfig(steps=job["steps"], batch_size=8, micro_batch_size=4, buckets=(16, 32), log_every=1,
                       checkpoint_every=CUT, seed=7, group_by_length=job["grouped"], pack=job.get("pack", False),
                       optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=2, total_steps=8))
    trainer = Trainer(tcfg, loss_fn=make_sft_loss(graphdef), params=params, mesh=mesh, workdir=job["workdir"],
                      progress=True, desc=f"bar-{job['name']}")
    state = trainer.run(data)
    trainer.close()
    gathered = jax.jit(lambda p: p, out_shardings=shd.replicated(mesh))(state.params)
    with open(f"{job['out']}.rows{pid}.json", "w") as f:
      json.dump(trainer.host_rows(), f)
    if pid == 0:
      np.savez(job["out"] + ".npz", *[np.asarray(x) for x in jax.tree.leaves(gathered)])


# ---- the launcher ------------------------------------------------------------------------------

def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


Proc = tuple[subprocess.Popen, str]  # a worker and the file of its stderr


def launch(spec: dict[str, Any], *, processes: int, devices_per_process: int, logdir: str, tag: str) -> list[Proc]:
  """Starts the worker `processes` times; stdout and stderr (progress bars) go to `<logdir>/<tag>.<pid>.*`."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
         # Unoptimised CPU code compiles in half the time; both runs use it, so they still compare.
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process} "
                      "--xla_backend_optimization_level=0"}
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(k, None)
  if processes > 1:
    env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{free_port()}", JAX_NUM_PROCESSES=str(processes))
  procs = []
  for pid in range(processes):
    err = os.path.join(logdir, f"{tag}.{pid}.err")
    with open(err, "w") as e, open(os.path.join(logdir, f"{tag}.{pid}.out"), "w") as o:
      p = subprocess.Popen([sys.executable, os.path.abspath(__file__), json.dumps(spec)], cwd=ROOT,
                           env={**env, "JAX_PROCESS_ID": str(pid)}, stdout=o, stderr=e)
    procs.append((p, err))
  return procs


def finish(procs: list[Proc], deadline: float) -> None:
  """Waits for every process until `deadline`; kills them all and fails (with their stderr) otherwise."""
  try:
    for p, _ in procs:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    pass
  for p, _ in procs:
    if p.poll() is None:
      p.kill()
      p.wait()
  tails = []
  for p, err in procs:
    if p.returncode != 0:
      with open(err) as f:
        tails.append(f"--- {os.path.basename(err)} (exit {p.returncode}):\n" + f.read()[-3000:])
  if tails:
    pytest.fail("\n".join(tails))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Any]:
  """1 process x 4 devices (reference) and 2 processes x 2 devices: plain for STEPS steps, grouped
  for CUT steps and then resumed to STEPS by new processes. Returns paths and timings."""
  tmp = tmp_path_factory.mktemp("multiprocess")
  root = str(tmp)

  def job(kind: str, name: str, steps: int) -> dict[str, Any]:
    return {"name": f"{kind}-{name}", "grouped": name != "plain", "pack": name == "packed", "steps": steps,
            "workdir": os.path.join(root, kind, name), "out": os.path.join(root, f"{kind}-{name}")}

  t0 = time.monotonic()
  cache = os.path.join(root, "xla_cache")
  ref = {"cache": cache, "jobs": [job("ref", name, STEPS) for name in ("plain", "grouped", "packed")]}
  first = {"cache": cache, "jobs": [job("mp", "plain", STEPS), job("mp", "grouped", CUT), job("mp", "packed", STEPS)]}
  deadline = time.monotonic() + GROUP_TIMEOUT_S
  ref_procs = launch(ref, processes=1, devices_per_process=4, logdir=root, tag="ref")
  mp_procs = launch(first, processes=2, devices_per_process=2, logdir=root, tag="mp1")
  finish(mp_procs, deadline)
  cut_steps = sorted(int(d) for d in os.listdir(os.path.join(root, "mp", "grouped", "checkpoints")) if d.isdigit())
  # The same checkpoint resumed by 2 new processes, and (a copy) by 1 process on 4 devices.
  shutil.copytree(os.path.join(root, "mp", "grouped"), os.path.join(root, "elastic", "grouped"))
  resumed = {"cache": cache, "jobs": [job("mp", "grouped", STEPS)]}
  elastic = {"cache": cache, "jobs": [job("elastic", "grouped", STEPS)]}
  mp2 = launch(resumed, processes=2, devices_per_process=2, logdir=root, tag="mp2")
  one = launch(elastic, processes=1, devices_per_process=4, logdir=root, tag="elastic")
  finish(mp2 + one + ref_procs, time.monotonic() + GROUP_TIMEOUT_S)
  return {"root": root, "cut_steps": cut_steps, "seconds": time.monotonic() - t0}


def raw_records(workdir: str) -> list[dict[str, Any]]:
  """Every line of the run's metrics.jsonl, duplicates included."""
  with open(os.path.join(workdir, "logs", "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def tensorboard_steps(logdir: str, tag: str) -> list[int]:
  """Steps of every `tag` scalar in the event files of `logdir` (TFRecord framing, read by hand)."""
  from tensorboardX.proto import event_pb2
  steps = []
  for name in sorted(os.listdir(logdir)):
    if not name.startswith("events.out.tfevents"):
      continue
    with open(os.path.join(logdir, name), "rb") as f:
      blob = f.read()
    pos = 0
    while pos + 12 <= len(blob):
      (n,) = struct.unpack("<Q", blob[pos:pos + 8])
      event = event_pb2.Event.FromString(blob[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      steps += [event.step for v in event.summary.value if v.tag == tag]
  return steps


def load_params(path: str) -> list[np.ndarray]:
  with np.load(path) as z:
    return [z[f"arr_{i}"] for i in range(len(z.files))]


# ---- the tests ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["plain", "grouped", "packed"])
def test_two_processes_train_like_one(runs, name):
  root = runs["root"]
  ref, mp = raw_records(os.path.join(root, "ref", name)), raw_records(os.path.join(root, "mp", name))
  assert [r["step"] for r in ref] == list(range(1, STEPS + 1))
  # Each step once: process 1 neither appended its own lines nor truncated process 0's on resume.
  assert [r["step"] for r in mp] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([r["loss"] for r in mp], [r["loss"] for r in ref], rtol=1e-6, atol=0)
  np.testing.assert_allclose([r["count"] for r in mp], [r["count"] for r in ref], rtol=0, atol=0)
  assert len({r["loss"] for r in ref}) == STEPS  # the steps really differ
  a, b = load_params(os.path.join(root, f"ref-{name}.npz")), load_params(os.path.join(root, f"mp-{name}.npz"))
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_of_2_processes_resumes_on_1(runs):
  root = runs["root"]
  ref = raw_records(os.path.join(root, "ref", "grouped"))
  elastic = raw_records(os.path.join(root, "elastic", "grouped"))
  assert [r["step"] for r in elastic] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([r["loss"] for r in elastic], [r["loss"] for r in ref], rtol=1e-6, atol=0)
  a, b = load_params(os.path.join(root, "ref-grouped.npz")), load_params(os.path.join(root, "elastic-grouped.npz"))
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)


def test_each_process_loads_only_the_rows_its_devices_hold(runs):
  root = runs["root"]
  rows = [json.load(open(os.path.join(root, f"mp-plain.rows{p}.json"))) for p in (0, 1)]
  # batch 8 in 2 micro-batches of 4 on fsdp=4: process 0 holds devices 0-1, process 1 devices 2-3.
  assert rows == [[0, 1, 4, 5], [2, 3, 6, 7]]
  assert json.load(open(os.path.join(root, "ref-plain.rows0.json"))) == list(range(8))


def test_resume_uses_the_checkpoint_both_processes_wrote(runs):
  root = runs["root"]
  assert runs["cut_steps"] == [CUT]
  ckpt = os.path.join(root, "mp", "grouped", "checkpoints")
  final = os.path.join(ckpt, str(STEPS))
  files = sorted(f for f in os.listdir(os.path.join(final, "data")) if f.startswith("process_"))
  assert files == ["process_0-of-2.json", "process_1-of-2.json"]
  states = [json.load(open(os.path.join(final, "data", f"process_{p}-of-2.json"))) for p in (0, 1)]
  assert states[0] == states[1]  # both hosts stand at the same global batch
  # The resumed processes started at CUT: the progress bar of process 0 shows it.
  with open(os.path.join(root, "mp2.0.err")) as f:
    assert f"{CUT}/{STEPS}" in f.read()


def test_metrics_and_progress_bars_come_from_process_0_only(runs):
  root = runs["root"]
  assert sorted(tensorboard_steps(os.path.join(root, "mp", "plain", "logs"), "loss")) == list(range(1, STEPS + 1))
  for tag, name in (("mp1", "mp-plain"), ("mp2", "mp-grouped")):
    with open(os.path.join(root, f"{tag}.0.err")) as f:
      assert f"bar-{name}" in f.read()
    with open(os.path.join(root, f"{tag}.1.err")) as f:
      assert "bar-" not in f.read()


def test_runtime_is_bounded(runs):
  assert runs["seconds"] < 2 * GROUP_TIMEOUT_S


# ---- in-process pieces -------------------------------------------------------------------------

@pytest.mark.parametrize("grouped", [False, True])
def test_the_data_needs_hosts_to_agree_on_a_bucket(grouped):
  """The runs above check bucket agreement only if, within their steps, some global batch is padded
  to 32 while one host's own rows would have fitted 16 (and each host pads to the global bucket)."""
  from autotraj_jax.training import data as data_lib
  data = make_examples(40, 512)
  kw = {"batch_size": 8, "buckets": (16, 32), "seed": 7, "group_by_length": grouped}
  whole = iter(data_lib.batch_dataset(data, **kw))
  hosts = [iter(data_lib.batch_dataset(data, rows=r, **kw)) for r in ([0, 1, 4, 5], [2, 3, 6, 7])]
  lengths, own = [], []
  for _ in range(STEPS):
    lengths.append(next(whole)["tokens"].shape[1])
    for it in hosts:
      batch = next(it)
      assert batch["tokens"].shape[1] == lengths[-1]
      own.append(data_lib.pick_bucket(int(batch["valid"].sum(1).max()), (16, 32)))
  assert set(lengths) == {16, 32}  # both compiled step shapes are used
  if not grouped:  # (grouped batches are alike in length: there the hosts agree anyway)
    assert any(o < lengths[k // 2] for k, o in enumerate(own))


def test_init_args_from_the_environment():
  from autotraj_jax.distributed import init_args
  assert init_args({}) == {}  # TPU pods, Slurm, ...: JAX detects the cluster
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  assert init_args(env) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
  assert init_args({**env, "JAX_LOCAL_DEVICE_IDS": "0,1"})["local_device_ids"] == [0, 1]
  with pytest.raises(ValueError, match="must be set together"):
    init_args({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"})
  with pytest.raises(ValueError, match=r"JAX_PROCESS_ID=4 is not in \[0, JAX_NUM_PROCESSES=4\)"):
    init_args({**env, "JAX_PROCESS_ID": "4"})
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES must be an integer"):
    init_args({**env, "JAX_NUM_PROCESSES": "two"})


def test_host_rows_of_a_layout():
  from autotraj_jax.training.trainer import host_rows

  class Layout:  # what one process of a 4-process run sees: it holds micro-batch columns 2 and 6..7 of 8
    def addressable_devices_indices_map(self, shape):
      assert shape == (2, 8)
      return {"d0": (slice(None), slice(2, 3)), "d1": (slice(None), slice(6, 8)), "d2": (slice(None), slice(2, 3))}

  assert host_rows(Layout(), 16, 2) == [2, 6, 7, 10, 14, 15]


def test_a_disabled_metric_writer_touches_no_file(tmp_path):
  from autotraj_jax.metrics import MetricWriter, read_metrics
  w = MetricWriter(tmp_path / "logs", start_step=0)  # one process: process 0, so enabled
  w.write(1, {"loss": 1.0})
  w.close()
  before = sorted(os.listdir(tmp_path / "logs"))
  off = MetricWriter(tmp_path / "logs", start_step=0, enabled=False)  # would truncate step 1
  off.write(2, {"loss": 2.0})
  off.flush()
  off.close()
  assert sorted(os.listdir(tmp_path / "logs")) == before
  assert [r["step"] for r in read_metrics(tmp_path / "logs")] == [1]
  MetricWriter(tmp_path / "other", enabled=False).close()
  assert not (tmp_path / "other").exists()


if __name__ == "__main__":
  worker(json.loads(sys.argv[1]))
