"""Answer checking on real benchmark golds, the reference checker's traps, and thread safety."""

import concurrent.futures
import json
import random
import time
from pathlib import Path

import pytest

pytest.importorskip("math_verify")

from autotraj_jax.tir import answers  # noqa: E402
from autotraj_jax.tir.answers import extract_answer, is_equivalent, normalize_qa, token_f1  # noqa: E402

BENCH = Path("/work/shared/data/benchmarks")


def _golds(name: str) -> dict[str, str]:
  path = BENCH / f"{name}-test.jsonl"
  if not path.is_file():
    pytest.skip(f"benchmark file {path} not present")
  with open(path) as f:
    return {r["id"]: r["answer"] for r in map(json.loads, f)}


# (benchmark id, expected gold, equivalent rewrites, non-equivalent near misses)
MATH500_CASES = [
  ("math500-test-0", "\\left( 3, \\frac{\\pi}{2} \\right)",
   ["(3,\\pi/2)", "\\left(3, \\dfrac{\\pi}{2}\\right)"], ["(3, \\pi)", "(\\pi/2, 3)"]),
  ("math500-test-162", "\\dfrac{17}{50}", ["0.34", "\\frac{17}{50}", "17/50", "$\\frac{17}{50}$"],
   ["\\frac{17}{5}"]),
  ("math500-test-31", "11\\sqrt2", ["11\\sqrt{2}", "\\sqrt{242}"], ["11", "\\sqrt{22}"]),
  ("math500-test-166", "\\frac{270}7\\text{ degrees}", ["\\frac{270}{7}", "\\frac{270}{7}^\\circ"],
   ["\\frac{270}{8}"]),
  ("math500-test-301", "5.4 \\text{ cents}", ["5.4", "5.40"], ["54"]),
  ("math500-test-7", "90^\\circ", ["90", "90^{\\circ}"], ["180^\\circ"]),
  ("math500-test-103", "(3,4]", ["(3, 4]"], ["[3,4)", "(3,4)"]),
  ("math500-test-307", "(-\\infty, 0]", ["(-\\infty,0]", "x \\in (-\\infty, 0]"],
   ["(-\\infty, 0)"]),
  ("math500-test-23", "x=5", ["5", "x = 5"], ["x=-5"]),
  ("math500-test-454", "y = 2x + 3", ["y=3+2x"], ["y = 2x - 3"]),
  ("math500-test-60", "(6,31,-1)", ["(6, 31, -1)"], ["(31,6,-1)"]),
  ("math500-test-422", "\\{1\\pm\\sqrt{5},-2\\}", ["\\{-2, 1+\\sqrt5, 1-\\sqrt5\\}"],
   ["\\{1+\\sqrt{5},-2\\}"]),
  ("math500-test-97", "\\text{east}", ["east", "\\text{East}", "{east}"], ["west", "northeast"]),
  ("math500-test-102", "(a+5)(b+2)", ["(b+2)(a+5)", "ab+2a+5b+10"], ["(a+2)(b+5)"]),
]


@pytest.mark.parametrize("qid, gold, same, different", MATH500_CASES,
                         ids=[c[0] for c in MATH500_CASES])
def test_math500_gold_rewrites(qid, gold, same, different):
  assert _golds("math500")[qid] == gold
  assert is_equivalent(gold, gold)
  for pred in same:
    assert is_equivalent(gold, pred), pred
  for pred in different:
    assert not is_equivalent(gold, pred), pred


def test_math500_sample_self_and_cross():
  golds = list(_golds("math500").values())
  rng = random.Random(0)
  sample = rng.sample(golds, 100)
  for g in sample:
    assert is_equivalent(g, g), g
    norm = answers.normalize_math(g)
    # The math-verify path itself, past the string fast path: it must parse every gold.
    if not answers._is_textual(norm):  # pylint: disable=protected-access
      assert answers._run_verify(norm, norm), g  # pylint: disable=protected-access
  for g in sample[:60]:
    other = rng.choice([o for o in golds if answers.normalize_math(o) != answers.normalize_math(g)])
    assert not is_equivalent(g, other), (g, other)


def test_gsm8k_thousands_separators_and_currency():
  golds = _golds("gsm8k")
  assert golds["gsm8k-test-2"] == "70000"
  for pred in ("70,000", "70000.00", "\\$70,000", "$70000$", "70000.0"):
    assert is_equivalent("70000", pred), pred
  with_commas = [g for g in golds.values() if "," in g]
  assert with_commas, "GSM8K golds carry thousands separators"
  for g in with_commas[:10]:
    plain = g.replace(",", "")
    assert is_equivalent(g, plain) and is_equivalent(plain, g), g
    assert not is_equivalent(g, str(int(float(plain)) + 1)), g


def test_hotpotqa_golds():
  golds = _golds("hotpotqa")
  assert golds["hotpotqa-test-0"] == "Frank Lowy"
  for pred in ("Frank Lowy", "frank lowy.", "{Frank Lowy}", "\\text{Frank Lowy}", " Frank  Lowy "):
    assert is_equivalent("Frank Lowy", pred, "knowledge"), pred
  assert is_equivalent("{Frank Lowy}", "Frank Lowy", "knowledge")
  assert is_equivalent(golds["hotpotqa-test-6"], "Saturdays", "knowledge")  # "The Saturdays"
  values = list(golds.values())
  rng = random.Random(1)
  for g in rng.sample(values, 50):
    assert is_equivalent(g, g, "knowledge"), g
    other = rng.choice([o for o in values if normalize_qa(o) != normalize_qa(g)])
    assert not is_equivalent(g, other, "knowledge"), (g, other)


def test_qa_numbers_and_multiple_golds():
  assert is_equivalent("3,384,569", "3384569", "knowledge")
  assert is_equivalent("0.5", "\\frac{1}{2}", "knowledge")  # numeric gold: math equivalence too
  assert is_equivalent(["Frank Lowy", "Sir Frank Lowy"], "sir frank lowy", "knowledge")
  assert not is_equivalent(["Frank Lowy", "Sir Frank Lowy"], "Frank", "knowledge")
  # Tuples (a loaded Query's gold) and the math domain: true when any gold matches.
  assert is_equivalent(("\\frac{1}{2}", "50\\%"), "0.5", "math")
  assert is_equivalent(("7", "\\frac{1}{2}"), "1/2", "math")
  assert not is_equivalent(("7", "8"), "9", "math")
  assert not is_equivalent(("", "  "), "", "math")


@pytest.mark.parametrize("gold, pred, domain", [
  ("\\frac{1}{9}", "\\frac{1}{8}", "math"),
  ("\\dfrac{1}{9}", "\\frac{1}{8}", "math"),
  ("\\frac{2}{9}", "\\frac{1}{9}", "math"),  # the last brace group alone would match
  ("x=3, y=4", "34", "math"),
  ("34", "x=3, y=4", "math"),
  ("Emperor Taizong of Tang", "Tang", "knowledge"),
  ("Emperor Taizong of Tang", "Emperor Zhaozong of Tang", "knowledge"),
  ("Emperor Taizong of Tang", "Emperor", "knowledge"),
  ("Frank Lowy", "Lowy", "knowledge"),
  ("5", "", "math"),
  ("5", None, "math"),
  ("5", "   ", "math"),
  ("Frank Lowy", "", "knowledge"),
  ("Frank Lowy", None, "knowledge"),
  ("", "", "math"),
  ("yes", "no", "knowledge"),
])
def test_reference_checker_traps_are_false(gold, pred, domain):
  assert not is_equivalent(gold, pred, domain)


def test_extract_then_check_end_to_end():
  traj = ("<think>1/9? no.</think><code>print(2/9)</code><result>0.2222</result>"
          "<answer>The final answer is \\boxed{\\frac{2}{9}}.</answer>")
  pred = extract_answer(traj)
  assert pred == "\\frac{2}{9}"
  assert is_equivalent("\\dfrac{2}{9}", pred)
  assert not is_equivalent("\\frac{1}{9}", pred)
  assert not is_equivalent("\\frac{2}{9}", extract_answer("<think>\\boxed{\\frac{2}{9}}</think>"))


def test_token_f1_and_normalize_qa():
  assert normalize_qa("The  Quick, brown fox!") == "quick brown fox"
  assert normalize_qa("\\text{An Apple}") == "apple"
  assert token_f1("Emperor Taizong of Tang", "Emperor Taizong of Tang") == 1.0
  assert 0.5 < token_f1("Emperor Taizong of Tang", "Emperor Zhaozong of Tang") < 1.0
  assert token_f1("yes", "no") == 0.0
  assert token_f1("yes", "yes indeed") == 0.0
  assert token_f1("Frank Lowy", None) == 0.0
  assert token_f1("Frank Lowy", "") == 0.0
  assert token_f1(["x y", "Frank Lowy"], "frank lowy") == 1.0
  assert token_f1(("Emperor Zhaozong of Tang", "Emperor Taizong"), "Emperor Taizong of Tang") == pytest.approx(
      max(token_f1("Emperor Zhaozong of Tang", "Emperor Taizong of Tang"),
          token_f1("Emperor Taizong", "Emperor Taizong of Tang")))


def test_code_domain_is_never_string_matched():
  assert not is_equivalent("def f():\n  return 1", "def f():\n  return 1", "code")
  with pytest.raises(ValueError, match="unknown answer domain"):
    is_equivalent("1", "1", "poetry")


def _thread_cases() -> list[tuple[str, str]]:
  golds = _golds("math500")
  cases = [(g, p) for _, g, same, diff in MATH500_CASES for p in same + diff]
  cases += [("\\frac{1}{9}", "\\frac{1}{8}"), ("x=3, y=4", "34"), ("2,125", "2125")]
  values = list(golds.values())
  rng = random.Random(2)
  while len(cases) < 50:
    cases.append((rng.choice(values), rng.choice(values)))
  return cases[:50]


def test_thread_safety_matches_main_thread():
  cases = _thread_cases()
  answers.clear_cache()
  want = [is_equivalent(g, p) for g, p in cases]
  assert any(want) and not all(want)
  answers.clear_cache()  # force real math-verify calls from the worker threads
  before = answers.fallback_count()
  with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
    got = list(pool.map(lambda c: is_equivalent(*c), cases))
  assert got == want
  assert answers.fallback_count() == before
  # The threads went through the process pool.
  assert answers._MATH.pool is not None  # pylint: disable=protected-access


def _in_thread(fn, *args):
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    return pool.submit(fn, *args).result()


def test_slow_comparison_times_out_in_main_thread_and_threads():
  gold, pred = "\\sum_{k=0}^{300} \\binom{300}{k} x^k", "(x+1)^{300}+1"  # not equal, slow to decide
  answers.configure_math(timeout_s=1)
  try:
    for run in (lambda: is_equivalent(gold, pred), lambda: _in_thread(is_equivalent, gold, pred)):
      answers.clear_cache()
      t0 = time.perf_counter()
      assert run() is False
      assert time.perf_counter() - t0 < 10
  finally:
    answers.configure_math(timeout_s=5)
    answers.clear_cache()
