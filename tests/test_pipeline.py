"""The smoke config end to end (stages 1 and 2), and SIGKILL-and-rerun tests: stage 1 loses and
duplicates nothing; trainers resume exactly."""

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


def test_smoke_run_writes_every_artifact(smoke_run):
  wd = smoke_run
  for name in ("candidates.jsonl", "scored.jsonl", "repairs.jsonl", "sft.jsonl", "pairs.jsonl",
               "report/stats.md", "report/stats.json", "report/scores.png", "eval/base.json",
               "eval/base.md"):
    assert os.path.exists(wd / name), name
  config = json.loads((wd / "config.json").read_text())
  n_cands = config["generate"]["num_queries"] * config["generate"]["samples_per_query"]
  cands = read_trajectories(wd / "candidates.jsonl")
  assert len(cands) == n_cands
  scored = read_trajectories(wd / "scored.jsonl")
  assert {t.quality for t in scored} <= {"high", "low", "wrong"} and all("total" in t.scores for t in scored)
  stats = json.loads((wd / "report" / "stats.json").read_text())
  assert stats["candidates"] == n_cands and stats["high"] + stats["low"] + stats["wrong"] == n_cands
  metrics = json.loads((wd / "eval" / "base.json").read_text())
  assert metrics["questions"] == config["eval"]["max_questions"] and 0.0 <= metrics["pass@1"] <= 1.0
  stages = json.loads((wd / "config.json").read_text())["stages"]
  assert sorted(os.listdir(wd / ".done")) == sorted(stages)
  results = json.loads((wd / "results.json").read_text())
  rows = results["rows"]
  assert [r["name"] for r in rows] == ["base", "sft_high_only", "sft_autotraj_question", "sft_autotraj",
                                       "rl_outcome_format", "rl_autotraj"]
  for r in rows:
    assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["hq_at_1"] <= r["accuracy"], r
  adjacent = {(a["name"], b["name"]) for a, b in zip(rows, rows[1:])}
  got = {(c["a"], c["b"], c["metric"]) for c in results["comparisons"]}
  assert {(a, b, m) for a, b in adjacent for m in ("accuracy", "hq_at_1")} <= got
  assert all((a, b) in adjacent and (m in ("accuracy", "hq_at_1") or m.startswith("accuracy@level"))
             for a, b, m in got)
  assert any(m.startswith("accuracy@level") for _, _, m in got)  # task-world questions carry their level
  for c in results["comparisons"]:
    assert c["ci95"][0] <= c["diff"] <= c["ci95"][1]
  rm = json.loads((wd / "rm" / "eval.json").read_text())
  # The smoke config is sized so that every model really trains: no row may be missing or skipped.
  for r in rows:
    assert not r["missing"], r
  assert rm["trained"] and rm["train_pairs"] >= config["rm"]["batch_size"], rm
  assert (wd / "rm" / "hf" / "config.json").exists()
  for model in ("sft_high_only", "sft_autotraj_question", "sft_autotraj", "rm", "rl_outcome_format", "rl_autotraj"):
    assert not (wd / model / "skipped.json").exists(), model
  rl_logs = [json.loads(line) for line in open(wd / "rl_autotraj" / "logs" / "metrics.jsonl")]
  assert rl_logs and all("reward/rm" in r for r in rl_logs)  # the RM really scored the rollouts
  assert os.path.exists(wd / "results.md")


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


@pytest.mark.slow
def test_sigkill_during_generation_and_repair_then_rerun(smoke_run, tmp_path):
  wd = tmp_path / "killed"
  env = {**os.environ}
  env.pop("XLA_FLAGS", None)
  stage1 = "--config.stages=('world','tokenizer','warmstart','generate','score','repair','datasets')"
  args = MAIN + [f"--config.workdir={wd}", stage1]
  # Kill 1: once the first generation chunk is on disk, before generation completes.
  proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  assert _kill_when(proc, lambda: _lines(wd / "candidates.jsonl") >= 1
                    and not os.path.exists(wd / ".done" / "generate"))
  assert not os.path.exists(wd / ".done" / "generate")
  # Kill 2: during repair, after its first chunk of originals is on disk.
  proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  assert _kill_when(proc, lambda: _lines(wd / "repairs.jsonl") >= 1 and not os.path.exists(wd / ".done" / "repair"))
  assert 0 < _lines(wd / "repairs.jsonl") < _lines(smoke_run / "repairs.jsonl")  # killed mid-stage
  proc = run(wd, stage1)
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
    proc = run(wd, "--config.backend=sglang", f"--config.sglang.urls={url}",
               "--config.stages=('generate','score','repair','datasets')", "--config.generate.num_queries=8",
               "--config.generate.samples_per_query=2", "--config.repair.max_originals=8")
  assert proc.returncode == 0, proc.stderr[-3000:]
  cands = read_trajectories(wd / "candidates.jsonl")
  assert len(cands) == 16
  assert all(len(t.segments) >= 1 for t in cands)
  for t in cands:
    for seg in t.segments:
      if seg.kind == "model":
        assert seg.logprobs is not None and len(seg.logprobs) == len(seg.token_ids)
  assert os.path.exists(wd / "report" / "stats.json")


def _restart_stage(smoke_run, tmp_path, name):
  """A copy of the finished smoke run with stage `name` (and everything after it) undone."""
  import shutil
  wd = tmp_path / "rerun"
  shutil.copytree(smoke_run, wd)
  stages = json.loads((wd / "config.json").read_text())["stages"]
  for later in stages[stages.index(name):]:
    (wd / ".done" / later).unlink(missing_ok=True)
  kind, _, variant = name.partition(":")
  shutil.rmtree(wd / f"{kind}_{variant}")
  return wd


def _metrics(path):
  rows = [json.loads(l) for l in open(path)]
  return [{k: v for k, v in r.items() if k != "time" and not k.startswith("time/")} for r in rows]


@pytest.mark.parametrize("stage,kill_at", [("sft:autotraj", 2), ("rl:outcome_format", 1)])
def test_sigkill_mid_training_then_rerun_matches_an_uninterrupted_run(smoke_run, tmp_path, stage, kill_at):
  """Trainers resume exactly: params, optimizer, RNG, step and data position all come back."""
  wd = _restart_stage(smoke_run, tmp_path, stage)
  kind, _, variant = stage.partition(":")
  out = wd / f"{kind}_{variant}"
  env = {**os.environ}
  env.pop("XLA_FLAGS", None)
  args = MAIN + [f"--config.workdir={wd}", f"--config.stages=('{stage}',)"]
  proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  assert _kill_when(proc, lambda: (out / "checkpoints" / str(kill_at)).exists())
  assert not (wd / ".done" / stage).exists()
  proc = run(wd, f"--config.stages=('{stage}',)")
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = _metrics(out / "logs" / "metrics.jsonl")
  ref = _metrics(smoke_run / f"{kind}_{variant}" / "logs" / "metrics.jsonl")
  # The killed run logged its first steps twice at most; the last record of each step must agree.
  last = lambda rows: {r["step"]: r for r in rows}
  assert last(got).keys() == last(ref).keys()
  for step, r in last(ref).items():
    for k, v in r.items():
      assert last(got)[step][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (step, k)


def _copy(smoke_run, tmp_path, name="copy"):
  import shutil
  wd = tmp_path / name
  shutil.copytree(smoke_run, wd)
  return wd


def test_changed_input_refuses_then_redo_reruns(smoke_run, tmp_path):
  """A finished stage whose inputs changed is not silently skipped: the rerun names the field."""
  wd = _copy(smoke_run, tmp_path)
  questions = tmp_path / "q.jsonl"
  questions.write_text("".join(json.dumps({"id": f"x{i}", "question": f"What is {i} + 1?", "answer": str(i + 1),
                                           "dataset": "toy", "split": "test", "domain": "math"}) + "\n"
                               for i in range(3)))
  args = [f"--config.data.test_file={questions}", "--config.stages=('eval:base',)"]
  proc = run(wd, *args)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "data.test_file changed" in proc.stderr and "redo" in proc.stderr
  proc = run(wd, *args, "--config.redo=('eval:base',)")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads((wd / "eval" / "base.json").read_text())["questions"] == 3


def test_mesh_override_trains_on_a_data_by_fsdp_mesh(smoke_run, tmp_path):
  """--config.mesh.* reaches the trainer: SFT on a 2 x 2 (data, fsdp) mesh of fake CPU devices."""
  wd = _copy(smoke_run, tmp_path)
  env = {**os.environ, "PYTHONUNBUFFERED": "1", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  proc = subprocess.run(MAIN + [f"--config.workdir={wd}", "--config.stages=('sft:autotraj',)",
                                "--config.redo=('sft:autotraj',)", "--config.mesh.data=2", "--config.mesh.fsdp=2",
                                "--config.sft.eval_questions=0"],
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "sft:autotraj" in proc.stdout and (wd / "sft_autotraj" / "checkpoints").exists()
  marker = json.loads((wd / ".done" / "sft:autotraj").read_text())
  assert marker["fingerprint"]["values"]["mesh"] == {"data": 2, "fsdp": 2, "tp": 1}
