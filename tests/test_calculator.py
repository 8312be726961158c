"""The calculator tool: arithmetic works, everything else is refused without being run."""

import math
import time

import pytest

from autotraj_jax.tir.calculator import Calculator, CalculatorError, evaluate
from autotraj_jax.tir.tools import make_tool


@pytest.mark.parametrize("expr, want", [
  ("1 + 2 * 3", 7),
  ("(1 + 2) * 3", 9),
  ("7 // 2", 3),
  ("7 % 4", 3),
  ("-3 ** 2", -9),
  ("2 ** 10", 1024),
  ("2 ^ 10", 1024),  # ^ is a power, as on a calculator
  ("2 ** -1", 0.5),
  ("+5 - -5", 10),
  ("1/4", 0.25),
  ("sqrt(16)", 4.0),
  ("log(8, 2)", 3.0),
  ("exp(0) + cos(0)", 2.0),
  ("sin(pi / 2)", 1.0),
  ("floor(2.7) + ceil(2.1)", 5),
  ("abs(-4) + max(1, 2, 3) + min(4, 5)", 11),
  ("factorial(5)", 120),
  ("12 * 3 =", 36),
  ("1.5e3", 1500.0),
])
def test_evaluates_arithmetic(expr, want):
  assert evaluate(expr) == pytest.approx(want)


def test_constants():
  assert evaluate("pi") == math.pi and evaluate("e") == math.e


@pytest.mark.parametrize("expr, fragment", [
  ("__import__('os')", "'__import__' is not allowed"),
  ("__import__('os').system('echo hi')", "not allowed"),
  ("(1).real", "Attribute is not allowed"),
  ("math.sqrt(4)", "not allowed"),
  ("x + 1", "unknown name 'x'"),
  ("open('/etc/passwd')", "'open' is not allowed"),
  ("[1, 2]", "List is not allowed"),
  ("lambda: 1", "Lambda is not allowed"),
  ("'a' * 3", "unsupported literal"),
  ("True + 1", "unsupported literal"),
  ("1 if 2 else 3", "IfExp is not allowed"),
  ("sqrt(x=4)", "keyword arguments"),
  ("1 << 100000", "LShift"),
  ("9**9**9", "too large"),
  ("10 ** 100000", "too large"),
  ("2 ** 4097", "too large"),
  ("factorial(10**6)", "factorial"),
  ("(10**1000) * (10**1000)", "too large"),
  ("1 / 0", "ZeroDivisionError"),
  ("sqrt(-1)", "ValueError"),
  ("(-8) ** (1/3)", "complex"),
  ("exp(1000)", "OverflowError"),
  ("1 +", "syntax error"),
  ("", "empty"),
  ("1" * 3000, "longer than"),
  ("(" * 500 + "1" + ")" * 500, "syntax error"),
])
def test_rejects(expr, fragment):
  with pytest.raises(CalculatorError, match=__import__("re").escape(fragment)):
    evaluate(expr)


def test_huge_powers_are_refused_fast():
  t0 = time.perf_counter()
  for expr in ("9**9**9", "2**2**2**2**2", "(10**100)**(10**100)", "-(7**99999)"):
    with pytest.raises(CalculatorError):
      evaluate(expr)
  assert time.perf_counter() - t0 < 1.0


def test_tool_results():
  tool = make_tool("calculator")
  assert isinstance(tool, Calculator) and tool.name == "calculator"
  res = tool("3 * (4 + 5)")
  assert res.ok and res.output == "27" and res.error is None and res.elapsed_s >= 0
  assert tool("0.1 + 0.2").output == "0.3"
  assert tool("10 / 4").output == "2.5"
  bad = tool("__import__('os').system('rm -rf /')")
  assert not bad.ok and bad.output.startswith("Error:") and bad.error
  assert not tool(None).ok  # a tool never raises, whatever it is given
