"""`LLMBackend` over an SGLang server's native HTTP API (`POST /generate` with `input_ids`).

Works with SGLang (GPU) and sglang-jax (TPU/CPU) alike; no sglang package is imported, the
server runs as its own process. Prompts go in as token ids and the sampled ids and logprobs
come back untouched, so trajectories keep exactly what the server generated. Anything that
would corrupt that (a trimmed stop, ids that disagree with the logprobs) is an error, never
a silent fix-up.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import random
import threading
import time
from typing import Any, Protocol, Sequence

import requests as rq
from requests.adapters import HTTPAdapter

from autotraj_jax.engine.backend import Completion, GenerationRequest

logger = logging.getLogger(__name__)

SEED_MODULUS = 2**31  # the server keeps seeds as int32


class Decoder(Protocol):

  def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
    ...


class SGLangResponseError(RuntimeError):
  """The server answered, but with something that cannot be turned into a faithful Completion."""


class SGLangGenerationError(RuntimeError):
  """Some requests still failed after all retries; `failures` maps request index -> reason."""

  def __init__(self, message: str, failures: dict[int, str]):
    super().__init__(message)
    self.failures = failures


class _Retryable(Exception):
  """A transient failure (connection error, 5xx, server-side abort): try again after a pause."""


@dataclasses.dataclass(frozen=True)
class _Attempt:
  ok: bool
  value: Any  # Completion when ok, else the failure reason


def request_payload(req: GenerationRequest, seed: int | None = None) -> dict[str, Any]:
  """JSON body of `POST /generate` for one request; `seed` overrides the request's own."""
  s = req.sampling
  seed = s.seed if seed is None else seed
  sampling: dict[str, Any] = {
      "max_new_tokens": s.max_new_tokens,
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


class SGLangBackend:
  """HTTP client of one SGLang server: bounded concurrency, per-request timeout, retries.

  `generate` returns one Completion per request in request order, or raises
  `SGLangGenerationError` naming every request that still failed after `max_retries`.
  """

  def __init__(self, base_url: str, tokenizer: Decoder, *, max_concurrency: int = 32,
               timeout_s: float = 600, max_retries: int = 5, backoff_s: float = 0.5,
               connect_timeout_s: float = 10.0, startup_wait_s: float = 5.0):
    if max_concurrency <= 0:
      raise ValueError(f"max_concurrency must be positive, got {max_concurrency}")
    if timeout_s <= 0:
      raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if max_retries < 0 or backoff_s < 0:
      raise ValueError(f"max_retries and backoff_s must be >= 0, got {max_retries}, {backoff_s}")
    self.base_url = base_url.rstrip("/")
    self.tokenizer = tokenizer
    self.max_concurrency = max_concurrency
    self.timeout = (min(connect_timeout_s, timeout_s), timeout_s)
    self.max_retries = max_retries
    self.backoff_s = backoff_s
    self._local = threading.local()
    self._sessions: list[rq.Session] = []
    self._lock = threading.Lock()
    self._pool: concurrent.futures.ThreadPoolExecutor | None = None
    self._wait_healthy(startup_wait_s)
    self.model_info = self._get_json("/get_model_info")
    if self.model_info.get("is_generation") is False:
      raise ValueError(f"the server at {self.base_url} serves an embedding model, not a generator")
    # Seeds only take effect with --enable-deterministic-sampling; with it, a request without
    # a seed gets a fixed default, so identical prompts would give identical "samples".
    self.deterministic_sampling: bool | None = self._server_flag("enable_deterministic_sampling")
    self._seeds = random.SystemRandom()
    self._warned_seed = False

  # -------------------------------------------------------------- plumbing

  def _session(self) -> rq.Session:
    s = getattr(self._local, "session", None)
    if s is None:
      s = rq.Session()
      adapter = HTTPAdapter(pool_maxsize=1, max_retries=0)  # retries are ours
      s.mount("http://", adapter)
      s.mount("https://", adapter)
      self._local.session = s
      with self._lock:
        self._sessions.append(s)
    return s

  def _wait_healthy(self, wait_s: float) -> None:
    """`GET /health` until it answers 200 or `wait_s` passes: a server may still be starting."""
    deadline = time.monotonic() + wait_s
    delay, last = 0.1, "no attempt"
    while True:
      try:
        r = self._session().get(self.base_url + "/health", timeout=self.timeout[0])
        if r.status_code == 200:
          return
        last = f"HTTP {r.status_code}"
      except rq.RequestException as e:
        last = f"{type(e).__name__}: {e}"
      if time.monotonic() + delay > deadline:
        raise ConnectionError(f"SGLang server at {self.base_url} is not reachable/healthy "
                              f"(GET /health: {last}); is it running and is the URL right?")
      time.sleep(delay)
      delay = min(delay * 2, 1.0)

  def _get_json(self, path: str) -> dict[str, Any]:
    try:
      r = self._session().get(self.base_url + path, timeout=self.timeout)
      r.raise_for_status()
      return r.json()
    except rq.RequestException as e:
      raise ConnectionError(f"GET {self.base_url}{path} failed: {e}") from e
    except ValueError as e:
      raise ConnectionError(f"GET {self.base_url}{path} did not return JSON: {e}") from e

  def _server_flag(self, name: str) -> bool | None:
    """A boolean server argument from `/get_server_info`, or None when the server does not say."""
    try:
      r = self._session().get(self.base_url + "/get_server_info", timeout=self.timeout)
      value = r.json().get(name) if r.status_code == 200 else None
    except (rq.RequestException, ValueError, AttributeError):
      return None
    return value if isinstance(value, bool) else None

  def _seed_for(self, req: GenerationRequest) -> int | None:
    """A fresh random seed for an unseeded sampled request on a seed-honouring server."""
    if req.sampling.seed is None and not req.sampling.greedy and self.deterministic_sampling:
      return self._seeds.randrange(SEED_MODULUS)
    return None

  def _post_once(self, req: GenerationRequest, seed: int | None) -> Completion:
    try:
      r = self._session().post(self.base_url + "/generate", json=request_payload(req, seed),
                               timeout=self.timeout)
    except rq.ConnectionError as e:  # includes connect timeouts
      raise _Retryable(f"connection error: {e}") from e
    except rq.Timeout as e:  # the server took the request: retrying would queue it twice
      raise TimeoutError(f"no answer within {self.timeout[1]} s: {e}") from e
    except rq.RequestException as e:  # e.g. a connection cut mid-body
      raise _Retryable(f"{type(e).__name__}: {e}") from e
    if r.status_code >= 500:
      raise _Retryable(f"HTTP {r.status_code}: {r.text[:300]}")
    if r.status_code != 200:
      raise SGLangResponseError(f"HTTP {r.status_code}: {r.text[:300]}")
    try:
      data = r.json()
    except ValueError as e:
      raise SGLangResponseError(f"response is not JSON: {r.text[:300]}") from e
    reason = (data.get("meta_info") or {}).get("finish_reason") if isinstance(data, dict) else None
    if isinstance(reason, dict) and reason.get("type") == "abort":
      status = reason.get("status_code")
      msg = f"server aborted the request: {reason.get('message')} (status {status})"
      if isinstance(status, int) and 400 <= status < 500:
        raise SGLangResponseError(msg)
      raise _Retryable(msg)
    return parse_response(req, data, self.tokenizer)

  def _run(self, req: GenerationRequest) -> _Attempt:
    seed = self._seed_for(req)
    for attempt in range(self.max_retries + 1):
      try:
        return _Attempt(True, self._post_once(req, seed))
      except _Retryable as e:
        reason = f"{e} (after {attempt + 1} attempts)"
        if attempt == self.max_retries:
          return _Attempt(False, reason)
        pause = self.backoff_s * 2 ** attempt
        time.sleep(pause + random.uniform(0, pause / 2))
      except Exception as e:  # not transient: report it, never drop the request
        return _Attempt(False, f"{type(e).__name__}: {e}")
    raise AssertionError("unreachable")

  # -------------------------------------------------------------- API

  def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
    """One completion per request, in request order; many in flight at once."""
    reqs = list(requests)
    if not reqs:
      return []
    if (self.deterministic_sampling is False and not self._warned_seed
        and any(r.sampling.seed is not None and not r.sampling.greedy for r in reqs)):
      self._warned_seed = True
      logger.warning("the SGLang server at %s ignores per-request seeds (it was not launched "
                     "with --enable-deterministic-sampling): seeded samples are not reproducible",
                     self.base_url)
    with self._lock:
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(self.max_concurrency,
                                                           thread_name_prefix="sglang")
      pool = self._pool
    attempts = list(pool.map(self._run, reqs))
    failures = {i: a.value for i, a in enumerate(attempts) if not a.ok}
    if failures:
      shown = "; ".join(f"#{i}: {why}" for i, why in list(failures.items())[:5])
      more = f"; ... and {len(failures) - 5} more" if len(failures) > 5 else ""
      raise SGLangGenerationError(
          f"{len(failures)} of {len(reqs)} generation requests to {self.base_url} failed: "
          f"{shown}{more}", failures)
    return [a.value for a in attempts]

  def close(self) -> None:
    with self._lock:
      pool, self._pool = self._pool, None
      sessions, self._sessions = self._sessions, []
    if pool is not None:
      pool.shutdown(wait=True)
    for s in sessions:
      s.close()

  def __enter__(self) -> "SGLangBackend":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
