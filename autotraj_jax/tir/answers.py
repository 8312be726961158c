"""Answer checking: symbolic equivalence for math, normalised exact match / F1 for QA.

Fixes the reference checker's faults: an empty or missing answer is never correct, a substring
of the gold is not a match, nested braces are compared whole, and numbers are never built by
deleting every non-digit ("x=3, y=4" is not 34).

Math goes through `math-verify` (gold first: `verify(parse(gold), parse(pred))`). Its timeouts use
`signal.alarm`, which only works in the main thread, so:
  * called from the main thread, it runs inline with math-verify's own timeouts;
  * called from any other thread, the check runs in a small, lazily created process pool
    (spawn start method, safe in a process that holds JAX/accelerator threads) where it is the
    worker's main thread, so the same timeouts apply; the caller also waits at most a bounded
    time and counts a timeout or a crashed pool as "not equivalent" (see `fallback_count`).
Both paths run the same function, so threaded and main-thread answers agree.
`configure_math(mode="process")` forces the pool, e.g. where the caller owns SIGALRM. As with
any spawned worker, a script that checks answers from threads needs the usual
`if __name__ == "__main__":` guard, since the workers import the main module.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import gc
import logging
import multiprocessing
import re
import string
import threading
from collections.abc import Sequence
from concurrent.futures.process import BrokenProcessPool

from autotraj_jax.tir.format import extract_answer, last_boxed

__all__ = [
  "clear_cache", "configure_math", "extract_answer", "fallback_count", "is_equivalent",
  "math_equivalent", "normalize_math", "normalize_qa", "qa_exact_match", "shutdown_math_pool",
  "token_f1",
]

log = logging.getLogger(__name__)

Gold = str | Sequence[str]

MATH_DOMAINS = frozenset({"math"})
QA_DOMAINS = frozenset({"knowledge", "qa"})
CODE_DOMAINS = frozenset({"code"})

# ---------------------------------------------------------------------------------------------
# QA: SQuAD normalisation, exact match and token F1.

_TEXT_CMD_RE = re.compile(
    r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCT = frozenset(string.punctuation)


def _unwrap(text: str, *, text_cmds: bool = True) -> str:
  """Drops `$…$`, `\\(…\\)`, a whole `\\boxed{}` or `{…}` (and `\\text{…}` if asked)."""
  s = _TEXT_CMD_RE.sub(r"\1", text.strip()) if text_cmds else text.strip()
  while True:
    before = s
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
      if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
        s = s[len(left):len(s) - len(right)].strip()
    if s.startswith(("\\boxed", "\\fbox")) and s.endswith("}"):
      inner = last_boxed(s)
      if inner is not None and s.count("\\boxed") + s.count("\\fbox") == 1:
        s = inner.strip()
    if s.startswith("{") and _whole_group(s):
      s = s[1:-1].strip()
    if s == before:
      return s


def _whole_group(s: str) -> bool:
  """True when `s` is one balanced `{...}` group (so `{a}{b}` is not)."""
  depth = 0
  i = 0
  while i < len(s):
    ch = s[i]
    if ch == "\\":
      i += 2
      continue
    depth += ch == "{"
    depth -= ch == "}"
    if depth == 0:
      return i == len(s) - 1
    i += 1
  return False


def normalize_qa(text: str) -> str:
  """SQuAD normalisation (lowercase, no punctuation, no articles, single spaces).

  LaTeX text wrappers are removed first, since QA answers arrive from `\\boxed{\\text{...}}`.
  """
  s = _unwrap(text).lower()
  s = "".join(ch for ch in s if ch not in _PUNCT)
  s = _ARTICLES_RE.sub(" ", s)
  return " ".join(s.split())


def _golds(gold: Gold) -> list[str]:
  return [gold] if isinstance(gold, str) else [g for g in gold if isinstance(g, str)]


def qa_exact_match(gold: Gold, predicted: str | None) -> bool:
  """Normalised exact match against any of the golds; never a substring match."""
  if predicted is None:
    return False
  pred = normalize_qa(predicted)
  return bool(pred) and any(pred == normalize_qa(g) for g in _golds(gold))


def token_f1(gold: Gold, predicted: str | None) -> float:
  """SQuAD token F1 (best over golds); yes/no/noanswer must match exactly."""
  if predicted is None:
    return 0.0
  pred = normalize_qa(predicted)
  best = 0.0
  for g in _golds(gold):
    ref = normalize_qa(g)
    if not pred or not ref:
      continue
    if (pred in ("yes", "no", "noanswer") or ref in ("yes", "no", "noanswer")) and pred != ref:
      continue
    common = collections.Counter(pred.split()) & collections.Counter(ref.split())
    same = sum(common.values())
    if same:
      precision, recall = same / len(pred.split()), same / len(ref.split())
      best = max(best, 2 * precision * recall / (precision + recall))
  return best


# ---------------------------------------------------------------------------------------------
# Math: light normalisation, a string fast path, then math-verify.

_THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_WORD = r"[A-Za-z]+(?:['\-][A-Za-z]+)*"
_WORDY_RE = re.compile(rf"{_WORD}(?:\s+{_WORD})*")
_NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?%?")


def normalize_math(text: str) -> str:
  """Canonical string form for the fast path (and the text handed to math-verify)."""
  s = _unwrap(text, text_cmds=False)  # math-verify reads `\\text{ cm}` as a unit, keep it
  s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
  s = re.sub(r"\\(?:left|right|big|Big|bigl|bigr|Bigl|Bigr)(?![A-Za-z])", "", s)
  s = re.sub(r"\\[,;:! ]|\\displaystyle|\\quad|\\qquad", " ", s)
  s = re.sub(r"\^\s*\{?\\circ\}?|\\circ|\\degree", "", s)
  s = s.replace("\\$", "")
  s = re.sub(r"^\$(?=\s*[\d.])", "", s)
  s = " ".join(s.split()).rstrip(".").strip()
  if _THOUSANDS_RE.fullmatch(s):
    s = s.replace(",", "")
  s = re.sub(r" ?([^A-Za-z0-9 ]) ?", r"\1", s)
  return s


def _is_textual(norm: str) -> bool:
  """A gold made of words (names, 'odd', 'Sunday'): compare as text, not as a product of symbols.

  At least one word must have two letters, so `p - q` or `x y` still go to math-verify.
  """
  s = _unwrap(norm)
  return bool(_WORDY_RE.fullmatch(s)) and bool(re.search(r"[A-Za-z]{2}", s))


def _verify_worker(gold: str, pred: str, timeout_s: int | None) -> bool:
  """math-verify on two answer strings, inside `\\boxed{}` so LaTeX without `$` is found.

  `timeout_s=None` disables math-verify's signal timeouts (the only way it runs off the main
  thread); used solely when no worker process can be started.
  """
  from math_verify import parse, verify  # pylint: disable=import-outside-toplevel
  try:
    g = parse("\\boxed{" + gold + "}", parsing_timeout=timeout_s)
    p = parse("\\boxed{" + pred + "}", parsing_timeout=timeout_s)
    return bool(g) and bool(p) and bool(verify(g, p, timeout_seconds=timeout_s))
  except Exception:  # math-verify raising is a parse failure, not a match
    return False


def _warm_worker() -> None:
  import math_verify  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import


class _MathPool:
  """Lazily started process pool for checks issued from non-main threads."""

  def __init__(self) -> None:
    self.lock = threading.Lock()
    self.pool: concurrent.futures.ProcessPoolExecutor | None = None
    self.workers = 2
    self.mode = "auto"
    self.timeout_s = 5
    self.fallbacks = 0
    self.no_pool_warned = False

  def get(self) -> concurrent.futures.ProcessPoolExecutor:
    with self.lock:
      if self.pool is None:
        self.pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_warm_worker)
      return self.pool

  def discard(self, pool: concurrent.futures.ProcessPoolExecutor, kill: bool = False) -> None:
    """Drops a broken (or, with `kill`, wedged) pool so the next call starts a fresh one."""
    with self.lock:
      if self.pool is pool:
        self.pool = None
    if kill:
      for proc in list((getattr(pool, "_processes", None) or {}).values()):  # no public kill
        proc.terminate()
    pool.shutdown(wait=False, cancel_futures=True)

  def count_fallback(self) -> None:
    with self.lock:
      self.fallbacks += 1

  def shutdown(self) -> None:
    with self.lock:
      pool, self.pool = self.pool, None
    if pool is not None:
      pool.shutdown(wait=False, cancel_futures=True)


_MATH = _MathPool()
atexit.register(_MATH.shutdown)

_CACHE: dict[tuple[str, str], bool] = {}
_CACHE_LOCK = threading.Lock()
_CACHE_MAX = 100_000


def configure_math(*, mode: str | None = None, workers: int | None = None,
                   timeout_s: int | None = None) -> None:
  """Sets how math-verify runs: mode 'auto' | 'inline' | 'process', pool size, per-step timeout."""
  if mode is not None:
    if mode not in ("auto", "inline", "process"):
      raise ValueError(f"mode must be 'auto', 'inline' or 'process', got {mode!r}")
    _MATH.mode = mode
  if workers is not None:
    if workers < 1:
      raise ValueError(f"workers must be >= 1, got {workers}")
    _MATH.workers = workers
    _MATH.shutdown()
  if timeout_s is not None:
    if timeout_s < 1:
      raise ValueError(f"timeout_s must be a whole number of seconds >= 1, got {timeout_s}")
    _MATH.timeout_s = int(timeout_s)


def clear_cache() -> None:
  """Forgets memoised math results (tests; or after changing `configure_math`)."""
  with _CACHE_LOCK:
    _CACHE.clear()


def fallback_count() -> int:
  """How many math checks timed out or lost their worker and were scored as not equivalent."""
  return _MATH.fallbacks


def shutdown_math_pool() -> None:
  """Stops the worker processes (they restart on demand)."""
  _MATH.shutdown()


def _run_verify(gold: str, pred: str) -> bool | None:
  """math-verify inline or in the pool; None when the pool timed out or failed (not cached)."""
  timeout_s = _MATH.timeout_s
  inline = _MATH.mode == "inline" or (
      _MATH.mode == "auto" and threading.current_thread() is threading.main_thread())
  if inline:
    # math-verify's SIGALRM timeout raises wherever Python happens to be; inside a gc callback
    # (JAX registers one) the exception is swallowed and the check runs on unbounded. So no
    # automatic gc during the check.
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
      return _verify_worker(gold, pred, timeout_s)
    finally:
      if gc_was_on:
        gc.enable()
  # Two parses and a comparison, each bounded inside the worker; the slack covers worker start.
  outer_s = 3 * timeout_s + 30
  for _ in range(2):  # a second try if another thread just replaced the pool
    pool = None
    try:
      pool = _MATH.get()
      future = pool.submit(_verify_worker, gold, pred, timeout_s)
    except RuntimeError:  # shut down or broken (BrokenProcessPool) by another thread
      if pool is not None:
        _MATH.discard(pool)
      continue
    except Exception as e:  # no child processes possible here (e.g. inside a daemonic process)
      if not _MATH.no_pool_warned:
        log.warning("no math-verify worker pool (%s): checking in-thread without timeouts", e)
        _MATH.no_pool_warned = True
      return _verify_worker(gold, pred, None)
    try:
      return future.result(timeout=outer_s)
    except (TimeoutError, concurrent.futures.CancelledError, BrokenProcessPool) as e:
      log.warning("math-verify fallback (%s) for gold=%r pred=%r: scored as not equivalent",
                  type(e).__name__, gold[:80], pred[:80])
      _MATH.discard(pool, kill=True)
      _MATH.count_fallback()
      return None
  _MATH.count_fallback()
  return None


def math_equivalent(gold: str, predicted: str | None) -> bool:
  """True when `predicted` equals `gold` as a math answer (symbolically or numerically)."""
  if predicted is None or not predicted.strip() or not gold.strip():
    return False
  g, p = normalize_math(gold), normalize_math(predicted)
  if not g or not p:
    return False
  if g == p:
    return True
  if _is_textual(g):
    return qa_exact_match(g, p)
  key = (g, p)
  with _CACHE_LOCK:
    hit = _CACHE.get(key)
  if hit is not None:
    return hit
  result = _run_verify(g, p)
  if result is None:  # a fallback counts as "not equivalent" but is not remembered
    return False
  with _CACHE_LOCK:
    if len(_CACHE) >= _CACHE_MAX:
      _CACHE.clear()
    _CACHE[key] = result
  return result


def _looks_mathematical(gold: str) -> bool:
  """A QA gold that is a plain number or explicit LaTeX (HLE has both), not free text."""
  s = gold.strip()
  return "\\" in s or s.startswith("$") or bool(_NUMBER_RE.fullmatch(normalize_math(s)))


_CODE_WARNED = False


def is_equivalent(gold: Gold, predicted: str | None, domain: str = "math") -> bool:
  """Whether `predicted` (an extracted answer, e.g. from `extract_answer`) matches `gold`.

  `gold` may be a string or a list of acceptable strings. Domains: 'math' (symbolic), 'knowledge'
  / 'qa' (SQuAD-normalised exact match, plus math equivalence when the gold is a number or
  formula), 'code' (always False: the benchmark files hold reference solutions, not tests, so
  code must be judged by running tests, not by comparing strings). Empty or None is never correct.
  """
  global _CODE_WARNED
  if predicted is None or not predicted.strip():
    return False
  golds = [g for g in _golds(gold) if g.strip()]
  if domain in MATH_DOMAINS:
    return any(math_equivalent(g, predicted) for g in golds)
  if domain in QA_DOMAINS:
    if qa_exact_match(golds, predicted):
      return True
    return any(_looks_mathematical(g) and math_equivalent(g, predicted) for g in golds)
  if domain in CODE_DOMAINS:
    if not _CODE_WARNED:
      log.warning("is_equivalent(domain='code') is always False: judge code by executing tests")
      _CODE_WARNED = True
    return False
  raise ValueError(f"unknown answer domain {domain!r}; expected math, knowledge, qa or code")
