"""Generation backends behind one seam: the in-process JAX engine and an SGLang client.

The JAX engine is imported on first use, so code that only needs the request/completion types
(the tool loop, evaluation, question files) does not pay for importing JAX.
"""

from typing import Any

from autotraj_jax.engine.backend import (
  PROMPT_TOO_LONG,
  Completion,
  GenerationRequest,
  LLMBackend,
  SamplingParams,
  find_stop,
  prompt_too_long,
)

__all__ = ["Completion", "GenerationRequest", "LLMBackend", "SamplingParams", "find_stop", "PROMPT_TOO_LONG",
           "prompt_too_long", "EngineConfig", "JaxEngine"]

_LAZY = {"EngineConfig", "JaxEngine"}


def __getattr__(name: str) -> Any:
  if name in _LAZY:
    from autotraj_jax.engine import jax_engine  # pylint: disable=import-outside-toplevel
    return getattr(jax_engine, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
