"""Entry points given bad input: one clear line naming the file or config field, never a pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from autotraj_jax import convert
from autotraj_jax import tokenizer as tk
from autotraj_jax.engine.sglang_backend import SGLangBackend
from autotraj_jax.models import hf
from autotraj_jax.models.config import get_preset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def good_tokenizer(tmp_path_factory):
  out = tmp_path_factory.mktemp("tok")
  tk.train_tokenizer(tk.demo_tokenizer_corpus(num_docs=200), out, vocab_size=400)
  return out


def _hf_dir(root, tokenizer_files: dict[str, str]) -> str:
  """An HF-looking source directory; the tokenizer is checked before any weight is read."""
  src = root / "src"
  src.mkdir()
  (src / "config.json").write_text(json.dumps(hf.hf_config_dict(get_preset("tiny"))))
  for name, text in tokenizer_files.items():
    (src / name).write_text(text)
  return str(src)


def _convert_err(argv, capsys) -> str:
  assert convert.main(argv) == 2, argv
  err = capsys.readouterr().err
  assert err.startswith("convert: error:") and err.count("\n") == 1 and "Traceback" not in err, err
  return err


def test_convert_missing_tokenizer_fails_naming_the_path(tmp_path, capsys):
  src = _hf_dir(tmp_path, {})
  err = _convert_err(["--from-hf", src, "--to-checkpoint", str(tmp_path / "out")], capsys)
  assert os.path.join(src, "tokenizer.json") in err
  assert not (tmp_path / "out").exists()


def test_convert_corrupt_tokenizer_fails_naming_the_file(tmp_path, capsys, good_tokenizer):
  src = _hf_dir(tmp_path, {"tokenizer.json": '{"version": "1.0", "model": {'})
  err = _convert_err(["--from-hf", src, "--to-hf", str(tmp_path / "o1")], capsys)
  assert os.path.join(src, "tokenizer.json") in err
  bad = tmp_path / "bad_tok"
  bad.mkdir()
  for name in os.listdir(good_tokenizer):
    (bad / name).write_bytes((good_tokenizer / name).read_bytes())
  (bad / "tokenizer_config.json").write_bytes(b"\xff{")
  err = _convert_err(["--from-hf", src, "--to-hf", str(tmp_path / "o2"), "--tokenizer", str(bad)],
                     capsys)
  assert str(bad / "tokenizer_config.json") in err


def test_convert_cli_exits_nonzero_on_a_corrupt_tokenizer(tmp_path):
  src = _hf_dir(tmp_path, {"tokenizer.json": "not json"})
  proc = subprocess.run([sys.executable, "-m", "autotraj_jax.convert", "--from-hf", src,
                         "--to-checkpoint", str(tmp_path / "out")],
                        capture_output=True, text=True, timeout=300, cwd=REPO)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith("convert: error:") and os.path.join(src, "tokenizer.json") in lines[-1]


def test_load_tokenizer_names_a_corrupt_file(tmp_path, good_tokenizer):
  assert tk.load_tokenizer(good_tokenizer).pad_token is not None
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "tokenizer.json").write_text('{"model": ')
  with pytest.raises(ValueError, match="tokenizer.json") as e:
    tk.load_tokenizer(bad)
  assert str(bad / "tokenizer.json") in str(e.value)
  (bad / "tokenizer.json").write_text('{"model": 3}')  # valid JSON, not a tokenizer
  with pytest.raises(tk.TokenizerError, match=str(bad / "tokenizer.json")):
    tk.load_tokenizer(bad)


@pytest.mark.parametrize("url", ["", "   ", None, "localhost:30000"])
def test_sglang_backend_rejects_an_unusable_url_at_construction(url):
  with pytest.raises(ValueError, match=r"sglang\.url"):
    SGLangBackend(url, tokenizer=None, startup_wait_s=0.0)


def test_requirements_list_jinja2():
  with open(os.path.join(REPO, "requirements.txt")) as f:
    names = {line.split("#")[0].strip().split(">")[0].split("=")[0].split("[")[0].lower()
             for line in f}
  assert "jinja2" in names
