"""Convert between HF safetensors directories and this project's orbax model checkpoints.

  python -m autotraj_jax.convert --from-hf HF_DIR --to-checkpoint CKPT_DIR [--mesh fsdp=8] [--dtype bfloat16]
  python -m autotraj_jax.convert --from-checkpoint CKPT_DIR --to-hf HF_DIR [--tokenizer DIR]

Any source pairs with any target (HF -> HF re-shards or casts). The tokenizer files and the
bos/eos/pad token ids travel along; a missing or corrupt tokenizer is an error (pass
--no-tokenizer to convert weights alone). Bad input exits with status 2 and a one-line message
naming the path.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile
from typing import Any, Sequence

import jax
import numpy as np

from autotraj_jax import checkpoint
from autotraj_jax import sharding as shd
from autotraj_jax.models import hf
from autotraj_jax.models.config import ModelConfig
from autotraj_jax.tokenizer import check_tokenizer_dir

DTYPES = ("float32", "bfloat16", "float16")
TOKEN_IDS_META = "hf_token_ids"


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m autotraj_jax.convert",
                              description="Convert HF safetensors <-> orbax model checkpoints.")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--from-hf", metavar="HF_DIR", help="HF model directory (config.json + safetensors)")
  src.add_argument("--from-checkpoint", metavar="CKPT_DIR", help="model checkpoint written by save_model")
  dst = p.add_mutually_exclusive_group(required=True)
  dst.add_argument("--to-checkpoint", metavar="CKPT_DIR", help="write an orbax model checkpoint here")
  dst.add_argument("--to-hf", metavar="HF_DIR", help="write an HF model directory here")
  p.add_argument("--mesh", default=None, help="lay params out on a mesh while converting, e.g. "
                 "'fsdp=8' or 'fsdp=4,tp=2' (default: one device)")
  p.add_argument("--dtype", choices=DTYPES, default=None, help="cast params (default: keep)")
  tok = p.add_mutually_exclusive_group()
  tok.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="tokenizer files to ship (default: the ones in the source)")
  tok.add_argument("--no-tokenizer", action="store_true",
                   help="write the model without tokenizer files (otherwise a missing one is an error)")
  p.add_argument("--max-shard-bytes", type=int, default=2**31, help="HF output: bytes per safetensors file")
  p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
  return p


def _nonempty(path: pathlib.Path) -> bool:
  return path.exists() and (not path.is_dir() or any(path.iterdir()))


def _load(args: argparse.Namespace) -> tuple[ModelConfig, str, Any, dict[str, Any], str | None]:
  """(cfg, kind, params, token ids, tokenizer dir) from the source."""
  mesh = shd.make_mesh(shd.MeshConfig.parse(args.mesh)) if args.mesh else None
  if args.from_hf:
    cfg, kind, params = hf.load_hf(args.from_hf, mesh=mesh, dtype=args.dtype)
    ids = hf.token_ids_of(hf.read_hf_config(args.from_hf))
    return cfg, kind, params, ids, _with_tokenizer(args.from_hf)
  cfg, kind, params = checkpoint.load_model(args.from_checkpoint, mesh=mesh)
  ckpt = checkpoint.Checkpointer(args.from_checkpoint, max_to_keep=None)
  ids = ckpt.read_meta().get(TOKEN_IDS_META) or {}
  ckpt.close()
  if args.dtype and args.dtype != cfg.param_dtype:
    params = jax.tree.map(lambda x: x.astype(args.dtype), params)
    cfg = cfg.replace(param_dtype=args.dtype, dtype=args.dtype)
  return cfg, kind, params, ids, _with_tokenizer(checkpoint.tokenizer_dir_of(args.from_checkpoint))


def _with_tokenizer(directory: str | None) -> str | None:
  """`directory` if it holds tokenizer files, else None (a source need not ship a tokenizer)."""
  if directory is None or not any((pathlib.Path(directory) / n).is_file() for n in hf.SIDECAR_FILES):
    return None
  return directory


def _tokenizer_source(args: argparse.Namespace) -> str:
  """The checked tokenizer directory to ship: `--tokenizer` or the source's own.

  Checked before any weights load, so a missing or corrupt tokenizer fails fast, naming the file.
  """
  if args.tokenizer is not None:
    directory = args.tokenizer
  elif args.from_hf:
    directory = args.from_hf
  else:
    directory = checkpoint.tokenizer_dir_of(args.from_checkpoint) or str(
      pathlib.Path(args.from_checkpoint) / checkpoint.TOKENIZER_SUBDIR)
  check_tokenizer_dir(directory)
  return directory


def _save(args: argparse.Namespace, cfg: ModelConfig, kind: str, params: Any, ids: dict[str, Any],
          tokenizer: str | None) -> str:
  """Write the target; returns its path."""
  if args.to_hf:
    hf.save_hf(args.to_hf, params, cfg, kind=kind, tokenizer_dir=tokenizer,
               max_shard_bytes=args.max_shard_bytes, token_ids=ids)
    return args.to_hf
  out = pathlib.Path(args.to_checkpoint)
  if out.exists() and args.overwrite:
    shutil.rmtree(out)
  with tempfile.TemporaryDirectory() as tmp:
    tok = None
    if tokenizer is not None:
      if not hf.copy_sidecar_files(tokenizer, tmp):
        raise FileNotFoundError(f"no tokenizer files ({', '.join(hf.SIDECAR_FILES[:2])}, ...) in {tokenizer}")
      tok = tmp
    checkpoint.save_model(out, params, cfg, kind=kind, tokenizer_dir=tok,
                          extra_meta={TOKEN_IDS_META: ids})
  return str(out)


def convert(args: argparse.Namespace) -> str:
  """Run one conversion; returns the summary line."""
  out = pathlib.Path(args.to_hf or args.to_checkpoint)
  if _nonempty(out) and not args.overwrite:
    raise ValueError(f"output {out} exists and is not empty (pass --overwrite to replace it)")
  src = pathlib.Path(args.from_hf or args.from_checkpoint)
  if not src.is_dir():
    raise FileNotFoundError(f"source directory {src} does not exist")
  if args.tokenizer is not None and not pathlib.Path(args.tokenizer).is_dir():
    raise FileNotFoundError(f"tokenizer directory {args.tokenizer} does not exist")
  if src.resolve() == out.resolve():
    raise ValueError("source and output are the same directory")
  if args.from_hf:  # a cheap look at the model config first: a wrong model is the bigger mistake
    hf.config_from_hf(hf.read_hf_config(args.from_hf))
  tokenizer = None if args.no_tokenizer else _tokenizer_source(args)
  cfg, kind, params, ids, _ = _load(args)
  where = _save(args, cfg, kind, params, ids, tokenizer)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  fmt = "HF model" if args.to_hf else "checkpoint"
  return f"wrote {fmt} {where}: {cfg.architecture} {kind}, {n:,} params, {cfg.param_dtype}"


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    print(convert(args))
  except (ValueError, OSError, checkpoint.CheckpointError) as e:  # TokenizerError is a ValueError
    print(f"convert: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
