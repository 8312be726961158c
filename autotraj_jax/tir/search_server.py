"""Serves a local BM25 index over HTTP so many generation workers share one index.

    python -m autotraj_jax.tir.search_server --corpus wiki.jsonl [--host 127.0.0.1 --port 8000]

Speaks the protocol of the FlashRAG server used by the paper's authors, which `SearchClient`
reads: `POST /search {"query": str, "top_n": k, "return_score": bool}` answers `docs` or
`[docs, scores]`; `POST /batch_search` takes `"query": [str, ...]` and answers a list per query
(or `[docs_per_query, scores_per_query]`); `GET /health`. `return_scores` is accepted as a synonym.
Standard library only (ThreadingHTTPServer): no web framework to install on a TPU VM.
"""

from __future__ import annotations

import argparse
import http.server
import json
import logging
import sys
from typing import Any

from autotraj_jax.tir.search import BM25Index, Passage

__all__ = ["make_server", "main"]

log = logging.getLogger(__name__)

MAX_TOP_N = 100
MAX_BODY_BYTES = 10 << 20


class _BadRequest(ValueError):
  pass


def _docs(passages: list[Passage]) -> list[dict[str, str]]:
  return [{"id": p.id, "contents": p.contents} for p in passages]


def _scores(passages: list[Passage]) -> list[float]:
  return [p.score if p.score is not None else 0.0 for p in passages]


def _options(body: dict[str, Any]) -> tuple[int, bool]:
  top_n = body.get("top_n", 10)
  if not isinstance(top_n, int) or isinstance(top_n, bool) or not 1 <= top_n <= MAX_TOP_N:
    raise _BadRequest(f"top_n must be an integer in [1, {MAX_TOP_N}], got {top_n!r}")
  return top_n, bool(body.get("return_score", False) or body.get("return_scores", False))


def _handler(index: BM25Index) -> type[http.server.BaseHTTPRequestHandler]:

  class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, code: int, payload: Any) -> None:
      data = json.dumps(payload).encode()
      self.send_response(code)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
      if self.path.rstrip("/") == "/health":
        self._send(200, {"status": "healthy", "num_docs": len(index),
                         "corpus": str(index.corpus_path)})
      else:
        self._send(404, {"detail": f"no route GET {self.path}"})

    def do_POST(self) -> None:  # noqa: N802
      try:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
          raise _BadRequest(f"request body over {MAX_BODY_BYTES} bytes")
        try:
          body = json.loads(self.rfile.read(length) or b"{}")
        except json.JSONDecodeError as e:
          raise _BadRequest(f"body is not JSON: {e}") from e
        if not isinstance(body, dict):
          raise _BadRequest("body must be a JSON object")
        route = self.path.rstrip("/")
        if route == "/search":
          self._send(200, self._search(body))
        elif route == "/batch_search":
          self._send(200, self._batch_search(body))
        else:
          self._send(404, {"detail": f"no route POST {self.path}"})
      except _BadRequest as e:
        self._send(400, {"detail": str(e)})
      except Exception as e:  # noqa: BLE001 - report, keep serving
        log.exception("search request failed")
        self._send(500, {"detail": f"{type(e).__name__}: {e}"})

    def _search(self, body: dict[str, Any]) -> Any:
      query = body.get("query")
      if not isinstance(query, str) or not query.strip():
        raise _BadRequest("query must be a non-empty string")
      top_n, with_scores = _options(body)
      found = index.search(query, top_n)
      return [_docs(found), _scores(found)] if with_scores else _docs(found)

    def _batch_search(self, body: dict[str, Any]) -> Any:
      queries = body.get("query", body.get("queries"))
      if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise _BadRequest("query must be a list of strings")
      top_n, with_scores = _options(body)
      found = index.batch_search(queries, top_n)
      if with_scores:
        return [[_docs(f) for f in found], [_scores(f) for f in found]]
      return [_docs(f) for f in found]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base-class signature
      log.debug("%s " + format, self.address_string(), *args)

  return Handler


def make_server(index: BM25Index, host: str = "127.0.0.1",
                port: int = 0) -> http.server.ThreadingHTTPServer:
  """A ready (bound, not yet serving) server; port 0 picks a free port (see `server_address`)."""
  server = http.server.ThreadingHTTPServer((host, port), _handler(index))
  server.daemon_threads = True
  return server


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--corpus", required=True, help="JSONL corpus with id and contents fields")
  parser.add_argument("--host", default="127.0.0.1")
  parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
  parser.add_argument("--cache-dir", default=None, help="where the BM25 index is cached")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  index = BM25Index(args.corpus, cache_dir=args.cache_dir)
  server = make_server(index, args.host, args.port)
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
