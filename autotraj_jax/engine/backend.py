"""The one generation seam: `LLMBackend.generate(requests) -> completions`.

Data generation, repair, RL rollouts and evaluation all call this. Requests carry prompt token
ids (never text: a server's tokenizer may split text differently) and completions carry the
sampled token ids with their sampler logprobs, so trajectories keep exactly what was generated.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Protocol, Sequence, runtime_checkable

FinishReason = Literal["stop", "eos", "length"]


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
  """

  token_ids: list[int]
  logprobs: list[float] | None
  text: str
  finish_reason: FinishReason
  matched_stop: str | None = None


@runtime_checkable
class LLMBackend(Protocol):

  def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
    """One completion per request, in request order."""
    ...


def find_stop(text: str, stops: Sequence[str], search_from: int = 0) -> tuple[int, str] | None:
  """Earliest end offset of any stop string in `text[search_from:]`, and which one."""
  best = None
  for s in stops:
    i = text.find(s, search_from)
    if i >= 0 and (best is None or i + len(s) < best[0]):
      best = (i + len(s), s)
  return best
