"""The SGLang `/generate` protocol: request bodies, response checks, server limits, URLs.

Pure functions of the wire format, shared by the client (`sglang_backend.py`) and its tests:
prompts go in as token ids and the sampled ids and logprobs come back untouched, so trajectories
keep exactly what the server generated. Anything that would corrupt that (a trimmed stop, ids that
disagree with the logprobs) is an error, never a silent fix-up.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Protocol, Sequence

from autotraj_jax.engine.backend import Completion, GenerationRequest

logger = logging.getLogger(__name__)

SEED_MODULUS = 2**31  # the server keeps seeds as int32


class Decoder(Protocol):

  def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
    ...


class SGLangResponseError(RuntimeError):
  """The server answered, but with something that cannot be turned into a faithful Completion."""


def request_payload(req: GenerationRequest, seed: int | None = None,
                    max_new_tokens: int | None = None) -> dict[str, Any]:
  """JSON body of `POST /generate` for one request; `seed` and `max_new_tokens` (a cap the
  server's context imposes) override the request's own."""
  s = req.sampling
  seed = s.seed if seed is None else seed
  sampling: dict[str, Any] = {
      "max_new_tokens": s.max_new_tokens if max_new_tokens is None else min(max_new_tokens, s.max_new_tokens),
      "temperature": s.temperature,
      "top_p": s.top_p,
      "top_k": s.top_k,
      "stop": list(req.stop),
      "stop_token_ids": list(req.stop_token_ids),
      # Keep the stop string / stop token in output_ids: trajectories must end where sampling did.
      "no_stop_trim": True,
      # SGLang drops special-token ids from output_ids unless told not to (<|im_end|> would vanish).
      "skip_special_tokens": False,
  }
  if seed is not None:
    sampling["sampling_seed"] = seed % SEED_MODULUS
  # Always asked for: sglang-jax 0.1.0rc0 crashes when one batch mixes requests with and
  # without logprobs. They are dropped again when the caller did not want them.
  return {"input_ids": list(req.prompt_ids), "sampling_params": sampling, "return_logprob": True}


def parse_response(req: GenerationRequest, data: Any, tokenizer: Decoder) -> Completion:
  """Completion from a `/generate` response, checking it against what was asked for."""
  if not isinstance(data, dict) or "output_ids" not in data or "meta_info" not in data:
    raise SGLangResponseError(f"response lacks output_ids/meta_info: {str(data)[:300]}")
  ids = [int(t) for t in data["output_ids"]]
  meta = data["meta_info"]
  reason = meta.get("finish_reason")
  if not isinstance(reason, dict):
    raise SGLangResponseError(f"response has no finish_reason dict: {reason!r}")
  kind, matched = reason.get("type"), reason.get("matched")
  if len(ids) > req.sampling.max_new_tokens:
    raise SGLangResponseError(f"server returned {len(ids)} tokens for max_new_tokens="
                              f"{req.sampling.max_new_tokens}")

  logprobs = None
  entries = meta.get("output_token_logprobs")
  if entries is not None:  # the sampler's own record of what it drew: cross-check the ids
    lp_ids = [int(e[1]) for e in entries]
    if ids and len(lp_ids) > len(ids) and lp_ids[len(lp_ids) - len(ids):] == ids:
      # sglang-jax 0.1.0rc0 now and then sends a request's early logprob entries twice (the
      # list is the first k entries, then all of them); the tail is the record of the output.
      logger.warning("server repeated %d logprob entries before the %d of its output; kept the tail",
                     len(lp_ids) - len(ids), len(ids))
      entries, lp_ids = entries[len(lp_ids) - len(ids):], ids
    if lp_ids != ids:
      raise SGLangResponseError(
          f"output_ids ({len(ids)} tokens) disagree with the ids in output_token_logprobs "
          f"({len(lp_ids)}); the server altered the sampled ids (e.g. skipped special tokens)")
    logprobs = [float(e[0]) for e in entries]
  elif req.return_logprobs:
    raise SGLangResponseError("return_logprob was set but the response has no output_token_logprobs")
  if not req.return_logprobs:
    logprobs = None

  text = tokenizer.decode(ids, skip_special_tokens=False)
  if kind == "length":
    return Completion(ids, logprobs, text, "length")
  if kind != "stop":
    raise SGLangResponseError(f"unexpected finish_reason {reason!r}")
  if isinstance(matched, str):
    if matched not in req.stop:
      # sglang reports a NaN / out-of-vocabulary sample as a matched "stop string".
      raise SGLangResponseError(f"server stopped on {matched!r}, which is not one of the "
                                f"requested stop strings {list(req.stop)}")
    if matched not in text:
      raise SGLangResponseError(
          f"server matched stop string {matched!r} but it is missing from the decoded output "
          f"{text[-80:]!r}: the server trimmed it (no_stop_trim not honoured); refusing to "
          f"return a truncated trajectory")
    return Completion(ids, logprobs, text, "stop", matched_stop=matched)
  if matched is None:
    raise SGLangResponseError(f"finish_reason {reason!r} names no stop string or token")
  stop_ids = matched if isinstance(matched, list) else [matched]
  if not ids or not all(isinstance(t, int) for t in stop_ids) or ids[-1] not in stop_ids:
    raise SGLangResponseError(
        f"server stopped on token {matched!r} but the output does not end with it (last id: "
        f"{ids[-1] if ids else None}): the server trimmed the stop token")
  return Completion(ids, logprobs, text, "eos")


# What SGLang and sglang-jax say when a prompt (with its completion budget) does not fit:
# "The input (N tokens) is longer than the model's context length (M tokens).", "Requested token
# count exceeds the model's maximum context length of M tokens ...", "Input length (N tokens)
# exceeds the maximum allowed length (M tokens)."
_CONTEXT_ERROR = re.compile(r"(longer than|exceeds).{0,80}(context length|maximum allowed length)",
                            re.IGNORECASE | re.DOTALL)


def is_context_error(message: str) -> bool:
  """Whether a server's 4xx message says the prompt is longer than its context."""
  return bool(_CONTEXT_ERROR.search(message))


def check_url(base_url: str | None) -> str:
  """`base_url` without a trailing slash; a clear ValueError naming the config field if unusable.

  Why: an empty URL otherwise surfaces later as "server at  is not reachable".
  """
  url = (base_url or "").strip().rstrip("/")
  if not url:
    raise ValueError("SGLang server URL is empty: set the config field sglang.urls (or the role's "
                     "sglang_urls), e.g. --config.sglang.urls=http://127.0.0.1:30000,http://127.0.0.1:30001")
  if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1]) == 0:
    raise ValueError(f"SGLang server URL {base_url!r} (config field sglang.urls) must look like "
                     "http://host:port")
  return url


def check_urls(urls: str | Sequence[str] | None) -> tuple[str, ...]:
  """Normalised server URLs; a string may hold one URL or several, comma-separated (as on the
  command line). Why refuse duplicates: the same server twice would get twice the load cap."""
  items = urls.split(",") if isinstance(urls, str) else list(urls or ())
  out = tuple(check_url(u) for u in (items or [None]))
  for i, u in enumerate(out):
    if u in out[:i]:
      raise ValueError(f"SGLang server {u} is listed twice in the config field sglang.urls")
  return out


def context_limits(server_info: dict[str, Any]) -> tuple[int | None, int | None]:
  """(context length, longest prompt) a server takes, from `/get_server_info`; None: not said.

  sglang refuses a prompt of >= context_length tokens or >= max_req_input_len tokens, and a
  request whose prompt + max_new_tokens reaches context_length.
  """
  def positive(key: str) -> int | None:
    v = server_info.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None

  context, max_input = positive("context_length"), positive("max_req_input_len")
  bounds = [b for b in (context and context - 2, max_input and max_input - 1) if b is not None]
  return context, (min(bounds) if bounds else None)


def new_token_cap(prompt_len: int, context_length: int | None, max_prompt_tokens: int | None) -> int | None:
  """Most tokens a prompt of `prompt_len` leaves room for: None if unbounded, 0 if it does not fit."""
  if max_prompt_tokens is not None and prompt_len > max_prompt_tokens:
    return 0
  if context_length is None:
    return None
  return max(context_length - 1 - prompt_len, 0)
