"""Trajectory tag grammar: parsing, answer extraction and format validation.

A response is a sequence of top-level blocks `<think>`, `<code>`, `<search>`, `<result>` and
`<answer>`; the final answer is the last balanced `\\boxed{...}` inside the last `<answer>` block.
Blocks do not nest: inside a block only its own closing tag ends it, so tool output or code that
mentions another tag cannot derail the parse. Validation reports every violation at once, so a
scorer or repairer can say exactly what is wrong instead of returning a bare -1.
"""

from __future__ import annotations

import dataclasses
import re

TAGS: tuple[str, ...] = ("think", "code", "search", "result", "answer")
TOOL_TAGS: frozenset[str] = frozenset({"code", "search"})

_TAG_RE = re.compile(r"<(/?)(think|code|search|result|answer)>")
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


@dataclasses.dataclass(frozen=True)
class Segment:
  """One top-level piece of a response.

  `kind` is a tag name or 'text' (anything outside tags); `content` excludes the tags; `start`
  and `end` are character offsets of the whole piece (tags included) in the response. `closed`
  is False for a block cut off before its closing tag.
  """

  kind: str
  content: str
  start: int
  end: int
  closed: bool = True


def _scan(text: str) -> tuple[list[Segment], list[str]]:
  """Splits `text` into segments and collects tag-level problems found on the way."""
  segments: list[Segment] = []
  problems: list[str] = []
  pos = 0
  text_start = 0

  def flush_text(upto: int) -> None:
    if upto > text_start:
      segments.append(Segment("text", text[text_start:upto], text_start, upto))

  while True:
    m = _TAG_RE.search(text, pos)
    if m is None:
      break
    closing, tag = m.group(1) == "/", m.group(2)
    if closing:
      problems.append(f"closing </{tag}> at offset {m.start()} has no matching <{tag}>")
      pos = m.end()
      continue
    flush_text(m.start())
    close_tag = f"</{tag}>"
    close_at = text.find(close_tag, m.end())
    body_end = len(text) if close_at < 0 else close_at
    body = text[m.end():body_end]
    if tag != "result":  # tool output is not the model's text: tags in it are not violations
      for inner in _TAG_RE.finditer(body):
        at = m.end() + inner.start()
        problems.append(f"{inner.group(0)} nested inside <{tag}> at offset {at}")
    if close_at < 0:
      segments.append(Segment(tag, body, m.start(), len(text), closed=False))
      pos = text_start = len(text)
      break
    end = close_at + len(close_tag)
    segments.append(Segment(tag, body, m.start(), end))
    pos = text_start = end
  flush_text(len(text))
  return segments, problems


def parse_segments(text: str) -> list[Segment]:
  """Top-level segments of a response, in order; text outside tags is kept as 'text'."""
  return _scan(text)[0]


def _balanced_group(text: str, open_at: int) -> int | None:
  """Index just past the `}` matching the `{` at `open_at`, or None if unbalanced.

  A backslash escapes the next character, so `\\{` and `\\}` (set braces) do not count.
  """
  depth = 0
  i = open_at
  while i < len(text):
    ch = text[i]
    if ch == "\\":
      i += 2
      continue
    if ch == "{":
      depth += 1
    elif ch == "}":
      depth -= 1
      if depth == 0:
        return i + 1
    i += 1
  return None


def _box_at(text: str, after: int) -> str | None:
  """Content of the box whose command ends at `after`: `{...}` (balanced) or `\\boxed 5`."""
  i = after
  while i < len(text) and text[i] in " \t":
    i += 1
  if i < len(text) and text[i] == "{":
    end = _balanced_group(text, i)
    return None if end is None else text[i + 1:end - 1]
  if i > after:  # `\boxed 5` form: one whitespace-free token
    m = re.match(r"[^\s$}]+", text[i:])
    if m:
      return m.group(0).rstrip(".,;")
  return None


def last_boxed(text: str) -> str | None:
  """Content of the last balanced `\\boxed{...}` / `\\fbox{...}` in `text`, or None.

  Nested braces are kept whole (`\\boxed{\\frac{1}{9}}` gives `\\frac{1}{9}`, never just `9`,
  the bug that made 1/9 equal 1/8 in the reference checker). Boxes are ranked by where they
  start; an unbalanced box is skipped in favour of the previous one.
  """
  for m in reversed(list(_BOX_RE.finditer(text))):
    content = _box_at(text, m.end())
    if content is not None:
      return content
  return None


def answer_block(text: str) -> str | None:
  """Content of the last `<answer>` block (a final unclosed one counts), or None."""
  blocks = [s for s in parse_segments(text) if s.kind == "answer"]
  return blocks[-1].content if blocks else None


def extract_answer(text: str) -> str | None:
  """The last balanced `\\boxed{}` inside the last `<answer>` block.

  None when there is no answer block or it holds no box: a missing answer must never match a
  gold answer (the reference checker compared "" and found it inside every gold). A final
  `<answer>` cut before `</answer>` still counts, since stop strings are often stripped.
  """
  block = answer_block(text)
  if block is None:
    return None
  boxed = last_boxed(block)
  return boxed.strip() if boxed is not None else None


def validate(text: str, *, partial: bool = False) -> list[str]:
  """Human-readable format violations of a model response (the assistant part only).

  An empty list means valid. With `partial=True` the response is treated as still being
  generated: a missing answer, a final unclosed block and a final tool call still waiting for
  its result are allowed.
  """
  segments, problems = _scan(text)
  problems = list(problems)
  blocks = [s for s in segments if s.kind != "text"]
  last_block = blocks[-1] if blocks else None

  for seg in segments:
    if seg.kind == "text":
      if seg.content.strip():
        snippet = " ".join(seg.content.split())[:40]
        problems.append(f"text outside tags at offset {seg.start}: {snippet!r}")
      continue
    if not seg.closed and not (partial and seg is last_block):
      problems.append(f"<{seg.kind}> at offset {seg.start} is never closed")
    if seg.kind in TOOL_TAGS and seg.closed and not seg.content.strip():
      problems.append(f"empty <{seg.kind}> call at offset {seg.start}")

  previous: Segment | None = None
  answer_seen = False
  for seg in blocks:
    if answer_seen:
      if seg.kind in TOOL_TAGS:
        problems.append(f"<{seg.kind}> tool call after the answer (offset {seg.start})")
      elif seg.kind != "answer":
        problems.append(f"<{seg.kind}> block after the answer (offset {seg.start})")
    if seg.kind == "result" and (previous is None or previous.kind not in TOOL_TAGS):
      problems.append(f"<result> at offset {seg.start} does not follow a <code> or <search> call")
    if previous is not None and previous.kind in TOOL_TAGS and seg.kind != "result":
      problems.append(f"<{previous.kind}> call at offset {previous.start} has no <result>")
    answer_seen = answer_seen or seg.kind == "answer"
    previous = seg
  if previous is not None and previous.kind in TOOL_TAGS and not partial:
    problems.append(f"<{previous.kind}> call at offset {previous.start} has no <result>"
                    " (trajectory cut off?)")

  answers = [s for s in blocks if s.kind == "answer"]
  if not answers:
    if not partial:
      problems.append("missing <answer> block")
  else:
    if len(answers) > 1:
      problems.append(f"{len(answers)} <answer> blocks (expected exactly one)")
    last = answers[-1]
    if last.closed or not partial:
      boxed = last_boxed(last.content)
      if boxed is None:
        problems.append("the answer has no \\boxed{...}")
      elif not boxed.strip():
        problems.append("the answer's \\boxed{} is empty")
  return problems
