"""The tool seam: a tool maps the text of one `<tag>…</tag>` block to a `ToolResult`, never raising.

Tools are registered by tag name (`code`, `search`, `calculator`, ...) so the rollout loop, data
generation and eval pick them from config strings. Tool output is truncated in the middle, because
both the head (what ran) and the tail (the answer, the traceback's last line) matter to the model.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Protocol, runtime_checkable

__all__ = [
  "Tool", "ToolResult", "available_tools", "make_tool", "register_tool", "safe_call",
  "truncate_middle",
]


@dataclasses.dataclass
class ToolResult:
  """What a tool call produced: the text to insert as `<result>`, whether it succeeded, its cost."""

  output: str
  ok: bool
  elapsed_s: float
  error: str | None = None


@runtime_checkable
class Tool(Protocol):
  """A callable tool; `session` lets a stateful tool (the python sandbox) keep per-trajectory state."""

  name: str

  def __call__(self, text: str, *, session: str | None = None) -> ToolResult: ...


_REGISTRY: dict[str, Callable[..., Tool]] = {}


def register_tool(name: str, factory: Callable[..., Tool]) -> Callable[..., Tool]:
  """Registers `factory(**kw) -> Tool` under `name`; re-registering the same factory is a no-op."""
  if not name or not isinstance(name, str):
    raise ValueError(f"tool name must be a non-empty string, got {name!r}")
  old = _REGISTRY.get(name)
  if old is not None and old is not factory and _qualname(old) != _qualname(factory):
    raise ValueError(f"tool {name!r} is already registered to {_qualname(old)}")
  _REGISTRY[name] = factory
  return factory


def make_tool(name: str, **kw: Any) -> Tool:
  """Builds the tool registered as `name` (importing the built-in tool modules on first use)."""
  if name not in _REGISTRY:
    _import_builtin(name)
  if name not in _REGISTRY:
    raise KeyError(f"unknown tool {name!r}; registered: {sorted(_REGISTRY)}")
  return _REGISTRY[name](**kw)


def available_tools() -> list[str]:
  """Names registered so far (built-in tool modules register on import)."""
  return sorted(_REGISTRY)


def truncate_middle(text: str, max_chars: int, *, elided: int = 0) -> str:
  """Keeps the head and tail of `text` within `max_chars` characters, marking how many were cut.

  `elided` counts characters a bounded capture already dropped from the middle of `text` (it kept
  only a head and a tail, each at least `max_chars` long), so the marker reports the true total.
  """
  if max_chars <= 0:
    return ""
  if elided <= 0 and len(text) <= max_chars:
    return text
  total = len(text) + max(elided, 0)
  keep = min(len(text), max_chars)
  while keep > 0 and keep + len(_marker(total - keep)) > max_chars:
    keep -= 1
  marker = _marker(total - keep)
  if len(marker) > max_chars:  # a budget too small for the marker: plain head
    return text[:max_chars]
  head = (keep + 1) // 2
  return text[:head] + marker + text[len(text) - (keep - head):]


def _marker(n: int) -> str:
  return f"\n...[{n} characters elided]...\n"


def safe_call(name: str, fn: Callable[[], ToolResult]) -> ToolResult:
  """Runs `fn`, turning any exception into `ok=False` so a tool never raises into the loop."""
  t0 = time.perf_counter()
  try:
    return fn()
  except BaseException as e:  # noqa: BLE001 - the contract is "never raise", KeyboardInterrupt aside
    if isinstance(e, KeyboardInterrupt):
      raise
    err = f"{type(e).__name__}: {e}"[:300]
    return ToolResult(output=f"[{name} tool failed: {err}]", ok=False,
                      elapsed_s=time.perf_counter() - t0, error=err)


def _qualname(f: Callable[..., Any]) -> str:
  return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', repr(f))}"


_BUILTIN_MODULES = {"code": "autotraj_jax.tir.sandbox"}


def _import_builtin(name: str) -> None:
  import importlib
  mod = _BUILTIN_MODULES.get(name, f"autotraj_jax.tir.{name}")
  try:
    importlib.import_module(mod)
  except ModuleNotFoundError as e:
    if e.name != mod:  # the tool module exists but one of its own imports is missing
      raise
