"""Several hosts, one run: what every process reads and what only process 0 writes.

In-process tests fake a second process (`is_primary` False). The 2-process tests run
jax.distributed on localhost (2 fake CPU devices each) against 1 process on 4 devices: the JAX
engine decodes the same tokens on a mesh spread over both processes, `to_host` and `from_primary`
give every process the same values, and a server backend is called by process 0 alone. The slow
test runs the smoke pipeline (stages 1 and 2) in 2 processes over one work directory.

The file is also the worker: `python tests/test_multihost.py SPEC_JSON`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_POLICY = os.path.join(ROOT, "assets", "demo_policy")
PROMPTS = ("What is 17 times 23?", "Who founded the city of Brakor?", "Compute 2 to the power 10.")
TIMEOUT_S = 300


# ---- the worker --------------------------------------------------------------------------------

class CountingServer:
  """A stand-in for an SGLang server: answers with this process's id and counts its calls."""

  def __init__(self, pid: int):
    self.pid, self.calls = pid, 0

  def generate(self, requests):
    from autotraj_jax.engine.backend import Completion
    self.calls += 1
    return [Completion(token_ids=[self.pid], logprobs=None, text=f"from {self.pid}", finish_reason="eos")
            for _ in requests]


def worker(spec: dict[str, Any]) -> None:
  """Runs the checks below in this process and writes what it saw to `<out>.<pid>.json`."""
  from autotraj_jax import distributed
  if os.environ.get("JAX_NUM_PROCESSES"):
    distributed.initialize()
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from autotraj_jax import sharding as shd
  from autotraj_jax.engine.backend import GenerationRequest, SamplingParams, generate_on_all_hosts
  from autotraj_jax.engine.jax_engine import EngineConfig, JaxEngine
  from autotraj_jax.models import init_model
  from autotraj_jax.models.hf import load_hf
  from autotraj_jax.tokenizer import load_tokenizer

  assert jax.device_count() == 4, jax.devices()
  pid = jax.process_index()
  mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=4, tp=1))
  seen: dict[str, Any] = {"primary": distributed.is_primary()}

  rows = jax.device_put(np.arange(8 * 3).reshape(8, 3), NamedSharding(mesh, P(shd.BATCH_AXES, None)))
  seen["to_host"] = shd.to_host({"rows": rows})["rows"].tolist()
  seen["from_primary"] = distributed.from_primary({"pid": pid, "text": "é" * 1000})

  server = CountingServer(pid)
  req = GenerationRequest((1, 2, 3), SamplingParams(temperature=0.0, max_new_tokens=4))
  seen["server_text"] = [c.text for c in generate_on_all_hosts(server, [req, req])]
  seen["server_calls"] = server.calls

  tokenizer = load_tokenizer(DEMO_POLICY)
  cfg, _, params = load_hf(DEMO_POLICY, mesh=mesh)
  graphdef, _ = init_model(cfg)
  engine = JaxEngine(graphdef, params, cfg, tokenizer, mesh=mesh,
                     config=EngineConfig(batch_buckets=(4, 8), prompt_buckets=(32,), new_token_buckets=(32,),
                                         chunk_steps=8, prefix_cache_rows=8, prefix_cache_len=64,
                                         prefix_min_match=4))
  greedy = SamplingParams(temperature=0.0, max_new_tokens=24)
  # Two samples per prompt, as stage 1 asks: each prompt is prefilled once and expanded to its rows.
  reqs = [GenerationRequest(tuple(tokenizer.encode(p)), greedy, stop=("</code>", "\n\n")) for p in PROMPTS
          for _ in range(2)]
  outs = engine.generate(reqs)
  again = engine.generate([GenerationRequest(r.prompt_ids + tuple(o.token_ids), greedy, stop=r.stop)
                           for r, o in zip(reqs, outs)])  # the next turn: read from the sharded prefix cache
  seen["engine"] = [[o.token_ids, o.finish_reason] for o in outs + again]
  seen["engine_reused_prefix"] = engine.prefill_ratio < 1.0
  with open(f"{spec['out']}.{pid}.json", "w") as f:
    json.dump(seen, f)


# ---- the launcher ------------------------------------------------------------------------------

def _free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(processes: int, devices: int) -> dict[str, str]:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(k, None)
  if processes > 1:
    env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}", JAX_NUM_PROCESSES=str(processes))
  return env


def _run(argv: list[str], *, processes: int, devices: int, logdir: str, tag: str, timeout: float) -> None:
  """Runs `argv` as `processes` processes of one jax.distributed run; fails with their stderr."""
  env = _env(processes, devices)
  procs = []
  for pid in range(processes):
    err = open(os.path.join(logdir, f"{tag}.{pid}.err"), "w")
    procs.append((subprocess.Popen(argv, cwd=ROOT, env={**env, "JAX_PROCESS_ID": str(pid)},
                                   stdout=subprocess.DEVNULL, stderr=err), err))
  deadline = time.monotonic() + timeout
  for p, _ in procs:
    try:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      pass
  tails = []
  for p, err in procs:
    if p.poll() is None:
      p.kill()
      p.wait()
    err.close()
    if p.returncode != 0:
      with open(err.name) as f:
        tails.append(f"--- {os.path.basename(err.name)} (exit {p.returncode}):\n" + f.read()[-3000:])
  if tails:
    pytest.fail("\n".join(tails))


@pytest.fixture(scope="module")
def seen(tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
  """What each process of the 2-process run saw, and what the 1-process reference saw."""
  root = str(tmp_path_factory.mktemp("multihost"))
  out = {}
  for tag, processes, devices in (("two", 2, 2), ("one", 1, 4)):
    spec = json.dumps({"out": os.path.join(root, tag)})
    _run([sys.executable, os.path.abspath(__file__), spec], processes=processes, devices=devices, logdir=root,
         tag=tag, timeout=TIMEOUT_S)
    out[tag] = []
    for pid in range(processes):
      with open(os.path.join(root, f"{tag}.{pid}.json")) as f:
        out[tag].append(json.load(f))
  return out


def test_every_process_reads_the_whole_array(seen):
  whole = np.arange(8 * 3).reshape(8, 3).tolist()
  assert [s["to_host"] for s in seen["two"]] == [whole, whole]


def test_every_process_gets_process_0s_value(seen):
  assert [s["from_primary"] for s in seen["two"]] == [{"pid": 0, "text": "é" * 1000}] * 2
  assert [s["primary"] for s in seen["two"]] == [True, False]


def test_a_server_is_called_by_process_0_alone(seen):
  assert [s["server_calls"] for s in seen["two"]] == [1, 0]
  assert [s["server_text"] for s in seen["two"]] == [["from 0", "from 0"]] * 2


def test_the_engine_decodes_on_a_mesh_over_two_processes_as_on_one(seen):
  one, (first, second) = seen["one"][0], seen["two"]
  assert first["engine"] == second["engine"] == one["engine"]
  assert any(tokens for tokens, _ in one["engine"])
  assert first["engine_reused_prefix"] and second["engine_reused_prefix"]


# ---- process 0 writes, the others only compute --------------------------------------------------

def test_writers_of_other_processes_touch_no_file(tmp_path, monkeypatch):
  from autotraj_jax.tir import records
  monkeypatch.setattr(records, "is_primary", lambda: False)
  with records.JsonlAppender(tmp_path / "a.jsonl") as w:
    w.write({"id": 1})
  assert records.write_jsonl(tmp_path / "b.jsonl", [{"id": 1}, {"id": 2}]) == 2
  records.write_json(tmp_path / "c.json", {"x": 1})
  records.write_text(tmp_path / "d.md", "| a |\n")
  assert list(tmp_path.iterdir()) == []
  monkeypatch.setattr(records, "is_primary", lambda: True)
  records.write_json(tmp_path / "c.json", {"x": 1})
  assert [p.name for p in tmp_path.iterdir()] == ["c.json"]


def test_host_only_stages_run_on_process_0_alone(tmp_path, monkeypatch):
  import ml_collections

  from autotraj_jax.pipeline import runner
  ran = []
  stages = {"summary": runner.Stage(lambda c, wd: ran.append("summary"), host_only=True),
            "train": runner.Stage(lambda c, wd: ran.append("train"))}
  config = ml_collections.ConfigDict({"workdir": str(tmp_path), "stages": ("train", "summary"), "redo": ()})
  monkeypatch.setattr(runner, "is_primary", lambda: False)
  monkeypatch.setattr("autotraj_jax.tir.records.is_primary", lambda: False)
  runner.run_stages(config, stages)
  assert ran == ["train"]
  assert not os.path.exists(os.path.join(tmp_path, "config.json"))  # nor markers: process 0 writes them
  monkeypatch.setattr(runner, "is_primary", lambda: True)
  monkeypatch.setattr("autotraj_jax.tir.records.is_primary", lambda: True)
  runner.run_stages(config, stages)
  assert ran == ["train", "train", "summary"]


# ---- the pipeline -------------------------------------------------------------------------------

@pytest.mark.slow
def test_smoke_pipeline_in_two_processes_writes_each_record_once(tmp_path):
  from autotraj_jax.tir.trajectory import read_trajectories
  wd = tmp_path / "run"
  stages = ("world", "tokenizer", "warmstart", "generate", "score", "repair", "datasets", "eval:base",
            "sft:high_only", "eval:sft_high_only", "sft:autotraj", "rm", "rl:autotraj", "eval:rl_autotraj",
            "results")
  argv = [sys.executable, os.path.join(ROOT, "experiments", "main.py"), "--config",
          os.path.join(ROOT, "experiments", "configs", "smoke.py"), f"--config.workdir={wd}",
          "--config.distributed=True", f"--config.stages={stages!r}", "--config.repair.max_originals=12"]
  _run(argv, processes=2, devices=2, logdir=str(tmp_path), tag="smoke", timeout=1200)
  cands = read_trajectories(wd / "candidates.jsonl")
  assert len(cands) == len({t.id for t in cands}) == 32 * 3
  repairs = [json.loads(line) for line in open(wd / "repairs.jsonl")]
  assert len(repairs) == len({r["original_id"] for r in repairs}) == 12
  with open(wd / "rm" / "eval.json") as f:
    assert json.load(f)["trained"]
  assert (wd / "rm" / "hf" / "model.safetensors").is_file()  # exported from params sharded over both hosts
  with open(wd / "results.json") as f:
    rows = json.load(f)["rows"]
  assert [r["name"] for r in rows if r.get("accuracy") is not None] == ["base", "sft_high_only", "rl_autotraj"]
  for name in ("base", "sft_high_only", "rl_autotraj"):
    with open(wd / "eval" / f"{name}.json") as f:
      assert json.load(f)["questions"] == 8
  bars = []
  for pid in (0, 1):
    with open(tmp_path / f"smoke.{pid}.err") as f:
      bars.append("%|" in f.read())  # a tqdm bar's "NN%|###" (tqdm writes to stderr)
  assert bars == [True, False]  # progress bars: process 0's only


if __name__ == "__main__":
  worker(json.loads(sys.argv[1]))
