"""BM25 index (build, cache, ranking), the retrieval server and client, and the search tool."""

import concurrent.futures
import http.client
import json
import os
import select
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("bm25s")

from autotraj_jax.tir import search as search_mod  # noqa: E402
from autotraj_jax.tir.search import (  # noqa: E402
  BM25Index,
  CorpusError,
  Passage,
  SearchClient,
  SearchError,
  SearchTool,
  format_passages,
  parse_reply,
  split_title,
)
from autotraj_jax.tir.search_server import make_server  # noqa: E402
from autotraj_jax.tir.tools import make_tool  # noqa: E402

DOCS = [
  ("d0", '"Frank Lowy"\nSir Frank Lowy is an Australian-Israeli businessman and co-founder of the '
         'Westfield Corporation. He presented the Australia 2022 FIFA World Cup bid.'),
  ("d1", '"Drifting (motorsport)"\nDrifting is a driving technique where the driver intentionally '
         'oversteers, with loss of traction, while maintaining control.'),
  ("d2", '"Tang dynasty"\nEmperor Taizong of Tang was the second emperor of the Tang dynasty '
         'of China.'),
  ("d3", '"Westfield Group"\nThe Westfield Group was a shopping centre company based in Sydney.'),
  ("d4", "A passage without a title line about volcanoes and magma chambers."),
  ("d5", '"Crystal Dynamics"\nCrystal Dynamics is an American video game developer in San Mateo.'),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
  with open(path, "w") as f:
    for doc_id, contents in DOCS:
      f.write(json.dumps({"id": doc_id, "contents": contents}) + "\n")
    f.write("\n")  # blank lines are skipped
  return path


@pytest.fixture(scope="module")
def index(corpus, tmp_path_factory):
  return BM25Index(corpus, cache_dir=tmp_path_factory.mktemp("bm25_cache"))


@pytest.fixture(scope="module")
def server_url(index):
  server = make_server(index, "127.0.0.1", 0)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{server.server_address[1]}"
  server.shutdown()
  server.server_close()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_build_then_reuse_cache(corpus, tmp_path, monkeypatch):
  first = BM25Index(corpus, cache_dir=tmp_path)
  assert not first.from_cache and len(first) == len(DOCS)

  def no_rebuild(*args, **kwargs):
    raise AssertionError("the cached index was rebuilt")

  monkeypatch.setattr(search_mod.BM25Index, "_build", no_rebuild)
  second = BM25Index(corpus, cache_dir=tmp_path)
  assert second.from_cache and second.key == first.key
  query = "Westfield shopping"
  assert [p.id for p in second.search(query, 2)] == [p.id for p in first.search(query, 2)]


def test_cache_key_follows_corpus_content(corpus, tmp_path):
  a = BM25Index(corpus, cache_dir=tmp_path)
  changed = tmp_path / "changed.jsonl"
  changed.write_text(corpus.read_text() + json.dumps({"id": "d6", "contents": "extra"}) + "\n")
  b = BM25Index(changed, cache_dir=tmp_path)
  assert a.key != b.key and not b.from_cache and len(b) == len(DOCS) + 1


def test_relevant_passage_ranks_first(index):
  hits = index.search("which technique involves oversteering", 3)
  assert hits[0].id == "d1"
  assert hits[0].score > 0 and all(h.score <= hits[0].score for h in hits)
  assert index.search("second emperor of the Tang dynasty", 1)[0].id == "d2"
  assert index.search("zzqx unknownword", 3) == []
  assert index.search("", 3) == []


def test_batch_search_matches_single(index):
  queries = ["Westfield co-founder", "video game developer", "magma"]
  batch = index.batch_search(queries, 2)
  assert [b[0].id for b in batch] == ["d0", "d5", "d4"]
  assert batch == [index.search(q, 2) for q in queries]
  assert len(index.search("Westfield", 100)) == 2  # k beyond the corpus is fine


def test_malformed_corpus_line_is_named(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"id": "a", "contents": "fine"}\n{"id": "b", "contents": oops}\n')
  with pytest.raises(CorpusError, match=r"bad\.jsonl:2: not valid JSON"):
    BM25Index(bad, cache_dir=tmp_path / "c")
  bad.write_text('{"id": "a", "contents": "fine"}\n\n{"contents": "no id"}\n')
  with pytest.raises(CorpusError, match=r"bad\.jsonl:3: missing field 'id'"):
    BM25Index(bad, cache_dir=tmp_path / "c")
  with pytest.raises(CorpusError, match="not found"):
    BM25Index(tmp_path / "missing.jsonl", cache_dir=tmp_path / "c")


def test_format_passages_layout():
  assert split_title('"Frank Lowy"\nSir Frank') == ("Frank Lowy", "Sir Frank")
  assert split_title("no title line") == (None, "no title line")
  out = format_passages([Passage("1", '"T"\nbody text'), Passage("2", "plain")])
  assert out == "[1] Title: T\nbody text\n\n[2] plain"
  assert format_passages([]) == "No results found."
  long = format_passages([Passage("1", "x" * 5000)], max_chars_per_passage=200)
  assert len(long) < 260 and "elided" in long


def test_tool_over_local_index(index):
  tool = SearchTool(index, top_k=2)
  res = tool("  who co-founded   Westfield? ")
  assert res.ok and res.error is None
  assert res.output.startswith("[1] Title: Frank Lowy\nSir Frank Lowy")
  empty = tool("   ")
  assert not empty.ok and "empty" in empty.error


def test_client_against_server(server_url):
  client = SearchClient(server_url, timeout_s=5, retries=0)
  assert client.health()["num_docs"] == len(DOCS)
  hits = client.search("oversteering technique", 2)
  assert hits[0].id == "d1" and hits[0].contents.startswith('"Drifting') and hits[0].score > 0
  batch = client.batch_search(["Westfield co-founder", "Tang emperor", "zzqx"], 2)
  assert [b[0].id if b else None for b in batch] == ["d0", "d2", None]
  tool = make_tool("search", url=server_url, top_k=1)
  res = tool("Crystal Dynamics developer")
  assert res.ok and res.output.startswith("[1] Title: Crystal Dynamics")
  assert [r.ok for r in tool.batch(["Westfield", ""])] == [True, False]


def test_server_rejects_bad_requests(server_url):
  client = SearchClient(server_url, timeout_s=5, retries=3, backoff_s=0.01)
  with pytest.raises(SearchError, match="HTTP 400.*query must be a non-empty string"):
    client._request("/search", {"query": "", "top_n": 3})  # pylint: disable=protected-access
  with pytest.raises(SearchError, match="1 attempt"):  # 4xx is not retried
    client._request("/search", {"query": "x", "top_n": 0})  # pylint: disable=protected-access
  with pytest.raises(SearchError, match="HTTP 404"):
    client._request("/nope", {})  # pylint: disable=protected-access


def test_dead_server_gives_clear_error_not_exception():
  url = f"http://127.0.0.1:{_free_port()}"
  tool = SearchTool(SearchClient(url, timeout_s=1, retries=1, backoff_s=0.01))
  res = tool("anything")
  assert not res.ok
  assert "search failed" in res.output and url in res.error and "2 attempt" in res.error
  assert all(not r.ok for r in tool.batch(["a", "b"]))


def test_parse_reply_accepts_flashrag_shapes():
  doc = {"id": "1", "contents": "a"}
  assert parse_reply([doc], None) == [[Passage("1", "a")]]
  assert parse_reply([[doc], [0.5]], None) == [[Passage("1", "a", 0.5)]]
  assert parse_reply([[doc], [doc]], 2) == [[Passage("1", "a")], [Passage("1", "a")]]
  assert parse_reply([[[doc], []], [[0.5], []]], 2) == [[Passage("1", "a", 0.5)], []]
  assert parse_reply({"result": [[{"document": doc, "score": 2}]]}, 1) == [[Passage("1", "a", 2.0)]]
  with pytest.raises(SearchError, match="unrecognised reply"):
    parse_reply({"oops": 1}, None)


def test_make_tool_needs_exactly_one_backend(corpus):
  with pytest.raises(ValueError, match="exactly one"):
    make_tool("search")
  with pytest.raises(ValueError, match="exactly one"):
    make_tool("search", url="http://x", corpus=str(corpus))


def test_server_cli_subprocess(corpus, tmp_path):
  repo = str(Path(__file__).resolve().parents[1])
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
  cmd = [sys.executable, "-m", "autotraj_jax.tir.search_server", "--corpus", str(corpus),
         "--port", "0", "--cache-dir", str(tmp_path)]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          env=env)
  try:
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    assert ready, "search server did not start within 60 s"
    line = proc.stdout.readline()
    assert "listening on http://127.0.0.1:" in line, line
    url = line.rsplit(" ", 1)[-1].strip()
    assert SearchClient(url, timeout_s=5).search("Westfield shopping centre", 1)[0].id == "d3"
  finally:
    proc.terminate()
    proc.wait(timeout=10)


# ---------------------------------------------------------------------------------------------
# The server under load and hostile clients (localhost only; every wait is bounded).


def _post_raw(port: int, path: str, body: bytes, timeout: float = 30.0,
              headers: dict[str, str] | None = None) -> tuple[int, dict]:
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
  try:
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json",
                                                   "Connection": "close", **(headers or {})})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read() or b"null")
  finally:
    conn.close()


@pytest.fixture
def served(index):
  """Starts make_server(index, **kw) on a free port; yields its port; always shut down."""
  servers = []

  def start(**kw):
    server = make_server(index, "127.0.0.1", 0, **kw)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    servers.append(server)
    return server.server_address[1]

  yield start
  for server in servers:
    server.shutdown()
    server.server_close()


def test_server_answers_a_burst_without_resets(served):
  port = served()
  body = json.dumps({"query": "Westfield shopping", "top_n": 2}).encode()

  def one(_):
    try:
      return _post_raw(port, "/search", body)[0]
    except OSError as e:  # a reset or refused connection
      return f"{type(e).__name__}: {e}"

  with concurrent.futures.ThreadPoolExecutor(64) as pool:
    codes = list(pool.map(one, range(500)))
  failed = [c for c in codes if c != 200]
  assert not failed, (len(failed), failed[:5])


def test_stalled_clients_time_out_and_do_not_exhaust_the_server(served):
  max_threads = 4
  port = served(max_threads=max_threads, timeout_s=0.5)
  liars = []
  for _ in range(5 * max_threads):  # each claims 1000 bytes, sends 10, then stalls
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"query\":")
    liars.append(s)
  try:
    status, docs = _post_raw(port, "/search", json.dumps({"query": "Tang emperor"}).encode())
    assert status == 200 and docs[0]["id"] == "d2"
    handlers = [t for t in threading.enumerate() if t.name.startswith(f"search-server-{port}_")]
    assert len(handlers) <= max_threads, len(handlers)
    for s in liars:  # the server gave up on every one of them (end of stream, no hang)
      assert s.recv(1024) == b""
  finally:
    for s in liars:
      s.close()


@pytest.mark.parametrize("body,detail", [
  (b'{"query": "caf\xe9"}', "not UTF-8"),
  (b'{"query": "x",', "not JSON"),
  (b'["x"]', "JSON object"),
  (b'{"query": 5}', "non-empty string"),
  (b'{"query": "x", "top_n": "3"}', "top_n"),
], ids=["non-utf8", "bad-json", "not-object", "wrong-type", "bad-top-n"])
def test_bad_bodies_get_400(served, body, detail):
  status, reply = _post_raw(served(), "/search", body)
  assert status == 400 and detail in reply["detail"], reply


def test_batch_with_wrong_fields_gets_400(served):
  status, reply = _post_raw(served(), "/batch_search", json.dumps({"query": ["a", 1]}).encode())
  assert status == 400 and "list of strings" in reply["detail"]


def test_oversized_body_gets_413_not_a_broken_pipe(served):
  from autotraj_jax.tir.search_server import MAX_BODY_BYTES
  port = served()
  body = b'{"query": "' + b"x" * (MAX_BODY_BYTES + (1 << 20)) + b'"}'  # about 11 MB
  status, reply = _post_raw(port, "/search", body)
  assert status == 413 and "limit" in reply["detail"], reply
  status, reply = _post_raw(port, "/search", b"", headers={"Content-Length": "-5"})
  assert status == 400 and "Content-Length" in reply["detail"]
  assert _post_raw(port, "/search", json.dumps({"query": "volcanoes"}).encode())[0] == 200
