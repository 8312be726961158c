"""Decoder models, presets and HF checkpoint conversion."""

from autotraj_jax.models import build
from autotraj_jax.models.build import abstract_model, init_model, init_sharded, merge
from autotraj_jax.models.config import PRESETS, ModelConfig, get_preset
from autotraj_jax.models.decoder import Cache, CausalLM, LayerCache, ScalarModel, causal_mask, gather_last, init_cache

__all__ = ["build", "abstract_model", "init_model", "init_sharded", "merge", "PRESETS", "ModelConfig", "get_preset",
           "Cache", "CausalLM", "LayerCache", "ScalarModel", "causal_mask", "gather_last", "init_cache"]
