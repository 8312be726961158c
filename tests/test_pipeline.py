"""Stage 1 end to end on the smoke config, and a SIGKILL-and-rerun that loses and duplicates nothing."""

import collections
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from autotraj_jax.tir.trajectory import read_trajectories

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = [sys.executable, os.path.join(ROOT, "experiments", "main.py"),
        "--config", os.path.join(ROOT, "experiments", "configs", "smoke.py")]


def run(workdir, *extra, timeout=600):
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  env.pop("XLA_FLAGS", None)
  return subprocess.run(MAIN + [f"--config.workdir={workdir}", *extra], env=env, capture_output=True,
                        text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  wd = tmp_path_factory.mktemp("smoke")
  proc = run(wd)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return wd


def test_smoke_stage1_writes_every_artifact(smoke_run):
  wd = smoke_run
  for name in ("candidates.jsonl", "scored.jsonl", "repairs.jsonl", "sft.jsonl", "pairs.jsonl",
               "report/stats.md", "report/stats.json", "report/score_total.png", "eval/base.json",
               "eval/base.md"):
    assert os.path.exists(wd / name), name
  cands = read_trajectories(wd / "candidates.jsonl")
  assert len(cands) == 8 * 2
  scored = read_trajectories(wd / "scored.jsonl")
  assert {t.quality for t in scored} <= {"high", "low", "wrong"} and all("total" in t.scores for t in scored)
  stats = json.loads((wd / "report" / "stats.json").read_text())
  assert stats["candidates"] == 16 and stats["high"] + stats["low"] + stats["wrong"] == 16
  metrics = json.loads((wd / "eval" / "base.json").read_text())
  assert metrics["questions"] == 8 and 0.0 <= metrics["pass@1"] <= 1.0
  done = sorted(os.listdir(wd / ".done"))
  assert done == sorted(["world", "tokenizer", "warmstart", "generate", "score", "repair", "datasets", "eval"])


def _kill_when(proc, predicate, timeout=600):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if proc.poll() is not None:
      return False
    if predicate():
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return True
    time.sleep(0.05)
  raise TimeoutError("the run never reached the kill point")


def _lines(path):
  return open(path).read().count("\n") if os.path.exists(path) else 0


def test_sigkill_during_generation_and_repair_then_rerun(smoke_run, tmp_path):
  wd = tmp_path / "killed"
  env = {**os.environ}
  env.pop("XLA_FLAGS", None)
  args = MAIN + [f"--config.workdir={wd}"]
  # Kill 1: once the first generation chunk is on disk, before generation completes.
  proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  assert _kill_when(proc, lambda: _lines(wd / "candidates.jsonl") >= 1 and not os.path.exists(wd / ".done" / "generate"))
  assert not os.path.exists(wd / ".done" / "generate")
  # Kill 2: during repair.
  proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  killed = _kill_when(proc, lambda: _lines(wd / "repairs.jsonl") >= 1 and not os.path.exists(wd / ".done" / "repair"))
  proc = run(wd)
  assert proc.returncode == 0, proc.stderr[-3000:]
  ref = {t.id: t for t in read_trajectories(smoke_run / "candidates.jsonl")}
  got = read_trajectories(wd / "candidates.jsonl")
  ids = [t.id for t in got]
  assert len(ids) == len(set(ids)) == len(ref)  # nothing duplicated, nothing lost
  assert collections.Counter(t.question_id for t in got) == collections.Counter(t.question_id for t in ref.values())
  # Per-request seeds make the resumed candidates identical to an uninterrupted run's.
  for t in got:
    assert t.response_ids == ref[t.id].response_ids
  repairs = [json.loads(l) for l in open(wd / "repairs.jsonl")]
  ref_repairs = [json.loads(l) for l in open(smoke_run / "repairs.jsonl")]
  assert sorted(r["original_id"] for r in repairs) == sorted(r["original_id"] for r in ref_repairs)
  assert len({r["original_id"] for r in repairs}) == len(repairs)
  assert killed or os.path.exists(wd / ".done" / "repair")


@pytest.mark.sglang
def test_stage1_against_sglang_jax_server(smoke_run, tmp_path):
  """The same stage-1 path with `backend=sglang`: the smoke policy exported and served."""
  import shutil

  import sglang_server
  if sglang_server.find_python312() is None:
    pytest.skip("sglang-jax needs Python 3.12 and none was found (set AUTOTRAJ_PYTHON312)")
  hf_dir = tmp_path / "hf"
  conv = subprocess.run([sys.executable, "-m", "autotraj_jax.convert", "--from-checkpoint",
                         str(smoke_run / "policy" / "checkpoints"), "--to-hf", str(hf_dir),
                         "--tokenizer", str(smoke_run / "tokenizer")], capture_output=True, text=True,
                        cwd=ROOT)
  assert conv.returncode == 0, conv.stderr[-2000:]
  wd = tmp_path / "served"
  wd.mkdir()
  for name in ("world", "tokenizer"):  # inputs of stage 1, reused from the embedded run
    shutil.copytree(smoke_run / name, wd / name)
  with sglang_server.running_server(hf_dir) as url:
    proc = run(wd, "--config.backend=sglang", f"--config.sglang.url={url}",
               "--config.stages=('generate','score','repair','datasets')")
  assert proc.returncode == 0, proc.stderr[-3000:]
  cands = read_trajectories(wd / "candidates.jsonl")
  assert len(cands) == 16 and all(len(t.segments) >= 1 for t in cands)
  for t in cands:
    for seg in t.segments:
      if seg.kind == "model":
        assert seg.logprobs is not None and len(seg.logprobs) == len(seg.token_ids)
  assert os.path.exists(wd / "report" / "stats.json")
