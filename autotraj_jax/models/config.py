"""Decoder configuration and size presets (Qwen2 / Llama family)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# What the backward pass keeps of each decoder block (see `decoder.remat_policy`):
# 'none' everything, 'full' only the block input, 'dots' also the matmul outputs.
REMAT_POLICIES = ("none", "full", "dots")


def remat_name(remat: bool | str) -> str:
  """A remat setting as a policy name; the old booleans mean 'none' / 'full'."""
  if isinstance(remat, bool):
    return "full" if remat else "none"
  if remat not in REMAT_POLICIES:
    raise ValueError(f"ModelConfig.remat={remat!r}; expected one of {REMAT_POLICIES} or a bool")
  return remat


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a decoder-only transformer.

  One config covers Qwen2/Qwen2.5 (`qkv_bias=True`) and Llama-style models
  (`qkv_bias=False`); `architecture` only picks the HF class on export.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  qkv_bias: bool = True
  tie_embeddings: bool = True
  max_position_embeddings: int = 32768
  architecture: str = "qwen2"
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat: bool | str = False  # a bool or one of REMAT_POLICIES
  # >0: the training losses compute logits and log-softmax this many positions at a time, so
  # [B, L, V] fp32 logits never exist at once (0: the whole sequence, as before).
  logits_chunk: int = 0
  attention_impl: str | None = None  # None: XLA; "cudnn": flash attention on NVIDIA GPUs

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                 "num_heads", "num_kv_heads", "head_dim"):
      if getattr(self, name) <= 0:
        raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of "
                       f"num_kv_heads ({self.num_kv_heads}) for grouped-query attention")
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
    for name in ("param_dtype", "dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}; expected one of {sorted(_DTYPES)}")
    remat_name(self.remat)
    if self.logits_chunk < 0:
      raise ValueError(f"ModelConfig.logits_chunk must be >= 0, got {self.logits_chunk}")
    if self.architecture not in ("qwen2", "llama"):
      raise ValueError(f"unsupported architecture {self.architecture!r}; expected 'qwen2' or 'llama'")

  @property
  def remat_policy(self) -> str:
    return remat_name(self.remat)

  @property
  def jnp_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def jnp_param_dtype(self):
    return _DTYPES[self.param_dtype]

  def replace(self, **kw: Any) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    return cls(**d)

  def num_params(self, include_embeddings: bool = True) -> int:
    d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
    attn = d * h * (self.num_heads * 2 + self.num_kv_heads * 2)
    if self.qkv_bias:
      attn += h * (self.num_heads + 2 * self.num_kv_heads)
    per_layer = attn + 3 * d * f + 2 * d
    total = self.num_layers * per_layer + d
    if include_embeddings:
      total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return total


# Published Qwen2.5 shapes; the tiny ones are for tests and the CPU demo.
PRESETS: dict[str, ModelConfig] = {
    "qwen2.5-0.5b": ModelConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64),
    "qwen2.5-1.5b": ModelConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128),
    "qwen2.5-3b": ModelConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                              num_layers=36, num_heads=16, num_kv_heads=2, head_dim=128),
    "qwen2.5-7b": ModelConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                              num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
                              tie_embeddings=False),
    # ~0.5B with head_dim 128 (servable by sglang-jax), for speed benchmarks.
    "bench-0.5b": ModelConfig(vocab_size=32768, hidden_size=1024, intermediate_size=4096,
                              num_layers=24, num_heads=8, num_kv_heads=2, head_dim=128),
    "tiny": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0),
    # Demo policy: a few million parameters, head_dim 128 and 2 KV heads so sglang-jax serves it.
    "demo": ModelConfig(vocab_size=2048, hidden_size=256, intermediate_size=768, num_layers=4,
                        num_heads=2, num_kv_heads=2, head_dim=128, rope_theta=10000.0,
                        max_position_embeddings=4096),
    # The demo's repairer: ~2.5x the demo policy, as a strong LLM stands to a small policy.
    "demo-repairer": ModelConfig(vocab_size=2048, hidden_size=384, intermediate_size=1024, num_layers=5,
                                 num_heads=3, num_kv_heads=3, head_dim=128, rope_theta=10000.0,
                                 max_position_embeddings=4096),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
  if name not in PRESETS:
    raise KeyError(f"unknown model preset {name!r}; available: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)
