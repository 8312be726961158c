"""Serves a local BM25 index over HTTP so many generation workers share one index.

    python -m autotraj_jax.tir.search_server --corpus wiki.jsonl [--host 127.0.0.1 --port 8000]

Speaks the protocol of the FlashRAG server used by the paper's authors, which `SearchClient`
reads: `POST /search {"query": str, "top_n": k, "return_score": bool}` answers `docs` or
`[docs, scores]`; `POST /batch_search` takes `"query": [str, ...]` and answers a list per query
(or `[docs_per_query, scores_per_query]`); `GET /health`. `return_scores` is accepted as a synonym.
Standard library only (http.server): no web framework to install on a TPU VM.

Bad input gets a JSON `{"detail": ...}` answer, never a crash: 400 for a body that is not UTF-8,
not JSON, not an object or has wrong fields, 411 for chunked bodies, 413 for a body over
`--max-body-mb`. A deep listen backlog absorbs bursts of clients, a fixed pool of
`--max-threads` handlers serves them, and a connection silent for `--timeout` seconds is closed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.server
import json
import logging
import socket
import sys
from typing import Any

from autotraj_jax.tir.search import BM25Index, Passage

__all__ = ["BadRequest", "SearchServer", "content_length", "make_server", "main", "parse_body"]

log = logging.getLogger(__name__)

MAX_TOP_N = 100
MAX_BATCH = 1024  # queries in one /batch_search
MAX_BODY_BYTES = 10 << 20
LISTEN_BACKLOG = 1024  # the default (5) resets connections under a burst of clients
DRAIN_LIMIT = 4 * MAX_BODY_BYTES  # an oversized body is read and dropped up to this, then cut


class BadRequest(ValueError):
  """Answered with `status` (400 unless stated) and the message as `detail`."""

  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.status = status


def _docs(passages: list[Passage]) -> list[dict[str, str]]:
  return [{"id": p.id, "contents": p.contents} for p in passages]


def _scores(passages: list[Passage]) -> list[float]:
  return [p.score if p.score is not None else 0.0 for p in passages]


def _options(body: dict[str, Any]) -> tuple[int, bool]:
  top_n = body.get("top_n", 10)
  if not isinstance(top_n, int) or isinstance(top_n, bool) or not 1 <= top_n <= MAX_TOP_N:
    raise BadRequest(f"top_n must be an integer in [1, {MAX_TOP_N}], got {top_n!r}")
  return top_n, bool(body.get("return_score", False) or body.get("return_scores", False))


def content_length(headers: Any, limit: int) -> int:
  """The declared body size; `BadRequest` (400, 411 or 413) when it is unusable."""
  if "chunked" in (headers.get("Transfer-Encoding") or "").lower():
    raise BadRequest("chunked request bodies are not supported: send Content-Length", 411)
  raw = (headers.get("Content-Length") or "0").strip()
  if not raw.isdigit():
    raise BadRequest(f"Content-Length must be a non-negative integer, got {raw[:40]!r}")
  length = int(raw)
  if length > limit:
    raise BadRequest(f"request body of {length} bytes is over the {limit}-byte limit", 413)
  return length


def parse_body(data: bytes) -> dict[str, Any]:
  """The JSON object in a request body; `BadRequest` for non-UTF-8, non-JSON or non-objects."""
  try:
    text = data.decode("utf-8") if data else "{}"
  except UnicodeDecodeError as e:
    raise BadRequest(f"body is not UTF-8: {e}") from e
  try:
    body = json.loads(text)
  except json.JSONDecodeError as e:
    raise BadRequest(f"body is not JSON: {e}") from e
  if not isinstance(body, dict):
    raise BadRequest("body must be a JSON object")
  return body


def _handler(index: BM25Index, timeout_s: float,
             max_body_bytes: int) -> type[http.server.BaseHTTPRequestHandler]:

  class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = timeout_s  # per socket operation: a stalled or lying client frees its thread

    def _send(self, code: int, payload: Any) -> None:
      data = json.dumps(payload).encode()
      self.send_response(code)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      if self.close_connection:
        self.send_header("Connection", "close")
      self.end_headers()
      self.wfile.write(data)

    def handle_expect_100(self) -> bool:
      try:
        content_length(self.headers, max_body_bytes)
      except BadRequest as e:
        self.close_connection = True
        self._send(e.status, {"detail": str(e)})
        return False
      return super().handle_expect_100()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
      if self.path.rstrip("/") == "/health":
        self._send(200, {"status": "healthy", "num_docs": len(index),
                         "corpus": str(index.corpus_path)})
      else:
        self._send(404, {"detail": f"no route GET {self.path}"})

    def do_POST(self) -> None:  # noqa: N802
      try:
        try:
          length = content_length(self.headers, max_body_bytes)
        except BadRequest:
          self.close_connection = True  # the body (if any) is not read: this connection is done
          raise
        data = self.rfile.read(length)
        if len(data) < length:
          self.close_connection = True
          return  # the client hung up mid-body: no one to answer
        body = parse_body(data)
        route = self.path.rstrip("/")
        if route == "/search":
          self._send(200, self._search(body))
        elif route == "/batch_search":
          self._send(200, self._batch_search(body))
        else:
          self._send(404, {"detail": f"no route POST {self.path}"})
      except BadRequest as e:
        self._send(e.status, {"detail": str(e)})
        if e.status == 413:
          self._drain()
      except (TimeoutError, ConnectionError):
        self.close_connection = True  # a stalled or vanished client: drop the connection
      except Exception as e:  # noqa: BLE001 - report, keep serving
        log.exception("search request failed")
        self._send(500, {"detail": f"{type(e).__name__}: {e}"})

    def _drain(self) -> None:
      """Reads and drops what the client is still sending, so it sees the 413 and not a reset."""
      try:
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_WR)
        left = DRAIN_LIMIT
        while left > 0:
          chunk = self.connection.recv(min(left, 1 << 16))
          if not chunk:
            break
          left -= len(chunk)
      except OSError:
        pass

    def _search(self, body: dict[str, Any]) -> Any:
      query = body.get("query")
      if not isinstance(query, str) or not query.strip():
        raise BadRequest("query must be a non-empty string")
      top_n, with_scores = _options(body)
      found = index.search(query, top_n)
      return [_docs(found), _scores(found)] if with_scores else _docs(found)

    def _batch_search(self, body: dict[str, Any]) -> Any:
      queries = body.get("query", body.get("queries"))
      if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise BadRequest("query must be a list of strings")
      if len(queries) > MAX_BATCH:
        raise BadRequest(f"at most {MAX_BATCH} queries per batch, got {len(queries)}")
      top_n, with_scores = _options(body)
      found = index.batch_search(queries, top_n)
      if with_scores:
        return [[_docs(f) for f in found], [_scores(f) for f in found]]
      return [_docs(f) for f in found]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base-class signature
      log.debug("%s " + format, self.address_string(), *args)

  return Handler


class SearchServer(http.server.HTTPServer):
  """An HTTP server with a deep listen backlog and a fixed pool of handler threads.

  Connections beyond `max_threads` wait in the pool's queue; each handler's socket times out
  after `timeout_s` of silence, so stalled clients cannot hold threads for long.
  """

  request_queue_size = LISTEN_BACKLOG
  allow_reuse_address = True

  def __init__(self, address: tuple[str, int], handler: type, max_threads: int):
    super().__init__(address, handler)
    self._pool = concurrent.futures.ThreadPoolExecutor(
      max_threads, thread_name_prefix=f"search-server-{self.server_address[1]}")

  def process_request(self, request: Any, client_address: Any) -> None:
    try:
      self._pool.submit(self._handle, request, client_address)
    except RuntimeError:  # the pool is shut down: the server is closing
      self.shutdown_request(request)

  def _handle(self, request: Any, client_address: Any) -> None:
    try:
      self.finish_request(request, client_address)
    except Exception:  # noqa: BLE001 - one connection's failure is logged, not fatal
      self.handle_error(request, client_address)
    finally:
      self.shutdown_request(request)

  def handle_error(self, request: Any, client_address: Any) -> None:
    log.debug("connection from %s failed", client_address, exc_info=True)

  def server_close(self) -> None:
    super().server_close()
    self._pool.shutdown(wait=False, cancel_futures=True)


def make_server(index: BM25Index, host: str = "127.0.0.1", port: int = 0, *, max_threads: int = 64,
                timeout_s: float = 10.0, max_body_bytes: int = MAX_BODY_BYTES) -> SearchServer:
  """A ready (bound, not yet serving) server; port 0 picks a free port (see `server_address`).

  `max_threads` bounds concurrent handlers, `timeout_s` each socket read/write, and
  `max_body_bytes` a request body (a larger one is answered 413).
  """
  for name, value in (("max_threads", max_threads), ("timeout_s", timeout_s),
                      ("max_body_bytes", max_body_bytes)):
    if not value > 0:
      raise ValueError(f"{name} must be positive, got {value!r}")
  return SearchServer((host, port), _handler(index, timeout_s, max_body_bytes), max_threads)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--corpus", required=True, help="JSONL corpus with id and contents fields")
  parser.add_argument("--host", default="127.0.0.1")
  parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
  parser.add_argument("--cache-dir", default=None, help="where the BM25 index is cached")
  parser.add_argument("--max-threads", type=int, default=64, help="concurrent request handlers")
  parser.add_argument("--timeout", type=float, default=10.0, help="seconds a connection may stall")
  parser.add_argument("--max-body-mb", type=float, default=MAX_BODY_BYTES / (1 << 20),
                      help="larger request bodies are answered 413")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  index = BM25Index(args.corpus, cache_dir=args.cache_dir)
  server = make_server(index, args.host, args.port, max_threads=args.max_threads,
                       timeout_s=args.timeout, max_body_bytes=int(args.max_body_mb * (1 << 20)))
  host, port = server.server_address[:2]
  print(f"search server: {len(index)} passages, listening on http://{host}:{port}", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
  return 0


if __name__ == "__main__":
  sys.exit(main())
