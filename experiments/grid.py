"""Runs one config over several seeds and/or a grid of overrides, then aggregates the results.

    python experiments/grid.py --config experiments/configs/demo.py --workdir /tmp/grid --seeds 0,1,2 \\
        [--set key=value ...] [--grid key=v1,v2 ...]

Every run is `experiments/main.py --config CFG --config.workdir=DIR/<run> --config.seed=S
[--config.key=value ...]` in a subprocess, one after the other, so `--seeds 0,1,2` takes about
3x the runtime of one demo run (see experiments/configs/demo.py), times the number of grid
combinations. `--set` applies to every run; each `--grid key=v1,v2` multiplies the runs by its
values (commas inside brackets or parentheses do not split: `--grid rl.buckets=(256,512),(512,)`).

The seed is `config.seed`: it changes model initialisation, sampling and data order. The task
world (`config.world.seed`) stays fixed, so every run trains and evaluates on the same questions.

Writes, under DIR:
- `<run>/`: the run's work directory (`seed0`, or `rl.kl_coef=0.1__seed0` with a grid), with its
  `results.json` from the `results` stage; `logs/<run>.log`: the run's stdout and stderr.
- `grid.json`: the runs (command, status, wall time) and, per override combination, mean, sample
  std and n over seeds of every metric of every results row (per-level accuracy `accuracy@level<L>`
  and the behaviour rates included) and of every adjacent-row comparison.
- `grid.md`: the runs, then one table per override combination: variants x (accuracy, HQ@1,
  format errors, tool calls, mean length, then accuracy per level and the behaviour rates where
  the runs have them) as "mean ± std".

A failed run is recorded and the others still run. Rerunning skips runs whose `results.json`
exists; an unfinished run resumes where it stopped (the pipeline resumes its stages).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Mapping, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from autotraj_jax.pipeline.results import (  # noqa: E402
  BEHAVIOUR_RATES,
  COLUMNS,
  MAIN,
  NON_METRIC_KEYS,
  formatter,
  level_columns,
)

DEFAULT_MAIN = os.path.join(ROOT, "experiments", "main.py")


@dataclasses.dataclass(frozen=True)
class Run:
  name: str                       # directory under the grid workdir
  seed: int
  overrides: dict[str, str]       # the grid's values for this run (not the --set ones)
  workdir: str
  command: list[str]


def split_values(text: str) -> list[str]:
  """`a,b` -> [a, b]; commas nested in (), [] or {} stay, so tuple values can be swept."""
  out, depth, cur = [], 0, ""
  for ch in text:
    depth += (ch in "([{") - (ch in ")]}")
    if ch == "," and depth == 0:
      out.append(cur)
      cur = ""
    else:
      cur += ch
  out.append(cur)
  return [v.strip() for v in out if v.strip()]


def parse_assignments(specs: Sequence[str], *, flag: str) -> dict[str, str]:
  out = {}
  for spec in specs:
    key, sep, value = spec.partition("=")
    key = key.strip().removeprefix("config.")
    if not sep or not key:
      raise ValueError(f"--{flag} {spec!r}: expected key=value")
    if key in out:
      raise ValueError(f"--{flag}: {key} is given twice")
    out[key] = value.strip()
  return out


def run_name(overrides: Mapping[str, str], seed: int) -> str:
  parts = [f"{k}={v}" for k, v in overrides.items()] + [f"seed{seed}"]
  return re.sub(r"[^A-Za-z0-9._=+-]+", "-", "__".join(parts))


def group_name(overrides: Mapping[str, str]) -> str:
  return ", ".join(f"{k}={v}" for k, v in overrides.items()) or "defaults"


def plan_runs(config: str, workdir: str, seeds: Sequence[int], sets: Mapping[str, str] | None = None,
              grid: Mapping[str, Sequence[str]] | None = None, *, main: str = DEFAULT_MAIN,
              python: str = sys.executable) -> list[Run]:
  """Every (grid combination, seed) run with its command; combinations outer, seeds inner."""
  sets, grid = dict(sets or {}), dict(grid or {})
  both = sorted(set(sets) & set(grid))
  if both:
    raise ValueError(f"{both} are both --set and --grid")
  if "seed" in sets or "seed" in grid or "workdir" in sets or "workdir" in grid:
    raise ValueError("seed and workdir are set by the grid itself: use --seeds and --workdir")
  if not seeds:
    raise ValueError("no seeds")
  runs = []
  for values in itertools.product(*grid.values()):
    overrides = dict(zip(grid, values))
    for seed in seeds:
      name = run_name(overrides, seed)
      wd = os.path.join(os.path.abspath(workdir), name)
      cmd = [python, main, "--config", os.path.abspath(config), f"--config.workdir={wd}", f"--config.seed={seed}"]
      cmd += [f"--config.{k}={v}" for k, v in {**sets, **overrides}.items()]
      runs.append(Run(name=name, seed=int(seed), overrides=overrides, workdir=wd, command=cmd))
  names = [r.name for r in runs]
  if len(set(names)) != len(names):
    raise ValueError(f"two runs map to one directory name: {names}")
  return runs


def _summary(rows: Sequence[Mapping[str, Any]]) -> str:
  return " | ".join(f"{r['label']}: " + (formatter("accuracy")(r["accuracy"]) if "accuracy" in r else "missing")
                    for r in rows)


def execute(runs: Sequence[Run], logs_dir: str, *, echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Runs each run not finished yet, one at a time; one progress line per run; never raises on a run."""
  os.makedirs(logs_dir, exist_ok=True)
  statuses = []
  for i, run in enumerate(runs, 1):
    results = os.path.join(run.workdir, "results.json")
    tag = f"[{i}/{len(runs)}] {run.name}"
    status: dict[str, Any] = {"run": run.name, "seed": run.seed, "overrides": run.overrides, "command": run.command}
    if os.path.exists(results):
      status.update(status="cached", wall_s=0.0)
      echo(f"{tag}: already done, skipped")
      statuses.append(status)
      continue
    echo(f"{tag}: running")
    log_path = os.path.join(logs_dir, f"{run.name}.log")
    t0 = time.time()
    with open(log_path, "a") as log:
      log.write(f"\n$ {' '.join(run.command)}\n")
      log.flush()
      try:
        rc = subprocess.run(run.command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
      except OSError as e:
        log.write(f"cannot start: {e}\n")
        rc = -1
    wall = round(time.time() - t0, 1)
    if rc == 0 and os.path.exists(results):
      status.update(status="ok", wall_s=wall)
      with open(results) as f:
        echo(f"{tag}: ok in {wall:.0f}s; accuracy {_summary(json.load(f)['rows'])}")
    else:
      why = f"exit code {rc}" if rc != 0 else "no results.json (is `results` in config.stages?)"
      status.update(status="failed", wall_s=wall, error=why, log=log_path)
      echo(f"{tag}: FAILED after {wall:.0f}s ({why}); see {log_path}")
    statuses.append(status)
  return statuses


def _stats(values: Sequence[float]) -> dict[str, Any]:
  return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
          "n": len(values), "values": list(values)}


def aggregate(results_by_run: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Mean, sample std and n over seeds, per override combination, row label and metric.

  `results_by_run`: run name -> {"overrides": {key: value}, "seed": int, "rows": results.json's
  list}. Rows marked missing count towards no metric. Groups keep the order of first appearance,
  and so do rows within a group.
  """
  groups: dict[tuple, dict[str, Any]] = {}
  for name, res in results_by_run.items():
    overrides = dict(res.get("overrides") or {})
    key = tuple(sorted(overrides.items()))
    g = groups.setdefault(key, {"name": group_name(overrides), "overrides": overrides, "runs": [], "seeds": [],
                                "_rows": {}})
    g["runs"].append(name)
    g["seeds"].append(res.get("seed"))
    for row in res.get("rows") or []:
      acc = g["_rows"].setdefault(row["label"], {"label": row["label"], "name": row.get("name"), "missing_runs": 0,
                                                 "_values": {}})
      if row.get("missing"):
        acc["missing_runs"] += 1
        continue
      for k, v in row.items():
        if k not in NON_METRIC_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool):
          acc["_values"].setdefault(k, []).append(float(v))
  for name, res in results_by_run.items():
    key = tuple(sorted(dict(res.get("overrides") or {}).items()))
    comps = groups[key].setdefault("_comps", {})
    for c in res.get("comparisons") or []:
      acc = comps.setdefault((c["a"], c["b"], c["metric"]), {"a": c["a"], "b": c["b"], "metric": c["metric"],
                                                             "diffs": [], "ci95": []})
      acc["diffs"].append(float(c["diff"]))
      acc["ci95"].append(list(c["ci95"]))
  out = []
  for g in groups.values():
    g["comparisons"] = [{**{k: v for k, v in c.items() if k != "diffs"}, "diff": _stats(c["diffs"]),
                         "seeds_excluding_zero": sum(lo > 0 or hi < 0 for lo, hi in c["ci95"])}
                        for c in g.pop("_comps", {}).values()]
    rows = []
    for acc in g.pop("_rows").values():
      values = acc.pop("_values")
      rows.append({**acc, "metrics": {k: _stats(v) for k, v in values.items()}})
    out.append({**g, "rows": rows})
  return out


def _cell(stats: Mapping[str, Any] | None, fmt: Callable[[float], str], seeds: int) -> str:
  if not stats:
    return "missing"
  if stats["std"] is None:
    text = f"{fmt(stats['mean'])} (n=1)"
  else:
    text = f"{fmt(stats['mean'])} ± {fmt(stats['std'])}"
  return text if stats["n"] == seeds or stats["std"] is None else f"{text} (n={stats['n']})"


def group_columns(group: Mapping[str, Any]) -> list[tuple[str, str, Callable[[float], str]]]:
  """(metric, header, format) of a group's table: the main columns always, then accuracy per level
  and the behaviour rates that some row of the group has."""
  present = {k for r in group["rows"] for k in r["metrics"]}
  headers = {k: h for k, h, _ in COLUMNS}
  extra = level_columns(present) + [k for k in BEHAVIOUR_RATES if k in present]
  return list(COLUMNS[:MAIN]) + [(k, headers.get(k, k), formatter(k)) for k in extra]


def render_markdown(groups: Sequence[Mapping[str, Any]], statuses: Sequence[Mapping[str, Any]],
                    header: str = "") -> str:
  from autotraj_jax.eval import markdown_table
  lines = ["# Grid results", ""] + ([header, ""] if header else [])
  lines += [markdown_table([{"run": s["run"], "seed": str(s["seed"]), "status": s["status"],
                             "wall time": f"{s.get('wall_s', 0.0):.0f}s"} for s in statuses]) if statuses else ""]
  for g in groups:
    seeds = len(g["seeds"])
    lines += [f"## {g['name']}", "",
              f"Mean ± sample std over {seeds} seed(s) ({', '.join(map(str, g['seeds']))}); "
              "(n=k) where only k runs have the variant.", ""]
    failed = [s["run"] for s in statuses if s["status"] == "failed" and s["overrides"] == g["overrides"]]
    if failed:
      lines += [f"Failed, not included: {', '.join(failed)}.", ""]
    table = [{"variant": r["label"], **{h: _cell(r["metrics"].get(k), fmt, seeds) for k, h, fmt in group_columns(g)}}
             for r in g["rows"]]
    lines.append(markdown_table(table) if table else "No results.\n")
    if g.get("comparisons"):
      lines += ["Differences between adjacent rows: mean ± std over seeds of the per-seed difference, and each "
                "seed's paired-bootstrap 95% interval.", ""]
      comp_rows = [{"from": c["a"], "to": c["b"], "metric": c["metric"],
                    "difference": _cell(c["diff"], lambda v: f"{100 * v:+.1f} pts", seeds),
                    "per-seed 95% intervals": "; ".join(f"[{100 * lo:+.1f}, {100 * hi:+.1f}]" for lo, hi in c["ci95"]),
                    "seeds excluding 0": f"{c['seeds_excluding_zero']}/{len(c['ci95'])}"} for c in g["comparisons"]]
      lines.append(markdown_table(comp_rows))
  return "\n".join(lines)


def load_results(runs: Sequence[Run]) -> dict[str, dict[str, Any]]:
  """The results.json of each run that has one, in the shape `aggregate` takes."""
  out = {}
  for run in runs:
    path = os.path.join(run.workdir, "results.json")
    if os.path.exists(path):
      with open(path) as f:
        data = json.load(f)
      out[run.name] = {"overrides": run.overrides, "seed": run.seed, "rows": data["rows"],
                       "comparisons": data.get("comparisons", [])}
  return out


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", required=True, help="experiments/configs/*.py file")
  p.add_argument("--workdir", required=True, help="the grid's directory; each run gets a subdirectory")
  p.add_argument("--seeds", default="0", help="comma-separated config.seed values")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
  p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="values to sweep")
  p.add_argument("--main", default=DEFAULT_MAIN, help="the pipeline script (tests pass a stand-in)")
  p.add_argument("--dry_run", action="store_true", help="print the commands and stop")
  args = p.parse_args(argv)

  seeds = [int(s) for s in split_values(args.seeds)]
  grid = {k: split_values(v) for k, v in parse_assignments(args.grid, flag="grid").items()}
  empty = [k for k, v in grid.items() if not v]
  if empty:
    p.error(f"--grid {empty}: no values")
  runs = plan_runs(args.config, args.workdir, seeds, parse_assignments(args.set, flag="set"), grid,
                   main=os.path.abspath(args.main))
  if args.dry_run:
    for run in runs:
      print(" ".join(run.command))
    return 0
  print(f"grid: {len(runs)} runs ({len(runs) // len(seeds)} combination(s) x {len(seeds)} seed(s)) "
        f"in {os.path.abspath(args.workdir)}", flush=True)
  statuses = execute(runs, os.path.join(args.workdir, "logs"), echo=lambda s: print(s, flush=True))
  groups = aggregate(load_results(runs))
  with open(os.path.join(args.workdir, "grid.json"), "w") as f:
    json.dump({"config": os.path.abspath(args.config), "seeds": seeds, "set": parse_assignments(args.set, flag="set"),
               "grid": grid, "runs": statuses, "groups": groups}, f, indent=2)
  header = f"Config `{args.config}`, seeds {seeds}" + "".join(f", `--set {s}`" for s in args.set)
  with open(os.path.join(args.workdir, "grid.md"), "w") as f:
    f.write(render_markdown(groups, statuses, header))
  failed = [s["run"] for s in statuses if s["status"] == "failed"]
  print(f"grid: wrote {os.path.join(args.workdir, 'grid.md')}"
        + (f"; {len(failed)} failed: {', '.join(failed)}" if failed else ""), flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
