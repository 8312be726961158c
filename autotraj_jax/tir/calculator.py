"""Safe arithmetic tool: an AST whitelist evaluator, never `eval`.

Only numbers, + - * / // % ** (and `^`, read as a power, as on a calculator), unary signs,
parentheses and a fixed set of math functions and constants are accepted. Every intermediate
result is size-checked before it is computed, so inputs like `9**9**9` or `10**10**6` are
rejected at once instead of eating CPU and memory.
"""

from __future__ import annotations

import ast
import math
import operator
import time
from typing import Any, Callable

from autotraj_jax.tir.tools import ToolResult, register_tool, safe_call

__all__ = ["Calculator", "CalculatorError", "evaluate"]

Number = int | float

MAX_INPUT_CHARS = 2_000
MAX_INT_BITS = 4_096  # ~1233 decimal digits: room for any exam answer, far from a DoS
MAX_FACTORIAL = 500  # 500! is ~3,800 bits, inside MAX_INT_BITS


class CalculatorError(ValueError):
  """An expression the calculator refuses or cannot evaluate."""


def _check(x: Number) -> Number:
  if isinstance(x, int) and x.bit_length() > MAX_INT_BITS:
    raise CalculatorError(f"result too large (over {MAX_INT_BITS} bits)")
  if isinstance(x, float) and math.isnan(x):
    raise CalculatorError("result is not a number")
  return x


def _pow(base: Number, exp: Number) -> Number:
  if isinstance(base, int) and isinstance(exp, int) and exp > 0 and abs(base) > 1:
    if (abs(base).bit_length() - 1) * exp > MAX_INT_BITS:
      raise CalculatorError(f"power too large (over {MAX_INT_BITS} bits)")
  try:
    result = base ** exp
  except ZeroDivisionError as e:
    raise CalculatorError("zero to a negative power") from e
  if isinstance(result, complex):
    raise CalculatorError("complex result (fractional power of a negative number)")
  return result


def _mul(a: Number, b: Number) -> Number:
  if (isinstance(a, int) and isinstance(b, int)
      and a.bit_length() + b.bit_length() > MAX_INT_BITS + 1):
    raise CalculatorError(f"result too large (over {MAX_INT_BITS} bits)")
  return a * b


def _factorial(n: Number) -> int:
  if isinstance(n, float) and n.is_integer():
    n = int(n)
  if not isinstance(n, int) or n < 0:
    raise CalculatorError("factorial needs a non-negative integer")
  if n > MAX_FACTORIAL:
    raise CalculatorError(f"factorial argument over {MAX_FACTORIAL}")
  return math.factorial(n)


def _log(x: Number, base: Number | None = None) -> float:
  return math.log(x) if base is None else math.log(x, base)


_BINARY: dict[type, Callable[[Number, Number], Number]] = {
  ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: _mul, ast.Div: operator.truediv,
  ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: _pow, ast.BitXor: _pow,
}
_UNARY: dict[type, Callable[[Number], Number]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS: dict[str, Callable[..., Number]] = {
  "sqrt": math.sqrt, "exp": math.exp, "log": _log, "ln": math.log, "log10": math.log10,
  "log2": math.log2, "sin": math.sin, "cos": math.cos, "tan": math.tan, "asin": math.asin,
  "acos": math.acos, "atan": math.atan, "sinh": math.sinh, "cosh": math.cosh, "tanh": math.tanh,
  "abs": abs, "round": round, "floor": math.floor, "ceil": math.ceil, "factorial": _factorial,
  "min": min, "max": max, "gcd": math.gcd, "degrees": math.degrees, "radians": math.radians,
}
_CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau, "inf": math.inf}


def _eval(node: ast.AST) -> Number:
  if isinstance(node, ast.Expression):
    return _eval(node.body)
  if isinstance(node, ast.Constant):
    if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
      raise CalculatorError(f"unsupported literal {node.value!r}")
    return _check(node.value)
  if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
    left, right = _eval(node.left), _eval(node.right)
    return _check(_BINARY[type(node.op)](left, right))
  if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
    return _check(_UNARY[type(node.op)](_eval(node.operand)))
  if isinstance(node, (ast.BinOp, ast.UnaryOp)):
    raise CalculatorError(f"operator {type(node.op).__name__} is not allowed")
  if isinstance(node, ast.Name):
    if node.id in _CONSTANTS:
      return _CONSTANTS[node.id]
    raise CalculatorError(f"unknown name {node.id!r}")
  if isinstance(node, ast.Call):
    if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS:
      what = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
      allowed = ", ".join(sorted(_FUNCTIONS))
      raise CalculatorError(f"function {what!r} is not allowed; allowed: {allowed}")
    if node.keywords:
      raise CalculatorError("keyword arguments are not allowed")
    args = [_eval(a) for a in node.args]
    return _check(_FUNCTIONS[node.func.id](*args))
  raise CalculatorError(f"{type(node).__name__} is not allowed in an arithmetic expression")


def evaluate(expression: str) -> Number:
  """Value of an arithmetic expression; raises `CalculatorError` for anything else."""
  text = expression.strip().rstrip("=").strip()
  if not text:
    raise CalculatorError("empty expression")
  if len(text) > MAX_INPUT_CHARS:
    raise CalculatorError(f"expression longer than {MAX_INPUT_CHARS} characters")
  try:
    tree = ast.parse(text, mode="eval")
  except SyntaxError as e:
    raise CalculatorError(f"syntax error: {e.msg}") from e
  try:
    return _eval(tree)
  except CalculatorError:
    raise
  except (ArithmeticError, ValueError, TypeError) as e:  # 1/0, sqrt(-1), exp(1000), log(0)
    raise CalculatorError(f"{type(e).__name__}: {e}") from e
  except RecursionError as e:
    raise CalculatorError("expression nested too deeply") from e


def format_number(x: Number) -> str:
  """Integers exactly; floats to 15 significant digits, without a trailing '.0' noise."""
  if isinstance(x, int):
    return str(x)
  if math.isinf(x):
    return "inf" if x > 0 else "-inf"
  return format(x, ".15g")


class Calculator:
  """The `calculator` tool: one expression in, its value (or an error line) out."""

  name = "calculator"

  def __call__(self, text: str, *, session: str | None = None) -> ToolResult:
    del session  # stateless

    def run() -> ToolResult:
      t0 = time.perf_counter()
      try:
        value = evaluate(text)
      except CalculatorError as e:
        return ToolResult(output=f"Error: {e}", ok=False, elapsed_s=time.perf_counter() - t0,
                          error=str(e))
      return ToolResult(output=format_number(value), ok=True, elapsed_s=time.perf_counter() - t0)

    return safe_call(self.name, run)


def _make_calculator(**kw: Any) -> Calculator:
  if kw:
    raise TypeError(f"calculator takes no options, got {sorted(kw)}")
  return Calculator()


register_tool("calculator", _make_calculator)
