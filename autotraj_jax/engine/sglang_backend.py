"""`LLMBackend` over SGLang servers' native HTTP API (`POST /generate` with `input_ids`).

Works with SGLang (GPU) and sglang-jax (TPU/CPU) alike; no sglang package is imported, the
servers run as their own processes. One backend spreads a batch over several servers of the
same model (least outstanding requests first) and moves a request to another server when
its server dies, so stage 1 scales past one server without losing or reordering requests.
Prompts go in as token ids and the sampled ids and logprobs come back untouched, so
trajectories keep exactly what the server generated. Anything that would corrupt that (a
trimmed stop, ids that disagree with the logprobs) is an error, never a silent fix-up.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import random
import threading
import time
from typing import Any, Sequence

import requests as rq
from requests.adapters import HTTPAdapter

from autotraj_jax.engine.backend import Completion, GenerationRequest, prompt_too_long
from autotraj_jax.engine.sglang_protocol import (
  SEED_MODULUS,
  Decoder,
  SGLangResponseError,
  check_urls,
  context_limits,
  is_context_error,
  new_token_cap,
  parse_response,
  request_payload,
)

logger = logging.getLogger(__name__)

__all__ = ["SGLangBackend", "SGLangGenerationError", "SGLangResponseError", "SGLangServersDown"]


class SGLangGenerationError(RuntimeError):
  """Some requests still failed after all retries; `failures` maps request index -> reason."""

  def __init__(self, message: str, failures: dict[int, str]):
    super().__init__(message)
    self.failures = failures


class SGLangServersDown(SGLangGenerationError):
  """Every server was down (and stayed down through its re-probes) while requests were pending."""


class _Retryable(Exception):
  """The server failed, not the request (connection error, 5xx, server-side abort): try it elsewhere."""


class _PromptTooLong(Exception):
  """The server refused the prompt as longer than its context."""


class _AllDown(Exception):
  """No server is up and none recovered within the request's retries."""


@dataclasses.dataclass(frozen=True)
class _Attempt:
  ok: bool
  value: Any  # Completion when ok, else the failure reason
  down: bool = False  # failed because every server was down


@dataclasses.dataclass
class _Server:
  url: str
  up: bool = True
  outstanding: int = 0   # requests posted to it and not yet answered
  failures: int = 0      # consecutive: the failure that took it down, then failed probes
  retry_at: float = 0.0  # monotonic time of its next `/health` probe while down
  probing: bool = False
  last_error: str = ""
  served: int = 0        # answers it gave (completions or refusals)


class SGLangBackend:
  """HTTP client of one or more SGLang servers of the same model.

  Each server gets at most `max_concurrency` requests at once; a request goes to the server
  with the fewest outstanding (ties in turn). A server that fails (connection refused/reset,
  5xx, abort) is marked down, its requests go to the others, and it is re-probed with
  `GET /health` after a cool-down (`backoff_s`, doubling up to `max_backoff_s`). A request is
  posted at most `max_retries + 1` times. A prompt the servers' context cannot hold comes back
  as a `prompt_too_long` completion; a completion the context cuts short ends with "length".

  `generate` returns one Completion per request in request order, or raises
  `SGLangGenerationError` naming every request that still failed (`SGLangServersDown` when
  every server was down).
  """

  def __init__(self, urls: str | Sequence[str], tokenizer: Decoder, *, max_concurrency: int = 32,
               timeout_s: float = 600, max_retries: int = 5, backoff_s: float = 0.5,
               max_backoff_s: float = 30.0, connect_timeout_s: float = 10.0, startup_wait_s: float = 5.0):
    self.urls = check_urls(urls)
    if max_concurrency <= 0:
      raise ValueError(f"max_concurrency must be positive, got {max_concurrency}")
    if timeout_s <= 0:
      raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if max_retries < 0 or backoff_s < 0 or max_backoff_s < backoff_s:
      raise ValueError(f"need max_retries >= 0 and 0 <= backoff_s <= max_backoff_s, got {max_retries}, "
                       f"{backoff_s}, {max_backoff_s}")
    self.tokenizer = tokenizer
    self.max_concurrency = max_concurrency
    self.timeout = (min(connect_timeout_s, timeout_s), timeout_s)
    self.max_retries = max_retries
    self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
    self._servers = [_Server(u) for u in self.urls]
    self._cond = threading.Condition()
    self._rr = 0
    self._local = threading.local()
    self._sessions: list[rq.Session] = []
    self._pool: concurrent.futures.ThreadPoolExecutor | None = None
    self._wait_healthy(startup_wait_s)
    infos = [self._get_json(u, "/get_model_info") for u in self.urls]
    server_infos = [self._server_info(u) for u in self.urls]
    for u, info in zip(self.urls, infos):
      if info.get("is_generation") is False:
        raise ValueError(f"the server at {u} serves an embedding model, not a generator")
    _check_same_model(self.urls, infos, server_infos)
    self.model_info = infos[0]
    # Seeds only take effect with --enable-deterministic-sampling; with it, a request without
    # a seed gets a fixed default, so identical prompts would give identical "samples".
    flags = [i.get("enable_deterministic_sampling") for i in server_infos]
    flags = [f if isinstance(f, bool) else None for f in flags]
    self.deterministic_sampling: bool | None = (False if False in flags else None if None in flags else True)
    limits = [context_limits(i) for i in server_infos]
    self.context_length = min((c for c, _ in limits if c is not None), default=None)
    self.max_prompt_tokens = min((m for _, m in limits if m is not None), default=None)
    self._seeds = random.SystemRandom()
    self._warned_seed = False

  # -------------------------------------------------------------- plumbing

  def _session(self) -> rq.Session:
    s = getattr(self._local, "session", None)
    if s is None:
      s = rq.Session()
      adapter = HTTPAdapter(pool_connections=len(self.urls), pool_maxsize=1, max_retries=0)  # retries are ours
      s.mount("http://", adapter)
      s.mount("https://", adapter)
      self._local.session = s
      with self._cond:
        self._sessions.append(s)
    return s

  def _health(self, url: str) -> str | None:
    """None if `GET /health` answers 200, else why not."""
    try:
      r = self._session().get(url + "/health", timeout=self.timeout[0])
    except rq.ConnectionError as e:
      return f"connection error: {e}"
    except rq.RequestException as e:
      return f"{type(e).__name__}: {e}"
    return None if r.status_code == 200 else f"GET /health: HTTP {r.status_code}"

  def _wait_healthy(self, wait_s: float) -> None:
    """Every server healthy within `wait_s` (a server may still be starting), else one error naming the rest."""
    deadline = time.monotonic() + wait_s
    delay = 0.1
    pending = {u: "no attempt" for u in self.urls}
    while True:
      for u in list(pending):
        why = self._health(u)
        if why is None:
          del pending[u]
        else:
          pending[u] = why
      if not pending:
        return
      if time.monotonic() + delay > deadline:
        names = "; ".join(f"{u} ({why})" for u, why in pending.items())
        raise ConnectionError(f"SGLang server{'s' if len(pending) > 1 else ''} not reachable/healthy: {names}; "
                              f"is it running and is the URL right (config field sglang.urls)?")
      time.sleep(delay)
      delay = min(delay * 2, 1.0)

  def _get_json(self, url: str, path: str) -> dict[str, Any]:
    try:
      r = self._session().get(url + path, timeout=self.timeout)
      r.raise_for_status()
      data = r.json()
    except rq.RequestException as e:
      raise ConnectionError(f"GET {url}{path} failed: {e}") from e
    except ValueError as e:
      raise ConnectionError(f"GET {url}{path} did not return JSON: {e}") from e
    if not isinstance(data, dict):
      raise ConnectionError(f"GET {url}{path} returned {type(data).__name__}, not a JSON object")
    return data

  def _server_info(self, url: str) -> dict[str, Any]:
    """`/get_server_info` (server arguments, scheduler limits), or {} when the server does not say."""
    try:
      r = self._session().get(url + "/get_server_info", timeout=self.timeout)
      data = r.json() if r.status_code == 200 else {}
    except (rq.RequestException, ValueError):
      return {}
    return data if isinstance(data, dict) else {}

  def _seed_for(self, req: GenerationRequest) -> int | None:
    """A fresh random seed for an unseeded sampled request on a seed-honouring server."""
    if req.sampling.seed is None and not req.sampling.greedy and self.deterministic_sampling:
      return self._seeds.randrange(SEED_MODULUS)
    return None

  def _cooldown(self, failures: int) -> float:
    return min(self.backoff_s * 2 ** max(failures - 1, 0), self.max_backoff_s)

  def _down_summary(self) -> str:
    return "; ".join(f"{s.url} ({s.last_error or 'down'})" for s in self._servers)

  def _acquire(self) -> _Server:
    """A server slot: re-probe a down server that is due, else the least loaded server that is up
    and below its cap, else wait. Raises _AllDown once every server failed > max_retries times in a row."""
    with self._cond:
      while True:
        now = time.monotonic()
        due = next((s for s in self._servers if not s.up and not s.probing and s.retry_at <= now), None)
        if due is not None:
          self._probe(due)
          continue
        n = len(self._servers)
        free = [i for i in ((self._rr + k) % n for k in range(n))
                if self._servers[i].up and self._servers[i].outstanding < self.max_concurrency]
        if free:
          best = min(free, key=lambda i: self._servers[i].outstanding)  # first of the least loaded
          self._rr = (best + 1) % n
          server = self._servers[best]
          server.outstanding += 1
          return server
        down = [s for s in self._servers if not s.up]
        if (len(down) == n and not any(s.probing for s in down)
            and all(s.failures > self.max_retries for s in down)):
          raise _AllDown(f"all {n} SGLang server{'s' if n > 1 else ''} (config field sglang.urls) are down: "
                         f"{self._down_summary()}")
        waits = [s.retry_at - now for s in down if not s.probing]
        self._cond.wait(max(min(waits), 0.001) if waits else None)

  def _probe(self, server: _Server) -> None:
    """`GET /health` on a down server, without holding the lock; called with it held."""
    server.probing = True
    self._cond.release()
    try:
      why = self._health(server.url)
    finally:
      self._cond.acquire()
      server.probing = False
    if why is None:
      server.up, server.failures = True, 0
      logger.info("SGLang server %s is healthy again", server.url)
    else:
      server.failures += 1
      server.last_error = why
      server.retry_at = time.monotonic() + self._cooldown(server.failures)
    self._cond.notify_all()

  def _release(self, server: _Server, error: str | None = None, answered: bool = True) -> None:
    """Give the slot back; `error`: the server failed (it is marked down); `answered`: it replied."""
    with self._cond:
      server.outstanding -= 1
      if error is None and answered:
        server.served += 1
        if not server.up and not server.probing:  # it answered: it is serving again
          server.up, server.failures = True, 0
      else:
        server.last_error = error
        if server.up:
          server.up = False
          server.failures += 1
          server.retry_at = time.monotonic() + self._cooldown(server.failures)
          others = sum(s.up for s in self._servers)
          logger.warning("SGLang server %s marked down (%s); %d other server%s up, re-probing in %.1f s",
                         server.url, error[:200], others, "" if others == 1 else "s",
                         self._cooldown(server.failures))
      self._cond.notify_all()

  def _post_once(self, url: str, req: GenerationRequest, seed: int | None, cap: int | None) -> Completion:
    try:
      r = self._session().post(url + "/generate", json=request_payload(req, seed, cap), timeout=self.timeout)
    except rq.ConnectionError as e:  # includes connect timeouts
      raise _Retryable(f"connection error: {e}") from e
    except rq.Timeout as e:  # the server took the request: retrying would queue it twice
      raise TimeoutError(f"no answer from {url} within {self.timeout[1]} s: {e}") from e
    except rq.RequestException as e:  # e.g. a connection cut mid-body
      raise _Retryable(f"{type(e).__name__}: {e}") from e
    if r.status_code >= 500:
      raise _Retryable(f"HTTP {r.status_code}: {r.text[:300]}")
    if r.status_code != 200:
      if r.status_code < 500 and is_context_error(r.text):
        raise _PromptTooLong(r.text[:300])
      raise SGLangResponseError(f"HTTP {r.status_code}: {r.text[:300]}")
    try:
      data = r.json()
    except ValueError as e:
      raise SGLangResponseError(f"response is not JSON: {r.text[:300]}") from e
    reason = (data.get("meta_info") or {}).get("finish_reason") if isinstance(data, dict) else None
    if isinstance(reason, dict) and reason.get("type") == "abort":
      status, message = reason.get("status_code"), str(reason.get("message"))
      msg = f"server aborted the request: {message} (status {status})"
      if isinstance(status, int) and 400 <= status < 500:
        if is_context_error(message):
          raise _PromptTooLong(msg)
        raise SGLangResponseError(msg)
      raise _Retryable(msg)
    return parse_response(req, data, self.tokenizer)

  def _run(self, req: GenerationRequest) -> _Attempt:
    cap = new_token_cap(len(req.prompt_ids), self.context_length, self.max_prompt_tokens)
    if cap == 0:
      return _Attempt(True, prompt_too_long(req))
    seed = self._seed_for(req)
    posts = 0
    while True:
      try:
        server = self._acquire()
      except _AllDown as e:
        return _Attempt(False, str(e), down=True)
      try:
        completion = self._post_once(server.url, req, seed, cap)
      except _Retryable as e:
        self._release(server, error=str(e))
        posts += 1
        if posts > self.max_retries:
          return _Attempt(False, f"{e} (after {posts} attempts, the last on {server.url})")
        continue
      except _PromptTooLong:
        self._release(server)
        return _Attempt(True, prompt_too_long(req))
      except TimeoutError as e:  # it took the request and may still be working on it: not a death
        self._release(server, answered=False)
        return _Attempt(False, str(e))
      except Exception as e:  # not transient: report it, never drop the request
        self._release(server)
        return _Attempt(False, f"{type(e).__name__} from {server.url}: {e}")
      self._release(server)
      return _Attempt(True, completion)

  # -------------------------------------------------------------- API

  def stats(self) -> dict[str, dict[str, Any]]:
    """Per server: up, requests in flight, answers served, last error."""
    with self._cond:
      return {s.url: {"up": s.up, "outstanding": s.outstanding, "served": s.served, "last_error": s.last_error}
              for s in self._servers}

  def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
    """One completion per request, in request order; many in flight at once on every server."""
    reqs = list(requests)
    if not reqs:
      return []
    if (self.deterministic_sampling is False and not self._warned_seed
        and any(r.sampling.seed is not None and not r.sampling.greedy for r in reqs)):
      self._warned_seed = True
      logger.warning("an SGLang server in %s ignores per-request seeds (it was not launched with "
                     "--enable-deterministic-sampling): seeded samples are not reproducible", ", ".join(self.urls))
    with self._cond:
      if not any(s.up for s in self._servers):  # a new batch re-probes at once: they may be back
        for s in self._servers:
          s.retry_at = min(s.retry_at, time.monotonic())
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(self.max_concurrency * len(self._servers),
                                                           thread_name_prefix="sglang")
      pool = self._pool
    attempts = list(pool.map(self._run, reqs))
    failures = {i: a.value for i, a in enumerate(attempts) if not a.ok}
    if failures:
      shown = "; ".join(f"#{i}: {why}" for i, why in list(failures.items())[:5])
      more = f"; ... and {len(failures) - 5} more" if len(failures) > 5 else ""
      summary = f"{len(failures)} of {len(reqs)} generation requests to {', '.join(self.urls)} failed"
      down = [a.value for a in attempts if a.down]
      if down:
        raise SGLangServersDown(f"{down[-1]}; {summary}", failures)
      raise SGLangGenerationError(f"{summary}: {shown}{more}", failures)
    return [a.value for a in attempts]

  def close(self) -> None:
    with self._cond:
      pool, self._pool = self._pool, None
    if pool is not None:
      pool.shutdown(wait=True)
    with self._cond:
      sessions, self._sessions = self._sessions, []
    for s in sessions:
      s.close()

  def __enter__(self) -> "SGLangBackend":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _check_same_model(urls: Sequence[str], model_infos: Sequence[dict[str, Any]],
                      server_infos: Sequence[dict[str, Any]]) -> None:
  """Refuse servers of different models: one batch would mix two policies' samples.

  A server is named by its --served-model-name (sglang defaults it to the model path), else by
  the model_path of /get_model_info; servers that report neither are not compared.
  """
  names = {}
  for u, mi, si in zip(urls, model_infos, server_infos):
    name = si.get("served_model_name") or mi.get("model_path")
    if name:
      names[u] = str(name)
  if len(set(names.values())) > 1:
    listed = "; ".join(f"{u}: {n}" for u, n in names.items())
    raise ValueError(f"the SGLang servers in sglang.urls serve different models ({listed}); serve the same "
                     "weights everywhere (with the same --served-model-name if their paths differ)")
