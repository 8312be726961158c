"""The results stage on a synthetic workdir, and the grid runner's planning, aggregation and loop."""

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from autotraj_jax.metrics import MetricWriter
from autotraj_jax.pipeline.config import base_config
from autotraj_jax.pipeline.results import load_rows, results_stage
from autotraj_jax.pipeline.rm import plot_scores
from autotraj_jax.pipeline.workdir import Workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID_PY = os.path.join(ROOT, "experiments", "grid.py")
ROWS = (("base policy", "base"), ("SFT high-quality only", "sft_high_only"),
        ("AutoTraj SFT (high + repaired)", "sft_autotraj"), ("RL outcome + format", "rl_outcome_format"),
        ("AutoTraj RL (outcome + format + RM)", "rl_autotraj"))


def _load_grid():
  spec = importlib.util.spec_from_file_location("grid", GRID_PY)
  mod = importlib.util.module_from_spec(spec)
  sys.modules["grid"] = mod  # dataclasses look their module up there
  spec.loader.exec_module(mod)
  return mod


grid = _load_grid()


def _metrics(acc: float) -> dict:
  return {"questions": 200.0, "pass@1": acc, "hq_at_1": acc / 2, "format_error_rate": 0.05, "answered_rate": 0.9,
          "tool_calls_per_question": 1.5, "tool_error_rate": 0.1, "mean_response_tokens": 120.0,
          "mean_model_tokens": 80.0}


def _config(rows=ROWS) -> ml_collections.ConfigDict:
  c = base_config()
  c.stages = ("world", "eval:base", "rl:autotraj", "results")
  c.results = dict(rows=rows, curves=("outcome_format", "autotraj"))
  return c


def _log(path, records):
  w = MetricWriter(path, tensorboard=False)
  for step, scalars in records:
    w.write(step, scalars)
  w.close()


@pytest.fixture()
def synthetic_wd(tmp_path):
  wd = Workdir(str(tmp_path / "run"))
  os.makedirs(os.path.join(wd.root, "eval"))
  for i, (_, name) in enumerate(ROWS):
    with open(wd.path("eval", f"{name}.json"), "w") as f:
      json.dump({**_metrics(0.2 + 0.1 * i), **({"maj@4": 0.5} if name == "rl_autotraj" else {})}, f)
  for v in ("outcome_format", "autotraj"):
    _log(os.path.join(wd.root, f"rl_{v}", "logs"),
         [(s, {"reward": 0.1 * s, "reward/outcome": 0.05 * s, "reward/format": 0.5, "accuracy": 0.03 * s, "kl": 0.01})
          for s in range(1, 6)] + ([(5, {"reward/rm": 0.3})] if v == "autotraj" else []))
  for v in ("high_only", "autotraj"):
    _log(os.path.join(wd.root, f"sft_{v}", "logs"),
         [(s, {"loss": 3.0 / s}) for s in range(1, 5)] + [(4, {"eval/loss": 1.0, "eval/accuracy": 0.3})])
  with open(wd.path("rm", "eval.json"), "w") as f:
    json.dump({"trained": True, "pair_accuracy": 0.8, "pair_margin": 0.25, "pairs": 40,
               "pair_accuracy_by_failure": {"hedge": 0.75, "wrong": 1.0},
               "scores": {q: {"mean": m, "std": 0.1, "n": 10} for q, m in (("high", 0.9), ("low", 0.4),
                                                                            ("wrong", 0.1))}}, f)
  plot_scores({"high": [0.8, 0.9, 1.0], "low": [0.3, 0.5], "wrong": [0.0, 0.2]}, wd.path("rm", "scores.png"))
  wd.mark_done("world", {"wall_s": 1.0, "finished": "2024-01-01 00:00:00"})
  wd.mark_done("eval:base", {"wall_s": 12.5, "finished": "2024-01-01 00:00:00"})
  wd.mark_done("rl:autotraj", {"wall_s": 3723.0, "finished": "2024-01-01 01:00:00"})
  return wd


def test_results_stage_writes_table_json_and_plots(synthetic_wd):
  wd = synthetic_wd
  results_stage(_config(), wd)
  rows = json.loads(open(wd.path("results.json")).read())["rows"]
  assert [r["label"] for r in rows] == [label for label, _ in ROWS]
  assert [r["name"] for r in rows] == [name for _, name in ROWS]
  assert not any(r["missing"] for r in rows)
  assert rows[2]["accuracy"] == pytest.approx(0.4) and rows[0]["format_error_rate"] == 0.05
  assert rows[0]["tool_calls_per_question"] == 1.5 and rows[0]["mean_length"] == 120.0
  assert rows[0]["mean_model_tokens"] == 80.0 and rows[4]["maj@4"] == 0.5
  assert "pass@1" not in rows[0] and "mean_response_tokens" not in rows[0]
  md = open(wd.path("results.md")).read()
  table = [line for line in md.splitlines() if line.startswith("| ")]
  assert [line.split(" | ")[0][2:] for line in table[1:6]] == [label for label, _ in ROWS]
  assert "| base policy | 20.0% | 10.0% | 5.0% | 1.50 | 120.0 |" in md
  assert "maj@4" in md and "50.0%" in md
  assert "80.0% on 40 held-out pairs, mean margin 0.250." in md and "| high | 0.900 |" in md
  assert "hedge 75.0%, wrong 100.0%" in md
  times = md[md.index("## Stage wall times"):]
  order = [times.index(s) for s in ("| world | 1.0s |", "| eval:base | 12.5s |", "| rl:autotraj | 62m 03.0s |")]
  assert order == sorted(order)  # pipeline order, not alphabetical
  assert "| total | 62m 16.5s |" in times
  for name in ("rl_reward.png", "rl_dynamics.png", "training_loss.png", "rm_scores.png"):
    path = wd.path("plots", name)
    assert os.path.getsize(path) > 1000, name
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert f"![{name}](plots/{name})" in md
  assert "skipped" not in md


def test_results_stage_tolerates_missing_evals_and_logs(tmp_path, caplog):
  wd = Workdir(str(tmp_path / "run"))
  os.makedirs(os.path.join(wd.root, "eval"))
  with open(wd.path("eval", "base.json"), "w") as f:
    json.dump(_metrics(0.3), f)
  with caplog.at_level("WARNING"):
    results_stage(_config(), wd)
  rows = json.loads(open(wd.path("results.json")).read())["rows"]
  assert len(rows) == 5 and rows[0]["missing"] is False
  assert all(r["missing"] is True and "accuracy" not in r for r in rows[1:])
  assert "sft_high_only" in caplog.text
  md = open(wd.path("results.md")).read()
  assert "| SFT high-quality only | missing |" in md and "`rl_autotraj`" in md
  for name in ("rl_reward.png", "rl_dynamics.png", "training_loss.png", "rm_scores.png"):
    assert f"`{name}`: skipped" in md and not os.path.exists(wd.path("plots", name))
  assert "Reward model" not in md


def test_untrained_reward_model_is_reported(tmp_path):
  wd = Workdir(str(tmp_path / "run"))
  os.makedirs(os.path.join(wd.root, "rm"))
  with open(os.path.join(wd.root, "rm", "eval.json"), "w") as f:
    json.dump({"trained": False, "reason": "3 training pairs", "pairs": 1}, f)
  results_stage(_config(), wd)
  md = open(wd.path("results.md")).read()
  assert "Not trained: 3 training pairs." in md and "Pair accuracy (preferred trajectory scored higher): - on 1" in md


def test_a_model_that_was_not_trained_is_reported_with_its_reason(tmp_path):
  wd = Workdir(str(tmp_path / "run"))
  assert wd.skipped("rl_autotraj") is None
  wd.skip("rm", "0 training pairs")
  wd.skip("rl_autotraj", f"its reward model 'rm' was not trained ({wd.skipped('rm')})")
  results_stage(_config(), wd)
  rows = {r["name"]: r for r in json.loads(open(wd.path("results.json")).read())["rows"]}
  assert rows["rl_autotraj"]["missing"]
  assert rows["rl_autotraj"]["error"] == "not trained: its reward model 'rm' was not trained (0 training pairs)"
  assert "error" not in rows["sft_autotraj"]  # merely not evaluated: no reason to give
  md = open(wd.path("results.md")).read()
  assert "`rl_autotraj` (not trained: its reward model 'rm' was not trained (0 training pairs))" in md


def test_load_rows_marks_unreadable_file_missing(tmp_path):
  (tmp_path / "bad.json").write_text("{not json")
  (tmp_path / "ok.json").write_text(json.dumps({"pass@1": 1, "note": "text", "flag": True}))
  rows = load_rows(str(tmp_path), [("bad", "bad"), ("ok", "ok")])
  assert rows[0]["missing"] and "error" in rows[0]
  assert rows[1] == {"label": "ok", "name": "ok", "missing": False, "accuracy": 1.0}


def _row(label, acc, fmt=0.1, calls=1.0, length=100.0, missing=False):
  if missing:
    return {"label": label, "name": label, "missing": True}
  return {"label": label, "name": label, "missing": False, "accuracy": acc, "format_error_rate": fmt,
          "tool_calls_per_question": calls, "mean_length": length}


def test_aggregate_mean_std_and_grouping():
  runs = {
      "lr=1__seed0": {"overrides": {"lr": "1"}, "seed": 0, "rows": [_row("base", 0.2), _row("rl", 0.5, length=90)]},
      "lr=1__seed1": {"overrides": {"lr": "1"}, "seed": 1, "rows": [_row("base", 0.4), _row("rl", 0.6, length=110)]},
      "lr=1__seed2": {"overrides": {"lr": "1"}, "seed": 2, "rows": [_row("base", 0.3), _row("rl", 0.0, missing=True)]},
      "lr=2__seed0": {"overrides": {"lr": "2"}, "seed": 0, "rows": [_row("base", 0.1), _row("rl", 0.9)]},
  }
  groups = grid.aggregate(runs)
  assert [g["name"] for g in groups] == ["lr=1", "lr=2"]
  g1, g2 = groups
  assert g1["runs"] == ["lr=1__seed0", "lr=1__seed1", "lr=1__seed2"] and g1["seeds"] == [0, 1, 2]
  assert [r["label"] for r in g1["rows"]] == ["base", "rl"]
  base = g1["rows"][0]["metrics"]["accuracy"]
  # mean(0.2, 0.4, 0.3) = 0.3; sample variance = (0.01 + 0.01 + 0) / 2 = 0.01 -> std 0.1
  assert base["mean"] == pytest.approx(0.3) and base["std"] == pytest.approx(0.1) and base["n"] == 3
  rl = g1["rows"][1]
  assert rl["missing_runs"] == 1
  # two runs have it: mean 0.55, std = |0.5 - 0.6| / sqrt(2)
  assert rl["metrics"]["accuracy"]["mean"] == pytest.approx(0.55)
  assert rl["metrics"]["accuracy"]["std"] == pytest.approx(0.1 / 2 ** 0.5) and rl["metrics"]["accuracy"]["n"] == 2
  assert rl["metrics"]["mean_length"]["mean"] == pytest.approx(100.0)
  assert rl["metrics"]["mean_length"]["std"] == pytest.approx(statistics.stdev([90.0, 110.0]))
  assert g1["rows"][0]["metrics"]["format_error_rate"]["std"] == pytest.approx(0.0)
  single = g2["rows"][1]["metrics"]["accuracy"]
  assert single == {"mean": 0.9, "std": None, "n": 1, "values": [0.9]}
  md = grid.render_markdown(groups, [])
  assert "## lr=1" in md and "## lr=2" in md
  assert "| base | 30.0% ± 10.0% | missing | 10.0% ± 0.0% | 1.00 ± 0.00 | 100.0 ± 0.0 |" in md
  assert "55.0% ± 7.1% (n=2)" in md and "90.0% (n=1)" in md


def test_plan_runs_seeds_times_grid():
  runs = grid.plan_runs("experiments/configs/demo.py", "/tmp/g", [0, 1], sets={"rl.steps": "10"},
                        grid={"rl.kl_coef": ["0.0", "0.1"], "model.preset": ["demo"]}, main="/x/main.py",
                        python="py")
  assert [r.name for r in runs] == [
      "rl.kl_coef=0.0__model.preset=demo__seed0", "rl.kl_coef=0.0__model.preset=demo__seed1",
      "rl.kl_coef=0.1__model.preset=demo__seed0", "rl.kl_coef=0.1__model.preset=demo__seed1"]
  r = runs[3]
  assert r.seed == 1 and r.overrides == {"rl.kl_coef": "0.1", "model.preset": "demo"}
  assert r.workdir == os.path.join("/tmp/g", r.name)
  assert r.command == ["py", "/x/main.py", "--config", os.path.abspath("experiments/configs/demo.py"),
                       f"--config.workdir=/tmp/g/{r.name}", "--config.seed=1", "--config.rl.steps=10",
                       "--config.rl.kl_coef=0.1", "--config.model.preset=demo"]
  assert not any("world.seed" in c for run in runs for c in run.command)
  plain = grid.plan_runs("c.py", "/tmp/g", [3])
  assert [r.name for r in plain] == ["seed3"] and plain[0].overrides == {}
  assert grid.split_values("(256,512),(512,), 3") == ["(256,512)", "(512,)", "3"]
  with pytest.raises(ValueError):
    grid.plan_runs("c.py", "/tmp/g", [0], sets={"a": "1"}, grid={"a": ["2"]})
  with pytest.raises(ValueError):
    grid.plan_runs("c.py", "/tmp/g", [0], grid={"seed": ["1"]})


FAKE_MAIN = textwrap.dedent("""\
    import json, os, sys
    args = dict(a[len("--config."):].split("=", 1) for a in sys.argv[1:] if a.startswith("--config."))
    seed, lr = int(args["seed"]), float(args.get("lr", "0"))
    if seed == 1 and lr == 2:
      sys.exit("boom")
    os.makedirs(args["workdir"], exist_ok=True)
    with open(os.path.join(args["workdir"], "calls.txt"), "a") as f:
      f.write("x")
    rows = [{"label": "base", "name": "base", "missing": False, "accuracy": 0.1 * seed + lr,
             "format_error_rate": 0.0, "tool_calls_per_question": 1.0, "mean_length": 10.0 * (seed + 1)}]
    comps = [{"a": "base", "b": "base", "metric": "accuracy", "diff": 0.1 * seed, "ci95": [0.05 * seed, 0.2]}]
    with open(os.path.join(args["workdir"], "results.json"), "w") as f:
      json.dump({"rows": rows, "comparisons": comps}, f)
    print("fake done", args["steps"])
""")


def test_grid_end_to_end_with_fake_main(tmp_path):
  fake = tmp_path / "fake_main.py"
  fake.write_text(FAKE_MAIN)
  out = tmp_path / "grid"
  cmd = [sys.executable, GRID_PY, "--config", os.path.join(ROOT, "experiments", "configs", "demo.py"),
         "--workdir", str(out), "--seeds", "0,1,2", "--set", "steps=7", "--grid", "lr=1,2", "--main", str(fake)]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1, proc.stderr  # one run fails, the grid reports it
  assert "[4/6] lr=2__seed0: running" in proc.stdout and "[5/6] lr=2__seed1: FAILED" in proc.stdout
  assert "[6/6] lr=2__seed2: ok" in proc.stdout
  assert "boom" in (out / "logs" / "lr=2__seed1.log").read_text()
  assert "fake done 7" in (out / "logs" / "lr=1__seed0.log").read_text()
  report = json.loads((out / "grid.json").read_text())
  assert [s["status"] for s in report["runs"]] == ["ok", "ok", "ok", "ok", "failed", "ok"]
  g1, g2 = report["groups"]
  acc1 = g1["rows"][0]["metrics"]["accuracy"]
  assert g1["name"] == "lr=1" and acc1["mean"] == pytest.approx(1.1) and acc1["std"] == pytest.approx(0.1)
  acc2 = g2["rows"][0]["metrics"]["accuracy"]
  assert acc2["n"] == 2 and acc2["mean"] == pytest.approx(2.1) and acc2["std"] == pytest.approx(0.2 / 2 ** 0.5)
  md = (out / "grid.md").read_text()
  assert "## lr=1" in md and "110.0% ± 10.0%" in md and "| lr=2__seed1 | 1 | failed |" in md
  # Rerun: finished runs are skipped, only the failed one runs again (and fails again).
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert proc.stdout.count("already done, skipped") == 5 and "lr=2__seed1: FAILED" in proc.stdout
  assert (out / "lr=1__seed0" / "calls.txt").read_text() == "x"


LEVELS = ["1", "1", "1", "1", "2", "2", "2", "2", "3", "3"]


def _eval_with_levels(wd, name, correct, levels, **extra):
  """eval/<name>.json and its trajectories: question i at levels[i] ('' = not recorded), correct[i] in {0, 1}."""
  from autotraj_jax.eval import level_metrics
  from autotraj_jax.tir.records import write_jsonl
  from autotraj_jax.tir.trajectory import Trajectory
  trajs = [Trajectory(id=f"eval/q{i}#0", question_id=f"q{i}", question="?", prompt_ids=[1], gold="1",
                      scores={"correctness": float(c)}, quality="high" if c else "wrong",
                      provenance={"source": "generated", **({"level": lv} if lv else {})})
           for i, (c, lv) in enumerate(zip(correct, levels))]
  write_jsonl(wd.path("eval", f"{name}.trajectories.jsonl"), trajs)
  metrics = {**_metrics(sum(correct) / len(correct)), "questions": len(correct), **extra,
             **level_metrics(levels, [float(c) for c in correct])}
  with open(wd.path("eval", f"{name}.json"), "w") as f:
    json.dump(metrics, f)


def test_results_rows_have_interval_levels_and_rates_and_level_comparisons(tmp_path):
  from autotraj_jax.stats import wilson_interval
  wd = Workdir(str(tmp_path / "run"))
  os.makedirs(wd.path("eval"))
  _eval_with_levels(wd, "base", [1, 1, 0, 0, 1, 0, 0, 0, 1, 0], LEVELS,
                    repeated_tool_call_rate=0.3, failed_tool_call_rate=0.2, hedging_rate=0.1)
  # rl's eval did not record level 3 (an older eval): no level-3 comparison can be made
  _eval_with_levels(wd, "rl", [1, 1, 1, 1, 1, 1, 0, 0, 1, 0], LEVELS[:8] + ["", ""],
                    repeated_tool_call_rate=0.0, failed_tool_call_rate=0.1, hedging_rate=0.0)
  results_stage(_config(rows=(("base policy", "base"), ("RL", "rl"))), wd)
  data = json.loads(open(wd.path("results.json")).read())
  base, rl = data["rows"]
  assert base["accuracy"] == pytest.approx(0.4) and base["accuracy_ci95"] == pytest.approx(wilson_interval(4, 10))
  assert base["accuracy_by_level"] == {"1": 0.5, "2": 0.25, "3": 0.5}
  assert base["questions_by_level"] == {"1": 4, "2": 4, "3": 2}
  assert base["accuracy_by_level_ci95"]["3"] == pytest.approx(wilson_interval(1, 2))
  assert (base["accuracy@level1"], base["accuracy@level2"], base["accuracy@level3"]) == (0.5, 0.25, 0.5)
  assert rl["accuracy@level1"] == 1.0 and "accuracy@level3" not in rl
  assert base["repeated_tool_call_rate"] == 0.3 and rl["failed_tool_call_rate"] == 0.1
  assert base["hq_at_1"] == 0.2 and base["missing"] is False  # the existing fields stay

  comps = {c["metric"]: c for c in data["comparisons"]}
  assert list(comps) == ["accuracy", "hq_at_1", "accuracy@level1", "accuracy@level2"]
  expected = {"accuracy": (0.3, 10), "hq_at_1": (0.3, 10), "accuracy@level1": (0.5, 4), "accuracy@level2": (0.25, 4)}
  for metric, (diff, n) in expected.items():
    c = comps[metric]
    assert set(c) == {"a", "b", "metric", "diff", "ci95", "n"} and (c["a"], c["b"]) == ("base", "rl")
    assert c["diff"] == pytest.approx(diff) and c["n"] == n
    low, high = c["ci95"]
    assert low <= c["diff"] <= high and low < high, metric

  md = open(wd.path("results.md")).read()
  header = next(line for line in md.splitlines() if line.startswith("| variant |"))
  assert "| accuracy 95% CI | accuracy@level1 | accuracy@level2 | accuracy@level3 |" in header
  assert "| repeated tool calls | failed tool calls |" in header
  lo, hi = wilson_interval(4, 10)
  assert f"| base policy | 40.0% | 20.0% | 5.0% | 1.50 | 120.0 | [{100 * lo:.1f}%, {100 * hi:.1f}%] | 50.0% | 25.0% " \
         "| 50.0% |" in md
  assert "| RL | 70.0% |" in md and "| 100.0% | 50.0% | - |" in md
  assert "| 30.0% | 20.0% |" in md and "| 0.0% | 10.0% |" in md
  assert "| base policy | RL | accuracy@level1 | +50.0 pts |" in md


def test_rows_without_levels_or_counts_keep_their_old_shape(tmp_path):
  from autotraj_jax.stats import wilson_interval
  (tmp_path / "old.json").write_text(json.dumps(_metrics(0.5)))
  (tmp_path / "odd.json").write_text(json.dumps({"pass@1": 0.5, "accuracy_by_level": {"1": "high", "2": 0.5}}))
  old, odd = load_rows(str(tmp_path), [("old", "old"), ("odd", "odd")])
  assert not any(k.startswith("accuracy@") or "by_level" in k for k in old)
  assert old["accuracy_ci95"] == pytest.approx(wilson_interval(100, 200))
  assert odd["accuracy_by_level"] == {"2": 0.5} and odd["accuracy@level2"] == 0.5 and "accuracy_ci95" not in odd
  assert "questions_by_level" not in odd


def test_aggregate_means_levels_and_behaviour_rates_over_seeds():
  def row(label, acc, lv2, repeated):
    return {**_row(label, acc), "accuracy@level2": lv2, "accuracy_by_level": {"2": lv2},
            "accuracy_ci95": [0.0, 1.0], "repeated_tool_call_rate": repeated}
  runs = {f"seed{s}": {"overrides": {}, "seed": s, "rows": [row("base", 0.2, lv2, rep)],
                       "comparisons": [{"a": "base", "b": "rl", "metric": "accuracy@level2", "diff": d,
                                        "ci95": [d - 0.04, d + 0.1]}]}
          for s, lv2, rep, d in ((0, 0.1, 0.2, 0.05), (1, 0.3, 0.4, 0.15))}
  (g,) = grid.aggregate(runs)
  metrics = g["rows"][0]["metrics"]
  assert metrics["accuracy@level2"]["mean"] == pytest.approx(0.2)
  assert metrics["accuracy@level2"]["std"] == pytest.approx(statistics.stdev([0.1, 0.3]))
  repeated = metrics["repeated_tool_call_rate"]
  assert repeated["mean"] == pytest.approx(0.3) and repeated["std"] == pytest.approx(statistics.stdev([0.2, 0.4]))
  assert "accuracy_by_level" not in metrics and "accuracy_ci95" not in metrics  # only numbers are averaged
  (comp,) = g["comparisons"]
  assert comp["metric"] == "accuracy@level2" and comp["diff"]["mean"] == pytest.approx(0.1)
  assert comp["seeds_excluding_zero"] == 2
  md = grid.render_markdown([g], [])
  assert "| variant | accuracy | HQ@1 | format errors | tool calls / q | mean length (tokens) | accuracy@level2 " \
         "| repeated tool calls |" in md
  assert "| 20.0% ± 14.1% | 30.0% ± 14.1% |" in md
  assert "| base | rl | accuracy@level2 | +10.0 pts ± +7.1 pts | [+1.0, +15.0]; [+11.0, +25.0] | 2/2 |" in md
  plain = grid.render_markdown(grid.aggregate({"seed0": {"overrides": {}, "seed": 0, "rows": [_row("base", 0.2)]}}), [])
  assert "accuracy@level" not in plain and "repeated tool calls" not in plain
