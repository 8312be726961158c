"""The `search` tool: a local BM25 index or a FlashRAG-style retrieval server behind one interface.

* `BM25Index` indexes a JSONL corpus (`{"id", "contents"}`, contents optionally starting with a
  title line, as in FlashRAG's wiki dumps) with `bm25s`. The index is built once and cached on disk
  under a key made of the corpus bytes' SHA-256 and the tokenizer settings, so every worker and
  every rerun reuses it. Passages are read back from the corpus file by byte offset, so the corpus
  text is never held in memory.
* `SearchClient` talks to a server speaking the protocol of the authors' FlashRAG server (and of
  `python -m autotraj_jax.tir.search_server`): `POST /search {"query", "top_n", "return_score(s)"}`
  and `POST /batch_search {"query": [...], ...}`, answering `docs` or `[docs, scores]`.
* `SearchTool` formats the top passages as the `<result>` text:

      [1] Title: <title>
      <passage text, cut to max_chars_per_passage>

      [2] ...

  A passage without a title line is printed as `[i] <text>`. Failures give `ok=False` with the
  reason, never an exception.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from autotraj_jax.tir.tools import ToolResult, register_tool, safe_call, truncate_middle

__all__ = [
  "BM25Index", "CorpusError", "Passage", "SearchBackend", "SearchClient", "SearchError",
  "SearchTool", "format_passages", "split_title",
]

log = logging.getLogger(__name__)

_INDEX_FORMAT = 1  # bump when the on-disk layout or tokenisation changes


class CorpusError(ValueError):
  """A corpus file that cannot be indexed (the message names the file and line)."""


class SearchError(RuntimeError):
  """A retrieval request that failed (server down, bad reply, ...)."""


@dataclasses.dataclass(frozen=True)
class Passage:
  """One retrieved passage; `score` is None when the server did not send scores."""

  id: str
  contents: str
  score: float | None = None


class SearchBackend(Protocol):
  """Anything that retrieves passages: a local index or a client of a remote one."""

  def search(self, query: str, k: int = 3) -> list[Passage]: ...

  def batch_search(self, queries: Sequence[str], k: int = 3) -> list[list[Passage]]: ...


def split_title(contents: str) -> tuple[str | None, str]:
  """(title, text) if the first line is a title (FlashRAG: `"Title"\\ntext`), else (None, text)."""
  head, sep, rest = contents.partition("\n")
  if not sep or not head.strip() or not rest.strip():
    return None, contents.strip()
  title = head.strip()
  if len(title) >= 2 and title[0] == title[-1] == '"':
    title = title[1:-1].strip()
  return title, rest.strip()


# ---------------------------------------------------------------------------------------------
# Local BM25 index.


def _default_cache_dir() -> Path:
  root = os.environ.get("AUTOTRAJ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                           "autotraj_jax")
  return Path(root) / "bm25"


def _file_sha256(path: Path) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _parse_line(raw: bytes, where: str) -> tuple[str, str]:
  """(id, contents) of one corpus line, or a CorpusError naming `where` (file:line)."""
  try:
    record = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CorpusError(f"{where}: not valid JSON ({e})") from e
  if not isinstance(record, dict):
    raise CorpusError(f"{where}: expected a JSON object, got {type(record).__name__}")
  if "id" not in record:
    raise CorpusError(f"{where}: missing field 'id'")
  contents = record.get("contents")
  if contents is None and "text" in record:  # FlashRAG corpora sometimes split title / text
    contents = f"{record.get('title', '')}\n{record['text']}".lstrip("\n")
  if not isinstance(contents, str):
    raise CorpusError(f"{where}: field 'contents' must be a string")
  return str(record["id"]), contents


class BM25Index:
  """BM25 over a JSONL corpus, cached on disk; thread-safe `search` / `batch_search`.

  `from_cache` tells whether the index was loaded instead of built.
  """

  def __init__(self, corpus_path: str | os.PathLike[str], *,
               cache_dir: str | os.PathLike[str] | None = None, stemmer: str | None = "english",
               stopwords: str = "en", mmap: bool = False) -> None:
    import bm25s  # pylint: disable=import-outside-toplevel

    self.corpus_path = Path(corpus_path)
    if not self.corpus_path.is_file():
      raise CorpusError(f"corpus file not found: {self.corpus_path}")
    self._bm25s = bm25s
    self._stemmer = _make_stemmer(stemmer)
    self._stopwords = stopwords
    self._lock = threading.Lock()  # PyStemmer objects are not thread-safe
    stem = stemmer if self._stemmer else None
    settings = f"v{_INDEX_FORMAT}|bm25s-{bm25s.__version__}|stem={stem}|stop={stopwords}"
    content = _file_sha256(self.corpus_path)
    self.key = hashlib.sha256(f"{content}|{settings}".encode()).hexdigest()[:32]
    root = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    self.cache_path = root / self.key
    self.from_cache = (self.cache_path / "meta.json").is_file()
    if not self.from_cache:
      self._build(root)
    self._retriever = bm25s.BM25.load(str(self.cache_path), mmap=mmap, show_progress=False)
    spans = np.load(self.cache_path / "spans.npy")
    self._starts, self._ends = spans[0], spans[1]
    self._fd = os.open(self.corpus_path, os.O_RDONLY)

  def __len__(self) -> int:
    return len(self._starts)

  def _tokenize(self, texts: list[str], return_ids: bool) -> Any:
    with self._lock:
      return self._bm25s.tokenize(texts, stopwords=self._stopwords, stemmer=self._stemmer,
                                  return_ids=return_ids, show_progress=False)

  def _build(self, root: Path) -> None:
    t0 = time.perf_counter()
    starts, ends, texts = [], [], []
    offset = 0
    with open(self.corpus_path, "rb") as f:
      for lineno, raw in enumerate(f, start=1):
        if raw.strip():
          _, contents = _parse_line(raw, f"{self.corpus_path}:{lineno}")
          starts.append(offset)
          ends.append(offset + len(raw))
          texts.append(contents)
        offset += len(raw)
    if not texts:
      raise CorpusError(f"{self.corpus_path}: corpus has no passages")
    retriever = self._bm25s.BM25()
    retriever.index(self._tokenize(texts, return_ids=True), show_progress=False)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{self.key}.", dir=root))
    try:
      retriever.save(str(tmp), show_progress=False)
      np.save(tmp / "spans.npy", np.asarray([starts, ends], dtype=np.int64))
      meta = {"corpus": str(self.corpus_path), "num_docs": len(texts), "key": self.key}
      (tmp / "meta.json").write_text(json.dumps(meta))
      try:
        os.rename(tmp, self.cache_path)  # atomic: readers never see a half-written index
      except OSError:
        if not (self.cache_path / "meta.json").is_file():
          raise
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
    log.info("built BM25 index of %d passages in %.1fs at %s", len(texts), time.perf_counter() - t0,
             self.cache_path)

  def passage(self, i: int, score: float | None = None) -> Passage:
    """The i-th passage, read from the corpus file by offset."""
    start, end = int(self._starts[i]), int(self._ends[i])
    raw = os.pread(self._fd, end - start, start)
    where = f"{self.corpus_path} at byte {start} (changed since indexing?)"
    doc_id, contents = _parse_line(raw, where)
    return Passage(doc_id, contents, score)

  def search(self, query: str, k: int = 3) -> list[Passage]:
    """Top-k passages with a positive BM25 score, best first (ties by corpus order)."""
    return self.batch_search([query], k)[0]

  def batch_search(self, queries: Sequence[str], k: int = 3) -> list[list[Passage]]:
    if isinstance(queries, str):
      raise TypeError("batch_search takes a list of queries, not a string")
    if k < 1:
      return [[] for _ in queries]
    results = []
    for tokens in self._tokenize(list(queries), return_ids=False):
      if not tokens:
        results.append([])
        continue
      scores = np.asarray(self._retriever.get_scores(tokens), dtype=np.float64)
      kk = min(k, len(scores))
      top = np.argpartition(-scores, kk - 1)[:kk]
      top = top[np.lexsort((top, -scores[top]))]
      results.append([self.passage(int(i), float(scores[i])) for i in top if scores[i] > 0])
    return results

  def close(self) -> None:
    if self._fd >= 0:
      os.close(self._fd)
      self._fd = -1

  def __del__(self) -> None:
    fd = getattr(self, "_fd", -1)
    if fd >= 0:
      os.close(fd)


def _make_stemmer(language: str | None) -> Any:
  if language is None:
    return None
  try:
    import Stemmer  # pylint: disable=import-outside-toplevel  (PyStemmer)
  except ImportError:
    log.warning("PyStemmer is not installed: BM25 runs without stemming")
    return None
  return Stemmer.Stemmer(language)


# ---------------------------------------------------------------------------------------------
# Remote retrieval server client.


def _to_passage(doc: Any, score: Any = None) -> Passage:
  if isinstance(doc, dict) and isinstance(doc.get("document"), dict):  # Search-R1 style
    score = doc.get("score", score)
    doc = doc["document"]
  if not isinstance(doc, dict):
    raise SearchError(f"unexpected document in reply: {str(doc)[:100]!r}")
  contents = doc.get("contents")
  if contents is None:
    contents = f"{doc.get('title', '')}\n{doc.get('text', '')}".strip("\n")
  return Passage(str(doc.get("id", "")), str(contents),
                 float(score) if isinstance(score, (int, float)) else None)


def _is_numbers(x: Any) -> bool:
  return isinstance(x, list) and all(isinstance(v, (int, float)) for v in x)


def _is_docs(x: Any) -> bool:
  return isinstance(x, list) and all(isinstance(v, dict) for v in x)


def parse_reply(reply: Any, n_queries: int | None) -> list[list[Passage]]:
  """Passages per query from a `/search` (n_queries None) or `/batch_search` reply.

  Accepts `docs`, `[docs, scores]` (FlashRAG with return_score) and `{"result": ...}`.
  """
  if isinstance(reply, dict) and "result" in reply:
    reply = reply["result"]
  if n_queries is None:
    if _is_docs(reply):
      return [[_to_passage(d) for d in reply]]
    if (isinstance(reply, list) and len(reply) == 2 and _is_docs(reply[0]) and _is_numbers(reply[1])
        and len(reply[0]) == len(reply[1])):
      return [[_to_passage(d, s) for d, s in zip(reply[0], reply[1])]]
    if isinstance(reply, list) and len(reply) == 1 and _is_docs(reply[0]):
      return [[_to_passage(d) for d in reply[0]]]
  else:
    if isinstance(reply, list) and len(reply) == n_queries and all(_is_docs(r) for r in reply):
      return [[_to_passage(d) for d in docs] for docs in reply]
    if (isinstance(reply, list) and len(reply) == 2 and isinstance(reply[0], list)
        and isinstance(reply[1], list) and len(reply[0]) == len(reply[1]) == n_queries
        and all(_is_docs(d) and _is_numbers(s) and len(d) == len(s) for d, s in zip(*reply))):
      return [[_to_passage(d, s) for d, s in zip(docs, scores)] for docs, scores in zip(*reply)]
  raise SearchError(f"unrecognised reply shape: {json.dumps(reply)[:200]}")


class SearchClient:
  """HTTP client of a FlashRAG-style retrieval server, with timeouts and retries.

  Proxy variables are ignored by default: the server is on the local network, and a proxy would
  answer for a dead server with its own error page.
  """

  def __init__(self, url: str, *, timeout_s: float = 10.0, retries: int = 2, backoff_s: float = 0.5,
               use_env_proxy: bool = False) -> None:
    if not url.startswith(("http://", "https://")):
      url = "http://" + url
    self.url = url.rstrip("/")
    self.timeout_s = timeout_s
    self.retries = max(0, retries)
    self.backoff_s = backoff_s
    handlers = [] if use_env_proxy else [urllib.request.ProxyHandler({})]
    self._opener = urllib.request.build_opener(*handlers)

  def _request(self, path: str, payload: dict[str, Any] | None) -> Any:
    data = None if payload is None else json.dumps(payload).encode()
    last = ""
    for attempt in range(self.retries + 1):
      if attempt:
        time.sleep(self.backoff_s * 2 ** (attempt - 1))
      req = urllib.request.Request(self.url + path, data=data,
                                   method="GET" if data is None else "POST",
                                   headers={"Content-Type": "application/json"})
      try:
        with self._opener.open(req, timeout=self.timeout_s) as resp:
          return json.loads(resp.read())
      except urllib.error.HTTPError as e:
        detail = e.read()[:300].decode(errors="replace")
        last = f"HTTP {e.code}: {detail}"
        if e.code < 500:  # the request itself is wrong: retrying cannot help
          break
      except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        last = f"{type(reason).__name__}: {reason}"
      except json.JSONDecodeError as e:
        last = f"reply is not JSON ({e})"
    raise SearchError(
        f"search server {self.url}{path} failed after {attempt + 1} attempt(s): {last}")

  def _payload(self, query: Any, k: int) -> dict[str, Any]:
    # FlashRAG's server reads `return_score`; the brief of other servers says `return_scores`.
    return {"query": query, "top_n": k, "return_score": True, "return_scores": True}

  def search(self, query: str, k: int = 3) -> list[Passage]:
    return parse_reply(self._request("/search", self._payload(query, k)), None)[0]

  def batch_search(self, queries: Sequence[str], k: int = 3) -> list[list[Passage]]:
    if not queries:
      return []
    reply = self._request("/batch_search", self._payload(list(queries), k))
    return parse_reply(reply, len(queries))

  def health(self) -> dict[str, Any]:
    return self._request("/health", None)


# ---------------------------------------------------------------------------------------------
# The tool.


def format_passages(passages: Sequence[Passage], max_chars_per_passage: int = 600) -> str:
  """The `<result>` text for a list of passages (see the module docstring for the layout)."""
  if not passages:
    return "No results found."
  blocks = []
  for i, p in enumerate(passages, start=1):
    title, text = split_title(p.contents)
    text = truncate_middle(text, max_chars_per_passage) if max_chars_per_passage > 0 else text
    blocks.append(f"[{i}] Title: {title}\n{text}" if title else f"[{i}] {text}")
  return "\n\n".join(blocks)


class SearchTool:
  """`<search>query</search>` -> the top passages as text."""

  name = "search"

  def __init__(self, backend: SearchBackend, *, top_k: int = 3, max_chars_per_passage: int = 600,
               max_query_chars: int = 500) -> None:
    if top_k < 1:
      raise ValueError(f"top_k must be >= 1, got {top_k}")
    self.backend = backend
    self.top_k = top_k
    self.max_chars_per_passage = max_chars_per_passage
    self.max_query_chars = max_query_chars

  def _query(self, text: str) -> str:
    return " ".join(text.split())[:self.max_query_chars]

  def __call__(self, text: str, *, session: str | None = None) -> ToolResult:
    del session  # stateless

    def run() -> ToolResult:
      t0 = time.perf_counter()
      query = self._query(text)
      if not query:
        return _empty_query()
      try:
        passages = self.backend.search(query, self.top_k)
      except (SearchError, CorpusError) as e:
        return _failed(str(e), time.perf_counter() - t0)
      return ToolResult(format_passages(passages, self.max_chars_per_passage), ok=True,
                        elapsed_s=time.perf_counter() - t0)

    return safe_call(self.name, run)

  def batch(self, queries: Sequence[str]) -> list[ToolResult]:
    """One `ToolResult` per query with a single round trip (for batched rollouts)."""
    t0 = time.perf_counter()
    cleaned = [self._query(q) for q in queries]
    live = [q for q in cleaned if q]
    try:
      found = iter(self.backend.batch_search(live, self.top_k) if live else [])
    except Exception as e:  # noqa: BLE001 - a tool never raises into the loop
      return [_failed(f"{type(e).__name__}: {e}"[:300], time.perf_counter() - t0) for _ in queries]
    elapsed = (time.perf_counter() - t0) / max(1, len(queries))
    results = []
    for q in cleaned:
      if not q:
        results.append(_empty_query())
        continue
      text = format_passages(next(found), self.max_chars_per_passage)
      results.append(ToolResult(text, ok=True, elapsed_s=elapsed))
    return results


def _empty_query() -> ToolResult:
  return ToolResult("Error: empty search query.", ok=False, elapsed_s=0.0, error="empty query")


def _failed(error: str, elapsed_s: float) -> ToolResult:
  return ToolResult(f"Error: search failed ({error})", ok=False, elapsed_s=elapsed_s, error=error)


def _make_search(*, url: str | None = None, corpus: str | None = None, cache_dir: str | None = None,
                 top_k: int = 3, max_chars_per_passage: int = 600, timeout_s: float = 10.0,
                 retries: int = 2) -> SearchTool:
  """`make_tool("search", url=...)` for a server, or `make_tool("search", corpus=...)` for BM25."""
  if (url is None) == (corpus is None):
    raise ValueError(
        "search tool needs exactly one of url= (retrieval server) or corpus= (JSONL file)")
  backend: SearchBackend
  if url is not None:
    backend = SearchClient(url, timeout_s=timeout_s, retries=retries)
  else:
    backend = BM25Index(corpus, cache_dir=cache_dir)
  return SearchTool(backend, top_k=top_k, max_chars_per_passage=max_chars_per_passage)


register_tool("search", _make_search)
