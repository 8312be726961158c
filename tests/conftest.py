"""Test-wide setup: 8 fake CPU devices for mesh tests (must precede the first jax import)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def demo_tokenizer_dir(tmp_path_factory):
  """The locally trained demo BPE tokenizer (2048 tokens, TIR tags as single tokens)."""
  from autotraj_jax.tokenizer import build_demo_tokenizer
  path = tmp_path_factory.mktemp("demo_tokenizer")
  build_demo_tokenizer(path)
  return str(path)


@pytest.fixture(scope="session")
def demo_tokenizer(demo_tokenizer_dir):
  from autotraj_jax.tokenizer import load_tokenizer
  return load_tokenizer(demo_tokenizer_dir)


def pytest_collection_finish(session):
  """Builds the sglang-jax venv once, before the tests, saying so: it takes minutes the first time."""
  if not any(item.get_closest_marker("sglang") for item in session.items):
    return
  import sglang_server
  venv = sglang_server.cache_dir() / sglang_server.VENV_NAME
  if sglang_server._installed(venv) or sglang_server.find_python312() is None:
    return
  reporter = session.config.pluginmanager.get_plugin("terminalreporter")
  say = reporter.write_line if reporter is not None else print
  say(f"building the sglang-jax environment once for the `sglang` tests (about 1.8 GB, 4-5 minutes) in {venv}; "
      f"log: {sglang_server.cache_dir() / 'sglang-jax-install.log'}")
  try:
    sglang_server.ensure_sglang_venv()
    say("sglang-jax environment ready")
  except RuntimeError as e:  # the sglang tests report it; the others run
    say(f"sglang-jax environment not built: {str(e).splitlines()[0]}")
