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
