"""AutoTraj-JAX: runs the stages a config lists, in one work directory.

    python experiments/main.py --config experiments/configs/demo.py --config.workdir=/tmp/demo

Any config field can be overridden (`--config.generate.samples_per_query=2`); `--show` prints every
field with its value and meaning. Rerunning the same command continues a killed run where it stopped.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import sys
import time
from typing import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CONFIGS = os.path.join(ROOT, "experiments", "configs")

USAGE = """usage: python experiments/main.py --config CONFIG [--config.FIELD=VALUE ...] [--show] [--debug]

  --config PATH          a config file (below); required
  --config.a.b=VALUE     override one field, e.g. --config.generate.samples_per_query=8
  --show                 print every field of the config with its value and meaning, and exit
  --debug                show the full traceback of an error
  -h, --help             this message
"""


class UsageError(Exception):
  """A command-line mistake: reported in one line, exit status 2."""


def _config_summary(path: str) -> str | None:
  """The first docstring line of a config file, or None for a shared module without get_config()."""
  import ast
  with open(path) as f:
    tree = ast.parse(f.read())
  if not any(isinstance(n, ast.FunctionDef) and n.name == "get_config" for n in tree.body):
    return None
  doc = (ast.get_docstring(tree) or "").strip()
  return doc.splitlines()[0] if doc else ""


def stage_table() -> dict:
  """Every stage by name: stage 1 (data_gen) and the library's (demo, stage 2, eval, results)."""
  from autotraj_jax.pipeline.stages import STAGES as LIBRARY
  from data_gen.stages import STAGES as STAGE1
  first = ("world", "tokenizer", "warmstart")  # where the policy comes from, then stage 1, then stage 2
  return {**{k: LIBRARY[k] for k in first}, **STAGE1, **{k: v for k, v in LIBRARY.items() if k not in first}}


def help_text() -> str:
  lines = [USAGE, "configs (experiments/configs/):"]
  for path in sorted(glob.glob(os.path.join(CONFIGS, "*.py"))):
    summary = _config_summary(path)
    if summary is not None:
      lines.append(f"  {os.path.basename(path):<22} {summary}")
  lines += ["", "stages (config.stages; 'kind:variant' applies config.<kind>_variants[variant]):"]
  for name, stage in stage_table().items():
    doc = (stage.fn.__doc__ or "").strip().splitlines()
    lines.append(f"  {name:<22} {doc[0] if doc else ''}")
  lines += ["", "list a config's fields: python experiments/main.py --config experiments/configs/demo.py --show"]
  return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> tuple[str, list[tuple[str, str]], bool, bool]:
  """(config path, overrides, show, debug) from `--config PATH --config.x=v --show --debug`."""
  path, overrides, show, debug = None, [], False, False
  args = list(argv)
  while args:
    arg = args.pop(0)
    if arg in ("--show", "--debug"):
      show, debug = (True, debug) if arg == "--show" else (show, True)
    elif arg == "--config" or arg.startswith("--config="):
      path = arg.partition("=")[2] if "=" in arg else (args.pop(0) if args else None)
      if not path:
        raise UsageError("--config needs a path")
    elif arg.startswith("--config."):
      key, eq, value = arg[len("--config."):].partition("=")
      if not eq:
        if not args:
          raise UsageError(f"{arg} needs a value (--config.{key}=VALUE)")
        value = args.pop(0)
      overrides.append((key, value))
    else:
      raise UsageError(f"unknown argument {arg!r} (see --help)")
  if path is None:
    raise UsageError("missing --config PATH (see --help for the configs)")
  return path, overrides, show, debug


def load_config(path: str, overrides: Sequence[tuple[str, str]], *, show: bool = False):
  from autotraj_jax.pipeline.config import ConfigError, apply_override, validate
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist (configs are in {os.path.relpath(CONFIGS)}/)")
  spec = importlib.util.spec_from_file_location("_autotraj_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} has no get_config()")
  config = module.get_config()
  for key, value in overrides:
    apply_override(config, key, value)
  validate(config, require_workdir=not show, check_paths=not show)
  return config


def run(config) -> None:
  import jax
  if config.distributed:  # before anything touches a device
    from autotraj_jax import distributed
    distributed.initialize()
  if config.compilation_cache_dir:  # reruns and later stages reuse compiled buckets
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.compilation_cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  from autotraj_jax.distributed import is_primary
  from autotraj_jax.pipeline.runner import run_stages
  t0 = time.time()
  wd, results = run_stages(config, stage_table())
  if is_primary():
    print(f"\nthis run, {time.time() - t0:.0f}s in all:")
    for r in results:
      print(f"  {r.name:<24} {r.status}" + (f" in {r.wall_s:.1f}s" if r.status == "ran" else ""))
    results_md = os.path.join(wd.root, "results.md")
    print(f"results: {results_md}" if os.path.exists(results_md) else f"done: {wd.root}")


class _QuietLibraries(logging.Filter):
  """Drops INFO chatter of checkpointing libraries; their warnings still show."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not any(
        s in record.pathname for s in ("/orbax/", "/jax/_src/", "/grain/", "/absl/"))


def main(argv: Sequence[str]) -> int:
  if any(a in ("-h", "--help", "--helpfull") for a in argv):
    print(help_text())
    return 0
  debug = "--debug" in argv
  from autotraj_jax.engine.sglang_backend import SGLangGenerationError
  from autotraj_jax.pipeline.config import ConfigError
  from autotraj_jax.pipeline.runner import StaleStageError
  from autotraj_jax.tir.records import RecordError
  # Mistakes in the command, the config or the inputs, and servers that are down: one line, exit 2.
  user_errors = (UsageError, ConfigError, StaleStageError, RecordError, FileNotFoundError, NotADirectoryError,
                 IsADirectoryError, ConnectionError, SGLangGenerationError)
  try:
    path, overrides, show, debug = parse_args(argv)
    config = load_config(path, overrides, show=show)
    if show:
      from autotraj_jax.pipeline.config import describe
      print(describe(config))
      return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for h in logging.getLogger().handlers:
      h.addFilter(_QuietLibraries())
    run(config)
    return 0
  except user_errors as e:
    if debug:
      raise
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
