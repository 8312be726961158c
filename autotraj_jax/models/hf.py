"""HF safetensors checkpoints <-> our param tree (Qwen2 / Llama; causal LM or scalar head).

Each tensor has a `Layout`: how an HF `[out, in]` weight splits and permutes into our
kernel shape (`[D, N, H]`, `[N, H, D]`, ...). One description drives both directions:
import reads, for every device shard, only the HF slice behind it; export gathers one
tensor at a time to host and streams it into size-bounded safetensors shards.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
import struct
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from safetensors import safe_open

from autotraj_jax import sharding as shd
from autotraj_jax.distributed import is_primary
from autotraj_jax.models import build
from autotraj_jax.models.config import ModelConfig

PathLike = str | os.PathLike

# HF class -> (our architecture, model kind).
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "Qwen2ForCausalLM": ("qwen2", "causal_lm"),
    "LlamaForCausalLM": ("llama", "causal_lm"),
    "Qwen2ForSequenceClassification": ("qwen2", "scalar"),
    "LlamaForSequenceClassification": ("llama", "scalar"),
}
_HF_CLASS = {v: k for k, v in ARCHITECTURES.items()}

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Tokenizer and generation defaults travel with the weights.
SIDECAR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                 "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                 "chat_template.json", "generation_config.json")
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")

_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_N_IN = {"o_proj": 2}  # kernels whose input side has two axes ([N, H] -> D); others have one


# ---------------------------------------------------------------- config

def _rope_theta(hf: dict[str, Any]) -> float:
  """RoPE base from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling` (older)."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  for d in (params, scaling):
    kind = d.get("rope_type", d.get("type", "default"))
    if kind not in ("default", None):
      raise ValueError(f"RoPE scaling type {kind!r} is not supported; only 'default' RoPE is")
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  return float(theta)


def _num_labels(hf: dict[str, Any]) -> int:
  if hf.get("num_labels") is not None:
    return int(hf["num_labels"])
  return len(hf["id2label"]) if hf.get("id2label") else 2  # HF's default is 2


def config_from_hf(hf: dict[str, Any]) -> tuple[ModelConfig, str]:
  """(ModelConfig, kind) from an HF `config.json` dict; rejects what the decoder cannot run."""
  supported = f"supported architectures: {sorted(ARCHITECTURES)}"
  model_type = hf.get("model_type")
  archs = hf.get("architectures") or []
  if archs:
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
      raise ValueError(f"unsupported HF architecture {archs} (model_type={model_type!r}); {supported}")
    arch, kind = ARCHITECTURES[archs[0]]
    if model_type not in (None, arch):
      raise ValueError(f"architecture {archs[0]} does not match model_type {model_type!r}")
  elif model_type in ("qwen2", "llama"):
    arch, kind = model_type, "causal_lm"
  else:
    raise ValueError(f"unsupported HF model_type {model_type!r}; {supported}")

  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported; only 'silu' is")
  if hf.get("use_sliding_window") or any(t != "full_attention" for t in hf.get("layer_types") or []):
    raise ValueError("sliding-window attention is not supported; only full attention is")
  if hf.get("mlp_bias"):
    raise ValueError("mlp_bias=True is not supported")
  if kind == "scalar" and _num_labels(hf) != 1:
    raise ValueError(f"{archs[0]} must have num_labels=1 for a scalar head, got {_num_labels(hf)}")

  hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
  stored = hf.get("dtype") or hf.get("torch_dtype")
  dtype = stored if stored in _ST_DTYPES else "float32"
  cfg = ModelConfig(
      vocab_size=hf["vocab_size"],
      hidden_size=hidden,
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hidden // heads,
      rope_theta=_rope_theta(hf),
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      qkv_bias=True if arch == "qwen2" else bool(hf.get("attention_bias", False)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_position_embeddings=hf.get("max_position_embeddings", 32768),
      architecture=arch,
      param_dtype=dtype,
      dtype=dtype,
  )
  return cfg, kind


def hf_config_dict(cfg: ModelConfig, kind: str = "causal_lm",
                   token_ids: dict[str, Any] | None = None) -> dict[str, Any]:
  """The `config.json` transformers' AutoConfig reads for this model."""
  if (cfg.architecture, kind) not in _HF_CLASS:
    raise ValueError(f"no HF class for architecture {cfg.architecture!r} and kind {kind!r}")
  d: dict[str, Any] = {
      "architectures": [_HF_CLASS[(cfg.architecture, kind)]],
      "model_type": cfg.architecture,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_position_embeddings,
      "rms_norm_eps": cfg.rms_norm_eps,
      # Both spellings: transformers 5 reads rope_parameters, older readers rope_theta.
      "rope_theta": cfg.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
      "tie_word_embeddings": cfg.tie_embeddings,
      "attention_dropout": 0.0,
      "initializer_range": 0.02,
      "use_cache": True,
      "dtype": cfg.param_dtype,
  }
  if cfg.architecture == "qwen2":
    d.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
  else:
    d.update(attention_bias=cfg.qkv_bias, mlp_bias=False, pretraining_tp=1)
  if kind == "scalar":
    d.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
  for k in TOKEN_ID_KEYS:
    if token_ids and token_ids.get(k) is not None:
      d[k] = token_ids[k]
  return d


def read_hf_config(hf_dir: PathLike) -> dict[str, Any]:
  path = pathlib.Path(hf_dir) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"no {CONFIG_FILE} in {hf_dir}: not an HF model directory")
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot parse {path}: {e}") from e


def token_ids_of(hf: dict[str, Any]) -> dict[str, Any]:
  """bos/eos/pad token ids of an HF config (those that are set)."""
  return {k: hf[k] for k in TOKEN_ID_KEYS if hf.get(k) is not None}


# ---------------------------------------------------------------- layouts

@dataclasses.dataclass(frozen=True)
class Layout:
  """HF tensor `key` reshaped to `split` axes, then permuted into our shape.

  `groups[a]` lists the sizes HF axis `a` splits into (`()` for a size-1 axis we drop);
  our axis `i` is split axis `perm[i]`.
  """

  key: str
  groups: tuple[tuple[int, ...], ...]
  perm: tuple[int, ...]

  @property
  def hf_shape(self) -> tuple[int, ...]:
    return tuple(math.prod(g) for g in self.groups)

  @property
  def split_shape(self) -> tuple[int, ...]:
    return tuple(s for g in self.groups for s in g)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.split_shape[p] for p in self.perm)

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    return np.transpose(x, np.argsort(self.perm)).reshape(self.hf_shape)

  def read(self, get: Callable[[tuple[slice, ...]], np.ndarray], index: tuple[slice, ...]) -> np.ndarray:
    """Our-layout block at `index` (unit-stride slices), reading only the HF rows behind it.

    A merged HF axis (e.g. N*H) is read as the contiguous run covering the block's slice of
    its leading split axis; slices of the trailing split axes are then taken in memory.
    """
    split: list[slice] = [slice(None)] * len(self.split_shape)
    for axis, s in zip(self.perm, index):
      split[axis] = s
    hf_index, block_shape, rest = [], [], []
    a = 0
    for g in self.groups:
      if not g:
        hf_index.append(slice(0, 1))
        continue
      lead, inner = split[a], math.prod(g[1:])
      hf_index.append(slice(lead.start * inner, lead.stop * inner))
      block_shape += [lead.stop - lead.start, *g[1:]]
      rest += [slice(None), *split[a + 1:a + len(g)]]
      a += len(g)
    block = np.asarray(get(tuple(hf_index))).reshape(block_shape)[tuple(rest)]
    return np.transpose(block, self.perm)


def _linear(key: str, in_dims: tuple[int, ...], out_dims: tuple[int, ...]) -> Layout:
  """HF Linear weight [prod(out), prod(in)] -> our kernel in_dims + out_dims."""
  n_out, n_in = len(out_dims), len(in_dims)
  return Layout(key, (tuple(out_dims), tuple(in_dims)),
                tuple(range(n_out, n_out + n_in)) + tuple(range(n_out)))


def layout_for(path: str, shape: tuple[int, ...]) -> Layout:
  """Layout of our parameter at '/'-joined `path` (e.g. 'model/layers/0/self_attn/q_proj/kernel')."""
  shape = tuple(shape)
  if path == "score":
    return Layout("score.weight", ((), shape), (0,))
  if path == "lm_head":
    return _linear("lm_head.weight", shape[:1], shape[1:])
  if path == "model/embed_tokens":
    return Layout("model.embed_tokens.weight", tuple((s,) for s in shape), tuple(range(len(shape))))
  key = path.replace("/", ".")
  if path.endswith("/kernel"):
    n_in = _N_IN.get(path.split("/")[-2], 1)
    return _linear(key[:-len("kernel")] + "weight", shape[:n_in], shape[n_in:])
  if path.endswith(("/bias", "/weight")):  # biases [N, H] -> [N*H]; norms [D]
    return Layout(key, (shape,), tuple(range(len(shape))))
  raise ValueError(f"no HF tensor name for parameter {path!r}")


def _implicit_zeros(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
  """HF tensors our model lacks because they are zero: Qwen2 always has q/k/v biases,
  Llama with attention_bias also has an o_proj bias."""
  out = []
  H = cfg.head_dim
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}.self_attn"
    if cfg.architecture == "qwen2" and not cfg.qkv_bias:
      out += [(f"{p}.q_proj.bias", (cfg.num_heads * H,)), (f"{p}.k_proj.bias", (cfg.num_kv_heads * H,)),
              (f"{p}.v_proj.bias", (cfg.num_kv_heads * H,))]
    if cfg.architecture == "llama" and cfg.qkv_bias:
      out.append((f"{p}.o_proj.bias", (cfg.hidden_size,)))
  return out


# ---------------------------------------------------------------- import

class _Reader:
  """Lazily opened safetensors files of one HF directory, with errors that name the file."""

  def __init__(self, hf_dir: PathLike):
    self.dir = pathlib.Path(hf_dir)
    self._files: dict[str, Any] = {}
    index, single = self.dir / INDEX_FILE, self.dir / SINGLE_FILE
    if index.is_file():
      try:
        self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
      except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot parse {index}: {e!r}") from e
      for name in sorted(set(self.weight_map.values())):
        if not (self.dir / name).is_file():
          raise FileNotFoundError(f"{index} names weight file {name!r}, which is missing from {self.dir}")
    elif single.is_file():
      self.weight_map = {k: SINGLE_FILE for k in self._file(SINGLE_FILE).keys()}
    else:
      hint = ""
      if any(self.dir.glob("pytorch_model*.bin")):
        hint = " (pytorch_model.bin is not supported; re-save with safe_serialization=True)"
      raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.dir}{hint}")

  def _file(self, name: str):
    if name not in self._files:
      path = self.dir / name
      try:
        self._files[name] = safe_open(str(path), framework="numpy").__enter__()
      except Exception as e:  # the rust reader raises its own error type
        raise ValueError(f"cannot read safetensors file {path}: {e}") from e
    return self._files[name]

  def slice(self, key: str):
    """(file name, lazy slice) of tensor `key`."""
    if key not in self.weight_map:
      raise ValueError(f"tensor {key!r} is missing from the checkpoint in {self.dir}")
    name = self.weight_map[key]
    try:
      return name, self._file(name).get_slice(key)
    except ValueError:
      raise
    except Exception as e:
      raise ValueError(f"cannot read tensor {key!r} from {self.dir / name}: {e}") from e

  def getter(self, key: str) -> Callable[[tuple[slice, ...]], np.ndarray]:
    name, sl = self.slice(key)

    def get(index):
      try:
        return sl[index]
      except Exception as e:
        raise ValueError(f"cannot read tensor {key!r} from {self.dir / name}: {e}") from e
    return get

  def close(self):
    for f in self._files.values():
      f.__exit__(None, None, None)
    self._files.clear()


def _normalize(index: Any, shape: tuple[int, ...]) -> tuple[slice, ...]:
  """Shard index from make_array_from_callback -> one explicit (start, stop) slice per axis."""
  index = tuple(index or ())
  index += (slice(None),) * (len(shape) - len(index))
  out = []
  for s, n in zip(index, shape):
    start, stop, step = s.indices(n)
    if step != 1:
      raise ValueError(f"strided shard index {s} is not supported")
    out.append(slice(start, stop))
  return tuple(out)


def load_hf(hf_dir: PathLike, *, mesh: Mesh | None = None,
            dtype: str | None = None) -> tuple[ModelConfig, str, dict]:
  """(config, kind, params) from an HF directory with one or index-sharded safetensors files.

  With `mesh`, every parameter is built shard by shard on its devices (each device reads
  only its slice of the file); without one it lands on the default device. `dtype` sets the
  param and compute dtype (default: the checkpoint's stored dtype).
  """
  cfg, kind = config_from_hf(read_hf_config(hf_dir))
  if dtype is not None:
    cfg = cfg.replace(param_dtype=dtype, dtype=dtype)
  _, abstract = build.abstract_model(cfg, kind)
  reader = _Reader(hf_dir)
  try:
    def load(path, leaf):
      p = shd.path_str(path)
      shape, np_dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
      lay = layout_for(p, shape)
      name, sl = reader.slice(lay.key)
      found = tuple(sl.get_shape())
      if found != lay.hf_shape:
        raise ValueError(f"tensor {lay.key!r} in {reader.dir / name} has shape {list(found)}, "
                         f"expected {list(lay.hf_shape)} from {CONFIG_FILE}")
      get = reader.getter(lay.key)
      if mesh is None:
        return jnp.asarray(lay.read(get, _normalize((), shape)).astype(np_dtype))
      blocks: dict[tuple, np.ndarray] = {}  # replicated shards are read once

      def block(index):
        idx = _normalize(index, shape)
        k = tuple((s.start, s.stop) for s in idx)
        if k not in blocks:
          blocks[k] = lay.read(get, idx).astype(np_dtype)
        return blocks[k]
      sharding = NamedSharding(mesh, shd.spec_for(p, shape, mesh))
      return jax.make_array_from_callback(shape, sharding, block)

    params = jax.tree_util.tree_map_with_path(load, abstract)
    for key, shape in _implicit_zeros(cfg):
      if key in reader.weight_map and np.any(reader.getter(key)(tuple(slice(0, n) for n in shape))):
        raise ValueError(f"tensor {key!r} is non-zero; this decoder has no such parameter")
  finally:
    reader.close()
  return cfg, kind, params


# ---------------------------------------------------------------- export

def _write_safetensors(path: pathlib.Path, entries: list[tuple[str, np.dtype, tuple[int, ...],
                                                                Callable[[], np.ndarray]]]) -> None:
  """Stream tensors into one safetensors file: header first, then one tensor in memory at a time."""
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for key, dt, shape, _ in entries:
    n = math.prod(shape) * dt.itemsize
    header[key] = {"dtype": _ST_DTYPES[dt.name], "shape": list(shape), "data_offsets": [offset, offset + n]}
    offset += n
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for key, dt, shape, fetch in entries:
      arr = np.ascontiguousarray(fetch(), dtype=dt)
      if arr.shape != shape:
        raise AssertionError(f"{key}: built shape {arr.shape}, planned {shape}")
      f.write(arr.tobytes())
  os.replace(tmp, path)


def _tokenizer_pad_id(tokenizer_dir: pathlib.Path) -> int | None:
  """Id of the tokenizer's pad token, read from its JSON files (no tokenizer library needed)."""
  try:
    tcfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
  except (OSError, ValueError):
    return None
  pad = tcfg.get("pad_token")
  pad = pad.get("content") if isinstance(pad, dict) else pad
  if not pad:
    return None
  for i, tok in (tcfg.get("added_tokens_decoder") or {}).items():
    if tok.get("content") == pad:
      return int(i)
  try:
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
  except (OSError, ValueError):
    return None
  for t in tok.get("added_tokens") or []:
    if t.get("content") == pad:
      return int(t["id"])
  vocab = (tok.get("model") or {}).get("vocab")
  if isinstance(vocab, dict) and pad in vocab:
    return int(vocab[pad])
  if isinstance(vocab, list):  # unigram: [[piece, score], ...]
    for i, entry in enumerate(vocab):
      if entry and entry[0] == pad:
        return i
  return None


def copy_sidecar_files(src: PathLike, dst: PathLike) -> list[str]:
  """Copy tokenizer / generation-config files (never weights) from `src` to `dst`."""
  src, dst = pathlib.Path(src), pathlib.Path(dst)
  if not src.is_dir():
    raise FileNotFoundError(f"tokenizer directory {src} does not exist")
  names = [n for n in SIDECAR_FILES if (src / n).is_file()]
  dst.mkdir(parents=True, exist_ok=True)
  for n in names:
    if (src / n).resolve() != (dst / n).resolve():
      shutil.copyfile(src / n, dst / n)
  return names


def _host(x: Any) -> np.ndarray:
  """One full tensor on host (gathered from its shards)."""
  return np.asarray(shd.to_host(x))


def save_hf(out_dir: PathLike, params: dict, cfg: ModelConfig, *, kind: str = "causal_lm",
            tokenizer_dir: PathLike | None = None, max_shard_bytes: int = 2**31,
            token_ids: dict[str, Any] | None = None) -> list[str]:
  """Write an HF directory transformers loads: config.json, safetensors shards (+ index when
  more than one) and the tokenizer files. Returns the weight file names.

  Tensors keep their dtype; `token_ids` (bos/eos/pad) go into config.json, and the
  tokenizer's own pad token, when it has one, sets pad_token_id.
  """
  if max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
  _, abstract = build.abstract_model(cfg, kind)
  want = {shd.path_str(p): tuple(l.shape) for p, l in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  have = {shd.path_str(p): tuple(l.shape) for p, l in leaves}
  if have != want:
    diff = sorted(set(have.items()) ^ set(want.items()))
    raise ValueError(f"params do not match the {kind} model of this config; differing entries: {diff[:6]}")

  entries = []
  for path, leaf in leaves:
    lay = layout_for(shd.path_str(path), leaf.shape)
    entries.append((lay.key, np.dtype(leaf.dtype), lay.hf_shape,
                    lambda lay=lay, leaf=leaf: lay.to_hf(_host(leaf))))
  zero_dt = np.dtype(cfg.jnp_param_dtype)
  for key, shape in _implicit_zeros(cfg):
    entries.append((key, zero_dt, shape, lambda shape=shape: np.zeros(shape, zero_dt)))

  shards: list[list] = [[]]
  size = 0
  for e in entries:
    n = math.prod(e[2]) * e[1].itemsize
    if shards[-1] and size + n > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(e)
    size += n

  names = ([SINGLE_FILE] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  if not is_primary():  # process 0 writes; the others only took part in gathering the tensors
    for e in entries:
      e[3]()
    return names
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  for stale in [out / SINGLE_FILE, out / INDEX_FILE, *out.glob("model-*-of-*.safetensors")]:
    stale.unlink(missing_ok=True)
  for name, shard in zip(names, shards):
    _write_safetensors(out / name, shard)
  if len(shards) > 1:
    total = sum(math.prod(e[2]) * e[1].itemsize for e in entries)
    index = {"metadata": {"total_size": total},
             "weight_map": {e[0]: name for name, shard in zip(names, shards) for e in shard}}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

  ids = dict(token_ids or {})
  if tokenizer_dir is not None:
    if not copy_sidecar_files(tokenizer_dir, out):
      raise FileNotFoundError(f"no tokenizer files ({', '.join(SIDECAR_FILES[:2])}, ...) in {tokenizer_dir}")
    pad = _tokenizer_pad_id(out)
    if pad is not None:
      ids["pad_token_id"] = pad
  (out / CONFIG_FILE).write_text(json.dumps(hf_config_dict(cfg, kind, ids), indent=2) + "\n")
  return names
