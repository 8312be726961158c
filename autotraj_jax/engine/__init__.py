"""Generation backends behind one seam: the in-process JAX engine and an SGLang client."""

from autotraj_jax.engine.backend import (Completion, GenerationRequest, LLMBackend, SamplingParams,
                                         find_stop)
from autotraj_jax.engine.jax_engine import EngineConfig, JaxEngine

__all__ = ["Completion", "GenerationRequest", "LLMBackend", "SamplingParams", "find_stop",
           "EngineConfig", "JaxEngine"]
