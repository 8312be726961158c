"""The one generation seam: `LLMBackend.generate(requests) -> completions`.

Data generation, repair, RL rollouts and evaluation all call this. Requests carry prompt token
ids (never text: a server's tokenizer may split text differently) and completions carry the
sampled token ids with their sampler logprobs, so trajectories keep exactly what was generated.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Protocol, Sequence, runtime_checkable

from autotraj_jax.distributed import from_primary, is_primary

FinishReason = Literal["stop", "eos", "length", "prompt_too_long"]
# A request whose prompt the backend cannot take: answered with no tokens so that one long
# prompt ends its own trajectory instead of the whole batch.
PROMPT_TOO_LONG = "prompt_too_long"


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  temperature: float = 1.0  # 0 means greedy
  top_p: float = 1.0
  top_k: int = -1           # -1: no top-k filter
  max_new_tokens: int = 256
  seed: int | None = None   # per-request seed: the same seed gives the same sample

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.top_k == 0 or self.top_k < -1:
      raise ValueError(f"top_k must be -1 (off) or positive, got {self.top_k}")
    if self.max_new_tokens <= 0:
      raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
  prompt_ids: tuple[int, ...]
  sampling: SamplingParams = SamplingParams()
  stop: tuple[str, ...] = ()            # stop strings, kept at the end of the completion
  stop_token_ids: tuple[int, ...] = ()  # extra stop tokens besides the model's EOS
  return_logprobs: bool = True

  def __post_init__(self):
    if not self.prompt_ids:
      raise ValueError("a generation request needs at least one prompt token")
    object.__setattr__(self, "prompt_ids", tuple(int(t) for t in self.prompt_ids))
    object.__setattr__(self, "stop", tuple(self.stop))
    object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


@dataclasses.dataclass
class Completion:
  """What one request produced.

  `token_ids` end with the token that completed a stop string or with the stop/EOS token.
  `text` is `tokenizer.decode(token_ids)`: it contains the stop string (and, if the last token
  runs past it, the rest of that token). `matched_stop` is the stop string that ended it.
  finish_reason "prompt_too_long": the backend could not take the prompt; no tokens.
  """

  token_ids: list[int]
  logprobs: list[float] | None
  text: str
  finish_reason: FinishReason
  matched_stop: str | None = None


def prompt_too_long(req: GenerationRequest) -> Completion:
  """The answer to a request whose prompt does not fit the backend: no tokens, nothing sampled."""
  return Completion(token_ids=[], logprobs=[] if req.return_logprobs else None, text="",
                    finish_reason=PROMPT_TOO_LONG)


@runtime_checkable
class LLMBackend(Protocol):
  """Multi-turn callers send each turn's full context as `prompt_ids`; a backend reuses the KV of
  a context's earlier turns by token prefix on its own (the JAX engine's prefix cache, SGLang's
  radix cache), so requests carry no session id. A backend with per-prefix state may also have
  an optional `release(contexts)`: see `release_contexts`."""

  def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
    """One completion per request, in request order."""
    ...


def generate_on_all_hosts(backend: LLMBackend, requests: Sequence[GenerationRequest]) -> list[Completion]:
  """`backend.generate` in a run of one or several processes, each sending the same requests.

  A backend whose model every process holds a part of (the JAX engine: `collective = True`) is
  called by every process. Any other (a server) is called by process 0 alone, whose completions
  every process then gets: the server sees each request once and no host's sample can differ."""
  if getattr(backend, "collective", False):
    return backend.generate(requests)
  return from_primary(backend.generate(requests) if is_primary() else None)


def release_contexts(backend: LLMBackend, contexts: Sequence[Sequence[int]]) -> None:
  """Tell `backend` these token sequences (finished trajectories) will not be continued, so it
  can free what it keeps for them. Backends without a `release` method (SGLang evicts its radix
  cache by itself) are left alone."""
  release = getattr(backend, "release", None)
  if release is not None and contexts:
    release([list(c) for c in contexts])


def find_stop(text: str, stops: Sequence[str], search_from: int = 0) -> tuple[int, str] | None:
  """Earliest end offset of any stop string in `text[search_from:]`, and which one."""
  best = None
  for s in stops:
    i = text.find(s, search_from)
    if i >= 0 and (best is None or i + len(s) < best[0]):
      best = (i + len(s), s)
  return best
