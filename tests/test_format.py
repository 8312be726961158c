"""Trajectory tag parsing, boxed-answer extraction and format validation."""

import pytest

from autotraj_jax.tir.format import Segment, extract_answer, last_boxed, parse_segments, validate

VALID = (
  "<think>I need the product.</think>\n"
  "<code>print(6 * 7)</code>\n"
  "<result>\n42\n</result>\n"
  "<think>Now look up the founder.</think>"
  "<search>Westfield founder</search><result>[1] Title: Frank Lowy\nSir Frank Lowy ...</result>\n"
  "<answer>The final answer is \\boxed{42}.</answer>"
)


def test_parse_segments_kinds_and_offsets():
  segs = parse_segments(VALID)
  kinds = [s.kind for s in segs if s.kind != "text"]
  assert kinds == ["think", "code", "result", "think", "search", "result", "answer"]
  assert all(not s.content.strip() for s in segs if s.kind == "text")
  code = next(s for s in segs if s.kind == "code")
  assert code.content == "print(6 * 7)"
  assert VALID[code.start:code.end] == "<code>print(6 * 7)</code>"
  assert "".join(VALID[s.start:s.end] for s in segs) == VALID


def test_parse_keeps_outside_text_and_unclosed_block():
  segs = parse_segments("hello <think>a</think> bye <code>x = 1")
  assert [(s.kind, s.content) for s in segs] == [
    ("text", "hello "), ("think", "a"), ("text", " bye "), ("code", "x = 1")]
  text = "hello <think>a</think> bye <code>x = 1"
  assert segs[-1] == Segment("code", "x = 1", segs[-1].start, len(text), closed=False)


def test_result_content_may_contain_tags():
  text = "<code>print('<answer>')</code><result><answer> and </code></result>"
  segs = [s for s in parse_segments(text) if s.kind != "text"]
  assert [s.kind for s in segs] == ["code", "result"]
  assert segs[1].content == "<answer> and </code>"


@pytest.mark.parametrize("text, want", [
  ("\\boxed{42}", "42"),
  ("\\boxed{\\frac{1}{9}}", "\\frac{1}{9}"),
  ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
  ("first \\boxed{1} then \\boxed{2}", "2"),
  ("\\fbox{7}", "7"),
  ("\\boxed {x}", "x"),
  ("\\boxed 5.", "5"),
  ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
  ("\\boxed{a} and a broken \\boxed{b", "a"),
  ("\\boxed{}", ""),
  ("no box here", None),
  ("\\boxedx{3}", None),
])
def test_last_boxed(text, want):
  assert last_boxed(text) == want


def test_extract_answer_uses_last_answer_block_only():
  text = ("<think>Maybe \\boxed{1}?</think><answer>\\boxed{2}</answer>"
          "<answer>so \\boxed{\\frac{2}{9}} not \\boxed{3}? no: \\boxed{\\frac{2}{9}}</answer>")
  assert extract_answer(text) == "\\frac{2}{9}"


def test_extract_answer_ignores_box_outside_answer():
  assert extract_answer("<think>\\boxed{5}</think>\\boxed{5}") is None
  assert extract_answer("<think>\\boxed{5}</think><answer>5</answer>") is None
  assert extract_answer("<think>x</think><answer>I think \\boxed{7}</answer>\\boxed{8}") == "7"


def test_extract_answer_accepts_cut_answer_and_nested_braces():
  assert extract_answer("<think>a</think><answer>\\boxed{\\sqrt{2}+1}") == "\\sqrt{2}+1"
  assert extract_answer("<answer>\\boxed{ \\text{Frank Lowy} }</answer>") == "\\text{Frank Lowy}"


def test_validate_accepts_valid_trajectories():
  assert validate(VALID) == []
  assert validate("<think>easy</think>\n<answer>\\boxed{3}</answer>\n") == []
  assert validate("<answer>\\boxed{3}</answer>") == []


def _one(text, fragment, **kw):
  problems = validate(text, **kw)
  assert any(fragment in p for p in problems), problems
  return problems


@pytest.mark.parametrize("text, fragment", [
  ("<think>a<answer>\\boxed{1}</answer>", "never closed"),
  ("<think>a</think></code><answer>\\boxed{1}</answer>", "no matching <code>"),
  ("<think>a <code>x</code></think><answer>\\boxed{1}</answer>", "<code> nested inside <think>"),
  ("<code>print(1) <search>q</search></code><result>1</result><answer>\\boxed{1}</answer>",
   "<search> nested inside <code>"),
  ("<think>a</think> stray words <answer>\\boxed{1}</answer>", "text outside tags"),
  ("<think>a</think>", "missing <answer>"),
  ("<answer>\\boxed{1}</answer><answer>\\boxed{2}</answer>", "2 <answer> blocks"),
  ("<answer>\\boxed{1}</answer><code>print(2)</code><result>2</result>",
   "tool call after the answer"),
  ("<think>a</think><result>5</result><answer>\\boxed{5}</answer>", "does not follow a <code>"),
  ("<code>print(5)</code><think>a</think><answer>\\boxed{5}</answer>", "has no <result>"),
  ("<think>a</think><code>print(5)</code>", "trajectory cut off"),
  ("<answer>The answer is 5.</answer>", "no \\boxed"),
  ("<answer>\\boxed{ }</answer>", "is empty"),
  ("<code> </code><result></result><answer>\\boxed{1}</answer>", "empty <code>"),
])
def test_validate_reports_each_violation(text, fragment):
  _one(text, fragment)


def test_validate_partial_allows_in_progress_trajectory():
  assert validate("<think>a</think><code>print(1)</code>", partial=True) == []
  assert validate("<think>a</think><code>print(1)", partial=True) == []
  assert validate("<think>a</think><answer>so \\boxed{4", partial=True) == []
  # A finished, well-formed prefix still needs its results in order.
  _one("<code>1</code><code>2</code>", "has no <result>", partial=True)


def test_validate_whitespace_between_blocks_is_fine():
  assert validate("\n\n  <think>a</think>\n\t<answer>\\boxed{1}</answer>\n\n") == []
